// A frozen LLM ready to answer: model + tokenizer + chat template + KV cache +
// sampler, behind a torch-free header (the implementation lives in
// models/nn/chat_llm.cpp). One object serves any number of sequences (one per
// conversation) one call at a time; the engine's batched worker builds on the
// same model directly.
//
// Prompts are lists of parts: text (tokenized with special tokens parsed) or
// embedding rows (speech tokens, [n, d_model] float32 row-major) placed where
// text tokens would be. Consecutive calls for the same sequence reuse the KV
// cache for the longest common token prefix (multi-turn chat costs only the
// new turn).
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "models/chat_template.hpp"
#include "models/sampler.hpp"

namespace undertone::models {

struct chat_llm_options {
  std::string path;                   ///< .gguf file or HF checkpoint directory
  std::string device = "cpu";         ///< cpu | cuda | cuda:N
  std::string dtype = "fp32";         ///< fp32 | bf16 | fp16
  int64_t context_tokens = 2048;      ///< per sequence: prompt + answer, tokens
  int64_t kv_cells = 32768;           ///< KV cache capacity over all sequences, tokens
  int64_t max_batch_rows = 512;       ///< prefill chunk, rows per step
  std::string chat_template = "auto"; ///< auto | chatml | llama-3
  std::string cpu_decode = "auto";    ///< auto | off (llama_options::cpu_decode)
};

/// One piece of a prompt: text, or `n_embeddings` rows of d_model floats.
struct prompt_part {
  std::string text;
  std::vector<float> embeddings;  ///< [n_embeddings * d_model], row-major
  int64_t n_embeddings = 0;
  static prompt_part from_text(std::string t) { return {std::move(t), {}, 0}; }
};

struct generation_request {
  sampling_params sampling;
  int64_t max_tokens = 256;                ///< answer cap, tokens
  std::vector<std::string> stop_strings;   ///< extra stop strings (stop tokens are always honoured)
};

struct generation_result {
  std::string text;             ///< the answer (without stop token/string)
  std::vector<int32_t> tokens;  ///< generated ids (without the stop token)
  int64_t prompt_tokens = 0;    ///< rows in the prompt (tokens + embeddings)
  int64_t reused_tokens = 0;    ///< of those, served from the KV cache
  double prefill_s = 0;         ///< time to process the new prompt rows
  double first_token_s = 0;     ///< from the call to the first streamed token
  double decode_s = 0;          ///< time spent generating after the first token
  std::string stop_reason;      ///< "stop_token" | "stop_string" | "max_tokens" | "context" | "cancelled"
};

class chat_llm {
 public:
  /// Loads model and tokenizer; throws std::runtime_error with a clear message.
  explicit chat_llm(const chat_llm_options& opt);
  ~chat_llm();
  chat_llm(const chat_llm&) = delete;
  chat_llm& operator=(const chat_llm&) = delete;

  /// Model facts for logs ("SmolLM2 ..., 30 layers, d 576, fp32 on cpu").
  std::string describe() const;
  int64_t d_model() const;
  const chat_template& templ() const;
  /// The prompt text for a conversation (chat template applied, generation prompt added).
  std::string format_chat(const std::vector<chat_message>& messages) const;
  /// Token ids of text (special tokens parsed).
  std::vector<int32_t> tokenize(const std::string& text) const;
  /// The input embeddings of token ids, [ids.size() * d_model] row-major: what a
  /// prompt_part of embeddings must look like to stand in for those tokens.
  std::vector<float> embed_tokens(const std::vector<int32_t>& ids) const;

  /// Generates the continuation of `prompt` for sequence `seq`, streaming text
  /// deltas (complete UTF-8 characters, stop strings held back) to `on_text`;
  /// returning false from `on_text` cancels. The answer stays in the KV cache
  /// (so the next turn can reuse it). Throws std::runtime_error if the prompt
  /// alone exceeds context_tokens or the KV cache is full.
  generation_result generate(int32_t seq, const std::vector<prompt_part>& prompt, const generation_request& req,
                             const std::function<bool(const std::string&)>& on_text = {});

  /// Forgets a sequence's cached context.
  void reset(int32_t seq);

 private:
  struct impl;
  std::unique_ptr<impl> p_;
};

}  // namespace undertone::models
