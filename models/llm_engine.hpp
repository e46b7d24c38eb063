// Continuous batching over many conversations, behind a torch-free header
// (implementation: models/nn/llm_engine.cpp). This is what the engine's LLM
// worker actor drives; `chat_llm` stays the one-call-at-a-time facade for chat,
// training and tests.
//
// Model (llama.cpp server's slots):
//   - A *slot* is one conversation: a sequence id in the KV cache, a queue of
//     prompt rows not yet prefilled, and at most one answer being generated.
//   - append() queues rows (text -> tokens, or speech-token embeddings). Rows are
//     prefilled by step() in chunks while the user is still speaking, so when
//     the turn ends only the tail and the assistant header remain.
//   - generate() asks for an answer once every queued row is prefilled; step()
//     then adds one decode row per generating slot per call.
//   - step() makes ONE batched forward over all slots: decode rows of generating
//     slots first (latency), then prefill rows of other slots up to
//     max_rows_per_step (round robin between slots, so one long prompt cannot
//     starve the others). It returns what happened: text deltas (complete UTF-8
//     characters, stop strings held back) and finished answers with timings.
//   - cancel() stops an answer (barge-in): with keep_answer = false the KV cache
//     is truncated to where the answer began, so the next turn continues from
//     the user's last words.
//
// The context after an answer: the prompt rows plus every token of
// generation_result::tokens (so also the token that completed a stop string);
// the stop token itself (e.g. <|im_end|>) is NOT in it. The last answer token
// is queued (prefilled by the next step), the others are in the KV cache. The
// caller therefore appends the template's whole assistant tail
// ("<|im_end|>\n" for chatml) whatever the stop reason, and the context equals
// the chat template rendered over the answer's tokens.
//
// Errors: misuse throws from the call (std::logic_error: wrong state;
// std::invalid_argument: bad slot id or arguments; std::runtime_error: the
// context limit). step() never throws for one slot's problem: a slot that finds
// no free KV cell (llm.kv_cells) gets an error event; its answer stops and its
// queued rows are dropped.
//
// Threads: not thread-safe; one owner (the worker actor) calls everything.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "models/chat_llm.hpp"

namespace undertone::models {

struct llm_engine_options {
  chat_llm_options llm;            ///< model, device, dtype, context and KV capacity
  int64_t max_slots = 64;          ///< concurrent conversations
  int64_t max_rows_per_step = 256; ///< rows (decode + prefill) in one forward
};

/// One thing step() reports.
struct llm_event {
  enum class kind { delta, finished, error };
  kind what = kind::delta;
  int32_t slot = -1;
  uint64_t answer_id = 0;       ///< the id generate() returned
  std::string text;             ///< delta: new text; finished: the whole answer; error: message
  generation_result result;     ///< finished only: tokens, stop_reason, timings (prefill_s = time from
                                ///< generate() until its pending rows were prefilled; prompt_tokens =
                                ///< context rows at generate(), reused_tokens = of those already prefilled)
};

class llm_engine {
 public:
  /// Loads the model (same loaders as chat_llm); throws std::runtime_error.
  explicit llm_engine(const llm_engine_options& opt);
  ~llm_engine();
  llm_engine(const llm_engine&) = delete;
  llm_engine& operator=(const llm_engine&) = delete;

  std::string describe() const;
  int64_t d_model() const;
  const chat_template& templ() const;
  std::vector<int32_t> tokenize(const std::string& text) const;
  /// A short identity of the loaded weights ("SmolLM2-135M-Instruct.Q4_1.gguf|98362432"),
  /// recorded with every answer.
  std::string model_version() const;

  /// A new empty conversation; throws std::runtime_error when max_slots are in use.
  int32_t open_slot();
  /// Frees the slot's KV cells; any answer in progress is dropped silently.
  /// No-op for a slot that is not open.
  void close_slot(int32_t slot);
  bool has_slot(int32_t slot) const;

  /// Queues prompt rows for `slot`. Text is tokenized with special tokens
  /// parsed (BOS prepended when it opens an empty context and the tokenizer
  /// wants one); embeddings are [n, d_model] float32 row-major, copied
  /// (n_embeddings = 0 means size / d_model). Throws std::logic_error while the
  /// slot is generating (cancel first), std::invalid_argument for embeddings
  /// whose size is not a multiple of d_model (or not n_embeddings x d_model) and
  /// for a part with both text and embeddings, std::runtime_error if the slot
  /// would exceed context_tokens (nothing is queued then; the caller applies
  /// its context policy and retries).
  void append(int32_t slot, const prompt_part& part);
  /// Starts an answer after the queued rows; returns its id (unique per engine).
  /// The answer's first token comes from the logits of the context's last row
  /// (in the step that prefills it; if nothing is queued that row is computed
  /// again, which needs it to be a token or the last row of the latest append).
  /// Its token budget is min(req.max_tokens, context_tokens - context_rows);
  /// running out of the context ends it with stop_reason "context".
  /// Throws std::logic_error if the slot is already generating or is empty,
  /// std::invalid_argument if req.max_tokens < 1, std::runtime_error if the
  /// context already holds context_tokens rows (no room for an answer).
  uint64_t generate(int32_t slot, const generation_request& req);
  /// Stops the slot's answer (no finished event follows; a pending generate() is
  /// dropped too). keep_answer = false also removes the answer's rows from the
  /// KV cache (context_rows() returns to its value at generate()); keep_answer =
  /// true keeps every token sampled so far (the last one queued). Queued, not
  /// yet prefilled prompt rows of a pending generate() are always dropped.
  /// No-op when the slot has no answer running or pending (e.g. it just finished).
  void cancel(int32_t slot, bool keep_answer);
  /// Keeps only the first n_rows rows of the slot's context (KV truncate; no-op
  /// if it has fewer). Throws std::logic_error while the slot is generating.
  void truncate(int32_t slot, int64_t n_rows);

  // The queries below throw std::invalid_argument for a slot that is not open.

  /// Rows in the slot's context: prefilled + queued.
  int64_t context_rows(int32_t slot) const;
  /// Rows prefilled into the KV cache.
  int64_t prefilled_rows(int32_t slot) const;
  /// True from generate() until the answer finished, failed or was cancelled.
  bool is_generating(int32_t slot) const;
  /// True if step() has anything to do.
  bool has_work() const;

  /// One batched forward (see the file comment). Returns events in slot order
  /// (per slot: deltas, then finished or error). A failure that concerns one
  /// slot (its KV cells: llm.kv_cells) becomes an error event for that slot
  /// (answer_id 0 when it had no answer) and stops its answer; other slots
  /// continue. An answer that reaches context_tokens finishes normally with
  /// stop_reason "context".
  std::vector<llm_event> step();

 private:
  struct impl;
  std::unique_ptr<impl> p_;
};

}  // namespace undertone::models
