// Whisper's audio encoder on LibTorch, offline and streaming (block-causal).
//
// Architecture (all Whisper sizes, tiny to large-v3): log-mel features
// [N, T, n_mels] at 100 frames/s -> conv1 (k3, s1, pad 1) + GELU -> conv2 (k3,
// s2, pad 1) + GELU -> [N, ceil(T/2), d_model] at 50 frames/s -> + sinusoidal
// position table (n_positions rows, 1500 = 30 s) -> n_layers pre-LayerNorm
// blocks (multi-head self-attention with q/v biases, k without, then a GELU MLP)
// -> final LayerNorm. GELU is the exact (erf) one; LayerNorm eps 1e-5.
//
// Streaming rule (block-causal). A stream is fed in chunks of F = chunk_ms/10
// mel frames (F even, >= 4); B = F/2 encoder frames per block.
//  - Conv stem: encoder frame u depends on mel frames 2u-2 .. 2u+2. When chunk c
//    (mel frames [cF, (c+1)F)) arrives, every frame whose inputs are all known is
//    computed: u in [cB-1, (c+1)B-1). So each chunk emits B frames, except the
//    first (B-1: frame -1 does not exist) and the last call (see below), and the
//    stem output equals the offline (zero-padded) conv stem exactly: no
//    approximation, no lookahead wait; the 20 ms of a chunk's end are emitted
//    with the next chunk. The state carries the last 4 mel frames.
//  - Block c is the set of frames emitted by call c. Block c attends to itself
//    and to the `context_blocks` blocks before it (all earlier ones until the
//    window is full); the keys/values of earlier blocks come from a per-layer
//    cache, so a chunk costs O(B x context).
//  - Cache layout: per stream and layer a ring of whole blocks (values
//    [n_heads, capacity, head_dim]; keys the same, or in tiles of 16 slots
//    [n_heads, capacity/16, head_dim, 16] for the fused kernel below, so that its
//    score loop reads them sequentially). It grows (doubling) up to
//    context_blocks x B slots, then the block that leaves the window is
//    overwritten by the new one after the new block's attention. Attention is
//    order-free over keys, so the ring's rotation needs no reordering; slots not
//    holding a cached frame are masked.
//  - Attention kernel: on an AVX-512 CPU with fp32/bf16 weights (head_dim a
//    multiple of 64: every Whisper size), forward_chunk computes each (stream,
//    head)'s attention in one fused kernel (scores against the ring and the
//    block, fp32 softmax, weighted sum, written into the [N, Q, d] output, then
//    the ring write), streams x heads spread over the LibTorch threads; it
//    replaces ~15 LibTorch ops per stream and layer whose dispatch, copies and
//    masks cost more than the arithmetic (bench/RESULTS.md, Encoder). Elsewhere
//    (fp64, CUDA, other CPUs) the same math runs as LibTorch ops. bf16 runs
//    scores/softmax/sums in fp32 (inputs widened exactly, output rounded once).
//    bf16 LayerNorm runs in fp32 on the CPU (LibTorch 1.13's bf16 kernel is
//    unvectorized).
//  - The last call (last = true) takes 0..F frames, zero-pads the right edge as
//    offline Whisper does and emits the remaining frames up to ceil(T/2) as one
//    final block. The offline reference forward_block_causal() splits T mel
//    frames as ceil(T/F)-1 full chunks plus a last call of the remaining 1..F.
//  - Positions continue across chunks: frame u uses row (u mod n_positions) of
//    the position table. Past Whisper's 30 s the cache is a sliding window of
//    whole blocks (context_blocks, by default as many as fit in the table), so
//    the positions inside one attention window are always distinct and
//    consecutive modulo n_positions ("recycled"). Offline full attention
//    (forward()) is limited to n_positions frames and throws beyond.
//
// Weights are registered as torch parameters under HF-like names (conv1.weight,
// layers.{i}.self_attn.qkv.weight (q, k, v fused; the k part of the bias is 0),
// layers.{i}.self_attn.out_proj.*, layers.{i}.self_attn_layer_norm.*,
// layers.{i}.fc1.*, layers.{i}.fc2.*, layers.{i}.final_layer_norm.*,
// layer_norm.*; buffer embed_positions), so parameters() feeds an optimizer.
//
// Device and dtype are fixed at construction: do not call Module::to() (the
// inputs would still be sent to the construction device/dtype).
//
// Thread safety: weights are read-only after construction; one caller at a time
// per state. forward_chunk() runs without autograd; forward() and
// forward_block_causal() are differentiable (training).
#pragma once

#include <torch/nn/module.h>
#include <torch/types.h>

#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <string>
#include <vector>

namespace undertone::models {

/// Hyper-parameters of a Whisper encoder (read from the checkpoint).
struct whisper_hparams {
  int64_t n_mels = 80;         ///< 80 (tiny .. large-v2) or 128 (large-v3)
  int64_t d_model = 384;
  int64_t n_heads = 6;
  int64_t n_layers = 4;
  int64_t d_ffn = 1536;
  int64_t n_positions = 1500;  ///< rows of the position table (encoder frames, 20 ms each)
  double ln_eps = 1e-5;
  std::string to_string() const;
};

/// Where/how the encoder runs and how it streams.
struct whisper_encoder_options {
  torch::Device device = torch::kCPU;    ///< cpu or cuda:N
  /// Weights and activations: fp32, bf16 or fp16 (fp16 on CUDA only with
  /// LibTorch 1.x, which lacks CPU fp16 kernels); fp64 for verification.
  torch::Dtype dtype = torch::kFloat32;
  int64_t chunk_ms = 320;                ///< streaming chunk, ms; multiple of 20, >= 40
  /// Earlier blocks a block may attend to (sliding window). -1: as many as fit
  /// in the position table with the current block, floor((n_positions-1)/B) - 1.
  int64_t context_blocks = -1;
  /// Trainable top layers (see set_trainable_layers); 0 = frozen.
  int64_t trainable_layers = 0;
};

/// Wall time of forward_chunk's phases, ms, accumulated over calls (pass one to
/// forward_chunk to fill it; bench/encoder --profile). attention = the
/// per-stream attention over [cache | block] including the cache writes;
/// other = total minus the named phases (checks, positions, cache growth, state updates).
struct whisper_chunk_timings {
  double total = 0, stem = 0, layer_norm = 0, qkv_proj = 0, attention = 0, out_proj = 0, mlp = 0;
  int64_t calls = 0;
  double other() const { return total - stem - layer_norm - qkv_proj - attention - out_proj - mlp; }
};

/// One stream's encoder state (conv history, per-layer key/value cache, position).
/// Created by whisper_encoder::init_state(); holds no weights.
class whisper_encoder_state {
 public:
  /// Mel frames consumed so far.
  int64_t mel_frames() const { return mel_frames_; }
  /// Encoder frames emitted so far (= absolute position of the next one).
  int64_t frames_out() const { return frames_out_; }
  /// forward_chunk calls so far (= index of the next block).
  int64_t chunks() const { return chunks_; }
  /// True after the last chunk; the state then accepts no more input.
  bool finished() const { return finished_; }
  /// Encoder frames currently held in the key/value cache.
  int64_t cached_frames() const;
  /// Bytes held by the key/value cache tensors (capacity, not use).
  int64_t cache_bytes() const;

 private:
  friend class whisper_encoder;
  struct block_span {
    int64_t slot;  ///< first slot in the ring
    int64_t len;   ///< frames
  };
  int64_t mel_frames_ = 0;
  int64_t frames_out_ = 0;
  int64_t chunks_ = 0;
  bool finished_ = false;
  torch::Tensor history_;            ///< [n_mels, 4] last mel frames (zeros before the start)
  /// Per layer ring buffers: values [n_heads, capacity, head_dim]; keys the same,
  /// or [n_heads, ceil(capacity/16), head_dim, 16] (tiles of 16 slots) with the fused kernel.
  std::vector<torch::Tensor> k_, v_;
  int64_t capacity_ = 0;             ///< slots per layer
  int64_t head_ = 0;                 ///< next slot to write
  int64_t extent_ = 0;               ///< 1 + highest slot ever written
  std::deque<block_span> blocks_;    ///< cached blocks, oldest first
};

class whisper_encoder : public torch::nn::Module {
 public:
  /// Weights by the parameter names above (plus "embed_positions"; if absent the
  /// sinusoidal table is computed), any dtype, on any device. Throws
  /// std::invalid_argument naming a missing tensor or a shape mismatch.
  whisper_encoder(const whisper_hparams& hp, const std::map<std::string, torch::Tensor>& weights,
                  const whisper_encoder_options& opt = {});

  /// Loads a CTranslate2 Whisper model directory (model.bin, WhisperSpec;
  /// encoder/... variables; f16/f32 weights converted to opt.dtype).
  static std::shared_ptr<whisper_encoder> from_ct2(const std::string& dir,
                                                   const whisper_encoder_options& opt = {});
  /// Loads the encoder of a Hugging Face Whisper checkpoint: a directory with
  /// config.json and model.safetensors (or model.safetensors.index.json +
  /// shards), or a single .safetensors file (hyper-parameters from a
  /// config.json beside it, else inferred from shapes with head_dim 64).
  /// Tensor names "model.encoder.*" (WhisperForConditionalGeneration) or
  /// "encoder.*" (WhisperModel).
  static std::shared_ptr<whisper_encoder> from_hf(const std::string& path,
                                                  const whisper_encoder_options& opt = {});
  /// from_ct2 if `path` is a directory with model.bin, else from_hf.
  static std::shared_ptr<whisper_encoder> load(const std::string& path,
                                               const whisper_encoder_options& opt = {});

  const whisper_hparams& hparams() const { return hp_; }
  const whisper_encoder_options& options() const { return opt_; }
  /// Mel frames per streaming chunk (chunk_ms / 10).
  int64_t chunk_frames() const { return chunk_frames_; }
  /// Encoder frames per block (chunk_frames / 2).
  int64_t block_frames() const { return chunk_frames_ / 2; }
  /// Earlier blocks attended to (resolved sliding window).
  int64_t context_blocks() const { return context_blocks_; }
  /// Output width (d_model).
  int64_t output_dim() const { return hp_.d_model; }

  /// Makes the top `n` transformer layers and the final LayerNorm trainable
  /// (requires_grad) and freezes everything else; n = 0 freezes all, n < 0 or
  /// n >= n_layers makes every parameter trainable, conv stem included.
  void set_trainable_layers(int64_t n);

  /// Offline encoder with full attention, as Whisper/CTranslate2 compute it:
  /// features [N, T, n_mels] (any float dtype/device) -> [N, ceil(T/2), d_model]
  /// in opt.dtype on opt.device. Throws if ceil(T/2) > n_positions.
  torch::Tensor forward(const torch::Tensor& features);
  /// Offline reference of the streaming path: same conv stem, blocks, sliding
  /// window and recycled positions as feeding the features through
  /// forward_chunk (ceil(T/F)-1 full chunks, then the rest as the last chunk).
  /// [N, T, n_mels] -> [N, ceil(T/2), d_model]; any T.
  torch::Tensor forward_block_causal(const torch::Tensor& features);

  /// A fresh stream state (position 0, empty cache).
  whisper_encoder_state init_state() const;
  /// Encodes the next chunk of each stream in one batched call.
  /// features: [N, T, n_mels]; row i continues states[i] (distinct, unfinished
  /// states, possibly at different positions). Not last: T == chunk_frames().
  /// last: 0 <= T <= chunk_frames(), then every remaining frame is emitted and
  /// the states are finished. Returns per stream its new encoder frames
  /// [n_i, d_model] (n_i may differ between streams: B-1 on a first chunk).
  /// `timings`, if given, accumulates the wall time of the call's phases.
  std::vector<torch::Tensor> forward_chunk(const torch::Tensor& features,
                                           const std::vector<whisper_encoder_state*>& states,
                                           bool last = false, whisper_chunk_timings* timings = nullptr);
  /// True when forward_chunk's attention runs the fused CPU kernel (fp32/bf16
  /// on an AVX-512 CPU, head_dim a multiple of 64); else LibTorch ops.
  bool fused_attention() const { return fused_attention_; }

 private:
  struct layer_weights {
    torch::Tensor ln1_w, ln1_b, qkv_w, qkv_b, out_w, out_b, ln2_w, ln2_b, fc1_w, fc1_b, fc2_w, fc2_b;
  };
  torch::Tensor stem_offline(const torch::Tensor& features);
  torch::Tensor transformer_offline(torch::Tensor x, const torch::Tensor& allowed);
  torch::Tensor mlp(const layer_weights& w, const torch::Tensor& x) const;
  /// LayerNorm over d_model; bf16 on the CPU is computed in fp32 (see the .cpp).
  torch::Tensor layer_norm(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& b) const;
  void check_features(const torch::Tensor& features, const char* what) const;

  whisper_hparams hp_;
  whisper_encoder_options opt_;
  int64_t chunk_frames_ = 32;
  int64_t context_blocks_ = 0;
  bool fused_attention_ = false;  ///< forward_chunk uses the fused CPU attention kernel
  torch::Tensor conv1_w_, conv1_b_, conv2_w_, conv2_b_, ln_w_, ln_b_, positions_;
  std::vector<layer_weights> layers_;
};

/// Whisper's sinusoidal position table [length, channels] (float32, CPU).
torch::Tensor whisper_sinusoids(int64_t length, int64_t channels);

}  // namespace undertone::models
