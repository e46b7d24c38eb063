// Internal (models/nn only): what the two LLM facades share, chat_llm (one call
// at a time) and llm_engine (continuous batching): loading model + tokenizer +
// chat template from chat_llm_options, the prompt-text tokenization rule, and
// the per-answer token loop state (sampler, stop tokens and strings, token
// budget, UTF-8 streaming).
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "models/chat_llm.hpp"
#include "models/nn/llama.hpp"
#include "models/sampler.hpp"
#include "models/tokenizer.hpp"

namespace undertone::models {

using llm_clock = std::chrono::steady_clock;
/// Seconds from `t` until now.
inline double seconds_since(llm_clock::time_point t) {
  return std::chrono::duration<double>(llm_clock::now() - t).count();
}

/// "fp32" | "bf16" | "fp16" -> dtype; throws std::runtime_error otherwise.
torch::Dtype parse_llm_dtype(const std::string& s);

/// A loaded LLM: weights, tokenizer, chat template and identity.
struct loaded_llm {
  std::shared_ptr<llama_model> model;
  std::unique_ptr<tokenizer> tok;
  chat_template tmpl;
  std::string name;     ///< general.name of a GGUF, else the file / directory name
  std::string version;  ///< "<file name>|<bytes>" (directory: summed size of its files)
};

/// Loads what `o` names (o.path, device, dtype, chat_template). `who` prefixes
/// error messages ("chat_llm", "llm_engine"). Throws std::runtime_error.
loaded_llm load_llm(const chat_llm_options& o, const std::string& who);

/// "SmolLM2 (llama, 30 layers, d 576, ..., KV 4096 cells)" for logs.
std::string describe_llm(const loaded_llm& m, const chat_llm_options& o);

/// Token ids of one text prompt part (special tokens parsed). With
/// `first_in_context` (the part opens an empty context) BOS is prepended when
/// the tokenizer asks for it and the text does not already start with it.
std::vector<int32_t> prompt_text_tokens(const tokenizer& tok, const std::string& text, bool first_in_context);

/// One answer being generated, token by token, independent of how the logits
/// are computed. Holds the sampler (seeded from the request), the stop
/// matcher, the UTF-8 stream decoder, the token budget and the result so far
/// (text, tokens, stop_reason; the timings are the caller's).
class answer_stream {
 public:
  /// `budget`: most tokens to generate (min of max_tokens and what the context
  /// still holds); `history`: the context's token ids so far (-1 for embedding
  /// rows) for the repetition penalty. When budget < req.max_tokens, running
  /// out of budget ends with stop_reason "context", else "max_tokens".
  answer_stream(const tokenizer& tok, const generation_request& req, int64_t budget, std::vector<int32_t> history);

  /// Samples one token from `logits` (n_vocab floats) and consumes it. A stop
  /// token ends the answer (not added to tokens); any other token is added to
  /// result().tokens and decoded; a stop string or the budget may then end the
  /// answer. Returns the text that became safe to emit (may be empty; appended
  /// to result().text). Must not be called once done().
  std::string next(const float* logits, int64_t n_vocab);
  /// True once the answer ended (stop token, stop string, budget, cancel).
  bool done() const { return done_; }
  /// The token sampled by the last next() (a stop token included).
  int32_t last_token() const { return last_; }
  /// Whether the last sampled token was a stop token.
  bool last_was_stop() const { return last_was_stop_; }
  /// Ends the answer early with stop_reason "cancelled"; held-back text is dropped.
  void cancel();
  /// Ends the answer: returns the held-back text (appended to result().text),
  /// nothing after a stop string or a cancel. Call once, after done() or to cut
  /// the answer short.
  std::string finish();
  /// The answer so far (complete after finish()).
  generation_result& result() { return res_; }
  const generation_result& result() const { return res_; }
  /// Tokens sampled so far, stop token excluded.
  int64_t n_tokens() const { return int64_t(res_.tokens.size()); }

 private:
  const tokenizer* tok_;
  sampler smp_;
  stop_matcher stops_;
  token_stream_decoder dec_;
  std::vector<int32_t> history_;
  int64_t budget_;
  generation_result res_;
  int32_t last_ = -1;
  bool last_was_stop_ = false;
  bool done_ = false;
  bool finished_ = false;
};

}  // namespace undertone::models
