// A llama-family decoder checkpoint in memory: hyper-parameters plus weights by
// canonical name, whatever file format it came from (GGUF or HF safetensors).
//
// Canonical weight names follow GGUF:
//   token_embd.weight            [n_vocab, d_model]
//   blk.{i}.attn_norm.weight     [d_model]
//   blk.{i}.attn_q.weight        [n_head * head_dim, d_model]     (+ .bias if hp.attn_bias)
//   blk.{i}.attn_k.weight        [n_head_kv * head_dim, d_model]  (+ .bias)
//   blk.{i}.attn_v.weight        [n_head_kv * head_dim, d_model]  (+ .bias)
//   blk.{i}.attn_output.weight   [d_model, n_head * head_dim]
//   blk.{i}.ffn_norm.weight      [d_model]
//   blk.{i}.ffn_gate.weight      [d_ff, d_model]
//   blk.{i}.ffn_up.weight        [d_ff, d_model]
//   blk.{i}.ffn_down.weight      [d_model, d_ff]
//   output_norm.weight           [d_model]
//   output.weight                [n_vocab, d_model]  (absent when tied to token_embd)
// Layout is torch's [out_features, in_features]. The q/k rows are in Hugging
// Face order (RoPE by rotate-half over the two halves of each head); llama.cpp's
// converter permutes them for its interleaved RoPE, so the GGUF loader undoes
// that permutation for arch "llama".
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <map>
#include <string>

namespace undertone::models {

/// Hyper-parameters of a llama-family decoder (Llama 2/3, SmolLM2, TinyLlama, Qwen2/2.5).
struct llama_hparams {
  std::string arch = "llama";  ///< "llama" | "qwen2" (qwen2: q/k/v biases)
  int64_t n_layer = 0;
  int64_t d_model = 0;
  int64_t n_head = 0;
  int64_t n_head_kv = 0;
  int64_t head_dim = 0;  ///< usually d_model / n_head
  int64_t d_ff = 0;
  int64_t n_vocab = 0;
  int64_t train_ctx = 0;  ///< context length the model was trained for, tokens
  double rope_theta = 10000.0;
  double rms_eps = 1e-5;
  std::string rope_scaling = "none";  ///< "none" | "linear" | "llama3"
  double rope_factor = 1.0;
  double rope_low_freq_factor = 1.0;   ///< llama3 scaling
  double rope_high_freq_factor = 4.0;  ///< llama3 scaling
  int64_t rope_original_ctx = 8192;    ///< llama3 scaling
  bool attn_bias = false;              ///< q/k/v projections carry biases (qwen2)
  bool tied_embeddings = true;         ///< no output.weight: logits use token_embd
  std::string to_string() const;
};

/// Weights by canonical name (see the table above).
using weight_map = std::map<std::string, torch::Tensor>;

/// A quantized 2-D weight kept in its GGUF blocks (for the CPU decode kernels,
/// models/nn/cpu_gemv.hpp): `rows` rows in torch order ([out, in]; q/k rows
/// un-permuted like the dequantized tensor), each `cols / 32` ggml blocks.
struct quantized_weight {
  uint32_t type = 0;  ///< ggml_type value (q4_1 or q8_0)
  int64_t rows = 0;   ///< out_features
  int64_t cols = 0;   ///< in_features
  torch::Tensor data; ///< uint8 [rows, bytes per row], CPU
};

struct llm_checkpoint {
  std::string path;    ///< file or directory it was loaded from
  std::string format;  ///< "gguf" | "hf-safetensors"
  llama_hparams hp;
  weight_map weights;  ///< all on CPU, in the dtype asked for
  /// Raw blocks of the q4_1 / q8_0 matrices by canonical name, besides their
  /// dequantized copy in `weights`; filled only when the loader is asked to.
  std::map<std::string, quantized_weight> quantized;
};

/// Loads a GGUF checkpoint: dequantizes every tensor (f32/f16/bf16/q4_0/q4_1/
/// q5_x/q8_0/k-quants) to `dtype`. Missing tensors, shape mismatches and
/// unsupported types throw std::runtime_error naming the tensor. With
/// `keep_blocks`, the q4_1 and q8_0 matrices are also kept as raw blocks in
/// llm_checkpoint::quantized.
llm_checkpoint load_gguf_llm(const std::string& path, torch::Dtype dtype = torch::kFloat32,
                             bool keep_blocks = false);

/// Loads a Hugging Face checkpoint directory (config.json + *.safetensors,
/// sharded or not) of a supported architecture (LlamaForCausalLM,
/// Qwen2ForCausalLM, MistralForCausalLM without sliding window).
llm_checkpoint load_hf_llm(const std::string& dir, torch::Dtype dtype = torch::kFloat32);

/// Dispatches on the path: a .gguf file or an HF directory (`keep_blocks`:
/// see load_gguf_llm; HF checkpoints have no blocks).
llm_checkpoint load_llm_checkpoint(const std::string& path, torch::Dtype dtype = torch::kFloat32,
                                   bool keep_blocks = false);

}  // namespace undertone::models
