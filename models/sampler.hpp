// Token sampling and stop-string handling, torch-free (works on float logits).
#pragma once

#include <cstdint>
#include <random>
#include <string>
#include <vector>

namespace undertone::models {

struct sampling_params {
  double temperature = 0.0;         ///< 0 = greedy (argmax after the repetition penalty)
  int64_t top_k = 40;               ///< keep the k most likely tokens; 0 = all
  double top_p = 0.95;              ///< keep the smallest set with this much mass; 1 = all
  double repetition_penalty = 1.0;  ///< >1 discourages tokens in the recent history; 1 = off
  int64_t repeat_last_n = 64;       ///< how much history the penalty looks at, tokens
  uint64_t seed = 42;
};

/// Picks the next token from one row of logits. Deterministic for a given seed
/// and call sequence. Order: repetition penalty, then (greedy | top-k,
/// temperature, top-p, draw).
class sampler {
 public:
  explicit sampler(const sampling_params& p);
  /// `logits`: n_vocab floats; `history`: tokens generated or seen so far (for the penalty).
  int32_t sample(const float* logits, int64_t n_vocab, const std::vector<int32_t>& history);
  const sampling_params& params() const { return p_; }

 private:
  sampling_params p_;
  std::mt19937_64 rng_;
  std::vector<std::pair<float, int32_t>> cand_;  // reused scratch
};

/// Streams generated text while watching for stop strings that may straddle
/// token boundaries: text that could still be the start of a stop string is
/// held back until it is decided.
class stop_matcher {
 public:
  explicit stop_matcher(std::vector<std::string> stops);
  /// Feeds newly decoded text; returns the part that is safe to emit now.
  std::string feed(const std::string& text);
  /// True once a stop string was seen; nothing after it is ever emitted.
  bool stopped() const { return stopped_; }
  /// Emits whatever is still held back (call at the end of generation).
  std::string flush();

 private:
  std::vector<std::string> stops_;
  std::string pending_;
  bool stopped_ = false;
};

}  // namespace undertone::models
