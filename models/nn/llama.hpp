// Frozen llama-family decoder (Llama 2/3, SmolLM2, TinyLlama, Qwen2/2.5) on
// LibTorch: RMSNorm, RoPE (theta; linear and llama3 scaling), grouped-query
// attention, SwiGLU, optional q/k/v biases, tied or untied output.
//
// The model object holds only immutable, shared weights (no parameter requires
// grad); per-sequence state lives in a kv_cache. Two entry points:
//  - step(): one batched, KV-cached step over rows of many sequences (prefill
//    and decode mixed), each row a token id or an embedding vector (serving);
//  - forward_embeddings(): a padded batch of input embeddings without cache,
//    differentiable w.r.t. the inputs (training a speech encoder through it).
#pragma once

#include <torch/types.h>

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "models/nn/cpu_gemv.hpp"
#include "models/nn/kv_cache.hpp"
#include "models/nn/llm_checkpoint.hpp"

namespace undertone::models {


/// Rows of one batched step (llama.cpp's llama_batch): each row is a token id
/// or an embedding vector, with its sequence id and position, and a flag
/// whether the step should return its logits.
struct llm_batch {
  std::vector<int64_t> token;      ///< token id per row; -1 for an embedding row
  std::vector<torch::Tensor> embd; ///< per row: [d_model] for embedding rows, undefined for token rows
  std::vector<int32_t> seq;        ///< sequence id per row (>= 0)
  std::vector<int64_t> pos;        ///< position per row (>= 0), tokens
  std::vector<uint8_t> logits;     ///< 1 if the row's logits are wanted

  size_t size() const { return token.size(); }
  bool empty() const { return token.empty(); }
  void clear();
  /// Adds one token row.
  void add_token(int64_t id, int32_t seq, int64_t pos, bool want_logits);
  /// Adds one embedding row; `e` is [d_model], any float dtype / device.
  void add_embedding(const torch::Tensor& e, int32_t seq, int64_t pos, bool want_logits);
  /// Adds ids[i] at positions pos0 + i; logits for the last row if `logits_last`.
  void add_tokens(const std::vector<int64_t>& ids, int32_t seq, int64_t pos0, bool logits_last);
  /// Adds the rows of `e` [n, d_model] at positions pos0 + i.
  void add_embeddings(const torch::Tensor& e, int32_t seq, int64_t pos0, bool logits_last);
  /// Number of rows that want logits.
  int64_t n_wanted() const;
};

/// Where and in what precision the model runs.
struct llama_options {
  torch::Device device = torch::kCPU;    ///< cpu or cuda:N
  torch::Dtype dtype = torch::kFloat32;  ///< weights, activations and KV cache: fp32, bf16 or fp16
  /// CPU decode kernels (models/nn/cpu_gemv.hpp, config llm.cpu_decode): when
  /// true, on a CPU with AVX-512, steps of at most cpu_decode_max_rows rows run
  /// their matrix products on the kernels: q4_1/q8_0 GGUF matrices from their
  /// raw blocks (kept besides the dequantized copy: ~100 MB for SmolLM2-135M),
  /// other matrices of a bf16 model on the bf16 kernels, and attention per
  /// row on cpu_attention.hpp; activations float32 between the products.
  /// false: ATen only.
  bool cpu_decode = true;
  /// Rows of a step up to which the kernels run (measured, bench_llm
  /// --max-rows: they beat ATen up to 32-row steps, bf16 and fp32, on a
  /// 2-core AVX-512/AMX VM; ATen's oneDNN/AMX GEMMs win at 64 rows).
  /// bf16 models with pre-packed AMX tiles use cpu_decode_amx_max_rows.
  int64_t cpu_decode_max_rows = 32;
  /// The same for bf16 models on pre-packed AMX tiles (cpu_decode_amx_prepack
  /// where AMX runs): they beat ATen's bf16 GEMMs at every step size measured
  /// up to 256 rows (docs/models.md), the server's largest step.
  int64_t cpu_decode_amx_max_rows = 256;
  /// A bf16 model's steps of at least this many rows (and at most
  /// cpu_decode_max_rows) feed the products bf16 activations and bf16-rounded
  /// weights (cpu_gemv::gemm_bf16, AMX where it runs: the operands of ATen's
  /// bf16 path); smaller steps use float32 activations and the exact block
  /// values (cpu_gemv::gemv, faster at 1-4 rows where dequantizing in
  /// registers is the cost). fp32 models always use the latter.
  int64_t cpu_decode_bf16_rows = 5;
  /// bf16 models on a CPU with AMX: keep a copy of every bf16 weight packed
  /// into AMX tiles (made once at load, 2 bytes per parameter: +270 MB for
  /// SmolLM2-135M, +16 GB for an 8B model), so that steps of >=
  /// cpu_decode_bf16_rows rows only load tiles and multiply. false: those
  /// steps make the tiles from the blocks per call (cpu_gemv::gemm_bf16, no
  /// extra memory, slower).
  bool cpu_decode_amx_prepack = true;
};

class llama_model {
 public:
  /// Copies the checkpoint's weights to opt.device / opt.dtype (fusing q/k/v and
  /// gate/up projections). Throws std::runtime_error naming a missing or
  /// misshapen tensor.
  llama_model(const llm_checkpoint& ck, const llama_options& opt = {});
  /// Loads a checkpoint (GGUF file or HF directory) and builds the model.
  static std::shared_ptr<llama_model> load(const std::string& path, const llama_options& opt = {});

  llama_model(const llama_model&) = delete;
  llama_model& operator=(const llama_model&) = delete;

  const llama_hparams& hparams() const { return hp_; }
  torch::Device device() const { return opt_.device; }
  torch::Dtype dtype() const { return opt_.dtype; }
  int64_t n_vocab() const { return hp_.n_vocab; }
  int64_t d_model() const { return hp_.d_model; }

  /// A KV cache of `n_cells` cells (tokens over all sequences) for this model,
  /// on its device and in its dtype.
  kv_cache make_cache(int64_t n_cells) const;

  /// One batched step: writes the keys/values of every row into free cells of
  /// `cache` (tagged with the row's seq/pos) and returns float32 logits
  /// [n_wanted, n_vocab] (on the model's device) for the rows with logits set,
  /// in row order. Row r attends to the cells of its own sequence with position
  /// <= pos[r], including rows of the same step. Runs without autograd.
  /// Throws std::invalid_argument for bad rows (token out of range, embedding
  /// of the wrong size, a (seq, pos) already in the cache, duplicate (seq, pos)
  /// in the batch) and std::runtime_error when the cache is full; the cache is
  /// unchanged when it throws.
  torch::Tensor step(const llm_batch& batch, kv_cache& cache) const;

  /// Input embeddings of token ids: [...] int64 -> [..., d_model] float32 on the
  /// model's device (what a token row feeds the first layer).
  torch::Tensor embed_tokens(const torch::Tensor& ids) const;

  /// Training entry point, no cache: `embeds` [B, T, d_model] (float32 or the
  /// model dtype, on the model's device), `attention_mask` [B, T] (1 = real
  /// token, 0 = padding; undefined = all real), optional `positions` [B, T]
  /// int64 (default: cumsum(mask) - 1, so left and right padding both work).
  /// Causal attention over real tokens. Returns float32 logits [B, T, n_vocab]
  /// (or the final-norm hidden states [B, T, d_model] if `hidden_only`).
  /// Differentiable w.r.t. `embeds`; outputs at padded positions are finite
  /// but meaningless.
  torch::Tensor forward_embeddings(const torch::Tensor& embeds, const torch::Tensor& attention_mask = {},
                                   const torch::Tensor& positions = {}, bool hidden_only = false) const;
  /// Logits (float32) from final-norm hidden states [..., d_model].
  torch::Tensor lm_head(const torch::Tensor& hidden) const;

  /// What the CPU decode kernels run here, e.g. "q4_1 x210, q8_0 x1 (avx512-bf16)",
  /// or "off" (disabled, not a CPU with AVX-512, or no matrix they can read).
  std::string cpu_decode_info() const;
  /// Matrix-vector products run on the CPU decode kernels so far (a counter
  /// for tests and benchmarks).
  int64_t cpu_decode_calls() const { return kernel_calls_.load(); }

  /// Every weight tensor with a descriptive name (fused ones: "blk.{i}.attn_qkv.weight",
  /// "blk.{i}.ffn_gate_up.weight"); none requires grad.
  std::vector<std::pair<std::string, torch::Tensor>> named_parameters() const;

 private:
  /// A matrix as the CPU decode kernels read it (format none: ATen only).
  struct packed {
    cpu_gemv::wformat f = cpu_gemv::wformat::none;
    int64_t out = 0, in = 0;
    torch::Tensor data;  ///< uint8 blocks, or the bf16 weight itself
    /// bf16 models on AMX (cpu_decode_amx_prepack): the bf16 weight packed
    /// for cpu_gemv::amx_gemm_packed (steps of >= cpu_decode_bf16_rows rows),
    /// else undefined.
    torch::Tensor amx;
  };
  struct layer {
    torch::Tensor attn_norm;  ///< [d_model]
    torch::Tensor wqkv;       ///< [(n_head + 2 n_head_kv) * head_dim, d_model]
    torch::Tensor bqkv;       ///< [(n_head + 2 n_head_kv) * head_dim] or undefined
    torch::Tensor wo;         ///< [d_model, n_head * head_dim]
    torch::Tensor ffn_norm;   ///< [d_model]
    torch::Tensor w_gate_up;  ///< [2 d_ff, d_model]
    torch::Tensor w_down;     ///< [d_model, d_ff]
    packed p_qkv, p_o, p_gate_up, p_down;  ///< the same for the decode kernels
    torch::Tensor attn_norm_f32, ffn_norm_f32;  ///< norm weights in float32 for the decode path
  };
  /// RMSNorm in float32 statistics; x float32 [..., d_model] -> model dtype.
  torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& w) const;
  /// cos/sin [N, head_dim/2] (float32) for positions [N] (int64, model device).
  std::pair<torch::Tensor, torch::Tensor> rope_tables(const torch::Tensor& pos) const;
  /// Rotates x [..., N, heads, head_dim] with tables [N, head_dim/2] (rotate-half).
  static torch::Tensor apply_rope(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin);
  /// x float32 [..., d_model] += SwiGLU(norm(x)).
  torch::Tensor ffn(const layer& L, const torch::Tensor& x) const;
  /// x [N, in] @ W^T (+ bias): on the decode kernels when `fast` and `p` has
  /// a format, else ATen. Returns float32 if `f32_out`, else the model dtype.
  /// With `wide` (and `fast`), on cpu_gemv::gemm_bf16 (or amx_gemm_packed
  /// where p.amx is set): x rounded to bf16 once. `out` (float32 [N, out],
  /// contiguous) and `xws` (bf16, at least N rounded up to 16 times
  /// amx_k(in) elements): buffers the kernel paths write into instead of
  /// allocating (a step reuses them over the layers: fresh multi-MB buffers
  /// cost page faults per call).
  torch::Tensor proj(const torch::Tensor& x, const torch::Tensor& w, const packed& p, const torch::Tensor& bias,
                     bool fast, bool f32_out, bool wide = false, const torch::Tensor& out = {},
                     const torch::Tensor& xws = {}) const;
  /// Builds the kernels' view of the weights from the checkpoint (blocks) or
  /// the bf16 weights; leaves every format none when the kernels cannot run.
  void pack_for_cpu_decode(const llm_checkpoint& ck);

  llama_hparams hp_;
  llama_options opt_;
  torch::Tensor tok_embd_;   ///< [n_vocab, d_model]
  torch::Tensor out_norm_;   ///< [d_model]
  torch::Tensor output_;     ///< [n_vocab, d_model] (== tok_embd_ when tied)
  torch::Tensor inv_freq_;   ///< [head_dim/2] float32, RoPE frequencies after scaling
  std::vector<layer> layers_;
  packed p_output_;            ///< output_ for the decode kernels
  torch::Tensor out_norm_f32_;  ///< out_norm_ in float32 for the decode path
  bool cpu_decode_ready_ = false;
  bool amx_packed_ = false;  ///< some matrices have pre-packed AMX tiles
  /// Largest step on the kernels: cpu_decode_amx_max_rows where the
  /// pre-packed AMX tiles run, else cpu_decode_max_rows.
  int64_t cpu_decode_rows() const;
  mutable std::atomic<int64_t> kernel_calls_{0};
};

}  // namespace undertone::models
