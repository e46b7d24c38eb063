// Evaluation of an aligned speech encoder (`undertone eval`, docs/evaluation.md).
//
// On the utterances of one split (speaker-disjoint from the probe's training
// split) and the 4 emotion classes, every system gets:
//   probe    linear probe (multinomial logistic regression, L2) on the
//            mean-pooled speech tokens, trained on the train split
//   answer   the LLM's own greedy answer to the auxiliary question (the
//            training prompt of the emotion_question task) mapped to a label
//            by keyword lists (answer_to_class)
//   ranking  teacher-forced mean log-prob of the teacher's 4 emotion-specific
//            answers (emotion task, cached teacher answers); correct when the
//            true emotion's answer scores highest
//   fidelity the greedy answer to the semantic prompt vs the teacher's answer
//            to the transcript: ROUGE-L F1 over words and cosine of the
//            mean-pooled final hidden states of the two answers
// Systems: the trained projector, baseline projectors (e.g. stage 1 only), the
// frozen Whisper encoder (probe only), the transcript-only text cascade, the
// oracle (the teacher's own text prompt with the emotion stated: what the LLM
// does when it is told the emotion), chance.
//
// This header is torch-free: label mapping, ROUGE-L, result structs, writers
// and plots live in models/evaluation.cpp; run_evaluation() is implemented in
// models/nn/evaluation.cpp (library undertone_models).
#pragma once

#include <cmath>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "models/manifest.hpp"

namespace undertone::models {

// ---------------------------------------------------------------- label mapping

/// Keywords of one class (lowercase; a keyword of several words matches that
/// word sequence).
struct class_keywords {
  emotion_label label;
  std::vector<std::string> words;
};
/// The keyword lists of the 4 classes, in four_class_labels() order.
const std::vector<class_keywords>& answer_keywords();

/// Maps a free-text answer to a class index (four_class_labels() order), or
/// -1 ("unknown") when no class or more than one class matches. Matching is
/// over lowercase words (word_tokens); a keyword preceded within 3 words by a
/// negation (not, no, never, nor, neither, without, hardly, a word ending in
/// n't) is ignored, and so is "happy/glad/pleased to" ("happy to help").
int answer_to_class(const std::string& answer);

/// Lowercase words of a text: runs of letters, digits, apostrophes and non-ASCII
/// bytes (U+2019 counts as an apostrophe); everything else separates.
std::vector<std::string> word_tokens(const std::string& text);

/// ROUGE-L F1 of a candidate against a reference (LCS length l; P = l/|cand|,
/// R = l/|ref|, F1 = 2PR/(P+R)); 1 when both are empty, 0 when one is.
double rouge_l_f1(const std::vector<std::string>& candidate, const std::vector<std::string>& reference);

// ---------------------------------------------------------------- results

/// One classification metric of one system over the 4 classes.
struct class_metric {
  bool available = false;
  /// Confusion counts [4 true classes][5 predictions: 4 classes + unknown].
  std::vector<std::vector<int64_t>> confusion = std::vector<std::vector<int64_t>>(4, std::vector<int64_t>(5, 0));
  /// Analytic accuracy for a row without predictions (chance); NaN otherwise.
  double expected = NAN;

  /// Records one prediction (`pred` -1 = unknown).
  void add(int truth, int pred);
  int64_t n() const;
  int64_t correct() const;
  int64_t unknown() const;
  /// correct / n (or `expected`); NaN when nothing was counted.
  double accuracy() const;
  /// Accuracy within true class c (recall); NaN when the class is absent.
  double recall(int c) const;
  double unknown_rate() const;
  nlohmann::json to_json() const;
};

/// Everything measured for one system (one row of the table).
struct system_result {
  std::string name;         ///< short id used in file names: "speech", "stage1", "encoder", "text", "oracle", "chance"
  std::string description;  ///< what it is, e.g. the projector path
  class_metric probe, answer, ranking;
  double rouge_l = NAN;        ///< mean ROUGE-L F1 (NaN = not measured)
  double hidden_cosine = NAN;  ///< mean cosine of mean-pooled final hidden states
  bool fidelity_reference = false;  ///< the teacher answer itself (the text cascade): 1 by definition
  nlohmann::json utterances = nlohmann::json::array();  ///< per utterance: answers, scores, predictions
  double seconds = 0;          ///< wall time spent on this system
};

/// The whole evaluation.
struct eval_report {
  nlohmann::json setup;           ///< options, models, counts (for eval.json / the model card)
  std::vector<int64_t> class_counts = std::vector<int64_t>(4, 0);  ///< eval utterances per class
  int64_t probe_train = 0;        ///< probe training utterances
  std::vector<system_result> systems;
  double seconds = 0;
};

// ---------------------------------------------------------------- running

/// A projector to evaluate: a projector checkpoint (projector.safetensors), a
/// trainer checkpoint (trainables.safetensors) or a training run directory
/// (its projector.safetensors, else its latest checkpoint). Empty path: a
/// freshly initialized projector (seed, hidden width below) - a sanity floor.
struct eval_system_spec {
  std::string name;  ///< [A-Za-z0-9_-]+, unique
  std::string projector;
};

struct eval_options {
  std::vector<std::string> manifests;   ///< JSONL manifests (read_manifest)
  std::vector<utterance> utterances;    ///< used instead of manifests when non-empty
  std::string split = "val";            ///< evaluated split
  std::string probe_split = "train";    ///< the probe's training split (must share no speaker with `split`)
  bool calm_as_neutral = false;         ///< fold calm into neutral (else calm is excluded)
  int64_t max_eval = 0;                 ///< at most N evaluated utterances (0 = all), class-balanced subset
  int64_t max_probe_train = 0;          ///< at most N probe training utterances (0 = all)
  uint64_t seed = 1;                    ///< subsets and fresh projectors

  std::vector<eval_system_spec> systems;  ///< the first is "the" system; the others are baselines
  bool text_baseline = true;              ///< transcript-only cascade row
  bool oracle = true;                     ///< emotion-stated text row (the teacher's prompt)
  bool encoder_probe = true;              ///< probe on the frozen encoder's mean-pooled frames
  int64_t fresh_hidden = 1024;            ///< hidden width of a freshly initialized projector

  std::string llm_path;                 ///< GGUF file or HF directory
  std::string llm_device = "cpu";
  std::string llm_dtype = "fp32";       ///< fp32 | bf16 (evaluation forwards and generation)
  std::string chat_template = "auto";
  std::string encoder_path;             ///< Whisper (CT2 directory or HF)
  std::string encoder_device = "cpu";
  int64_t chunk_ms = 320;               ///< block-causal encoder chunk (as in training)
  int64_t context_blocks = -1;          ///< encoder window (-1 = as many as fit)
  int64_t stack_frames = 8;             ///< projector stack of a fresh projector
  std::string mel_normalization = "causal";

  std::string cache_dir;                ///< teacher answers + features (the trainer's cache)
  int64_t max_response_tokens = 48;     ///< teacher answer cap (part of the cache key; as in training)
  std::string teacher_dtype = "fp32";   ///< as in training (part of the cache key)
  int64_t teacher_batch = 16;
  int64_t answer_tokens = 24;           ///< cap of the LLM's answer to the emotion question
  int64_t batch = 8;                    ///< sequences per generation / scoring forward
  double probe_l2 = 1e-3;               ///< L2 weight of the probe (on the mean cross-entropy)
  int64_t probe_iterations = 300;       ///< LBFGS iterations (full batch)

  int progress_tty = -1;                ///< -1 detect, 0 lines, 1 bar
  bool quiet = false;                   ///< no progress output
  /// Status lines ("LLM loaded", teacher stats, ...); default: stdout unless quiet.
  std::function<void(const std::string&)> log;
};

/// Runs the evaluation (models/nn/evaluation.cpp). Throws std::runtime_error
/// naming the file/option for missing models, an empty split, a speaker that
/// occurs in both the evaluated and the probe's training split, or a projector
/// that does not fit the LLM/encoder.
eval_report run_evaluation(const eval_options& opt);

// ---------------------------------------------------------------- writers

/// The markdown report: one summary table (rows = systems; columns = probe
/// accuracy, answer accuracy and unknown rate, ranking accuracy, ROUGE-L,
/// hidden-state cosine), then per-class recall tables for each metric.
std::string eval_markdown(const eval_report& r);
nlohmann::json eval_json(const eval_report& r);

/// Draws a confusion matrix (rows = true class, columns = predicted class and,
/// when any prediction was unknown, "unknown"; colour = row-normalized share,
/// label = count) into `png` with gnuplot; also writes png minus ".png" + ".tsv"
/// and ".gp". Returns "" on success, else why not.
std::string plot_confusion(const class_metric& m, const std::string& png, const std::string& title);

/// Writes DIR/eval.md, DIR/eval.json and DIR/confusion_<system>_<metric>.png
/// for every measured classification metric. Returns the problems met while
/// plotting (e.g. gnuplot missing); the md/json files are always written.
std::vector<std::string> write_eval_outputs(const eval_report& r, const std::string& dir);

}  // namespace undertone::models
