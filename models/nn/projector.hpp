// Projector from speech-encoder frames into the LLM's input-embedding space.
//
// k consecutive encoder frames [k, d_in] are concatenated into one vector
// [k * d_in] (frame-major: frame 0's channels first) and mapped by a SwiGLU MLP
//   y = W_down (silu(W_gate s) * (W_up s))      (no biases)
// to one "speech token" [d_out] (d_out = the LLM's hidden size, 576 for
// SmolLM2-135M). With Whisper's 50 frames/s and k = 8: 6.25 tokens/s.
//
// Streaming: a projector_state keeps the frames (< k) that do not yet fill a
// group; a token is emitted as soon as its k-th frame arrives, so streaming
// output equals the offline forward() on the concatenated frames. At the end of
// a stream, flush() emits the leftover frames zero-padded to k (or nothing),
// as forward(..., pad_last = true) does offline.
//
// Checkpoint: safetensors with tensors gate.weight [d_hidden, k*d_in],
// up.weight [d_hidden, k*d_in], down.weight [d_out, d_hidden] in the
// projector's dtype, and __metadata__ {format: "undertone.projector",
// version: "1", stack, d_in, d_hidden, d_out, activation: "swiglu"}.
#pragma once

#include <torch/nn/module.h>
#include <torch/types.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace undertone::models {

/// Shape of a projector.
struct projector_config {
  int64_t stack = 8;       ///< encoder frames per token (k)
  int64_t d_in = 384;      ///< encoder width (384 for whisper tiny)
  int64_t d_hidden = 1024; ///< SwiGLU hidden width
  int64_t d_out = 576;     ///< LLM hidden size
  std::string to_string() const;
  bool operator==(const projector_config& o) const {
    return stack == o.stack && d_in == o.d_in && d_hidden == o.d_hidden && d_out == o.d_out;
  }
};

/// One stream's projector state: the frames not yet grouped.
class projector_state {
 public:
  /// Frames waiting for a full group (0 .. stack-1).
  int64_t pending() const { return pending_.defined() ? pending_.size(0) : 0; }
  /// Encoder frames received so far.
  int64_t frames_in() const { return frames_in_; }
  /// Tokens emitted so far.
  int64_t tokens_out() const { return tokens_out_; }

 private:
  friend class projector;
  torch::Tensor pending_;  ///< [pending, d_in] or undefined
  int64_t frames_in_ = 0;
  int64_t tokens_out_ = 0;
};

class projector : public torch::nn::Module {
 public:
  /// Random initialization (normal, std 1/sqrt(fan_in)), reproducible from
  /// `seed`; all parameters trainable. Parameter names: gate_weight,
  /// up_weight, down_weight. dtype fp32, bf16 or fp16 (fp16 on CUDA only with
  /// LibTorch 1.x).
  explicit projector(const projector_config& cfg, torch::Device device = torch::kCPU,
                     torch::Dtype dtype = torch::kFloat32, uint64_t seed = 0);

  /// Loads a checkpoint written by save(): config from its metadata, weights in
  /// `dtype` (bit-exact when it equals the stored dtype). Throws
  /// std::runtime_error naming the file for a missing/invalid metadata key or
  /// tensor, or a shape that does not match the metadata.
  static std::shared_ptr<projector> load(const std::string& path, torch::Device device = torch::kCPU,
                                         torch::Dtype dtype = torch::kFloat32);
  /// Writes the checkpoint (atomically) in the parameters' dtype.
  void save(const std::string& path) const;
  /// Replaces this projector's weights by those of `path`; throws (changing
  /// nothing) if the file's config or any tensor shape differs from config().
  void load_weights(const std::string& path);

  const projector_config& config() const { return cfg_; }
  torch::Device device() const { return gate_.device(); }
  torch::Dtype dtype() const { return gate_.scalar_type(); }

  /// Offline: frames [N, T, d_in] -> tokens [N, floor(T/k), d_out] (trailing
  /// T mod k frames dropped), or [N, ceil(T/k), d_out] with the last group
  /// zero-padded if `pad_last`. Differentiable.
  torch::Tensor forward(const torch::Tensor& frames, bool pad_last = false);
  /// Maps already stacked groups [..., k*d_in] -> [..., d_out]. Differentiable.
  torch::Tensor forward_stacked(const torch::Tensor& stacked);

  projector_state init_state() const;
  /// Streaming for several streams in one MLP call: frames[i] [n_i, d_in] (n_i
  /// may be 0) continues states[i]; returns per stream its new tokens
  /// [m_i, d_out], m_i = floor((pending_i + n_i) / k). No autograd.
  std::vector<torch::Tensor> forward_stream(const std::vector<torch::Tensor>& frames,
                                            const std::vector<projector_state*>& states);
  /// Emits the leftover frames of `state` zero-padded to one token ([1, d_out]),
  /// or [0, d_out] if none; the state is then empty.
  torch::Tensor flush(projector_state& state);

 private:
  projector_config cfg_;
  torch::Tensor gate_, up_, down_;
};

}  // namespace undertone::models
