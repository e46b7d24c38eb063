// GGUF -> llm_checkpoint: hyper-parameters from the metadata, every tensor
// dequantized to fp32 by gguf_file and converted to the requested dtype.
#include "models/gguf.hpp"
#include "models/nn/llm_checkpoint.hpp"

#include <filesystem>
#include <sstream>
#include <stdexcept>
#include <vector>

namespace undertone::models {

std::string llama_hparams::to_string() const {
  std::ostringstream os;
  os << "arch=" << arch << " n_layer=" << n_layer << " d_model=" << d_model << " n_head=" << n_head
     << " n_head_kv=" << n_head_kv << " head_dim=" << head_dim << " d_ff=" << d_ff
     << " n_vocab=" << n_vocab << " train_ctx=" << train_ctx << " rope_theta=" << rope_theta
     << " rms_eps=" << rms_eps << " rope_scaling=" << rope_scaling;
  if (rope_scaling != "none") os << " rope_factor=" << rope_factor;
  if (rope_scaling == "llama3")
    os << " low_freq_factor=" << rope_low_freq_factor << " high_freq_factor=" << rope_high_freq_factor
       << " original_ctx=" << rope_original_ctx;
  os << " attn_bias=" << (attn_bias ? "true" : "false")
     << " tied_embeddings=" << (tied_embeddings ? "true" : "false");
  return os.str();
}

namespace {

[[noreturn]] void fail(const std::string& path, const std::string& what) {
  throw std::runtime_error("GGUF LLM checkpoint " + path + ": " + what);
}

// Undoes llama.cpp's converter permutation of q/k rows. The converter maps, for
// each head, HF row (half * hd/2 + i) to GGUF row (2 * i + half) so that ggml's
// interleaved RoPE rotates the pairs HF rotates by halves. Viewing the GGUF rows
// as [heads, hd/2, 2] and swapping the last two axes restores [heads, 2, hd/2].
torch::Tensor unpermute_qk(const torch::Tensor& w, int64_t n_heads) {
  const int64_t rows = w.size(0);
  std::vector<int64_t> shape{n_heads, rows / n_heads / 2, 2};
  for (int64_t d = 1; d < w.dim(); ++d) shape.push_back(w.size(d));
  return w.reshape(shape).transpose(1, 2).reshape(w.sizes()).contiguous();
}

}  // namespace

llm_checkpoint load_gguf_llm(const std::string& path, torch::Dtype dtype, bool keep_blocks) {
  gguf_file f(path);
  llm_checkpoint ck;
  ck.path = path;
  ck.format = "gguf";
  llama_hparams& hp = ck.hp;

  hp.arch = f.get_string("general.architecture");
  if (hp.arch != "llama" && hp.arch != "qwen2")
    fail(path, "unsupported general.architecture '" + hp.arch + "' (supported: llama, qwen2)");
  const std::string a = hp.arch + ".";
  auto need = [&](const std::string& key) {
    if (!f.has(a + key)) fail(path, "missing metadata key " + a + key);
    return f.get_int(a + key);
  };
  hp.n_layer = need("block_count");
  hp.d_model = need("embedding_length");
  hp.d_ff = need("feed_forward_length");
  hp.n_head = need("attention.head_count");
  hp.n_head_kv = f.get_int_or(a + "attention.head_count_kv", hp.n_head);
  if (hp.n_layer <= 0 || hp.d_model <= 0 || hp.d_ff <= 0 || hp.n_head <= 0 || hp.n_head_kv <= 0 ||
      hp.n_head % hp.n_head_kv != 0)
    fail(path, "inconsistent layer/head counts: " + hp.to_string());
  hp.head_dim = f.get_int_or(a + "attention.key_length", hp.d_model / hp.n_head);
  if (f.get_int_or(a + "attention.value_length", hp.head_dim) != hp.head_dim)
    fail(path, a + "attention.value_length differs from key_length (unsupported)");
  if (hp.head_dim <= 0 || hp.head_dim % 2 != 0) fail(path, "head_dim must be even and positive");
  if (f.get_int_or(a + "rope.dimension_count", hp.head_dim) != hp.head_dim)
    fail(path, a + "rope.dimension_count != head_dim: partial rotary embeddings are not supported");
  hp.train_ctx = f.get_int_or(a + "context_length", 2048);
  hp.rope_theta = f.get_float_or(a + "rope.freq_base", 10000.0);
  hp.rms_eps = f.get_float_or(a + "attention.layer_norm_rms_epsilon", 1e-5);

  const std::string scaling = f.get_string_or(a + "rope.scaling.type", "none");
  if (scaling == "linear") {
    hp.rope_scaling = "linear";
    hp.rope_factor = f.get_float_or(a + "rope.scaling.factor", 1.0);
    if (!(hp.rope_factor > 0)) fail(path, a + "rope.scaling.factor must be > 0");
  } else if (scaling != "none") {
    fail(path, "unsupported " + a + "rope.scaling.type '" + scaling + "' (supported: none, linear)");
  }
  hp.rope_original_ctx = f.get_int_or(a + "rope.scaling.original_context_length", hp.rope_original_ctx);

  const gguf_tensor_info* embd = f.find_tensor("token_embd.weight");
  if (!embd) fail(path, "missing tensor token_embd.weight");
  if (embd->shape.size() != 2) fail(path, "token_embd.weight is not 2-D");
  hp.n_vocab = embd->shape[1];
  hp.tied_embeddings = f.find_tensor("output.weight") == nullptr;
  hp.attn_bias = f.find_tensor("blk.0.attn_q.bias") != nullptr;

  const int64_t D = hp.d_model, Q = hp.n_head * hp.head_dim, KV = hp.n_head_kv * hp.head_dim;
  std::vector<std::pair<std::string, std::vector<int64_t>>> expected;  // torch [out, in]
  expected.push_back({"token_embd.weight", {hp.n_vocab, D}});
  expected.push_back({"output_norm.weight", {D}});
  if (!hp.tied_embeddings) expected.push_back({"output.weight", {hp.n_vocab, D}});
  for (int64_t i = 0; i < hp.n_layer; ++i) {
    const std::string b = "blk." + std::to_string(i) + ".";
    expected.push_back({b + "attn_norm.weight", {D}});
    expected.push_back({b + "attn_q.weight", {Q, D}});
    expected.push_back({b + "attn_k.weight", {KV, D}});
    expected.push_back({b + "attn_v.weight", {KV, D}});
    if (hp.attn_bias) {
      expected.push_back({b + "attn_q.bias", {Q}});
      expected.push_back({b + "attn_k.bias", {KV}});
      expected.push_back({b + "attn_v.bias", {KV}});
    }
    expected.push_back({b + "attn_output.weight", {D, Q}});
    expected.push_back({b + "ffn_norm.weight", {D}});
    expected.push_back({b + "ffn_gate.weight", {hp.d_ff, D}});
    expected.push_back({b + "ffn_up.weight", {hp.d_ff, D}});
    expected.push_back({b + "ffn_down.weight", {D, hp.d_ff}});
  }
  // llama3-style RoPE scaling is stored by llama.cpp's converter as a tensor of
  // per-frequency divisors rather than as metadata.
  if (f.find_tensor("rope_freqs.weight")) {
    hp.rope_scaling = "llama3";
    expected.push_back({"rope_freqs.weight", {hp.head_dim / 2}});
  }

  for (const auto& [name, shape] : expected) {
    const gguf_tensor_info* t = f.find_tensor(name);
    if (!t) fail(path, "missing tensor " + name);
    std::vector<int64_t> ggml_shape(shape.rbegin(), shape.rend());
    if (t->shape != ggml_shape) {
      std::ostringstream os;
      os << "tensor " << name << " has ggml shape [";
      for (size_t k = 0; k < t->shape.size(); ++k) os << (k ? ", " : "") << t->shape[k];
      os << "], expected [";
      for (size_t k = 0; k < ggml_shape.size(); ++k) os << (k ? ", " : "") << ggml_shape[k];
      os << "] for " << hp.to_string();
      fail(path, os.str());
    }
    torch::Tensor w = torch::empty(shape, torch::kFloat32);
    try {
      f.dequantize(*t, w.data_ptr<float>());
    } catch (const std::exception& e) {
      fail(path, "tensor " + name + ": " + e.what());
    }
    const bool is_q = name.size() > 13 && name.compare(name.size() - 13, 13, "attn_q.weight") == 0;
    const bool is_k = name.size() > 13 && name.compare(name.size() - 13, 13, "attn_k.weight") == 0;
    const bool is_qb = name.size() > 11 && name.compare(name.size() - 11, 11, "attn_q.bias") == 0;
    const bool is_kb = name.size() > 11 && name.compare(name.size() - 11, 11, "attn_k.bias") == 0;
    if (hp.arch == "llama" && (is_q || is_qb)) w = unpermute_qk(w, hp.n_head);
    if (hp.arch == "llama" && (is_k || is_kb)) w = unpermute_qk(w, hp.n_head_kv);
    // Norm weights and RoPE factors stay fp32-precise but follow the dtype asked for.
    ck.weights[name] = dtype == torch::kFloat32 ? w : w.to(dtype);
    const auto type = static_cast<ggml_type>(t->type);
    if (keep_blocks && shape.size() == 2 && (type == ggml_type::q4_1 || type == ggml_type::q8_0)) {
      // Rows are independent runs of blocks, so the q/k row un-permutation
      // applies to the packed bytes as to the dequantized rows.
      const int64_t rb = int64_t(ggml_row_bytes(t->type, shape[1]));
      if (uint64_t(rb * shape[0]) != t->n_bytes) fail(path, "tensor " + name + ": block bytes do not match its shape");
      uint8_t* src = const_cast<uint8_t*>(f.tensor_data(*t));  // read only: cloned right away
      torch::Tensor q = torch::from_blob(src, {shape[0], rb}, torch::kUInt8).clone();
      if (hp.arch == "llama" && is_q) q = unpermute_qk(q, hp.n_head);
      if (hp.arch == "llama" && is_k) q = unpermute_qk(q, hp.n_head_kv);
      ck.quantized[name] = quantized_weight{t->type, shape[0], shape[1], q};
    }
  }
  return ck;
}

llm_checkpoint load_llm_checkpoint(const std::string& path, torch::Dtype dtype, bool keep_blocks) {
  namespace fs = std::filesystem;
  std::error_code ec;
  if (fs::is_directory(path, ec)) return load_hf_llm(path, dtype);
  if (!fs::exists(path, ec))
    throw std::runtime_error("LLM checkpoint " + path + " does not exist (expected a .gguf file or an "
                             "HF directory with config.json)");
  if (fs::path(path).extension() == ".gguf") return load_gguf_llm(path, dtype, keep_blocks);
  throw std::runtime_error("LLM checkpoint " + path +
                           ": not a .gguf file nor a directory; pass a GGUF file or an HF checkpoint "
                           "directory");
}

}  // namespace undertone::models
