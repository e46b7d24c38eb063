// Behavioral alignment of a speech encoder to a frozen LLM (Kang et al. 2024,
// "Frozen Large Language Models Can Perceive Paralinguistic Aspects of Speech")
// with BLSP-Emo's two stages. See docs/training.md for the recipe and numbers.
//
//  1. Teacher targets. For an utterance (transcript T, emotion E) the frozen LLM
//     answers a *text* chatml prompt, greedily (max_tokens); its answer R is the
//     target. Tasks (template version k_alignment_template_version):
//       semantic          user = T                                   (stage 1)
//       emotion           user = "[The speaker sounds sad.] T"        (stage 2)
//       emotion_question  user = "[The speaker sounds sad.] T\nHow does the speaker feel?"  (auxiliary)
//     The emotion is stated inside the user message (not as a system line) so
//     that the speech tokens replace exactly the part of the prompt that carried
//     both the words and the emotion, and the system prompt (the model's
//     default) is the same for teacher and student. Answers are cached on disk
//     (teacher_cache), keyed by the LLM's identity, the template version, task,
//     transcript, emotion and max_tokens.
//  2. Student prompt: the same chatml text with the user message's content
//     replaced by speech tokens (projector(encoder(log-mel))), followed for the
//     auxiliary task by "\nHow does the speaker feel?":
//       <|im_start|>system\n{default}<|im_end|>\n<|im_start|>user\n[speech][\nQ]<|im_end|>\n<|im_start|>assistant\n R <|im_end|>
//  3. Loss: cross-entropy on R's tokens plus the end-of-turn token (when the
//     teacher ended its answer), through the frozen LLM; optionally + KL(teacher
//     || student) at temperature tau on the same positions, the teacher's
//     logits coming from the text prompt on the fly (no grad).
//  4. Trainable: the projector and optionally the top N encoder layers. The LLM
//     never changes (no parameter requires grad; AdamW only sees trainables).
//
// Everything is deterministic for a given seed and thread count, and a run
// stopped at a checkpoint and resumed reproduces the uninterrupted run bit for
// bit (state: trainables, AdamW moments, step, data-sampler position, seed).
#pragma once

#include <torch/nn/module.h>
#include <torch/types.h>

#include <cmath>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "models/chat_template.hpp"
#include "models/manifest.hpp"
#include "models/mel.hpp"
#include "models/nn/llama.hpp"
#include "models/nn/projector.hpp"
#include "models/nn/whisper_encoder.hpp"
#include "models/tokenizer.hpp"

namespace undertone::models {

/// Version of the teacher/student prompt wording; part of every teacher cache
/// key, bump it whenever the wording below changes.
inline constexpr const char* k_alignment_template_version = "align-v1";
/// The auxiliary question.
inline constexpr const char* k_emotion_question = "How does the speaker feel?";

/// What the teacher is asked.
enum class alignment_task { semantic, emotion, emotion_question };
std::string to_string(alignment_task t);
/// "semantic" | "emotion" | "emotion_question"; throws std::invalid_argument.
alignment_task parse_alignment_task(const std::string& s);

/// Which examples a training run uses: stage 1 (semantic), stage 2 (emotion +
/// auxiliary), or both in sequence (semantic for the first part of the steps).
enum class alignment_stage { semantic, emotion, both };
std::string to_string(alignment_stage s);
/// "semantic" | "emotion" | "both"; throws std::invalid_argument.
alignment_stage parse_alignment_stage(const std::string& s);

/// "The speaker sounds sad." (neutral: "The speaker sounds neutral.", whisper:
/// "The speaker is whispering."). Throws std::invalid_argument for unlabeled.
std::string emotion_cue(emotion_label e);

/// The teacher's user message for (task, transcript, emotion); see the table above.
std::string teacher_user_text(alignment_task task, const std::string& transcript, emotion_label emotion);

// ---------------------------------------------------------------- the frozen LLM

/// The frozen LLM with what the trainer needs around it.
struct alignment_llm {
  std::shared_ptr<llama_model> model;
  std::shared_ptr<tokenizer> tok;
  chat_template templ;
  std::string path;      ///< checkpoint file or directory
  std::string identity;  ///< cache identity: "name|bytes|mtime" per file (see llm_identity)
  int32_t end_of_turn = -1;  ///< the chat format's end-of-turn token (<|im_end|>, <|eot_id|>)

  /// Loads model, tokenizer and template ("auto": from the model). Throws std::runtime_error.
  static alignment_llm load(const std::string& path, const llama_options& opt = {},
                            const std::string& chat_template_name = "auto");

  /// Token ids of the teacher's text prompt (chat template with the model's
  /// default system prompt, generation prompt appended).
  std::vector<int32_t> teacher_prompt(alignment_task task, const std::string& transcript,
                                      emotion_label emotion) const;
  /// Token ids of a one-turn chat prompt whose user message is `user_text`
  /// (default system prompt, generation prompt appended; BOS when the model adds one).
  /// teacher_prompt() is text_prompt(teacher_user_text(...)).
  std::vector<int32_t> text_prompt(const std::string& user_text) const;
  /// Token ids before and after the speech tokens of the student prompt.
  std::pair<std::vector<int32_t>, std::vector<int32_t>> student_prompt(alignment_task task) const;
};

/// Identity of an LLM checkpoint for cache keys, cheap to compute: for a file
/// "filename|size|mtime_ns"; for a directory the same for each file, sorted.
/// (A sha256 of a multi-GB file would cost seconds on every run; size + mtime
/// + name changes whenever the file is replaced.)
std::string llm_identity(const std::string& path);

// ---------------------------------------------------------------- teacher

struct teacher_request {
  alignment_task task = alignment_task::semantic;
  std::string transcript;
  emotion_label emotion = emotion_label::neutral;  ///< ignored (set to unlabeled) for semantic
  bool operator<(const teacher_request& o) const;
  bool operator==(const teacher_request& o) const;
};

struct teacher_response {
  std::vector<int32_t> tokens;  ///< the answer, without the end-of-turn token
  std::string text;             ///< decoded answer
  bool ended = false;           ///< the teacher emitted a stop token (else max_tokens cut it)
};

/// Teacher answers on disk: `dir`/teacher.jsonl, one line per answer with its
/// key (sha256 of identity, template version, task, transcript, emotion,
/// max_tokens) and the readable fields. Append-only; a torn last line (crash)
/// is ignored; the first entry for a key wins.
class teacher_cache {
 public:
  teacher_cache(const std::string& dir, std::string llm_identity, int64_t max_tokens);
  /// The cache key of a request.
  std::string key(const teacher_request& r) const;
  std::optional<teacher_response> find(const teacher_request& r) const;
  /// Stores and appends to the file (flushed).
  void put(const teacher_request& r, const teacher_response& resp);
  size_t size() const { return entries_.size(); }
  const std::string& file() const { return file_; }

 private:
  std::string file_, identity_;
  int64_t max_tokens_;
  std::map<std::string, teacher_response> entries_;
};

struct teacher_options {
  int64_t max_tokens = 48;  ///< answer cap, tokens
  int64_t batch = 16;       ///< sequences decoded together in one batched step
};

struct teacher_stats {
  size_t requests = 0, hits = 0, generated = 0;
  int64_t tokens = 0;   ///< tokens generated (misses only)
  double seconds = 0;   ///< generation wall time
};

/// A generation prompt: token ids, then optional embedding rows (speech
/// tokens, [n, d_model], any float dtype), then more token ids.
struct prompt_input {
  std::vector<int32_t> pre;
  torch::Tensor embeds;  ///< [n, d_model] or undefined
  std::vector<int32_t> post;
};

/// Greedy continuations of `prompts` (at most `max_tokens` each), `batch`
/// sequences per batched step (prefill of all prompts in one step, then one row
/// per unfinished sequence per step). A stop token ends a sequence (ended =
/// true, not part of tokens); text is the decoded answer with ill-formed UTF-8
/// replaced by U+FFFD. No autograd.
std::vector<teacher_response> greedy_generate(const alignment_llm& llm, const std::vector<prompt_input>& prompts,
                                              int64_t max_tokens, int64_t batch);

/// Greedy answers for `reqs`, `opt.batch` sequences per batched step (prefill
/// of all prompts in one step, then one row per unfinished sequence per step).
/// No cache.
std::vector<teacher_response> generate_teacher(const alignment_llm& llm, const std::vector<teacher_request>& reqs,
                                               const teacher_options& opt);

/// Cached answers for `reqs` (duplicates resolved once); misses are generated
/// in batches and appended to the cache. `progress(done, total)` after each batch.
std::vector<teacher_response> teacher_responses(const alignment_llm& llm, teacher_cache& cache,
                                                const std::vector<teacher_request>& reqs, const teacher_options& opt,
                                                teacher_stats* stats = nullptr,
                                                const std::function<void(size_t, size_t)>& progress = {});

/// "fp32" -> kFloat32, "bf16" -> kBFloat16; anything else throws
/// std::invalid_argument("<what> '<s>' is not fp32 or bf16").
torch::Dtype llm_dtype_of(const std::string& s, const std::string& what);

/// teacher_responses() with the answers generated in `teacher_dtype` ("fp32" /
/// "bf16", the dtype that is part of the cache's identity) although `llm` may
/// run in another one (llm_options.dtype): only when the cache misses an answer
/// AND the dtypes differ is a second copy of the LLM (llm.path, llm_options
/// with the teacher dtype, `chat_template_name`) loaded for the generation and
/// freed afterwards; otherwise `llm` answers (or nothing is generated).
/// Throws std::invalid_argument (via llm_dtype_of, message "<what_prefix>teacher
/// dtype ...") for an unknown teacher_dtype when a generation is needed.
std::vector<teacher_response> teacher_responses_in_dtype(
    const alignment_llm& llm, const llama_options& llm_options, const std::string& teacher_dtype,
    const std::string& chat_template_name, teacher_cache& cache, const std::vector<teacher_request>& reqs,
    const teacher_options& opt, teacher_stats* stats = nullptr,
    const std::function<void(size_t, size_t)>& progress = {}, const std::string& what_prefix = "");

// ---------------------------------------------------------------- features

/// Per-utterance encoder inputs, computed once and cached on disk
/// (`dir`/features/<key>.safetensors; key = sha256 of the audio file's path,
/// size and mtime, the mel config and, for encoder outputs, the encoder's
/// identity, chunk and window). With `encoder_outputs` the cache holds the
/// frozen encoder's block-causal outputs [T_enc, d_enc] (what streaming
/// produces), which makes training much cheaper when no encoder layer is
/// trained; otherwise log-mel frames [T_mel, n_mels].
class feature_store {
 public:
  feature_store(const std::string& dir, const mel_config& mel, std::shared_ptr<whisper_encoder> encoder,
                std::string encoder_identity, bool encoder_outputs);
  /// Loads or computes the features of every utterance (kept in memory,
  /// float32 on the CPU). `progress(done, total)` after each.
  void prepare(const std::vector<utterance>& utts, const std::function<void(size_t, size_t)>& progress = {});
  /// Features of utterance i of the prepared list.
  const torch::Tensor& get(size_t i) const { return feats_.at(i); }
  size_t size() const { return feats_.size(); }
  bool encoder_outputs() const { return encoder_outputs_; }
  size_t cache_hits() const { return hits_; }

 private:
  std::string dir_;
  mel_config mel_;
  std::shared_ptr<whisper_encoder> encoder_;
  std::string encoder_identity_;
  bool encoder_outputs_;
  std::vector<torch::Tensor> feats_;
  size_t hits_ = 0;
};

// ---------------------------------------------------------------- examples and batches

/// One training example: an utterance, a task and the teacher's answer.
struct alignment_example {
  size_t utt = 0;  ///< index into the feature_store / utterance list
  alignment_task task = alignment_task::semantic;
  std::vector<int32_t> response;        ///< R (without end of turn)
  bool ended = false;                    ///< R is followed by the end-of-turn token in the loss
  std::vector<int32_t> teacher_prompt;  ///< text prompt ids (for the KL term)
};

/// A padded batch (right padding), on the LLM's device.
struct alignment_batch {
  torch::Tensor embeds;          ///< [B, T, d_model] float32; differentiable w.r.t. the speech tokens
  torch::Tensor attention_mask;  ///< [B, T] int64, 1 = real
  torch::Tensor targets;         ///< [B, T] int64: the token that follows position t (0 where none)
  torch::Tensor loss_mask;       ///< [B, T] bool: t predicts a response token or the end of turn
  torch::Tensor teacher_ids;     ///< [B, T2] int64 text prompt + R (+ eot), right padded (KL only)
  torch::Tensor teacher_mask;    ///< [B, T2] int64
  torch::Tensor teacher_loss_mask;  ///< [B, T2] bool, same count per row as loss_mask
  int64_t n_tokens = 0;          ///< loss positions over the batch
};

struct loss_options {
  double ce_weight = 1.0;
  double kl_weight = 0.0;       ///< 0 = no teacher forward
  double kl_temperature = 1.0;  ///< tau; the KL is multiplied by tau^2
};

struct loss_value {
  torch::Tensor loss;  ///< scalar, differentiable
  double ce = 0, kl = 0;
  int64_t tokens = 0;
};

/// The speech encoder + projector being trained, and the frozen LLM.
struct speech_model {
  std::shared_ptr<whisper_encoder> encoder;  ///< may be null when features are encoder outputs
  std::shared_ptr<projector> proj;
  int64_t trainable_encoder_layers = 0;
  /// Speech tokens [n, d_model] of one utterance's features (encoder outputs
  /// or log-mel, as the feature store holds), differentiable w.r.t. the trainables.
  torch::Tensor speech_tokens(const torch::Tensor& features, bool features_are_encoder_outputs);
  /// Every trainable tensor with a name ("projector.gate_weight", "encoder.layers.3.fc1.weight", ...).
  std::vector<std::pair<std::string, torch::Tensor>> trainables();
};

/// A right-padded batch of sequences `prefixes[i]` (embedding rows [P_i,
/// d_model]) followed by the tokens `continuations[i]`; the loss positions are
/// those that predict the last `scored[i]` continuation tokens (embeds,
/// attention_mask, targets, loss_mask and n_tokens are set; no teacher side).
/// Differentiable w.r.t. the prefixes.
alignment_batch continuation_batch(const alignment_llm& llm, const std::vector<torch::Tensor>& prefixes,
                                   const std::vector<std::vector<int32_t>>& continuations,
                                   const std::vector<int64_t>& scored);

/// Logits [N, n_vocab] (float32) at the loss positions of `b` (row-major: row
/// 0's positions first), from one student forward (hidden states for the whole
/// batch, the LM head only at the loss positions).
torch::Tensor loss_position_logits(const alignment_llm& llm, const alignment_batch& b);

/// Teacher-forced log-likelihood per row of `b`: {sum of log p(target) over the
/// row's loss positions, number of those positions} (double, [B] each, CPU).
std::pair<torch::Tensor, torch::Tensor> row_log_likelihood(const alignment_llm& llm, const alignment_batch& b);

/// Builds the padded student batch (and the teacher's text batch when
/// `with_teacher`) for `examples`, taking features from `feats`.
alignment_batch collate(const alignment_llm& llm, speech_model& sm, const feature_store& feats,
                        const std::vector<const alignment_example*>& examples, bool with_teacher);

/// The loss of a batch: CE over loss_mask positions (mean per token) and the
/// optional KL term. Runs the student forward (hidden states only; logits only
/// at loss positions) and, when kl_weight > 0, the teacher forward under no_grad.
loss_value alignment_loss(const alignment_llm& llm, const alignment_batch& b, const loss_options& opt);

/// One example per (utterance, task) with the teacher's answer (from `cache`,
/// generating the misses): the semantic task for every utterance with a
/// transcript, the emotion tasks for utterances whose label is not unlabeled
/// and passes `use_label`. Example .utt is the index into `utts`.
std::vector<alignment_example> build_examples(const alignment_llm& llm, teacher_cache& cache,
                                              const std::vector<utterance>& utts,
                                              const std::vector<alignment_task>& tasks,
                                              const std::function<bool(emotion_label)>& use_label,
                                              const teacher_options& topt, teacher_stats* stats = nullptr,
                                              const std::function<void(size_t, size_t)>& progress = {});

/// The tasks of a stage: semantic -> {semantic}; emotion -> {emotion,
/// emotion_question}; both -> all three.
std::vector<alignment_task> stage_tasks(alignment_stage s);

// ---------------------------------------------------------------- trainer

struct train_options {
  alignment_stage stage = alignment_stage::emotion;
  int64_t steps = 1000;          ///< optimizer steps
  int64_t batch = 4;             ///< examples per micro-batch
  int64_t accum = 1;             ///< micro-batches per optimizer step
  double lr = 1e-3;              ///< peak learning rate
  double min_lr_ratio = 0.1;     ///< cosine decays to lr * this
  int64_t warmup = 50;           ///< linear warmup steps
  double weight_decay = 0.01;    ///< AdamW, on matrices only
  double beta1 = 0.9, beta2 = 0.999, eps = 1e-8;
  double clip = 1.0;             ///< global grad-norm clip; 0 = off
  double semantic_fraction = 0.3;  ///< stage both: share of steps spent on stage 1
  loss_options loss;
  int64_t val_every = 100;       ///< steps; 0 = only at the end
  int64_t val_examples = 64;     ///< validation examples used (fixed subset)
  int64_t ckpt_every = 100;      ///< steps; 0 = only at the end
  int64_t keep_checkpoints = 2;  ///< newest step directories kept
  uint64_t seed = 1;             ///< data order
  std::string out_dir;           ///< checkpoints, metrics.jsonl, loss.png, final weights
  bool plot = true;              ///< draw loss.png at the end (needs gnuplot)
  int progress_tty = -1;         ///< -1 detect, 0 lines, 1 bar
  bool quiet = false;            ///< no progress output
  std::string to_string() const;
};

/// Learning rate at `step` (0-based): linear warmup to lr over `warmup` steps,
/// then cosine decay to lr * min_lr_ratio at `steps`.
double lr_at(const train_options& o, int64_t step);

/// AdamW over named tensors (PyTorch's algorithm, decoupled weight decay),
/// with state that serializes exactly (safetensors).
class adamw {
 public:
  adamw(std::vector<std::pair<std::string, torch::Tensor>> params, double beta1, double beta2, double eps,
        double weight_decay);
  /// One update with the current .grad() of every parameter (a missing grad counts as zero).
  void step(double lr);
  void zero_grad();
  int64_t steps() const { return t_; }
  /// Moments as named tensors ("m.<name>", "v.<name>") for a checkpoint.
  std::vector<std::pair<std::string, torch::Tensor>> state() const;
  /// Restores moments and the step count; throws naming a missing/misshapen tensor.
  void load_state(const std::map<std::string, torch::Tensor>& st, int64_t t);
  const std::vector<std::pair<std::string, torch::Tensor>>& params() const { return params_; }

 private:
  std::vector<std::pair<std::string, torch::Tensor>> params_;
  std::vector<torch::Tensor> m_, v_;
  double b1_, b2_, eps_, wd_;
  int64_t t_ = 0;
};

/// Global L2 norm of the gradients; scales them down to `max_norm` when above
/// (max_norm <= 0: only measures).
double clip_grad_norm(const std::vector<std::pair<std::string, torch::Tensor>>& params, double max_norm);

/// Deterministic example order: per phase (stage-1 / stage-2 pool) an epoch
/// counter and a cursor; epoch e is a permutation drawn from (seed, phase, e).
struct data_sampler {
  struct phase_state {
    int64_t epoch = 0, cursor = 0;
  };
  uint64_t seed = 1;
  phase_state phases[2];
  /// The next `n` indices into a pool of `pool` examples for `phase` (0, 1).
  std::vector<size_t> next(int phase, size_t pool, size_t n);
};

/// Runs alignment training with checkpoints in opt.out_dir:
///   checkpoints/step-NNNNNNN/{trainables.safetensors, optimizer.safetensors, state.json}
///   (each written to a temporary directory, fsynced, renamed), `latest`
///   (the newest step directory's name, replaced atomically), metrics.jsonl,
///   loss.png, and at the end projector.safetensors (+ encoder_layers.safetensors
///   when encoder layers were trained).
class alignment_trainer {
 public:
  /// `train_sem`/`train_emo` are the stage-1 and stage-2 pools (either may be
  /// empty when its stage is unused); `val` the validation examples.
  alignment_trainer(const alignment_llm& llm, speech_model& sm, const feature_store& train_feats,
                    const feature_store* val_feats, std::vector<alignment_example> train_sem,
                    std::vector<alignment_example> train_emo, std::vector<alignment_example> val,
                    train_options opt);

  /// Loads the newest checkpoint in opt.out_dir if there is one; returns its
  /// step (0 if none). Throws if it was written with a different batch,
  /// accumulation, seed, stage or trainable set.
  int64_t resume();
  /// Trains from the current step to `stop_at` (default opt.steps); saves a
  /// checkpoint every ckpt_every steps and at the end; validates every
  /// val_every steps and at the end. Returns the last train loss.
  double train(int64_t stop_at = -1);
  /// Mean CE (and KL) over the validation examples, no grad.
  loss_value validate();
  /// Writes a checkpoint for the current step (atomically) and prunes old ones.
  std::string save_checkpoint();
  /// Writes projector.safetensors (and encoder_layers.safetensors) into out_dir.
  void export_weights() const;
  int64_t step() const { return step_; }
  const train_options& options() const { return opt_; }
  /// Test hook: called after each checkpoint file is written inside the
  /// temporary directory (name of the file); throwing from it simulates a crash.
  std::function<void(const std::string&)> on_checkpoint_file;
  /// Called after every optimizer step with the new step count and that step's
  /// train loss; returning false stops train() after this step (the stop is
  /// handled as reaching `stop_at`: a checkpoint is written). Progress and
  /// cancellation for callers such as the online fine-tuner (models/finetune.hpp).
  std::function<bool(int64_t step, double loss)> on_step;

 private:
  int phase_at(int64_t step) const;
  std::vector<const alignment_example*> next_batch(int phase);

  const alignment_llm& llm_;
  speech_model& sm_;
  const feature_store& train_feats_;
  const feature_store* val_feats_;
  std::vector<alignment_example> pools_[2];
  std::vector<alignment_example> val_;
  train_options opt_;
  std::unique_ptr<adamw> optim_;
  data_sampler sampler_;
  int64_t step_ = 0;
  double last_val_ = NAN;
};

/// Loads trainables written by save_trainables (projector and encoder layers)
/// into `sm`; throws naming a missing or misshapen tensor.
void load_trainables(speech_model& sm, const std::string& path);
/// Writes the named trainables (float32) atomically.
void save_trainables(speech_model& sm, const std::string& path, const std::map<std::string, std::string>& meta = {});

}  // namespace undertone::models
