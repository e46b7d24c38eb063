#include "models/nn/llama.hpp"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/core/InferenceMode.h>
#include <torch/csrc/autograd/generated/variable_factories.h>


#include <algorithm>
#include <cmath>
#include <functional>
#include <cstring>
#include <limits>
#include <map>
#include <set>
#include <sstream>
#include <stdexcept>
#include <unordered_map>

#include "models/gguf.hpp"
#include "models/nn/cpu_attention.hpp"

namespace undertone::models {

// ---------------------------------------------------------------- llm_batch

void llm_batch::clear() {
  token.clear();
  embd.clear();
  seq.clear();
  pos.clear();
  logits.clear();
}

void llm_batch::add_token(int64_t id, int32_t s, int64_t p, bool want_logits) {
  token.push_back(id);
  embd.emplace_back();
  seq.push_back(s);
  pos.push_back(p);
  logits.push_back(want_logits ? 1 : 0);
}

void llm_batch::add_embedding(const torch::Tensor& e, int32_t s, int64_t p, bool want_logits) {
  token.push_back(-1);
  embd.push_back(e);
  seq.push_back(s);
  pos.push_back(p);
  logits.push_back(want_logits ? 1 : 0);
}

void llm_batch::add_tokens(const std::vector<int64_t>& ids, int32_t s, int64_t pos0, bool logits_last) {
  for (size_t i = 0; i < ids.size(); ++i)
    add_token(ids[i], s, pos0 + int64_t(i), logits_last && i + 1 == ids.size());
}

void llm_batch::add_embeddings(const torch::Tensor& e, int32_t s, int64_t pos0, bool logits_last) {
  if (e.dim() != 2) throw std::invalid_argument("llm_batch::add_embeddings: expected [n, d_model]");
  const int64_t n = e.size(0);
  for (int64_t i = 0; i < n; ++i) add_embedding(e[i], s, pos0 + i, logits_last && i + 1 == n);
}

int64_t llm_batch::n_wanted() const {
  int64_t n = 0;
  for (uint8_t l : logits) n += l != 0;
  return n;
}

// ---------------------------------------------------------------- helpers

namespace {

torch::Tensor need(const llm_checkpoint& ck, const std::string& name, std::vector<int64_t> shape) {
  auto it = ck.weights.find(name);
  if (it == ck.weights.end())
    throw std::runtime_error("LLM checkpoint " + ck.path + ": missing tensor " + name);
  if (it->second.sizes() != torch::IntArrayRef(shape)) {
    std::ostringstream os;
    os << "LLM checkpoint " << ck.path << ": tensor " << name << " has shape " << it->second.sizes()
       << ", expected " << torch::IntArrayRef(shape);
    throw std::runtime_error(os.str());
  }
  return it->second;
}

// x [N, in] @ w[out, in]^T (+ bias). For a single row on the CPU, gemv beats
// the gemm at::linear would call: OpenBLAS's sgemv 2-3x for fp32, ATen's bf16
// gemv ~1.5x over oneDNN's gemm.
torch::Tensor lin(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& bias = {}) {
  if (x.dim() == 2 && x.size(0) == 1 && x.is_cpu()) {
    torch::Tensor y = at::mv(w, x.reshape({-1}));
    if (bias.defined()) y = y + bias;
    return y.unsqueeze(0);
  }
  return bias.defined() ? at::linear(x, w, bias) : at::linear(x, w);
}

// Scaled-dot-product attention with grouped-query heads.
// q [S, R, H, hd] (already scaled by 1/sqrt(hd)); k, v [S, Hkv, L, hd];
// mask [S, R, L] float32 additive (0 / -inf) or undefined (all allowed).
// Returns [S, R, H * hd] in v's dtype. Scores and softmax in float32.
torch::Tensor attend(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                     const torch::Tensor& mask) {
  const int64_t S = q.size(0), R = q.size(1), H = q.size(2), hd = q.size(3);
  const int64_t Hkv = k.size(1), L = k.size(2), rep = H / Hkv;
  // Query heads h = g * rep + j share kv head g (HF repeat_kv order).
  torch::Tensor qg = q.view({S, R, Hkv, rep, hd}).permute({0, 2, 1, 3, 4}).reshape({S, Hkv, R * rep, hd});
  torch::Tensor sc = at::matmul(qg, k.transpose(-1, -2)).to(torch::kFloat32);  // [S, Hkv, R*rep, L]
  if (mask.defined()) sc = (sc.view({S, Hkv, R, rep, L}) + mask.view({S, 1, R, 1, L})).view({S, Hkv, R * rep, L});
  torch::Tensor p = at::softmax(sc, -1).to(v.scalar_type());
  torch::Tensor o = at::matmul(p, v);  // [S, Hkv, R*rep, hd]
  return o.view({S, Hkv, R, rep, hd}).permute({0, 2, 1, 3, 4}).reshape({S, R, H * hd});
}

// ---- float32 row helpers of the CPU decode path (a few rows of d_model or
// d_ff values: plain loops beat a dozen small ATen ops and their allocations).

// Rotate-half RoPE in place on `heads` heads of hd values, then * scale.
void rope_row(float* p, int64_t heads, int64_t hd, const float* cos, const float* sin, float scale) {
  const int64_t half = hd / 2;
  for (int64_t h = 0; h < heads; ++h, p += hd)
    for (int64_t i = 0; i < half; ++i) {
      const float x1 = p[i], x2 = p[half + i];
      p[i] = (x1 * cos[i] - x2 * sin[i]) * scale;
      p[half + i] = (x2 * cos[i] + x1 * sin[i]) * scale;
    }
}

// Writes n float32 values as T (float, bf16 or fp16; round to nearest even).
template <class T>
void store_as(void* dst, const float* src, int64_t n) {
  T* d = static_cast<T*>(dst);
  for (int64_t i = 0; i < n; ++i) d[i] = T(src[i]);
}

}  // namespace

// ---------------------------------------------------------------- model

llama_model::llama_model(const llm_checkpoint& ck, const llama_options& opt) : hp_(ck.hp), opt_(opt) {
  if (opt.dtype != torch::kFloat32 && opt.dtype != torch::kBFloat16 && opt.dtype != torch::kFloat16)
    throw std::invalid_argument("llama_model: dtype must be fp32, bf16 or fp16");
  const llama_hparams& h = hp_;
  if (h.n_layer <= 0 || h.d_model <= 0 || h.n_head <= 0 || h.n_head_kv <= 0 || h.n_head % h.n_head_kv ||
      h.head_dim <= 0 || h.head_dim % 2 || h.d_ff <= 0 || h.n_vocab <= 0)
    throw std::runtime_error("LLM checkpoint " + ck.path + ": invalid hyper-parameters: " + h.to_string());
  torch::NoGradGuard no_grad;
  const auto to_dev = [&](const torch::Tensor& t) {
    torch::Tensor r = t.to(opt.device, opt.dtype).contiguous();
    r.set_requires_grad(false);
    return r;
  };
  const int64_t D = h.d_model, Q = h.n_head * h.head_dim, KV = h.n_head_kv * h.head_dim;
  tok_embd_ = to_dev(need(ck, "token_embd.weight", {h.n_vocab, D}));
  out_norm_ = to_dev(need(ck, "output_norm.weight", {D}));
  if (h.tied_embeddings)
    output_ = tok_embd_;
  else
    output_ = to_dev(need(ck, "output.weight", {h.n_vocab, D}));
  for (int64_t i = 0; i < h.n_layer; ++i) {
    const std::string b = "blk." + std::to_string(i) + ".";
    layer L;
    L.attn_norm = to_dev(need(ck, b + "attn_norm.weight", {D}));
    L.wqkv = to_dev(torch::cat({need(ck, b + "attn_q.weight", {Q, D}), need(ck, b + "attn_k.weight", {KV, D}),
                                need(ck, b + "attn_v.weight", {KV, D})}));
    if (h.attn_bias)
      L.bqkv = to_dev(torch::cat({need(ck, b + "attn_q.bias", {Q}), need(ck, b + "attn_k.bias", {KV}),
                                  need(ck, b + "attn_v.bias", {KV})}));
    L.wo = to_dev(need(ck, b + "attn_output.weight", {D, Q}));
    L.ffn_norm = to_dev(need(ck, b + "ffn_norm.weight", {D}));
    L.w_gate_up = to_dev(torch::cat({need(ck, b + "ffn_gate.weight", {h.d_ff, D}),
                                     need(ck, b + "ffn_up.weight", {h.d_ff, D})}));
    L.w_down = to_dev(need(ck, b + "ffn_down.weight", {D, h.d_ff}));
    layers_.push_back(std::move(L));
  }

  // RoPE frequencies, float32, computed in double.
  const int64_t half = h.head_dim / 2;
  std::vector<float> inv(static_cast<size_t>(half));
  auto rf = ck.weights.find("rope_freqs.weight");
  torch::Tensor factors;
  if (rf != ck.weights.end()) factors = need(ck, "rope_freqs.weight", {half}).to(torch::kFloat64).contiguous();
  for (int64_t i = 0; i < half; ++i) {
    double f = 1.0 / std::pow(h.rope_theta, double(2 * i) / double(h.head_dim));
    if (factors.defined()) {
      // llama.cpp stores llama3 scaling as per-frequency divisors.
      f /= factors.data_ptr<double>()[i];
    } else if (h.rope_scaling == "linear") {
      f /= h.rope_factor;
    } else if (h.rope_scaling == "llama3") {
      const double pi = 3.14159265358979323846;
      const double low_wl = double(h.rope_original_ctx) / h.rope_low_freq_factor;
      const double high_wl = double(h.rope_original_ctx) / h.rope_high_freq_factor;
      const double wl = 2 * pi / f;
      if (wl > low_wl) {
        f /= h.rope_factor;
      } else if (wl >= high_wl) {
        const double smooth = (double(h.rope_original_ctx) / wl - h.rope_low_freq_factor) /
                              (h.rope_high_freq_factor - h.rope_low_freq_factor);
        f = (1 - smooth) * f / h.rope_factor + smooth * f;
      }
    } else if (h.rope_scaling != "none") {
      throw std::runtime_error("LLM checkpoint " + ck.path + ": unsupported rope scaling '" + h.rope_scaling +
                               "' (supported: none, linear, llama3)");
    }
    inv[size_t(i)] = float(f);
  }
  inv_freq_ = torch::tensor(inv).to(opt.device);
  pack_for_cpu_decode(ck);
}

void llama_model::pack_for_cpu_decode(const llm_checkpoint& ck) {
  using cpu_gemv::wformat;
  if (!opt_.cpu_decode || !opt_.device.is_cpu() || !cpu_gemv::supported(wformat::q4_1)) return;
  const bool bf16 = opt_.dtype == torch::kBFloat16;
  // The rows of `names` concatenated as in the fused ATen weight `fused`: from
  // their GGUF blocks when all parts have the same block type, else the bf16
  // weight itself (bf16 models), else nothing (ATen).
  auto pack = [&](const std::vector<std::string>& names, const torch::Tensor& fused) {
    packed p;
    p.out = fused.size(0);
    p.in = fused.size(1);
    std::vector<torch::Tensor> parts;
    uint32_t type = 0;
    for (const auto& n : names) {
      auto it = ck.quantized.find(n);
      if (it == ck.quantized.end() || (!parts.empty() && it->second.type != type) || it->second.cols != p.in) {
        parts.clear();
        break;
      }
      type = it->second.type;
      parts.push_back(it->second.data);
    }
    if (!parts.empty() && (type == uint32_t(ggml_type::q4_1) || type == uint32_t(ggml_type::q8_0))) {
      p.f = type == uint32_t(ggml_type::q4_1) ? wformat::q4_1 : wformat::q8_0;
      p.data = parts.size() == 1 ? parts[0].contiguous() : torch::cat(parts).contiguous();
      if (p.data.size(0) != p.out || p.data.size(1) != cpu_gemv::row_bytes(p.f, p.in)) p = packed{};
    } else if (bf16 && fused.scalar_type() == torch::kBFloat16 && fused.is_contiguous()) {
      p.f = wformat::bf16;
      p.data = fused;
    }
    if (p.f != wformat::none && bf16 && opt_.cpu_decode_amx_prepack && cpu_gemv::amx_supported() &&
        fused.scalar_type() == torch::kBFloat16) {
      // The loader's bf16 weight: the values gemm_bf16 makes from the blocks.
      const torch::Tensor wc = fused.contiguous();
      p.amx = torch::empty({cpu_gemv::amx_packed_size(p.out, p.in)}, torch::kBFloat16);
      cpu_gemv::amx_pack_weights(reinterpret_cast<const uint16_t*>(wc.data_ptr()), p.out, p.in,
                                 reinterpret_cast<uint16_t*>(p.amx.data_ptr()));
      amx_packed_ = true;
    }
    cpu_decode_ready_ |= p.f != wformat::none;
    return p;
  };
  for (size_t i = 0; i < layers_.size(); ++i) {
    const std::string b = "blk." + std::to_string(i) + ".";
    layer& L = layers_[i];
    L.p_qkv = pack({b + "attn_q.weight", b + "attn_k.weight", b + "attn_v.weight"}, L.wqkv);
    L.p_o = pack({b + "attn_output.weight"}, L.wo);
    L.p_gate_up = pack({b + "ffn_gate.weight", b + "ffn_up.weight"}, L.w_gate_up);
    L.p_down = pack({b + "ffn_down.weight"}, L.w_down);
  }
  p_output_ = pack({hp_.tied_embeddings ? "token_embd.weight" : "output.weight"}, output_);
  if (opt_.dtype != torch::kFloat32 && opt_.dtype != torch::kBFloat16) cpu_decode_ready_ = false;
  if (!cpu_decode_ready_) return;
  for (layer& L : layers_) {
    L.attn_norm_f32 = L.attn_norm.to(torch::kFloat32).contiguous();
    L.ffn_norm_f32 = L.ffn_norm.to(torch::kFloat32).contiguous();
  }
  out_norm_f32_ = out_norm_.to(torch::kFloat32).contiguous();
}

int64_t llama_model::cpu_decode_rows() const {
  return amx_packed_ && cpu_gemv::amx_supported() ? opt_.cpu_decode_amx_max_rows : opt_.cpu_decode_max_rows;
}

std::string llama_model::cpu_decode_info() const {
  if (!cpu_decode_ready_) return "off";
  std::map<std::string, int> n;
  auto count = [&](const packed& p) {
    static const char* names[] = {"aten", "bf16", "q4_1", "q8_0"};
    ++n[names[int(p.f)]];
  };
  for (const layer& L : layers_) {
    count(L.p_qkv);
    count(L.p_o);
    count(L.p_gate_up);
    count(L.p_down);
  }
  count(p_output_);
  std::string r;
  for (const auto& [k, v] : n) r += (r.empty() ? "" : ", ") + k + " x" + std::to_string(v);
  return r + " (" + cpu_gemv::isa() + (amx_packed_ ? ", pre-packed AMX tiles" : "") + ", up to " +
         std::to_string(cpu_decode_rows()) + " rows)";
}

torch::Tensor llama_model::proj(const torch::Tensor& x, const torch::Tensor& w, const packed& p,
                                const torch::Tensor& bias, bool fast, bool f32_out, bool wide,
                                const torch::Tensor& out_buf, const torch::Tensor& xws) const {
  if (!fast || p.f == cpu_gemv::wformat::none) {
    const torch::Tensor xw = x.to(w.scalar_type());  // the decode path's float32 rows on a bf16 weight
    torch::Tensor y = bias.defined() ? lin(xw, w, bias) : lin(xw, w);
    return f32_out ? y.to(torch::kFloat32) : y;
  }
  if (wide && p.amx.defined() && cpu_gemv::amx_supported()) {
    // Rows rounded to bf16 straight into the A-tile layout (row stride
    // amx_k(in), rows padded to 16), then tile loads and TDPBF16PS only.
    const torch::Tensor xf = x.to(torch::kFloat32).contiguous();
    const int64_t rows = xf.size(0), in = p.in, out = p.out, K = cpu_gemv::amx_k(in);
    const int64_t rp = (rows + 15) / 16 * 16;
    torch::Tensor xin = xws.defined() && xws.numel() >= rp * K ? xws : torch::empty({rp, K}, torch::kBFloat16);
    auto* xb = reinterpret_cast<uint16_t*>(xin.data_ptr());
    const float* xp = xf.data_ptr<float>();
    cpu_gemv::to_bf16_rows(xp, in, xb, K, 0, rows);
    if (rp > rows) std::memset(xb + rows * K, 0, size_t((rp - rows) * K) * 2);
    torch::Tensor y = out_buf.defined() ? out_buf.narrow(0, 0, rows) : torch::empty({rows, out}, torch::kFloat32);
    const auto* wp = reinterpret_cast<const uint16_t*>(p.amx.data_ptr());
    float* yp = y.data_ptr<float>();
    at::parallel_for(0, (out + 15) / 16, 1, [&](int64_t a, int64_t e) {
      cpu_gemv::amx_gemm_packed(wp, out, in, xb, rows, yp, out, a * 16, e * 16);
    });
    ++kernel_calls_;
    if (bias.defined()) y.add_(bias);
    return f32_out ? y : y.to(opt_.dtype);
  }
  if (wide) {
    const torch::Tensor xin = x.to(torch::kBFloat16).contiguous();  // once per projection input
    const int64_t rows = xin.size(0), in = p.in, out = p.out;
    torch::Tensor y = out_buf.defined() ? out_buf.narrow(0, 0, rows) : torch::empty({rows, out}, torch::kFloat32);
    const auto* xb = reinterpret_cast<const uint16_t*>(xin.data_ptr());
    const void* wp = p.data.data_ptr();
    float* yp = y.data_ptr<float>();
    const cpu_gemv::wformat f = p.f;
    at::parallel_for(0, out, 16, [&](int64_t a, int64_t e) { cpu_gemv::gemm_bf16(f, wp, in, xb, rows, yp, out, a, e); });
    ++kernel_calls_;
    if (bias.defined()) y.add_(bias);
    return f32_out ? y : y.to(opt_.dtype);
  }
  const bool bf16 = p.f == cpu_gemv::wformat::bf16;
  const torch::Tensor xin = x.to(bf16 ? torch::kBFloat16 : torch::kFloat32).contiguous();
  const int64_t rows = xin.size(0), in = p.in, out = p.out;
  torch::Tensor y = out_buf.defined() ? out_buf.narrow(0, 0, rows) : torch::empty({rows, out}, torch::kFloat32);
  const float* xf = bf16 ? nullptr : xin.data_ptr<float>();
  const uint16_t* xb = bf16 ? reinterpret_cast<const uint16_t*>(xin.data_ptr()) : nullptr;
  const void* wp = p.data.data_ptr();
  float* yp = y.data_ptr<float>();
  const cpu_gemv::wformat f = p.f;
  at::parallel_for(0, out, 64, [&](int64_t a, int64_t e) { cpu_gemv::gemv(f, wp, in, xf, xb, rows, yp, out, a, e); });
  ++kernel_calls_;
  if (bias.defined()) y.add_(bias);
  return f32_out ? y : y.to(opt_.dtype);
}

std::shared_ptr<llama_model> llama_model::load(const std::string& path, const llama_options& opt) {
  // Dequantize straight to the target dtype so the host copy is as small as it can be.
  const torch::Dtype host = opt.device.is_cpu() ? opt.dtype : torch::kFloat32;
  const bool keep_blocks = opt.cpu_decode && opt.device.is_cpu() && cpu_gemv::supported(cpu_gemv::wformat::q4_1);
  return std::make_shared<llama_model>(load_llm_checkpoint(path, host, keep_blocks), opt);
}

kv_cache llama_model::make_cache(int64_t n_cells) const { return kv_cache(hp_, n_cells, opt_.device, opt_.dtype); }

std::vector<std::pair<std::string, torch::Tensor>> llama_model::named_parameters() const {
  std::vector<std::pair<std::string, torch::Tensor>> r;
  r.emplace_back("token_embd.weight", tok_embd_);
  for (size_t i = 0; i < layers_.size(); ++i) {
    const std::string b = "blk." + std::to_string(i) + ".";
    const layer& L = layers_[i];
    r.emplace_back(b + "attn_norm.weight", L.attn_norm);
    r.emplace_back(b + "attn_qkv.weight", L.wqkv);
    if (L.bqkv.defined()) r.emplace_back(b + "attn_qkv.bias", L.bqkv);
    r.emplace_back(b + "attn_output.weight", L.wo);
    r.emplace_back(b + "ffn_norm.weight", L.ffn_norm);
    r.emplace_back(b + "ffn_gate_up.weight", L.w_gate_up);
    r.emplace_back(b + "ffn_down.weight", L.w_down);
  }
  r.emplace_back("output_norm.weight", out_norm_);
  if (!hp_.tied_embeddings) r.emplace_back("output.weight", output_);
  return r;
}

torch::Tensor llama_model::rms_norm(const torch::Tensor& x, const torch::Tensor& w) const {
  torch::Tensor var = x.pow(2).mean(-1, /*keepdim=*/true);
  return (x * at::rsqrt(var + hp_.rms_eps)).to(opt_.dtype) * w;
}

std::pair<torch::Tensor, torch::Tensor> llama_model::rope_tables(const torch::Tensor& pos) const {
  torch::Tensor ang = pos.to(torch::kFloat32).unsqueeze(-1) * inv_freq_;  // [N, half]
  return {at::cos(ang).to(opt_.dtype), at::sin(ang).to(opt_.dtype)};
}

torch::Tensor llama_model::apply_rope(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin) {
  const int64_t half = x.size(-1) / 2;
  torch::Tensor x1 = x.narrow(-1, 0, half), x2 = x.narrow(-1, half, half);
  torch::Tensor c = cos.unsqueeze(-2), s = sin.unsqueeze(-2);  // broadcast over heads
  return at::cat({x1 * c - x2 * s, x2 * c + x1 * s}, -1);
}

torch::Tensor llama_model::ffn(const layer& L, const torch::Tensor& x) const {
  torch::Tensor gu = lin(rms_norm(x, L.ffn_norm), L.w_gate_up);
  torch::Tensor a = at::silu(gu.narrow(-1, 0, hp_.d_ff)) * gu.narrow(-1, hp_.d_ff, hp_.d_ff);
  return x + lin(a, L.w_down).to(torch::kFloat32);
}

torch::Tensor llama_model::lm_head(const torch::Tensor& hidden) const {
  return lin(hidden.to(opt_.dtype), output_).to(torch::kFloat32);
}

torch::Tensor llama_model::embed_tokens(const torch::Tensor& ids) const {
  torch::Tensor flat = ids.reshape({-1}).to(opt_.device, torch::kLong);
  std::vector<int64_t> shape(ids.sizes().begin(), ids.sizes().end());
  shape.push_back(hp_.d_model);
  return tok_embd_.index_select(0, flat).to(torch::kFloat32).view(shape);
}

// ---------------------------------------------------------------- batched step

torch::Tensor llama_model::step(const llm_batch& b, kv_cache& cache) const {
  c10::InferenceMode inference;
  const int64_t N = int64_t(b.size());
  const auto dev = opt_.device;
  const auto long_opts = torch::TensorOptions().dtype(torch::kLong);
  if (b.embd.size() != b.size() || b.seq.size() != b.size() || b.pos.size() != b.size() ||
      b.logits.size() != b.size())
    throw std::invalid_argument("llm step: batch vectors token/embd/seq/pos/logits differ in length");
  if (N == 0) return torch::empty({0, hp_.n_vocab}, torch::TensorOptions().device(dev).dtype(torch::kFloat32));
  if (cache.n_layer() != hp_.n_layer || cache.k(0).size(0) != hp_.n_head_kv ||
      cache.k(0).size(2) != hp_.head_dim || cache.device() != dev || cache.dtype() != opt_.dtype)
    throw std::invalid_argument("llm step: KV cache was made for another model, device or dtype");

  // ---- validate rows
  std::set<std::pair<int32_t, int64_t>> row_keys;
  std::unordered_map<int32_t, size_t> group_of_seq;  // seq -> index into seq_rows
  std::vector<std::vector<int64_t>> seq_rows;
  std::vector<int32_t> seq_ids;
  std::vector<int64_t> tok_rows, tok_ids, emb_rows, wanted;
  for (int64_t r = 0; r < N; ++r) {
    const int32_t s = b.seq[size_t(r)];
    const int64_t p = b.pos[size_t(r)];
    if (s < 0 || p < 0)
      throw std::invalid_argument("llm step: row " + std::to_string(r) + " has negative seq or pos");
    if (!row_keys.insert({s, p}).second)
      throw std::invalid_argument("llm step: seq " + std::to_string(s) + " pos " + std::to_string(p) +
                                  " appears twice in the batch");
    const int64_t t = b.token[size_t(r)];
    if (t >= 0) {
      if (t >= hp_.n_vocab)
        throw std::invalid_argument("llm step: row " + std::to_string(r) + " token " + std::to_string(t) +
                                    " out of range (n_vocab " + std::to_string(hp_.n_vocab) + ")");
      tok_rows.push_back(r);
      tok_ids.push_back(t);
    } else {
      const torch::Tensor& e = b.embd[size_t(r)];
      if (!e.defined() || e.numel() != hp_.d_model || !e.is_floating_point())
        throw std::invalid_argument("llm step: row " + std::to_string(r) +
                                    " is an embedding row without a float [d_model=" +
                                    std::to_string(hp_.d_model) + "] vector");
      emb_rows.push_back(r);
    }
    if (b.logits[size_t(r)]) wanted.push_back(r);
    auto [it, fresh] = group_of_seq.emplace(s, seq_rows.size());
    if (fresh) {
      seq_rows.emplace_back();
      seq_ids.push_back(s);
    }
    seq_rows[it->second].push_back(r);
  }
  {
    const auto& cs = cache.cell_seq();
    const auto& cp = cache.cell_pos();
    for (int64_t c = 0; c < cache.extent(); ++c)
      if (cs[size_t(c)] >= 0 && group_of_seq.count(cs[size_t(c)]) && row_keys.count({cs[size_t(c)], cp[size_t(c)]}))
        throw std::invalid_argument("llm step: seq " + std::to_string(cs[size_t(c)]) + " already has pos " +
                                    std::to_string(cp[size_t(c)]) + " in the KV cache (truncate it first)");
  }

  const std::vector<int64_t> cells = cache.allocate(b.seq, b.pos);  // throws "KV cache full" untouched
  try {
    // ---- attention groups: each sequence with several rows alone; all
    // single-row (decode) sequences together, keys padded to the longest.
    const auto& cs = cache.cell_seq();
    const auto& cp = cache.cell_pos();
    std::vector<std::vector<int64_t>> seq_cells(seq_rows.size());
    for (int64_t c = 0; c < cache.extent(); ++c) {
      if (cs[size_t(c)] < 0) continue;
      auto it = group_of_seq.find(cs[size_t(c)]);
      if (it != group_of_seq.end()) seq_cells[it->second].push_back(c);
    }
    struct group {
      std::vector<size_t> seqs;  // indices into seq_rows
      int64_t R = 0, L = 0;
      torch::Tensor rows;        // [S*R] batch rows (undefined: rows row0..row0+R-1)
      int64_t row0 = -1;
      torch::Tensor key_idx;     // [S*L] cells (undefined: contiguous from cell0)
      int64_t cell0 = -1;
      torch::Tensor mask;        // [S, R, L] additive float32 or undefined
    };
    // Built only where ATen attends (the CPU decode path attends per row).
    std::vector<group> groups;
    auto build_groups = [&] {
      group decode;
      for (size_t g = 0; g < seq_rows.size(); ++g) {
        if (seq_rows[g].size() == 1) {
          decode.seqs.push_back(g);
        } else {
          group G;
          G.seqs.push_back(g);
          groups.push_back(std::move(G));
        }
      }
      if (!decode.seqs.empty()) groups.push_back(std::move(decode));
      for (group& G : groups) {
        const int64_t S = int64_t(G.seqs.size());
        G.R = int64_t(seq_rows[G.seqs[0]].size());
        for (size_t g : G.seqs) G.L = std::max(G.L, int64_t(seq_cells[g].size()));
        // rows
        std::vector<int64_t> rows;
        for (size_t g : G.seqs) rows.insert(rows.end(), seq_rows[g].begin(), seq_rows[g].end());
        bool contiguous_rows = true;
        for (size_t i = 1; i < rows.size(); ++i) contiguous_rows &= rows[i] == rows[i - 1] + 1;
        if (contiguous_rows)
          G.row0 = rows[0];
        else
          G.rows = torch::tensor(rows, long_opts).to(dev);
        // keys
        const auto& c0 = seq_cells[G.seqs[0]];
        if (S == 1 && c0.back() - c0.front() + 1 == G.L) {
          G.cell0 = c0.front();
        } else {
          std::vector<int64_t> idx;
          idx.reserve(size_t(S * G.L));
          for (size_t g : G.seqs) {
            const auto& sc = seq_cells[g];
            idx.insert(idx.end(), sc.begin(), sc.end());
            idx.insert(idx.end(), size_t(G.L) - sc.size(), sc.front());  // padding, masked below
          }
          G.key_idx = torch::tensor(idx, long_opts).to(dev);
        }
        // mask
        torch::Tensor m = torch::zeros({S, G.R, G.L}, torch::kFloat32);
        float* mp = m.data_ptr<float>();
        bool any = false;
        const float ninf = -std::numeric_limits<float>::infinity();
        for (int64_t si = 0; si < S; ++si) {
          const auto& sc = seq_cells[G.seqs[size_t(si)]];
          const auto& sr = seq_rows[G.seqs[size_t(si)]];
          for (int64_t r = 0; r < G.R; ++r) {
            const int64_t p = b.pos[size_t(sr[size_t(r)])];
            float* row = mp + (si * G.R + r) * G.L;
            for (int64_t j = 0; j < G.L; ++j) {
              const bool ok = j < int64_t(sc.size()) && cp[size_t(sc[size_t(j)])] <= p;
              if (!ok) {
                row[j] = ninf;
                any = true;
              }
            }
          }
        }
        if (any) G.mask = m.to(dev);
      }
    };

    // ---- inputs [N, d_model] float32
    torch::Tensor x;
    if (emb_rows.empty()) {
      x = tok_embd_.index_select(0, torch::tensor(tok_ids, long_opts).to(dev)).to(torch::kFloat32);
    } else {
      std::vector<torch::Tensor> es;
      es.reserve(emb_rows.size());
      for (int64_t r : emb_rows) es.push_back(b.embd[size_t(r)].reshape({hp_.d_model}).to(dev, torch::kFloat32));
      torch::Tensor e = at::stack(es);
      if (tok_rows.empty()) {
        x = e;
      } else {
        x = torch::empty({N, hp_.d_model}, torch::TensorOptions().device(dev).dtype(torch::kFloat32));
        x.index_copy_(0, torch::tensor(emb_rows, long_opts).to(dev), e);
        x.index_copy_(0, torch::tensor(tok_rows, long_opts).to(dev),
                      tok_embd_.index_select(0, torch::tensor(tok_ids, long_opts).to(dev)).to(torch::kFloat32));
      }
    }
    const int64_t H = hp_.n_head, Hkv = hp_.n_head_kv, hd = hp_.head_dim;
    const int64_t Q = H * hd, KV = Hkv * hd;
    const double scale = 1.0 / std::sqrt(double(hd));
    // Attention of q [N, H, hd] (model dtype) over the cache's keys/values of
    // layer l, by groups; returns [N, Q] in the model dtype.
    auto attend_groups = [&](const torch::Tensor& q, const torch::Tensor& K, const torch::Tensor& V) {
      torch::Tensor attn;
      std::vector<torch::Tensor> outs;
      for (const group& G : groups) {
        const int64_t S = int64_t(G.seqs.size());
        torch::Tensor qg = G.rows.defined() ? q.index_select(0, G.rows) : q.narrow(0, G.row0, S * G.R);
        torch::Tensor kg, vg;
        if (G.cell0 >= 0) {
          kg = K.narrow(1, G.cell0, G.L).unsqueeze(0);
          vg = V.narrow(1, G.cell0, G.L).unsqueeze(0);
        } else {
          kg = K.index_select(1, G.key_idx).view({Hkv, S, G.L, hd}).transpose(0, 1);
          vg = V.index_select(1, G.key_idx).view({Hkv, S, G.L, hd}).transpose(0, 1);
        }
        outs.push_back(attend(qg.view({S, G.R, H, hd}), kg, vg, G.mask).view({S * G.R, Q}));
      }
      if (groups.size() == 1 && groups[0].row0 == 0) {
        attn = outs[0];
      } else {
        attn = torch::empty({N, Q}, outs[0].options());
        for (size_t gi = 0; gi < groups.size(); ++gi) {
          const group& G = groups[gi];
          if (G.rows.defined())
            attn.index_copy_(0, G.rows, outs[gi]);
          else
            attn.narrow(0, G.row0, outs[gi].size(0)).copy_(outs[gi]);
        }
      }
      return attn;
    };

    if (cpu_decode_ready_ && N <= cpu_decode_rows()) {
      // CPU decode path (steps of <= cpu_decode_max_rows rows): the matrix
      // products on the kernels (gemm_bf16 for bf16 models from
      // cpu_decode_bf16_rows rows, else gemv); between
      // them the activations stay float32 rows updated in place (RMSNorm, RoPE,
      // SwiGLU, residuals as plain loops); only the KV cache and the attention
      // matmuls use the model dtype.
      const int64_t D = hp_.d_model, F = hp_.d_ff, half = hd / 2, W = Q + 2 * KV;
      const auto f32 = torch::TensorOptions().dtype(torch::kFloat32);
      x = x.contiguous();
      float* xp = x.data_ptr<float>();
      torch::Tensor hbuf = torch::empty({N, D}, f32), abuf = torch::empty({N, F}, f32);
      float* hbp = hbuf.data_ptr<float>();
      float* abp = abuf.data_ptr<float>();
      torch::Tensor ang = torch::tensor(b.pos, long_opts).to(torch::kFloat32).unsqueeze(-1) * inv_freq_;
      torch::Tensor cos32 = at::cos(ang).contiguous(), sin32 = at::sin(ang).contiguous();
      const float* cp32 = cos32.data_ptr<float>();
      const float* sp32 = sin32.data_ptr<float>();
      const bool kv_bf16 = opt_.dtype == torch::kBFloat16;
      const auto store = kv_bf16 ? &store_as<c10::BFloat16> : &store_as<float>;
      const size_t esz = kv_bf16 ? 2 : 4;
      // Attention on cpu_attention (float32 scores and outputs) where it runs:
      // each row's cells are those of its sequence at positions <= its own.
      const bool own_attn = cpu_attention::supported(hd);
      std::vector<std::vector<int64_t>> row_cells(own_attn ? size_t(N) : 0);
      for (size_t n = 0; n < row_cells.size(); ++n)
        for (int64_t c : seq_cells[group_of_seq.at(b.seq[n])])
          if (cp[size_t(c)] <= b.pos[n]) row_cells[n].push_back(c);
      const int64_t rep = H / Hkv;
      // Many rows of a bf16 model: bf16 activations (cpu_decode_bf16_rows).
      const bool wide = opt_.dtype == torch::kBFloat16 && N >= opt_.cpu_decode_bf16_rows && cpu_gemv::bf16_supported();
      // Row loops over the rows in parallel where a chunk has enough work
      // (~16k values: below that waking the other threads costs more).
      auto par_rows = [&](int64_t per_row, const std::function<void(int64_t, int64_t)>& fn) {
        at::parallel_for(0, N, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, per_row)), fn);
      };
      // Buffers reused by every layer (fresh ones per product would page-fault
      // their megabytes in again each time).
      torch::Tensor qkv_buf = torch::empty({N, W}, f32), gu_buf = torch::empty({N, 2 * F}, f32);
      torch::Tensor res_buf = torch::empty({N, D}, f32);  // attention output projection, then FFN output
      torch::Tensor attn_buf = own_attn ? torch::empty({N, Q}, f32) : torch::Tensor();
      const int64_t kmax = std::max({cpu_gemv::amx_k(D), cpu_gemv::amx_k(Q), cpu_gemv::amx_k(F)});
      torch::Tensor xws = wide ? torch::empty({(N + 15) / 16 * 16 * kmax}, torch::kBFloat16) : torch::Tensor();
      torch::Tensor dn;  // the previous layer's FFN output, added at the next norm
      for (int64_t l = 0; l < hp_.n_layer; ++l) {
        const layer& L = layers_[size_t(l)];
        const float* pending = dn.defined() ? dn.data_ptr<float>() : nullptr;
        const float* anw = L.attn_norm_f32.data_ptr<float>();
        par_rows(D, [&](int64_t r0, int64_t r1) {
          cpu_gemv::residual_rms_rows(xp, pending, hbp, D, anw, hp_.rms_eps, r0, r1);
        });
        torch::Tensor qkv = proj(hbuf, L.wqkv, L.p_qkv, L.bqkv, true, true, wide, qkv_buf, xws);  // [N, W] float32
        float* qp = qkv.data_ptr<float>();
        torch::Tensor& K = cache.k(l);
        torch::Tensor& V = cache.v(l);
        if (!K.is_contiguous() || !V.is_contiguous())
          throw std::runtime_error("llm step: KV cache tensors are not contiguous");
        const int64_t n_cells = K.size(1);
        auto* kp = static_cast<char*>(K.data_ptr());
        auto* vp = static_cast<char*>(V.data_ptr());
        par_rows(W, [&](int64_t r0, int64_t r1) {
          for (int64_t n = r0; n < r1; ++n) {
            float* row = qp + n * W;
            rope_row(row, H, hd, cp32 + n * half, sp32 + n * half, float(scale));
            rope_row(row + Q, Hkv, hd, cp32 + n * half, sp32 + n * half, 1.0f);
            for (int64_t g = 0; g < Hkv; ++g) {
              const size_t off = size_t((g * n_cells + cells[size_t(n)]) * hd) * esz;
              store(kp + off, row + Q + g * hd, hd);
              store(vp + off, row + Q + KV + g * hd, hd);
            }
          }
        });
        torch::Tensor attn;
        if (own_attn) {
          attn = attn_buf;
          float* atp = attn.data_ptr<float>();
          // Per (row, kv head): its rep query heads h = g * rep + j together.
          at::parallel_for(0, N * Hkv, 1, [&](int64_t t0, int64_t t1) {
            std::vector<float> scratch;
            for (int64_t t = t0; t < t1; ++t) {
              const int64_t n = t / Hkv, g = t % Hkv;
              const auto& rc = row_cells[size_t(n)];
              scratch.resize(rc.size() * size_t(rep));
              const size_t kv_off = size_t(g * n_cells * hd) * esz;
              cpu_attention::attend_heads(qp + n * W + g * rep * hd, rep, kp + kv_off, vp + kv_off, kv_bf16, hd,
                                          rc.data(), int64_t(rc.size()), scratch.data(), atp + n * Q + g * rep * hd);
            }
          });
        } else {
          if (groups.empty()) build_groups();
          attn = attend_groups(qkv.narrow(1, 0, Q).to(opt_.dtype).view({N, H, hd}), K, V);
        }
        torch::Tensor o = proj(attn, L.wo, L.p_o, {}, true, true, wide, res_buf, xws);
        const float* op = o.data_ptr<float>();
        const float* fnw = L.ffn_norm_f32.data_ptr<float>();
        par_rows(D, [&](int64_t r0, int64_t r1) {
          cpu_gemv::residual_rms_rows(xp, op, hbp, D, fnw, hp_.rms_eps, r0, r1);
        });
        torch::Tensor gu = proj(hbuf, L.w_gate_up, L.p_gate_up, {}, true, true, wide, gu_buf, xws);  // [N, 2F]
        const float* gp = gu.data_ptr<float>();
        par_rows(F, [&](int64_t r0, int64_t r1) {
          for (int64_t n = r0; n < r1; ++n) cpu_gemv::silu_mul(gp + n * 2 * F, gp + n * 2 * F + F, abp + n * F, F);
        });
        dn = proj(abuf, L.w_down, L.p_down, {}, true, true, wide, res_buf, xws);
      }
      if (wanted.empty())
        return torch::empty({0, hp_.n_vocab}, torch::TensorOptions().device(dev).dtype(torch::kFloat32));
      const int64_t nw = int64_t(wanted.size());
      const float* dnp = dn.data_ptr<float>();
      for (int64_t i = 0; i < nw; ++i) {
        const int64_t r = wanted[size_t(i)];
        cpu_gemv::residual_rms_rows(xp + r * D, dnp + r * D, hbp + i * D, D, out_norm_f32_.data_ptr<float>(),
                                    hp_.rms_eps, 0, 1);
      }
      return proj(hbuf.narrow(0, 0, nw), output_, p_output_, {}, true, true, wide, {}, xws);
    }

    build_groups();
    auto [cos, sin] = rope_tables(torch::tensor(b.pos, long_opts).to(dev));
    bool contiguous_cells = true;
    for (size_t i = 1; i < cells.size(); ++i) contiguous_cells &= cells[i] == cells[i - 1] + 1;
    torch::Tensor cells_t;
    if (!contiguous_cells) cells_t = torch::tensor(cells, long_opts).to(dev);
    for (int64_t l = 0; l < hp_.n_layer; ++l) {
      const layer& L = layers_[size_t(l)];
      torch::Tensor h = rms_norm(x, L.attn_norm);
      torch::Tensor qkv = L.bqkv.defined() ? lin(h, L.wqkv, L.bqkv) : lin(h, L.wqkv);
      torch::Tensor q = apply_rope(qkv.narrow(1, 0, Q).view({N, H, hd}), cos, sin) * scale;
      torch::Tensor k = apply_rope(qkv.narrow(1, Q, KV).view({N, Hkv, hd}), cos, sin);
      torch::Tensor v = qkv.narrow(1, Q + KV, KV).view({N, Hkv, hd});
      torch::Tensor& K = cache.k(l);
      torch::Tensor& V = cache.v(l);
      if (contiguous_cells) {
        K.narrow(1, cells[0], N).copy_(k.transpose(0, 1));
        V.narrow(1, cells[0], N).copy_(v.transpose(0, 1));
      } else {
        K.index_copy_(1, cells_t, k.transpose(0, 1));
        V.index_copy_(1, cells_t, v.transpose(0, 1));
      }
      x = x + lin(attend_groups(q, K, V), L.wo).to(torch::kFloat32);
      x = ffn(L, x);
    }
    if (wanted.empty())
      return torch::empty({0, hp_.n_vocab}, torch::TensorOptions().device(dev).dtype(torch::kFloat32));
    torch::Tensor xw = int64_t(wanted.size()) == N ? x : x.index_select(0, torch::tensor(wanted, long_opts).to(dev));
    return lm_head(rms_norm(xw, out_norm_));
  } catch (...) {
    cache.release(cells);
    throw;
  }
}

// ---------------------------------------------------------------- training forward

torch::Tensor llama_model::forward_embeddings(const torch::Tensor& embeds, const torch::Tensor& attention_mask,
                                              const torch::Tensor& positions, bool hidden_only) const {
  if (embeds.dim() != 3 || embeds.size(2) != hp_.d_model)
    throw std::invalid_argument("llama_model::forward_embeddings: embeds must be [B, T, d_model=" +
                                std::to_string(hp_.d_model) + "]");
  const int64_t B = embeds.size(0), T = embeds.size(1);
  const auto dev = opt_.device;
  torch::Tensor mask = attention_mask.defined()
                           ? attention_mask.to(dev).to(torch::kBool)
                           : torch::ones({B, T}, torch::TensorOptions().device(dev).dtype(torch::kBool));
  if (mask.sizes() != torch::IntArrayRef({B, T}))
    throw std::invalid_argument("llama_model::forward_embeddings: attention_mask must be [B, T]");
  torch::Tensor pos = positions.defined() ? positions.to(dev, torch::kLong)
                                          : (mask.to(torch::kLong).cumsum(1) - 1).clamp_min(0);
  if (pos.sizes() != torch::IntArrayRef({B, T}))
    throw std::invalid_argument("llama_model::forward_embeddings: positions must be [B, T]");

  // Causal over real keys; every query may always see itself, so padded rows
  // never softmax over nothing (which would put NaN into the gradients).
  const auto bool_opts = torch::TensorOptions().device(dev).dtype(torch::kBool);
  torch::Tensor causal = torch::ones({T, T}, bool_opts).tril();
  torch::Tensor allowed = (causal.unsqueeze(0) & mask.unsqueeze(1)) | torch::eye(T, bool_opts).unsqueeze(0);
  torch::Tensor add_mask = torch::zeros({B, T, T}, torch::TensorOptions().device(dev).dtype(torch::kFloat32))
                               .masked_fill(allowed.logical_not(), -std::numeric_limits<float>::infinity());

  auto [cos, sin] = rope_tables(pos.reshape({-1}));
  cos = cos.view({B, T, -1});
  sin = sin.view({B, T, -1});
  const int64_t H = hp_.n_head, Hkv = hp_.n_head_kv, hd = hp_.head_dim;
  const int64_t Q = H * hd, KV = Hkv * hd;
  const double scale = 1.0 / std::sqrt(double(hd));
  torch::Tensor x = embeds.to(dev, torch::kFloat32);
  for (const layer& L : layers_) {
    torch::Tensor h = rms_norm(x, L.attn_norm);
    torch::Tensor qkv = L.bqkv.defined() ? at::linear(h, L.wqkv, L.bqkv) : at::linear(h, L.wqkv);
    torch::Tensor q = apply_rope(qkv.narrow(2, 0, Q).reshape({B, T, H, hd}), cos, sin) * scale;
    torch::Tensor k = apply_rope(qkv.narrow(2, Q, KV).reshape({B, T, Hkv, hd}), cos, sin).transpose(1, 2);
    torch::Tensor v = qkv.narrow(2, Q + KV, KV).reshape({B, T, Hkv, hd}).transpose(1, 2);
    x = x + at::linear(attend(q, k, v, add_mask), L.wo).to(torch::kFloat32);
    x = ffn(L, x);
  }
  torch::Tensor hidden = rms_norm(x, out_norm_);
  return hidden_only ? hidden.to(torch::kFloat32) : lm_head(hidden);
}

}  // namespace undertone::models
