// Online fine-tuning of the speech projector (issue 7, docs/finetune.md).
//
// One round (finetune_round):
//  1. Data. Training rows = the annotated turns of logged sessions (manifests
//     exported by the session store; every row, whatever its split) plus a
//     replay buffer drawn from the original training manifests (their
//     split = train rows). Rows with a 4-class emotion (calm folded into
//     neutral unless calm_as_neutral = false) give the stage-2 examples
//     (emotion + "How does the speaker feel?"); rows without an emotion
//     ("unlabeled") but with a transcript give the semantic example. Held-out
//     rows = the split val/test rows of the validation manifests; a speaker of
//     the held-out set that also occurs in the training rows is refused.
//  2. Train. The alignment trainer (models/nn/alignment.hpp, same losses,
//     AdamW, warmup + cosine) starts from the current projector and runs
//     `steps` steps of `batch` examples; every batch holds exactly
//     round(replay_ratio * batch) replay examples and the rest session examples.
//  3. Gate. The gate metric is computed on the held-out set for the current
//     projector and for the candidate, with the same frozen LLM and features:
//       val_loss  mean cross-entropy per answer token of the teacher's answers
//                 (stage-2 tasks: emotion + auxiliary question), teacher-forced
//                 (lower is better). Passes iff  candidate <= current + margin.
//       ranking   accuracy of ranking the 4 emotion-specific teacher answers by
//                 mean log-prob (the `ranking acc` of docs/evaluation.md;
//                 higher is better). Passes iff candidate >= current - margin.
//       both      both of the above, each with the same margin.
//     Written as one rule with score = -val_loss or ranking accuracy:
//     decision = score(candidate) >= score(current) - margin.
//  4. Publish. Only when the gate passes is `publish(candidate, meta)` called;
//     its return value is the published version. A round that throws, is
//     cancelled or fails the gate publishes nothing; when publish() itself
//     throws, the round throws (naming the candidate file, which stays on disk).
//
// Callbacks (log, progress, cancelled, publish) are called on the round's own
// thread, not the caller's.
//
// Priority: the round's work runs on a thread of its own with nice `nice`
// (setpriority on that thread id) and `threads` LibTorch/OpenMP threads; the
// OpenMP workers it uses are created by that thread and inherit its nice. The
// caller's thread and every other thread of the process keep their priority
// and thread count (docs/finetune.md, "Priority").
//
// Torch-free header: finetune_round() is implemented in models/nn/finetune.cpp
// (library undertone_models); the rest in models/finetune.cpp.
#pragma once

#include <cstdint>
#include <functional>
#include <stdexcept>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace undertone::models {

/// What decides whether a candidate is published (see the header comment).
enum class gate_metric_kind { val_loss, ranking, both };
std::string to_string(gate_metric_kind g);
/// "val_loss" | "ranking" | "both"; throws std::invalid_argument listing them.
gate_metric_kind parse_gate_metric(const std::string& s);

/// Publishes a gated candidate (e.g. into the encoder registry): the projector
/// file and what the round measured; returns the new version's name. May throw
/// (finetune_round then throws; nothing counts as published).
using publish_fn = std::function<std::string(const std::string& projector_path, const nlohmann::json& meta)>;

struct finetune_options {
  // ---- data
  std::vector<std::string> session_manifests;  ///< annotated logged turns (session store export)
  std::vector<std::string> replay_manifests;   ///< original training data; their split=train rows
  double replay_ratio = 0.5;                   ///< share of every batch from the replay buffer, [0, 1)
  std::vector<std::string> val_manifests;      ///< held-out speakers; their split=val/test rows
  int64_t max_val = 0;                         ///< at most N held-out utterances (0 = all; fixed subset)
  bool calm_as_neutral = true;                 ///< RAVDESS calm -> neutral (as the shipped projector)

  // ---- models (paths already resolved)
  std::string projector;                ///< the projector now serving (the starting point)
  std::string llm_path;                 ///< GGUF file or HF directory (frozen)
  std::string llm_device = "cpu";
  std::string llm_dtype = "fp32";       ///< fp32 | bf16 (training forwards and the gate)
  std::string chat_template = "auto";
  std::string encoder_path;             ///< Whisper (frozen; its outputs are cached)
  std::string encoder_device = "cpu";
  int64_t chunk_ms = 320;
  int64_t context_blocks = -1;          ///< encoder window (-1 = as many as fit)
  std::string mel_normalization = "causal";

  // ---- teacher (part of the cache keys; keep them as in training)
  int64_t max_response_tokens = 32;
  std::string teacher_dtype = "fp32";
  int64_t teacher_batch = 16;

  // ---- training
  int64_t steps = 200;
  int64_t batch = 4;
  double lr = 1e-4;
  int64_t warmup = -1;                  ///< -1 = min(10, steps / 10)
  uint64_t seed = 1;                    ///< data order and replay subset
  std::string cache_dir;                ///< teacher answers + features (the trainer's cache)
  std::string out_dir;                  ///< this round's directory: must not exist or be empty

  // ---- gate
  gate_metric_kind gate_metric = gate_metric_kind::val_loss;
  double gate_margin = 0.01;            ///< in the metric's units (nats/token; accuracy fraction)

  // ---- priority
  int threads = 1;                      ///< LibTorch/OpenMP threads of the round (>= 1)
  int nice = 19;                        ///< nice of the round's thread (0..19; 0 = unchanged)

  // ---- callbacks (all optional)
  publish_fn publish;                   ///< called only when the gate passes
  std::function<void(const std::string&)> log;  ///< status lines
  /// Progress of the current phase: `done` of `total` units ("features",
  /// "teacher", "train", "gate current", "gate candidate"), e.g. train steps.
  std::function<void(const std::string& phase, int64_t done, int64_t total, const std::string& info)> progress;
  /// Polled between steps and phases; true = stop (the round then throws
  /// finetune_cancelled and publishes nothing).
  std::function<bool()> cancelled;
  /// Polled between training steps; while it returns true the round waits
  /// (polling every 0.25 s; cancelled() still stops it). The engine sets it to
  /// "sessions are being served" (finetune.pause_while_sessions): nice alone
  /// does not keep a 2-core machine's serving latency within 20 %
  /// (bench/RESULTS.md), pausing does. A step already running finishes first.
  std::function<bool()> paused;
};

/// Thrown by finetune_round when options.cancelled() said so.
struct finetune_cancelled : std::runtime_error {
  using std::runtime_error::runtime_error;
};

/// One metric for current and candidate.
struct gate_row {
  std::string metric;           ///< "val_loss" | "ranking"
  double current = 0, candidate = 0;
  double margin = 0;
  bool higher_is_better = true;
  bool gating = false;          ///< part of the decision (else reported only)
  bool passed = false;          ///< candidate within margin of current (see the header comment)
  int64_t n = 0;                ///< examples (val_loss: answer tokens; ranking: utterances)
};

struct finetune_result {
  bool passed = false;          ///< the gate passed
  bool published = false;       ///< publish() was called and returned
  std::string published_version;
  std::string reason;           ///< one sentence: why published or not
  std::string candidate;        ///< candidate projector file (written even when not published)
  std::string base_projector;   ///< the projector the round started from
  std::string out_dir;
  std::vector<gate_row> metrics;
  int64_t session_turns = 0;    ///< session rows used (annotated)
  int64_t session_examples = 0, replay_examples = 0, val_utterances = 0, val_examples = 0;
  int64_t steps = 0;
  double first_loss = 0, last_loss = 0;  ///< train loss of the first and last step
  double seconds = 0;                    ///< wall time of the whole round
  double train_seconds = 0, gate_seconds = 0;
  double paused_seconds = 0;             ///< of train_seconds: waiting in options.paused() (serving)
  std::string priority;         ///< what the round ran with ("nice 19, 1 thread")
  nlohmann::json to_json() const;
};

/// Runs one round (see the header comment); blocks until it is done. Throws
/// std::exception for bad inputs (missing/unreadable manifest or audio, no
/// annotated turns, held-out speakers in the training data, projector that
/// does not fit) and finetune_cancelled; publish() is then never called.
/// Implemented in models/nn/finetune.cpp.
finetune_result finetune_round(const finetune_options& opt);

/// The held-out rule: throws std::invalid_argument naming the first speaker
/// of `val_speakers` that occurs in `train_speakers` and where.
void check_held_out(const std::vector<std::pair<std::string, std::string>>& train_speakers,
                    const std::vector<std::pair<std::string, std::string>>& val_speakers);

/// A fresh round directory under `root`: root/round-YYYYmmdd-HHMMSS[-N] (created).
std::string new_round_dir(const std::string& root);

/// Plain-text gate table: metric, current, candidate, margin, rule, decision.
std::string gate_table(const finetune_result& r);

/// The comma-separated list of a config value ("a.jsonl, b.jsonl"), blanks trimmed.
std::vector<std::string> split_list(const std::string& s);

/// How many rows of the manifest(s) a round would use as annotated turns (4-class
/// emotion or a transcript): the count a data source may report.
int64_t count_annotated_turns(const std::vector<std::string>& manifests, bool calm_as_neutral = true);

}  // namespace undertone::models
