#include "models/nn/whisper_encoder.hpp"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/generated/variable_factories.h>
#include <torch/version.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#endif

#include <algorithm>
#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <limits>
#include <set>
#include <sstream>
#include <stdexcept>

#include <nlohmann/json.hpp>

#include "models/ct2_model.hpp"
#include "models/nn/cpu_features.hpp"
#include "models/nn/cpu_simd.hpp"
#include "models/safetensors.hpp"

namespace undertone::models {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

std::string shape_str(at::IntArrayRef s) {
  std::ostringstream o;
  o << '[';
  for (size_t i = 0; i < s.size(); ++i) o << (i ? ", " : "") << s[i];
  o << ']';
  return o.str();
}

// Pre-computes what softmax needs: half-precision scores are normalized in fp32.
at::Tensor softmax_last(const at::Tensor& s) {
  if (s.scalar_type() == at::kFloat || s.scalar_type() == at::kDouble) return at::softmax(s, -1);
  return at::softmax(s, -1, at::kFloat).to(s.scalar_type());
}

// Fuses q/k/v projections of a HF checkpoint: k has no bias in Whisper, so its
// part of the fused bias is zero (and has no effect on attention anyway).
void fuse_qkv(std::map<std::string, torch::Tensor>& w, const std::string& base,
              const torch::Tensor& qw, const torch::Tensor& qb, const torch::Tensor& kw,
              const torch::Tensor& vw, const torch::Tensor& vb) {
  w[base + "qkv.weight"] = at::cat({qw, kw, vw}, 0);
  w[base + "qkv.bias"] = at::cat({qb, at::zeros_like(qb), vb}, 0);
}

torch::Tensor from_floats(std::vector<float>&& v, const std::vector<int64_t>& shape) {
  return torch::from_blob(v.data(), shape, torch::kFloat32).clone();
}

[[noreturn]] void hf_fail(const std::string& path, const std::string& what) {
  throw std::invalid_argument("whisper_encoder: HF checkpoint " + path + ": " + what);
}

std::shared_ptr<torch::nn::Module> child(torch::nn::Module& parent, const std::string& name) {
  return parent.register_module(name, std::make_shared<torch::nn::Module>());
}

// ---------------------------------------------------------------- fused streaming attention
//
// forward_chunk's attention for one (stream, head) on the CPU: the block's
// queries against the keys/values of the stream's ring (slots [0, e), keys
// in tiles of 16 slots [hd][16], values [cap, hd]) and against the block's own keys, in fp32
// (scores, softmax, weighted sum; bf16 inputs are widened exactly), written
// straight into the [N, Q, d] output, and the block's keys/values copied into
// the ring afterwards. It replaces about 15 small LibTorch ops per stream and
// layer (narrow/matmul/cat/mask/softmax/dtype round trips/copies), which cost
// more than the arithmetic. AVX-512 (checked at run time); other CPUs, fp64
// and CUDA keep the LibTorch path (forward_chunk's fallback).
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define UT_FUSED_ATTENTION 1
#define UT_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma")))
#else
#define UT_FUSED_ATTENTION 0
#endif

struct fused_attention_job {
  const void* q = nullptr;  // query row 0 of this head (model dtype); k at +d, v at +2d elements
  int64_t qkv_stride = 0;   // elements between rows (3 d)
  int64_t cnt = 0;          // block rows
  int64_t skip = 0;         // output rows before the block (zeroed: frame -1 of a first chunk)
  void* kt_ring = nullptr;        // keys of this head, [cap/16][hd][16] tiles; null while the state has no cache
  void* v_ring = nullptr;         // [cap, hd]
  int64_t cap = 0, e = 0;         // ring slots, slots in use [0, e)
  const std::vector<int64_t>* invalid = nullptr;  // slots in [0, e) holding no cached frame (ring holes)
  void* out = nullptr;            // output row 0 of this head (row `skip` is the block's first)
  int64_t out_stride = 0;
  int64_t store_slot = -1;        // >= 0: write the block's keys/values into the ring from this slot
};

bool fused_kernel_cpu() {
#if UT_FUSED_ATTENTION
  return cpu_has_avx512();
#else
  return false;
#endif
}

#if UT_FUSED_ATTENTION
// GCC 12's AVX-512 headers initialise "undefined" vectors from themselves
// (GCC bug 105593): -Wuninitialized false positives once inlined here.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }
inline float widen(float x) { return x; }
inline float widen(c10::BFloat16 x) { return float(x); }

UT_AVX512 inline __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
UT_AVX512 inline __m512 load16(const c10::BFloat16* p, __mmask16 m) {  // bf16 -> fp32 is exact: bits << 16
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}
UT_AVX512 inline __mmask16 tail_mask(int64_t left) {
  return left >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1u);
}

// exp(x) for x <= 0 (simd::exp16: Cephes expf, about 1 ulp), exactly 0 below
// -87.3 (and for -inf, the masked slots).
UT_AVX512 inline __m512 exp16(__m512 x) {
  const __mmask16 keep = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.33654f), _CMP_GE_OQ);
  return _mm512_maskz_mov_ps(keep, simd::exp16(x));
}

// Scores of R query rows (qf, fp32, row stride hd) against one tile of up to 16
// keys stored as [hd][16] (key j's component c at kt[c * 16 + j]).
template <int R, class T>
UT_AVX512 void score_tile(const float* qf, int64_t hd, const T* kt, __mmask16 m, float* s, int64_t ld) {
  __m512 a[R];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) a[r] = _mm512_setzero_ps();
  for (int64_t c = 0; c < hd; ++c) {
    const __m512 k = load16(kt + c * 16, m);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) a[r] = _mm512_fmadd_ps(_mm512_set1_ps(qf[r * hd + c]), k, a[r]);
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) _mm512_mask_storeu_ps(s + r * ld, m, a[r]);
}

// Asks for [p, p + bytes) in cache ahead of use: the ring is read once per call
// and is not in cache; the hardware prefetcher stops at 4 KiB pages.
inline void prefetch(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t i = 0; i < bytes; i += 64) _mm_prefetch(c + i, _MM_HINT_T0);
}
constexpr int64_t k_prefetch_tiles = 4;  // key tiles ahead (8 KiB in bf16)

// Scores of rows [0, rows) (a multiple of 8) against n keys in [n/16][hd][16] tiles.
template <class T>
UT_AVX512 void scores(const float* qf, int64_t rows, int64_t hd, const T* kt, int64_t n, float* s, int64_t ld) {
  const int64_t tile_bytes = 16 * hd * int64_t(sizeof(T));
  for (int64_t r0 = 0; r0 < rows;) {
    const bool wide = rows - r0 > 8;
    if (r0 == 0) prefetch(kt, std::min(k_prefetch_tiles * 16, round_up(n, 16)) * hd * int64_t(sizeof(T)));
    for (int64_t e0 = 0; e0 < n; e0 += 16) {
      const T* tile = kt + e0 * hd;
      if (r0 == 0 && e0 + k_prefetch_tiles * 16 < n) prefetch(tile + k_prefetch_tiles * 16 * hd, tile_bytes);
      if (wide)
        score_tile<16>(qf + r0 * hd, hd, tile, tail_mask(n - e0), s + r0 * ld + e0, ld);
      else
        score_tile<8>(qf + r0 * hd, hd, tile, tail_mask(n - e0), s + r0 * ld + e0, ld);
    }
    r0 += wide ? 16 : 8;
  }
}

// acc[rows, hd] += p[rows, n keys] x v[n keys, hd] (rows a multiple of 4, hd of
// 64). Keys in blocks of 64 so that a block of v is read from memory once and
// from L1 by every group of 4 rows.
template <class T>
UT_AVX512 void pv(const float* p, int64_t ld, int64_t rows, const T* v, int64_t n, float* acc, int64_t hd) {
  const int64_t row_bytes = hd * int64_t(sizeof(T));
  prefetch(v, std::min<int64_t>(n, 64) * row_bytes);
  for (int64_t e0 = 0; e0 < n; e0 += 64) {
    const int64_t e1 = std::min(n, e0 + 64);
    if (e1 < n) prefetch(v + e1 * hd, (std::min(n, e1 + 64) - e1) * row_bytes);
    for (int64_t r0 = 0; r0 < rows; r0 += 4)
      for (int64_t c0 = 0; c0 < hd; c0 += 64) {
        float* ac = acc + r0 * hd + c0;
        __m512 a[4][4];  // this block's partial sums, added to acc at its end (shorter rounding chains)
#pragma GCC unroll 4
        for (int r = 0; r < 4; ++r)
#pragma GCC unroll 4
          for (int k = 0; k < 4; ++k) a[r][k] = _mm512_setzero_ps();
        const float* pr = p + r0 * ld;
        for (int64_t e = e0; e < e1; ++e) {
          const T* row = v + e * hd + c0;
          const __m512 v0 = load16(row, 0xFFFF), v1 = load16(row + 16, 0xFFFF), v2 = load16(row + 32, 0xFFFF),
                       v3 = load16(row + 48, 0xFFFF);
#pragma GCC unroll 4
          for (int r = 0; r < 4; ++r) {
            const __m512 w = _mm512_set1_ps(pr[r * ld + e]);
            a[r][0] = _mm512_fmadd_ps(w, v0, a[r][0]);
            a[r][1] = _mm512_fmadd_ps(w, v1, a[r][1]);
            a[r][2] = _mm512_fmadd_ps(w, v2, a[r][2]);
            a[r][3] = _mm512_fmadd_ps(w, v3, a[r][3]);
          }
        }
#pragma GCC unroll 4
        for (int r = 0; r < 4; ++r)
#pragma GCC unroll 4
          for (int k = 0; k < 4; ++k)
            _mm512_storeu_ps(ac + r * hd + 16 * k, _mm512_add_ps(_mm512_loadu_ps(ac + r * hd + 16 * k), a[r][k]));
      }
  }
}

// In place: row[0, len) -> exp(row - max); returns the sum.
UT_AVX512 float softmax_numerators(float* row, int64_t len) {
  __m512 mx = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t i = 0; i < len; i += 16)
    mx = _mm512_max_ps(mx, _mm512_mask_loadu_ps(mx, tail_mask(len - i), row + i));
  const float m = _mm512_reduce_max_ps(mx);
  const __m512 mv = _mm512_set1_ps(m == -std::numeric_limits<float>::infinity() ? 0.f : m);
  __m512 sum = _mm512_setzero_ps();
  for (int64_t i = 0; i < len; i += 16) {
    const __mmask16 t = tail_mask(len - i);
    const __m512 y = _mm512_maskz_mov_ps(t, exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(t, row + i), mv)));
    _mm512_mask_storeu_ps(row + i, t, y);
    sum = _mm512_add_ps(sum, y);
  }
  return _mm512_reduce_add_ps(sum);
}

struct attn_scratch {
  std::vector<float> buf;
  float* get(size_t n) {
    if (buf.size() < n) buf.resize(n);
    return buf.data();
  }
};


template <class T>
UT_AVX512 void attend(const fused_attention_job& j, int64_t hd, int64_t d, float scale) {
  thread_local attn_scratch scratch;
  const int64_t cnt = j.cnt, e = j.e, rows8 = round_up(std::max<int64_t>(cnt, 1), 8), cpad = round_up(cnt, 16);
  const int64_t len = e + cnt, ld = round_up(len, 16);
  const T* q = static_cast<const T*>(j.q);
  const T* k = q + d;
  const T* v = q + 2 * d;
  T* out = static_cast<T*>(j.out);
  for (int64_t r = 0; r < j.skip; ++r)
    for (int64_t c = 0; c < hd; ++c) out[r * j.out_stride + c] = T(0.f);
  if (cnt == 0) return;
  out += j.skip * j.out_stride;
  float* qf = scratch.get(size_t(rows8 * hd + hd * cpad + cnt * hd + rows8 * ld + rows8 * hd + rows8));
  float* kct = qf + rows8 * hd;  // block keys in [cpad/16][hd][16] tiles, as the ring
  float* vcf = kct + hd * cpad;  // block values [cnt, hd]
  float* s = vcf + cnt * hd;     // scores / probabilities [rows8, ld]: ring slots, then the block
  float* acc = s + rows8 * ld;   // [rows8, hd]
  float* inv = acc + rows8 * hd; // [rows8] 1 / softmax denominators
  for (int64_t r = 0; r < rows8; ++r)
    for (int64_t c = 0; c < hd; ++c) qf[r * hd + c] = r < cnt ? widen(q[r * j.qkv_stride + c]) * scale : 0.f;
  std::fill(kct, kct + hd * cpad, 0.f);
  for (int64_t r = 0; r < cnt; ++r)
    for (int64_t c = 0; c < hd; ++c) {
      kct[(r / 16) * hd * 16 + c * 16 + r % 16] = widen(k[r * j.qkv_stride + c]);
      vcf[r * hd + c] = widen(v[r * j.qkv_stride + c]);
    }
  if (e > 0) scores(qf, rows8, hd, static_cast<const T*>(j.kt_ring), e, s, ld);
  scores(qf, rows8, hd, static_cast<const float*>(kct), cnt, s + e, ld);
  const int64_t rows4 = round_up(cnt, 4);
  for (int64_t r = 0; r < rows4; ++r) {
    float* row = s + r * ld;
    if (r >= cnt) {  // padding rows: zero probabilities
      std::fill(row, row + len, 0.f);
      continue;
    }
    if (j.invalid)
      for (int64_t slot : *j.invalid) row[slot] = -std::numeric_limits<float>::infinity();
    inv[r] = 1.f / softmax_numerators(row, len);
  }
  std::fill(acc, acc + rows4 * hd, 0.f);
  if (e > 0) pv(s, ld, rows4, static_cast<const T*>(j.v_ring), e, acc, hd);
  pv(s + e, ld, rows4, static_cast<const float*>(vcf), cnt, acc, hd);
  for (int64_t r = 0; r < cnt; ++r)
    for (int64_t c = 0; c < hd; ++c) out[r * j.out_stride + c] = T(acc[r * hd + c] * inv[r]);
  if (j.store_slot >= 0) {  // after attention: the slots may be those of the block that leaves the window
    T* kt_w = static_cast<T*>(j.kt_ring);
    T* v_w = static_cast<T*>(j.v_ring);
    for (int64_t r = 0; r < cnt; ++r) {
      const int64_t slot = (j.store_slot + r) % j.cap;
      T* kt_tile = kt_w + (slot / 16) * hd * 16 + slot % 16;
      for (int64_t c = 0; c < hd; ++c) {
        kt_tile[c * 16] = k[r * j.qkv_stride + c];
        v_w[slot * hd + c] = v[r * j.qkv_stride + c];
      }
    }
  }
}

template <class T>
void run_fused_attention_t(const std::vector<fused_attention_job>& jobs, int64_t hd, int64_t d, float scale) {
  at::parallel_for(0, int64_t(jobs.size()), 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) attend<T>(jobs[size_t(i)], hd, d, scale);
  });
}
#pragma GCC diagnostic pop
#endif

void run_fused_attention(const std::vector<fused_attention_job>& jobs, at::ScalarType dtype, int64_t hd, int64_t d,
                         float scale) {
#if UT_FUSED_ATTENTION
  if (dtype == at::kBFloat16) return run_fused_attention_t<c10::BFloat16>(jobs, hd, d, scale);
  if (dtype == at::kFloat) return run_fused_attention_t<float>(jobs, hd, d, scale);
#endif
  (void)jobs, (void)hd, (void)d, (void)scale;
  throw std::logic_error(std::string("whisper_encoder: no fused attention for dtype ") + c10::toString(dtype));
}

}  // namespace

std::string whisper_hparams::to_string() const {
  std::ostringstream o;
  o << "whisper encoder: n_mels=" << n_mels << " d_model=" << d_model << " n_heads=" << n_heads
    << " n_layers=" << n_layers << " d_ffn=" << d_ffn << " n_positions=" << n_positions;
  return o.str();
}

torch::Tensor whisper_sinusoids(int64_t length, int64_t channels) {
  if (channels < 4 || channels % 2) throw std::invalid_argument("whisper_sinusoids: channels must be even and >= 4");
  const int64_t half = channels / 2;
  const double inc = std::log(10000.0) / double(half - 1);
  auto inv = at::exp(at::arange(half, at::kDouble) * -inc);
  auto t = at::arange(length, at::kDouble).unsqueeze(1) * inv.unsqueeze(0);
  return at::cat({at::sin(t), at::cos(t)}, 1).to(at::kFloat);
}

// ---------------------------------------------------------------- state

int64_t whisper_encoder_state::cached_frames() const {
  int64_t n = 0;
  for (const auto& b : blocks_) n += b.len;
  return n;
}

int64_t whisper_encoder_state::cache_bytes() const {
  int64_t n = 0;
  for (const auto& t : k_) n += t.defined() ? int64_t(t.numel() * t.element_size()) : 0;
  for (const auto& t : v_) n += t.defined() ? int64_t(t.numel() * t.element_size()) : 0;
  return n;
}

// ---------------------------------------------------------------- construction

whisper_encoder::whisper_encoder(const whisper_hparams& hp,
                                 const std::map<std::string, torch::Tensor>& weights,
                                 const whisper_encoder_options& opt)
    : hp_(hp), opt_(opt) {
  if (hp.n_mels <= 0 || hp.d_model <= 0 || hp.n_heads <= 0 || hp.n_layers <= 0 || hp.d_ffn <= 0 ||
      hp.n_positions <= 0 || hp.d_model % hp.n_heads)
    throw std::invalid_argument("whisper_encoder: invalid hyper-parameters (" + hp.to_string() + ")");
  if (opt.chunk_ms < 40 || opt.chunk_ms % 20)
    throw std::invalid_argument("whisper_encoder: chunk_ms must be a multiple of 20 and >= 40, got " +
                                std::to_string(opt.chunk_ms));
  if (opt.dtype != torch::kFloat32 && opt.dtype != torch::kBFloat16 && opt.dtype != torch::kFloat16 &&
      opt.dtype != torch::kFloat64)
    throw std::invalid_argument("whisper_encoder: dtype must be float32, bfloat16, float16 or float64");
#if TORCH_VERSION_MAJOR < 2
  if (opt.dtype == torch::kFloat16 && opt.device.is_cpu())  // LibTorch 1.x has no fp16 CPU conv/GEMM kernels
    throw std::invalid_argument("whisper_encoder: float16 needs a CUDA device with this LibTorch; use bfloat16 on CPU");
#endif
  chunk_frames_ = opt.chunk_ms / 10;
  const int64_t b = chunk_frames_ / 2;
  context_blocks_ = opt.context_blocks >= 0 ? opt.context_blocks : std::max<int64_t>(0, (hp.n_positions - 1) / b - 1);
  const auto to = torch::TensorOptions().dtype(opt.dtype).device(opt.device);
  const int64_t d = hp.d_model;

  auto get = [&](const std::string& name, std::vector<int64_t> shape) {
    auto it = weights.find(name);
    if (it == weights.end() || !it->second.defined())
      throw std::invalid_argument("whisper_encoder: missing weight \"" + name + "\"");
    if (it->second.sizes() != at::IntArrayRef(shape))
      throw std::invalid_argument("whisper_encoder: weight \"" + name + "\" has shape " +
                                  shape_str(it->second.sizes()) + ", expected " + shape_str(shape) +
                                  " for " + hp.to_string());
    return it->second.detach().to(to).contiguous();
  };
  auto param = [](torch::nn::Module& m, const std::string& name, torch::Tensor t) {
    return m.register_parameter(name, std::move(t), /*requires_grad=*/false);
  };

  auto c1 = child(*this, "conv1");
  conv1_w_ = param(*c1, "weight", get("conv1.weight", {d, hp.n_mels, 3}));
  conv1_b_ = param(*c1, "bias", get("conv1.bias", {d}));
  auto c2 = child(*this, "conv2");
  conv2_w_ = param(*c2, "weight", get("conv2.weight", {d, d, 3}));
  conv2_b_ = param(*c2, "bias", get("conv2.bias", {d}));
  if (weights.count("embed_positions"))
    positions_ = get("embed_positions", {hp.n_positions, d});
  else
    positions_ = whisper_sinusoids(hp.n_positions, d).to(to);
  positions_ = register_buffer("embed_positions", positions_);

  auto layers = child(*this, "layers");
  for (int64_t i = 0; i < hp.n_layers; ++i) {
    const std::string p = "layers." + std::to_string(i) + ".";
    auto l = child(*layers, std::to_string(i));
    layer_weights w;
    auto ln1 = child(*l, "self_attn_layer_norm");
    w.ln1_w = param(*ln1, "weight", get(p + "self_attn_layer_norm.weight", {d}));
    w.ln1_b = param(*ln1, "bias", get(p + "self_attn_layer_norm.bias", {d}));
    auto sa = child(*l, "self_attn");
    auto qkv = child(*sa, "qkv");
    w.qkv_w = param(*qkv, "weight", get(p + "self_attn.qkv.weight", {3 * d, d}));
    w.qkv_b = param(*qkv, "bias", get(p + "self_attn.qkv.bias", {3 * d}));
    auto out = child(*sa, "out_proj");
    w.out_w = param(*out, "weight", get(p + "self_attn.out_proj.weight", {d, d}));
    w.out_b = param(*out, "bias", get(p + "self_attn.out_proj.bias", {d}));
    auto ln2 = child(*l, "final_layer_norm");
    w.ln2_w = param(*ln2, "weight", get(p + "final_layer_norm.weight", {d}));
    w.ln2_b = param(*ln2, "bias", get(p + "final_layer_norm.bias", {d}));
    auto fc1 = child(*l, "fc1");
    w.fc1_w = param(*fc1, "weight", get(p + "fc1.weight", {hp.d_ffn, d}));
    w.fc1_b = param(*fc1, "bias", get(p + "fc1.bias", {hp.d_ffn}));
    auto fc2 = child(*l, "fc2");
    w.fc2_w = param(*fc2, "weight", get(p + "fc2.weight", {d, hp.d_ffn}));
    w.fc2_b = param(*fc2, "bias", get(p + "fc2.bias", {d}));
    layers_.push_back(std::move(w));
  }
  auto ln = child(*this, "layer_norm");
  ln_w_ = param(*ln, "weight", get("layer_norm.weight", {d}));
  ln_b_ = param(*ln, "bias", get("layer_norm.bias", {d}));
  fused_attention_ = opt.device.is_cpu() && (opt.dtype == torch::kFloat32 || opt.dtype == torch::kBFloat16) &&
                     (d / hp.n_heads) % 64 == 0 && fused_kernel_cpu();
  set_trainable_layers(opt.trainable_layers);
}

void whisper_encoder::set_trainable_layers(int64_t n) {
  for (auto& p : parameters()) p.set_requires_grad(false);
  if (n == 0) return;
  if (n < 0 || n >= hp_.n_layers) {
    for (auto& p : parameters()) p.set_requires_grad(true);
    return;
  }
  for (int64_t i = hp_.n_layers - n; i < hp_.n_layers; ++i) {
    auto& w = layers_[size_t(i)];
    for (auto* t : {&w.ln1_w, &w.ln1_b, &w.qkv_w, &w.qkv_b, &w.out_w, &w.out_b, &w.ln2_w, &w.ln2_b,
                    &w.fc1_w, &w.fc1_b, &w.fc2_w, &w.fc2_b})
      t->set_requires_grad(true);
  }
  ln_w_.set_requires_grad(true);
  ln_b_.set_requires_grad(true);
}

// ---------------------------------------------------------------- loaders

std::shared_ptr<whisper_encoder> whisper_encoder::from_ct2(const std::string& dir,
                                                           const whisper_encoder_options& opt) {
  ct2_model m(dir);
  if (m.spec_name() != "WhisperSpec")
    throw std::invalid_argument("whisper_encoder: " + dir + " is a CTranslate2 " + m.spec_name() +
                                " model, not WhisperSpec");
  auto tensor = [&](const std::string& name) {
    const auto& v = m.at(name);
    return from_floats(m.to_float(v), v.shape);
  };
  whisper_hparams hp;
  hp.n_heads = m.scalar_int("encoder/num_heads");
  hp.n_layers = 0;
  while (m.find("encoder/layer_" + std::to_string(hp.n_layers) + "/self_attention/linear_0/weight"))
    ++hp.n_layers;
  if (hp.n_layers == 0) throw std::invalid_argument("whisper_encoder: " + dir + " has no encoder/layer_0");
  std::map<std::string, torch::Tensor> w;
  w["conv1.weight"] = tensor("encoder/conv1/weight");
  w["conv1.bias"] = tensor("encoder/conv1/bias");
  w["conv2.weight"] = tensor("encoder/conv2/weight");
  w["conv2.bias"] = tensor("encoder/conv2/bias");
  w["embed_positions"] = tensor("encoder/position_encodings/encodings");
  w["layer_norm.weight"] = tensor("encoder/layer_norm/gamma");
  w["layer_norm.bias"] = tensor("encoder/layer_norm/beta");
  if (w["conv1.weight"].dim() != 3 || w["embed_positions"].dim() != 2)
    throw std::invalid_argument("whisper_encoder: " + dir + ": unexpected conv1/position shapes");
  hp.d_model = w["conv1.weight"].size(0);
  hp.n_mels = w["conv1.weight"].size(1);
  hp.n_positions = w["embed_positions"].size(0);
  for (int64_t i = 0; i < hp.n_layers; ++i) {
    const std::string c = "encoder/layer_" + std::to_string(i) + "/";
    const std::string p = "layers." + std::to_string(i) + ".";
    w[p + "self_attn_layer_norm.weight"] = tensor(c + "self_attention/layer_norm/gamma");
    w[p + "self_attn_layer_norm.bias"] = tensor(c + "self_attention/layer_norm/beta");
    w[p + "self_attn.qkv.weight"] = tensor(c + "self_attention/linear_0/weight");
    w[p + "self_attn.qkv.bias"] = tensor(c + "self_attention/linear_0/bias");
    w[p + "self_attn.out_proj.weight"] = tensor(c + "self_attention/linear_1/weight");
    w[p + "self_attn.out_proj.bias"] = tensor(c + "self_attention/linear_1/bias");
    w[p + "final_layer_norm.weight"] = tensor(c + "ffn/layer_norm/gamma");
    w[p + "final_layer_norm.bias"] = tensor(c + "ffn/layer_norm/beta");
    w[p + "fc1.weight"] = tensor(c + "ffn/linear_0/weight");
    w[p + "fc1.bias"] = tensor(c + "ffn/linear_0/bias");
    w[p + "fc2.weight"] = tensor(c + "ffn/linear_1/weight");
    w[p + "fc2.bias"] = tensor(c + "ffn/linear_1/bias");
  }
  hp.d_ffn = w["layers.0.fc1.weight"].size(0);
  return std::make_shared<whisper_encoder>(hp, w, opt);
}

std::shared_ptr<whisper_encoder> whisper_encoder::from_hf(const std::string& path,
                                                          const whisper_encoder_options& opt) {
  auto fail = [&](const std::string& what) { hf_fail(path, what); };
  std::vector<std::string> files;
  fs::path cfg_path;
  if (fs::is_directory(path)) {
    const fs::path dir(path);
    cfg_path = dir / "config.json";
    if (fs::exists(dir / "model.safetensors.index.json")) {
      std::ifstream in(dir / "model.safetensors.index.json");
      json idx;
      try {
        idx = json::parse(in);
      } catch (const json::exception& e) {
        fail(std::string("model.safetensors.index.json is not valid JSON: ") + e.what());
      }
      std::set<std::string> shards;
      if (!idx.contains("weight_map") || !idx["weight_map"].is_object())
        fail("model.safetensors.index.json lacks \"weight_map\"");
      for (auto& [name, file] : idx["weight_map"].items())
        if (name.find("encoder.") != std::string::npos) shards.insert(file.get<std::string>());
      for (const auto& s : shards) files.push_back((dir / s).string());
    } else if (fs::exists(dir / "model.safetensors")) {
      files.push_back((dir / "model.safetensors").string());
    } else {
      fail("no model.safetensors or model.safetensors.index.json");
    }
  } else if (fs::is_regular_file(path)) {
    files.push_back(path);
    cfg_path = fs::path(path).parent_path() / "config.json";
  } else {
    fail("no such file or directory");
  }
  json cfg = json::object();
  if (fs::exists(cfg_path)) {
    std::ifstream in(cfg_path);
    try {
      cfg = json::parse(in);
    } catch (const json::exception& e) {
      fail(cfg_path.string() + " is not valid JSON: " + e.what());
    }
  }
  if (cfg.contains("activation_function") && cfg["activation_function"] != "gelu")
    fail("activation_function " + cfg["activation_function"].dump() + " is not supported (gelu only)");

  std::vector<std::unique_ptr<safetensors_file>> opened;
  std::map<std::string, std::pair<const safetensors_file*, const st_tensor_info*>> index;
  for (const auto& f : files) {
    opened.push_back(std::make_unique<safetensors_file>(f));
    for (const auto& t : opened.back()->tensors()) index[t.name] = {opened.back().get(), &t};
  }
  std::string prefix;
  if (index.count("model.encoder.conv1.weight"))
    prefix = "model.encoder.";
  else if (index.count("encoder.conv1.weight"))
    prefix = "encoder.";
  else if (index.count("conv1.weight"))
    prefix = "";
  else
    fail("no Whisper encoder tensors (model.encoder.conv1.weight, encoder.conv1.weight or conv1.weight)");
  auto has = [&](const std::string& n) { return index.count(prefix + n) > 0; };
  auto tensor = [&](const std::string& n) {
    auto it = index.find(prefix + n);
    if (it == index.end()) hf_fail(path, "missing tensor " + prefix + n);
    const auto& [file, info] = it->second;
    std::vector<float> v(size_t(info->n_elements()));
    file->to_float32(*info, v.data());
    return from_floats(std::move(v), info->shape);
  };

  whisper_hparams hp;
  std::map<std::string, torch::Tensor> w;
  for (const char* n : {"conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias", "layer_norm.weight",
                        "layer_norm.bias"})
    w[n] = tensor(n);
  if (w["conv1.weight"].dim() != 3) fail("conv1.weight is not 3-D");
  hp.d_model = w["conv1.weight"].size(0);
  hp.n_mels = w["conv1.weight"].size(1);
  if (has("embed_positions.weight")) {
    w["embed_positions"] = tensor("embed_positions.weight");
    hp.n_positions = w["embed_positions"].size(0);
  } else {
    hp.n_positions = cfg.value("max_source_positions", int64_t(1500));
  }
  hp.n_layers = 0;
  while (has("layers." + std::to_string(hp.n_layers) + ".fc1.weight")) ++hp.n_layers;
  if (hp.n_layers == 0) fail("no encoder layers (" + prefix + "layers.0.fc1.weight)");
  hp.n_heads = cfg.value("encoder_attention_heads", hp.d_model / 64);
  auto check_cfg = [&](const char* key, int64_t have) {
    if (cfg.contains(key) && cfg[key].is_number_integer() && cfg[key].get<int64_t>() != have)
      fail(std::string("config.json ") + key + " = " + cfg[key].dump() + " but the tensors say " +
           std::to_string(have));
  };
  check_cfg("d_model", hp.d_model);
  check_cfg("num_mel_bins", hp.n_mels);
  check_cfg("encoder_layers", hp.n_layers);
  for (int64_t i = 0; i < hp.n_layers; ++i) {
    const std::string p = "layers." + std::to_string(i) + ".";
    const std::string a = p + "self_attn.";
    fuse_qkv(w, a, tensor(a + "q_proj.weight"), tensor(a + "q_proj.bias"), tensor(a + "k_proj.weight"),
             tensor(a + "v_proj.weight"), tensor(a + "v_proj.bias"));
    for (const char* n : {"self_attn.out_proj.weight", "self_attn.out_proj.bias", "self_attn_layer_norm.weight",
                          "self_attn_layer_norm.bias", "final_layer_norm.weight", "final_layer_norm.bias",
                          "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"})
      w[p + n] = tensor(p + n);
  }
  hp.d_ffn = w["layers.0.fc1.weight"].size(0);
  check_cfg("encoder_ffn_dim", hp.d_ffn);
  return std::make_shared<whisper_encoder>(hp, w, opt);
}

std::shared_ptr<whisper_encoder> whisper_encoder::load(const std::string& path,
                                                       const whisper_encoder_options& opt) {
  if (fs::is_directory(path) && fs::exists(fs::path(path) / "model.bin")) return from_ct2(path, opt);
  return from_hf(path, opt);
}

// ---------------------------------------------------------------- offline

void whisper_encoder::check_features(const torch::Tensor& f, const char* what) const {
  if (!f.defined() || f.dim() != 3 || f.size(2) != hp_.n_mels)
    throw std::invalid_argument(std::string("whisper_encoder::") + what + ": features must be [N, frames, " +
                                std::to_string(hp_.n_mels) + "], got " +
                                (f.defined() ? shape_str(f.sizes()) : std::string("undefined")));
  if (!at::isFloatingType(f.scalar_type()))
    throw std::invalid_argument(std::string("whisper_encoder::") + what + ": features must be floating point");
}

torch::Tensor whisper_encoder::stem_offline(const torch::Tensor& features) {
  const auto to = torch::TensorOptions().dtype(opt_.dtype).device(opt_.device);
  const int64_t n = features.size(0), t = features.size(1);
  if (t == 0) return at::zeros({n, 0, hp_.d_model}, to);
  auto x = features.to(to).transpose(1, 2);  // [N, mels, T]
  auto h = at::gelu(at::conv1d(x, conv1_w_, conv1_b_, at::IntArrayRef{1}, at::IntArrayRef{1}));
  auto y = at::gelu(at::conv1d(h, conv2_w_, conv2_b_, at::IntArrayRef{2}, at::IntArrayRef{1}));
  return y.transpose(1, 2);  // [N, ceil(T/2), d]
}

torch::Tensor whisper_encoder::layer_norm(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& b) const {
  // LibTorch 1.13's CPU LayerNorm is not vectorized for bf16 (about 10x slower
  // than fp32 at [32, 16, 384]); it accumulates in fp32 either way, so the
  // result is the same up to the final rounding.
  if (x.scalar_type() == at::kBFloat16 && x.is_cpu())
    return at::layer_norm(x.to(at::kFloat), {hp_.d_model}, w.to(at::kFloat), b.to(at::kFloat), hp_.ln_eps)
        .to(at::kBFloat16);
  return at::layer_norm(x, {hp_.d_model}, w, b, hp_.ln_eps);
}

torch::Tensor whisper_encoder::mlp(const layer_weights& w, const torch::Tensor& x) const {
  auto h = layer_norm(x, w.ln2_w, w.ln2_b);
  return at::linear(at::gelu(at::linear(h, w.fc1_w, w.fc1_b)), w.fc2_w, w.fc2_b);
}

torch::Tensor whisper_encoder::transformer_offline(torch::Tensor x, const torch::Tensor& allowed) {
  const int64_t n = x.size(0), u = x.size(1), d = hp_.d_model, nh = hp_.n_heads, hd = d / nh;
  const double scale = 1.0 / std::sqrt(double(hd));
  for (const auto& w : layers_) {
    auto h = layer_norm(x, w.ln1_w, w.ln1_b);
    auto qkv = at::linear(h, w.qkv_w, w.qkv_b).view({n, u, 3, nh, hd}).permute({2, 0, 3, 1, 4});
    auto q = qkv[0] * scale, k = qkv[1], v = qkv[2];  // [N, H, U, hd]
    auto s = at::matmul(q, k.transpose(-2, -1));       // [N, H, U, U]
    if (allowed.defined()) s = s.masked_fill(allowed.logical_not(), -std::numeric_limits<double>::infinity());
    auto o = at::matmul(softmax_last(s), v).transpose(1, 2).reshape({n, u, d});
    x = x + at::linear(o, w.out_w, w.out_b);
    x = x + mlp(w, x);
  }
  return layer_norm(x, ln_w_, ln_b_);
}

torch::Tensor whisper_encoder::forward(const torch::Tensor& features) {
  check_features(features, "forward");
  auto x = stem_offline(features);
  const int64_t u = x.size(1);
  if (u > hp_.n_positions)
    throw std::invalid_argument("whisper_encoder::forward: " + std::to_string(features.size(1)) +
                                " mel frames give " + std::to_string(u) + " positions, more than the " +
                                std::to_string(hp_.n_positions) +
                                " of the position table (30 s); use forward_block_causal or streaming");
  if (u == 0) return x;
  x = x + positions_.narrow(0, 0, u).unsqueeze(0);
  return transformer_offline(x, {});
}

torch::Tensor whisper_encoder::forward_block_causal(const torch::Tensor& features) {
  check_features(features, "forward_block_causal");
  auto x = stem_offline(features);
  const int64_t u = x.size(1), t = features.size(1), f = chunk_frames_, b = f / 2;
  if (u == 0) return x;
  const int64_t last_block = (t + f - 1) / f - 1;
  std::vector<int64_t> blk(static_cast<size_t>(u)), pos(static_cast<size_t>(u));
  for (int64_t j = 0; j < u; ++j) {
    blk[size_t(j)] = std::min((j + 1) / b, last_block);
    pos[size_t(j)] = j % hp_.n_positions;
  }
  auto bt = torch::from_blob(blk.data(), {u}, at::kLong);
  auto bi = bt.unsqueeze(1), bj = bt.unsqueeze(0);
  auto allowed = (bj <= bi).logical_and(bj >= bi - context_blocks_).to(opt_.device);
  auto pt = torch::from_blob(pos.data(), {u}, at::kLong).to(opt_.device);
  x = x + positions_.index_select(0, pt).unsqueeze(0);
  return transformer_offline(x, allowed);
}

// ---------------------------------------------------------------- streaming

whisper_encoder_state whisper_encoder::init_state() const {
  whisper_encoder_state s;
  s.history_ = at::zeros({hp_.n_mels, 4}, torch::TensorOptions().dtype(opt_.dtype).device(opt_.device));
  s.k_.resize(size_t(hp_.n_layers));
  s.v_.resize(size_t(hp_.n_layers));
  return s;
}

std::vector<torch::Tensor> whisper_encoder::forward_chunk(const torch::Tensor& features,
                                                          const std::vector<whisper_encoder_state*>& states,
                                                          bool last, whisper_chunk_timings* timings) {
  using tclock = std::chrono::steady_clock;
  const auto t_start = tclock::now();
  auto t_mark = t_start;
  // Adds the time since the previous mark to `phase` (nullptr: left to "other").
  auto tick = [&](double whisper_chunk_timings::*phase) {
    if (!timings) return;
    const auto now = tclock::now();
    if (phase) timings->*phase += std::chrono::duration<double, std::milli>(now - t_mark).count();
    t_mark = now;
  };
  check_features(features, "forward_chunk");
  const int64_t n = features.size(0), t = features.size(1), f = chunk_frames_, b = f / 2;
  const int64_t d = hp_.d_model, nh = hp_.n_heads, hd = d / nh, np = hp_.n_positions;
  if (size_t(n) != states.size())
    throw std::invalid_argument("whisper_encoder::forward_chunk: " + std::to_string(n) + " feature rows but " +
                                std::to_string(states.size()) + " states");
  if (!last && t != f)
    throw std::invalid_argument("whisper_encoder::forward_chunk: a chunk must have chunk_frames() = " +
                                std::to_string(f) + " frames, got " + std::to_string(t) +
                                " (pass last = true for the final, shorter one)");
  if (last && t > f)
    throw std::invalid_argument("whisper_encoder::forward_chunk: the last chunk may have at most " +
                                std::to_string(f) + " frames, got " + std::to_string(t));
  std::set<const whisper_encoder_state*> seen;
  for (auto* s : states) {
    if (!s) throw std::invalid_argument("whisper_encoder::forward_chunk: null state");
    if (!seen.insert(s).second) throw std::invalid_argument("whisper_encoder::forward_chunk: a state appears twice");
    if (s->finished_)
      throw std::invalid_argument("whisper_encoder::forward_chunk: state is finished (its last chunk was "
                                  "encoded); use init_state() for a new stream");
    if (int64_t(s->k_.size()) != hp_.n_layers || !s->history_.defined() || s->history_.size(0) != hp_.n_mels)
      throw std::invalid_argument("whisper_encoder::forward_chunk: state was not made by this encoder's init_state()");
  }
  torch::NoGradGuard no_grad;
  const auto to = torch::TensorOptions().dtype(opt_.dtype).device(opt_.device);
  tick(nullptr);

  // ---- conv stem on [history (4) | new frames | 2 zero frames if last]
  std::vector<torch::Tensor> hist;
  for (auto* s : states) hist.push_back(s->history_);
  std::vector<torch::Tensor> parts{at::stack(hist), features.to(to).transpose(1, 2)};
  if (last) parts.push_back(at::zeros({n, hp_.n_mels, 2}, to));
  auto win = at::cat(parts, 2);                                  // [N, mels, Lw]
  auto h = at::gelu(at::conv1d(win, conv1_w_, conv1_b_, at::IntArrayRef{1}, at::IntArrayRef{0}));  // [N, d, Lw-2], column j = time m-3+j
  const int64_t lh = h.size(2);
  bool any_start = false;
  for (auto* s : states) any_start |= s->mel_frames_ == 0;
  if (any_start || last) {  // offline zero padding of conv2's input outside [0, T_total)
    std::vector<float> m(size_t(n * lh), 1.f);
    for (int64_t i = 0; i < n; ++i) {
      const int64_t m0 = states[size_t(i)]->mel_frames_;
      for (int64_t j = 0; j < lh; ++j) {
        const int64_t time = m0 - 3 + j;
        if (time < 0 || (last && time >= m0 + t)) m[size_t(i * lh + j)] = 0.f;
      }
    }
    h = h * torch::from_blob(m.data(), {n, 1, lh}, at::kFloat).to(to);
  }
  auto x = at::gelu(at::conv1d(h, conv2_w_, conv2_b_, at::IntArrayRef{2}, at::IntArrayRef{0})).transpose(1, 2);  // [N, Q, d]
  const int64_t q_len = x.size(1);
  tick(&whisper_chunk_timings::stem);

  // Frame of query row j of stream i: m_i/2 - 1 + j; row 0 of a first chunk is frame -1 (skipped).
  std::vector<int64_t> start(static_cast<size_t>(n)), pos(static_cast<size_t>(n * q_len));
  for (int64_t i = 0; i < n; ++i) {
    const int64_t u0 = states[size_t(i)]->mel_frames_ / 2 - 1;
    start[size_t(i)] = u0 < 0 ? 1 : 0;
    for (int64_t j = 0; j < q_len; ++j) pos[size_t(i * q_len + j)] = std::max<int64_t>(0, u0 + j) % np;
  }
  auto pos_idx = torch::from_blob(pos.data(), {n * q_len}, at::kLong).to(opt_.device);
  x = x + positions_.index_select(0, pos_idx).view({n, q_len, d});

  // ---- cache slots for the new block (ring buffer of whole blocks), decided before any write.
  // Values [n_heads, capacity, head_dim]; keys the same for the LibTorch path and
  // [n_heads, ceil(capacity/16), head_dim, 16] (tiles of 16 slots) for the fused kernel.
  const bool store = !last && context_blocks_ > 0;
  const int64_t max_cap = context_blocks_ * b;
  const bool fused = fused_attention_;
  std::vector<int64_t> slot(size_t(n), 0);
  std::vector<torch::Tensor> slot_valid(static_cast<size_t>(n));  // [E] bool where the ring has holes (LibTorch path)
  std::vector<std::vector<int64_t>> holes(static_cast<size_t>(n)); // the same as slot lists (fused path)
  for (int64_t i = 0; i < n; ++i) {
    auto& s = *states[size_t(i)];
    const int64_t cnt = q_len - start[size_t(i)];
    if (s.extent_ > 0 && s.cached_frames() < s.extent_) {
      std::vector<uint8_t> valid(size_t(s.extent_), 0);
      for (const auto& blk : s.blocks_)
        for (int64_t j = 0; j < blk.len; ++j) valid[size_t((blk.slot + j) % s.capacity_)] = 1;
      if (fused) {
        for (int64_t j = 0; j < s.extent_; ++j)
          if (!valid[size_t(j)]) holes[size_t(i)].push_back(j);
      } else {
        slot_valid[size_t(i)] = torch::from_blob(valid.data(), {s.extent_}, at::kByte).to(opt_.device).to(at::kBool);
      }
    }
    if (!store || cnt == 0) continue;
    if (s.head_ + cnt > s.capacity_ && s.capacity_ < max_cap) {
      const int64_t cap = std::min(max_cap, std::max({s.head_ + cnt, 2 * s.capacity_, 4 * b}));
      for (size_t l = 0; l < s.k_.size(); ++l) {
        auto nk = fused ? at::zeros({nh, (cap + 15) / 16, hd, 16}, to) : at::zeros({nh, cap, hd}, to);
        auto nv = at::zeros({nh, cap, hd}, to);
        if (s.extent_ > 0) {
          const int64_t used = fused ? (s.extent_ + 15) / 16 : s.extent_;  // whole tiles
          nk.narrow(1, 0, used).copy_(s.k_[l].narrow(1, 0, used));
          nv.narrow(1, 0, s.extent_).copy_(s.v_[l].narrow(1, 0, s.extent_));
        }
        s.k_[l] = nk;
        s.v_[l] = nv;
      }
      s.capacity_ = cap;
    }
    slot[size_t(i)] = s.head_ % s.capacity_;
  }
  auto write_ring = [](torch::Tensor& dst, const torch::Tensor& src, int64_t at_slot, int64_t cap) {
    const int64_t cnt = src.size(1), first = std::min(cnt, cap - at_slot);
    dst.narrow(1, at_slot, first).copy_(src.narrow(1, 0, first));
    if (first < cnt) dst.narrow(1, 0, cnt - first).copy_(src.narrow(1, first, cnt - first));
  };

  // ---- transformer: batched projections and MLP, per-stream attention against its own cache
  const double scale = 1.0 / std::sqrt(double(hd));
  tick(nullptr);
  for (size_t l = 0; l < layers_.size(); ++l) {
    const auto& w = layers_[l];
    auto hn = layer_norm(x, w.ln1_w, w.ln1_b);
    tick(&whisper_chunk_timings::layer_norm);
    auto qkv_rows = at::linear(hn, w.qkv_w, w.qkv_b).contiguous();  // [N, Q, 3 d]: q | k | v, heads inside
    tick(&whisper_chunk_timings::qkv_proj);
    torch::Tensor o;
    if (fused) {
      o = at::empty({n, q_len, d}, to);
      std::vector<fused_attention_job> jobs(size_t(n * nh));
      const int64_t esz = int64_t(qkv_rows.element_size());
      auto* qkv_p = static_cast<char*>(qkv_rows.data_ptr());
      auto* o_p = static_cast<char*>(o.data_ptr());
      for (int64_t i = 0; i < n; ++i) {
        auto& s = *states[size_t(i)];
        const int64_t s0 = start[size_t(i)], cnt = q_len - s0;
        for (int64_t h = 0; h < nh; ++h) {
          auto& jb = jobs[size_t(i * nh + h)];
          jb.q = qkv_p + ((i * q_len + s0) * 3 * d + h * hd) * esz;
          jb.qkv_stride = 3 * d;
          jb.cnt = cnt;
          jb.skip = s0;
          jb.out = o_p + (i * q_len * d + h * hd) * esz;
          jb.out_stride = d;
          jb.cap = s.capacity_;
          jb.e = s.extent_;
          jb.invalid = holes[size_t(i)].empty() ? nullptr : &holes[size_t(i)];
          if (s.capacity_ > 0) {
            jb.kt_ring = static_cast<char*>(s.k_[l].data_ptr()) + h * s.k_[l].stride(0) * esz;
            jb.v_ring = static_cast<char*>(s.v_[l].data_ptr()) + h * s.capacity_ * hd * esz;
          }
          jb.store_slot = store && cnt > 0 ? slot[size_t(i)] : -1;
        }
      }
      run_fused_attention(jobs, opt_.dtype, hd, d, float(scale));
    } else {
      auto qkv = qkv_rows.view({n, q_len, 3, nh, hd}).permute({2, 0, 3, 1, 4});
      auto q = qkv[0] * scale, k = qkv[1], v = qkv[2];  // [N, H, Q, hd]
      o = at::zeros({n, nh, q_len, hd}, to);
      for (int64_t i = 0; i < n; ++i) {
        auto& s = *states[size_t(i)];
        const int64_t s0 = start[size_t(i)], cnt = q_len - s0;
        if (cnt == 0) continue;
        auto qi = q[i].narrow(1, s0, cnt), ki = k[i].narrow(1, s0, cnt), vi = v[i].narrow(1, s0, cnt);
        auto sc = at::matmul(qi, ki.transpose(-2, -1));  // [H, cnt, cnt]
        const int64_t e = s.extent_;
        torch::Tensor oi;
        if (e > 0) {
          auto pk = s.k_[l].narrow(1, 0, e), pv = s.v_[l].narrow(1, 0, e);
          auto sp = at::matmul(qi, pk.transpose(-2, -1));  // [H, cnt, E]
          if (slot_valid[size_t(i)].defined())
            sp.masked_fill_(slot_valid[size_t(i)].logical_not(), -std::numeric_limits<double>::infinity());
          auto p = softmax_last(at::cat({sp, sc}, -1));
          oi = at::matmul(p.narrow(-1, 0, e), pv) + at::matmul(p.narrow(-1, e, cnt), vi);
        } else {
          oi = at::matmul(softmax_last(sc), vi);
        }
        o[i].narrow(1, s0, cnt).copy_(oi);
        if (store) {  // after attention: the slots may be those of the block that leaves the window
          write_ring(s.k_[l], ki, slot[size_t(i)], s.capacity_);
          write_ring(s.v_[l], vi, slot[size_t(i)], s.capacity_);
        }
      }
      o = o.transpose(1, 2).reshape({n, q_len, d});
    }
    tick(&whisper_chunk_timings::attention);
    x = x + at::linear(o, w.out_w, w.out_b);
    tick(&whisper_chunk_timings::out_proj);
    auto h2 = layer_norm(x, w.ln2_w, w.ln2_b);
    tick(&whisper_chunk_timings::layer_norm);
    x = x + at::linear(at::gelu(at::linear(h2, w.fc1_w, w.fc1_b)), w.fc2_w, w.fc2_b);  // mlp() without its LayerNorm
    tick(&whisper_chunk_timings::mlp);
  }
  x = layer_norm(x, ln_w_, ln_b_);
  tick(&whisper_chunk_timings::layer_norm);

  // ---- outputs and state updates
  std::vector<torch::Tensor> out;
  out.reserve(size_t(n));
  for (int64_t i = 0; i < n; ++i) {
    auto& s = *states[size_t(i)];
    const int64_t s0 = start[size_t(i)], cnt = q_len - s0;
    out.push_back(x[i].narrow(0, s0, cnt));
    if (store && cnt > 0) {
      s.blocks_.push_back({slot[size_t(i)], cnt});
      s.head_ = slot[size_t(i)] + cnt;  // taken modulo capacity at the next write
      s.extent_ = std::max(s.extent_, std::min(s.capacity_, slot[size_t(i)] + cnt));
      while (int64_t(s.blocks_.size()) > context_blocks_) s.blocks_.pop_front();
    }
    if (!last) s.history_ = win[i].narrow(1, win.size(2) - 4, 4).clone();
    s.mel_frames_ += t;
    s.frames_out_ += cnt;
    s.chunks_ += 1;
    s.finished_ = last;
  }
  if (timings) {
    timings->total += std::chrono::duration<double, std::milli>(tclock::now() - t_start).count();
    timings->calls += 1;
  }
  return out;
}

}  // namespace undertone::models
