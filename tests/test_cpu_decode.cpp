// CPU decode kernels (models/nn/cpu_gemv.hpp) and their use by llama_model::step
// (llm.cpu_decode): kernels vs the dequantized weights on random and real
// (pinned SmolLM2 GGUF) matrices; auto vs off on the model.
//
// Tolerances: the kernels accumulate in fp32, so each output may differ from
// a float64 product of the same (dequantized) values by a few fp32 roundings
// of the sum of |w x|: asserted |y - ref| <= kRelTol * sum |w| |x| (measured
// below 1e-6). gemm_bf16 (bf16 activations, bf16-rounded weights) is checked
// the same way against float64 products of the bf16-rounded operands, and its
// bf16 weights bit for bit against the loader's fp32 -> bf16 copy.
#include <boost/test/unit_test.hpp>

#include <torch/torch.h>

#include <cmath>
#include <cstring>
#include <map>
#include <numeric>
#include <algorithm>
#include <random>

#include <nlohmann/json.hpp>

#include "models/gguf.hpp"
#include "models/nn/cpu_attention.hpp"
#include "models/nn/cpu_gemv.hpp"
#include "models/nn/llama.hpp"
#include "support.hpp"

using namespace undertone;
using models::llama_model;
using models::llm_batch;
namespace cg = models::cpu_gemv;

namespace {

constexpr double kRelTol = 2e-5;

bool have_kernels() {
  if (cg::supported(cg::wformat::q4_1)) return true;
  BOOST_TEST_MESSAGE("this CPU has no AVX-512: kernel checks skipped (the model uses ATen)");
  return false;
}

uint16_t half_bits(float v) { return c10::Half(v).x; }

/// Random blocks of `type` (q4_1 or q8_0) for an [out, in] matrix.
std::vector<uint8_t> random_blocks(cg::wformat f, int64_t out, int64_t in, std::mt19937& rng) {
  std::vector<uint8_t> b(size_t(out * cg::row_bytes(f, in)));
  std::uniform_real_distribution<float> scale(0.002f, 0.05f);
  std::uniform_int_distribution<int> byte(0, 255);
  const size_t bs = f == cg::wformat::q4_1 ? 20 : 34;
  for (size_t off = 0; off < b.size(); off += bs) {
    const uint16_t d = half_bits(scale(rng)), m = half_bits(-8 * scale(rng));
    std::memcpy(&b[off], &d, 2);
    size_t q0 = 2;
    if (f == cg::wformat::q4_1) {
      std::memcpy(&b[off + 2], &m, 2);
      q0 = 4;
    }
    for (size_t j = q0; j < bs; ++j) b[off + j] = uint8_t(byte(rng));
  }
  return b;
}

/// Runs the kernel over output rows [0, out) in three uneven pieces (as the
/// threads of at::parallel_for would) and returns y [rows, out].
torch::Tensor run_kernel(cg::wformat f, const void* w, int64_t out, int64_t in, const torch::Tensor& x) {
  const int64_t rows = x.size(0);
  torch::Tensor y = torch::full({rows, out}, std::nanf(""), torch::kFloat32);
  torch::Tensor xf = x.to(torch::kFloat32).contiguous(), xb = x.to(torch::kBFloat16).contiguous();
  const int64_t a = out / 3, b = out - out / 5;
  for (auto [o0, o1] : {std::pair{int64_t(0), a}, std::pair{a, b}, std::pair{b, out}})
    cg::gemv(f, w, in, xf.data_ptr<float>(), reinterpret_cast<const uint16_t*>(xb.data_ptr()), rows,
             y.data_ptr<float>(), out, o0, o1);
  return y;
}

/// Largest |y - x W^T| / (|x| |W|^T), W float [out, in], in float64.
double rel_error(const torch::Tensor& y, const torch::Tensor& x, const torch::Tensor& w) {
  torch::Tensor xd = x.to(torch::kFloat64), wd = w.to(torch::kFloat64);
  torch::Tensor ref = xd.matmul(wd.t()), bound = xd.abs().matmul(wd.abs().t()) + 1e-30;
  return ((y.to(torch::kFloat64) - ref).abs() / bound).max().item<double>();
}

torch::Tensor dequantized(cg::wformat f, const uint8_t* blocks, int64_t out, int64_t in) {
  torch::Tensor w = torch::empty({out, in}, torch::kFloat32);
  const uint32_t type = uint32_t(f == cg::wformat::q4_1 ? models::ggml_type::q4_1 : models::ggml_type::q8_0);
  for (int64_t o = 0; o < out; ++o)
    models::dequantize_row(type, blocks + o * cg::row_bytes(f, in), w.data_ptr<float>() + o * in, in);
  return w;
}

}  // namespace

BOOST_AUTO_TEST_CASE(quantized_kernels_match_dequantized_random) {
  if (!have_kernels()) return;
  std::mt19937 rng(7);
  torch::manual_seed(7);
  double worst = 0;
  for (cg::wformat f : {cg::wformat::q4_1, cg::wformat::q8_0})
    for (int64_t in : {32, 96, 576, 1536})
      for (int64_t out : {1, 5, 70})
        for (int64_t rows : {1, 2, 3, 4, 5, 9}) {
          const auto blocks = random_blocks(f, out, in, rng);
          torch::Tensor x = torch::randn({rows, in});
          torch::Tensor y = run_kernel(f, blocks.data(), out, in, x);
          const double e = rel_error(y, x, dequantized(f, blocks.data(), out, in));
          worst = std::max(worst, e);
          BOOST_CHECK_MESSAGE(e <= kRelTol, "format " << int(f) << " in " << in << " out " << out << " rows " << rows
                                                      << ": relative error " << e);
        }
  BOOST_TEST_MESSAGE("q4_1/q8_0 kernels vs float64 reference: worst relative error " << worst);
}

BOOST_AUTO_TEST_CASE(bf16_kernels_match_float64_random) {
  if (!have_kernels()) return;
  torch::manual_seed(3);
  for (bool dp : {true, false}) {
    cg::use_avx512_bf16(dp);
    double worst = 0;
    // Lengths that are not multiples of the 32-lane (or 16-lane) vectors included.
    for (int64_t in : {1, 17, 32, 33, 100, 576, 1000})
      for (int64_t out : {1, 3, 4, 5, 13, 70})
        for (int64_t rows : {1, 2, 3, 4, 6}) {
          torch::Tensor w = torch::randn({out, in}).to(torch::kBFloat16).contiguous();
          torch::Tensor x = torch::randn({rows, in}).to(torch::kBFloat16);
          torch::Tensor y = run_kernel(cg::wformat::bf16, w.data_ptr(), out, in, x);
          const double e = rel_error(y, x, w);
          worst = std::max(worst, e);
          BOOST_CHECK_MESSAGE(e <= kRelTol, (dp ? "avx512-bf16" : "avx512f") << " in " << in << " out " << out
                                                                              << " rows " << rows << ": " << e);
        }
    BOOST_TEST_MESSAGE("bf16 kernel (" << (dp ? "avx512-bf16" : "avx512f") << ") worst relative error " << worst);
  }
  cg::use_avx512_bf16(true);
}

BOOST_AUTO_TEST_CASE(real_blocks_match_dequantized_weights) {
  if (!have_kernels()) return;
  const auto ck = models::load_gguf_llm(testing::llm_gguf_path(), torch::kFloat32, /*keep_blocks=*/true);
  // The pinned file: q4_1 layers, q8_0 token embedding (the tied LM head).
  BOOST_CHECK_EQUAL(ck.quantized.at("blk.0.attn_q.weight").type, uint32_t(models::ggml_type::q4_1));
  BOOST_CHECK_EQUAL(ck.quantized.at("token_embd.weight").type, uint32_t(models::ggml_type::q8_0));
  BOOST_CHECK_EQUAL(ck.quantized.count("blk.0.attn_norm.weight"), 0u);
  torch::manual_seed(11);
  for (const std::string name : {"blk.0.attn_q.weight", "blk.3.attn_k.weight", "blk.5.attn_v.weight",
                                 "blk.7.ffn_down.weight", "blk.29.ffn_gate.weight", "token_embd.weight"}) {
    const auto& q = ck.quantized.at(name);
    const torch::Tensor& w = ck.weights.at(name);
    const cg::wformat f = q.type == uint32_t(models::ggml_type::q4_1) ? cg::wformat::q4_1 : cg::wformat::q8_0;
    // Row order of the kept blocks (q/k un-permuted) equals the dequantized tensor's, bit for bit.
    BOOST_CHECK(torch::equal(dequantized(f, q.data.data_ptr<uint8_t>(), q.rows, q.cols), w));
    for (int64_t rows : {1, 3}) {
      torch::Tensor x = torch::randn({rows, q.cols});
      const double e = rel_error(run_kernel(f, q.data.data_ptr(), q.rows, q.cols, x), x, w);
      BOOST_TEST_MESSAGE(name << " rows " << rows << ": relative error " << e);
      BOOST_CHECK_LE(e, kRelTol);
    }
  }
}

namespace {

/// Weights of an [out, in] matrix in `f` (blocks or bf16 bytes) as the bf16
/// values a bf16 model holds: the loader's fp32 dequantization cast to bf16.
torch::Tensor bf16_weights(cg::wformat f, const void* w, int64_t out, int64_t in) {
  if (f == cg::wformat::bf16)
    return torch::from_blob(const_cast<void*>(w), {out, in}, torch::kBFloat16).clone();
  return dequantized(f, static_cast<const uint8_t*>(w), out, in).to(torch::kBFloat16);
}

/// gemm_bf16 over output rows [0, out) in three uneven pieces; x [rows, in] (any float dtype, rounded to bf16).
torch::Tensor run_gemm_bf16(cg::wformat f, const void* w, int64_t out, int64_t in, const torch::Tensor& x) {
  const int64_t rows = x.size(0);
  torch::Tensor y = torch::full({rows, out}, std::nanf(""), torch::kFloat32);
  torch::Tensor xb = x.to(torch::kBFloat16).contiguous();
  const int64_t a = out / 3, b = out - out / 5;
  for (auto [o0, o1] : {std::pair{int64_t(0), a}, std::pair{a, b}, std::pair{b, out}})
    cg::gemm_bf16(f, w, in, reinterpret_cast<const uint16_t*>(xb.data_ptr()), rows, y.data_ptr<float>(), out, o0,
                  o1);
  return y;
}

/// The paths gemm_bf16 has on this CPU: AMX tiles and/or AVX512-BF16.
std::vector<bool> amx_modes() {
  std::vector<bool> m{false};
  if (cg::amx_supported()) m.push_back(true);
  return m;
}

}  // namespace

BOOST_AUTO_TEST_CASE(gemm_bf16_matches_bf16_rounded_reference_random) {
  if (!have_kernels() || !cg::bf16_supported()) {
    BOOST_TEST_MESSAGE("no AVX512-BF16: gemm_bf16 checks skipped");
    return;
  }
  std::mt19937 rng(9);
  torch::manual_seed(9);
  for (bool amx : amx_modes()) {
    cg::use_amx(amx);
    double worst = 0;
    for (cg::wformat f : {cg::wformat::q4_1, cg::wformat::q8_0, cg::wformat::bf16})
      for (int64_t in : {32, 96, 576, 1536, 17, 100})
        for (int64_t out : {1, 5, 70}) {
          if (f != cg::wformat::bf16 && in % 32) continue;
          std::vector<uint8_t> blocks;
          torch::Tensor wb16;
          if (f == cg::wformat::bf16)
            wb16 = torch::randn({out, in}).to(torch::kBFloat16).contiguous();
          else
            blocks = random_blocks(f, out, in, rng);
          const void* w = f == cg::wformat::bf16 ? wb16.data_ptr() : static_cast<const void*>(blocks.data());
          const torch::Tensor wref = bf16_weights(f, w, out, in);
          // 1..16 rows: one chunk; 17, 40: several; 70: > 64 rows (AMX: the weight tile kept across passes).
          for (int64_t rows : {1, 5, 16, 17, 40, 70}) {
            torch::Tensor x = torch::randn({rows, in}).to(torch::kBFloat16);
            const double e = rel_error(run_gemm_bf16(f, w, out, in, x), x, wref);
            worst = std::max(worst, e);
            BOOST_CHECK_MESSAGE(e <= kRelTol, (amx ? "amx" : "avx512-bf16") << " format " << int(f) << " in " << in
                                                                          << " out " << out << " rows " << rows
                                                                          << ": relative error " << e);
          }
        }
    BOOST_TEST_MESSAGE("gemm_bf16 (" << (amx ? "amx" : "avx512-bf16")
                                     << ") vs float64 of the bf16 operands: worst relative error " << worst);
  }
  cg::use_amx(true);
}

BOOST_AUTO_TEST_CASE(gemm_bf16_weights_equal_the_loaders_bf16_and_rows_are_independent) {
  if (!have_kernels() || !cg::bf16_supported()) return;
  const auto ck = models::load_gguf_llm(testing::llm_gguf_path(), torch::kBFloat16, /*keep_blocks=*/true);
  torch::manual_seed(13);
  for (bool amx : amx_modes()) {
    cg::use_amx(amx);
    for (const std::string name : {"blk.0.attn_q.weight", "blk.7.ffn_down.weight", "token_embd.weight"}) {
      const auto& q = ck.quantized.at(name);
      const torch::Tensor& w = ck.weights.at(name);  // the bf16 model's weight
      const cg::wformat f = q.type == uint32_t(models::ggml_type::q4_1) ? cg::wformat::q4_1 : cg::wformat::q8_0;
      const int64_t out = std::min<int64_t>(q.rows, 300);
      // One-hot rows read single weights: y[r, o] = W[o, i_r] exactly (one
      // product of bf16 values, no rounding), so the kernel's bf16 weights
      // are the loader's (fp32 dequantization, then round to nearest even).
      std::vector<int64_t> cols{0, 1, 31, 32, 63, q.cols / 2, q.cols - 1};
      torch::Tensor onehot = torch::zeros({int64_t(cols.size()), q.cols});
      for (size_t r = 0; r < cols.size(); ++r) onehot[int64_t(r)][cols[r]] = 1;
      torch::Tensor y = run_gemm_bf16(f, q.data.data_ptr(), out, q.cols, onehot);
      torch::Tensor expect = w.narrow(0, 0, out).index_select(1, torch::tensor(cols, torch::kLong)).t().to(torch::kFloat32);
      BOOST_CHECK_MESSAGE(torch::equal(y, expect), name << ": bf16 weights differ from the loader's");
      // Real activations' scale; same bound as the random test.
      torch::Tensor x = torch::randn({24, q.cols}).to(torch::kBFloat16);
      torch::Tensor y24 = run_gemm_bf16(f, q.data.data_ptr(), out, q.cols, x);
      const double e = rel_error(y24, x, w.narrow(0, 0, out));
      BOOST_TEST_MESSAGE(name << " (" << (amx ? "amx" : "avx512-bf16") << ", 24 rows): relative error " << e);
      BOOST_CHECK_LE(e, kRelTol);
      // Each row's result is independent of the other rows: 24 rows at once
      // equal 16 + 8 and 24 single rows bit for bit.
      torch::Tensor a = run_gemm_bf16(f, q.data.data_ptr(), out, q.cols, x.narrow(0, 0, 16));
      torch::Tensor b = run_gemm_bf16(f, q.data.data_ptr(), out, q.cols, x.narrow(0, 16, 8));
      BOOST_CHECK(torch::equal(torch::cat({a, b}), y24));
      for (int64_t r : {0, 5, 23})
        BOOST_CHECK(torch::equal(run_gemm_bf16(f, q.data.data_ptr(), out, q.cols, x.narrow(0, r, 1))[0], y24[r]));
    }
  }
  cg::use_amx(true);
}

namespace {

/// amx_gemm_packed over output tiles [0, out) in two pieces split at a
/// multiple of 16 (as at::parallel_for splits the tiles); x [rows, in].
torch::Tensor run_amx_packed(const std::vector<uint16_t>& wp, int64_t out, int64_t in, const torch::Tensor& x) {
  const int64_t rows = x.size(0), K = cg::amx_k(in), rp = (rows + 15) / 16 * 16;
  torch::Tensor xb = torch::zeros({rp, K}, torch::kBFloat16);
  xb.narrow(0, 0, rows).narrow(1, 0, in).copy_(x);
  torch::Tensor y = torch::full({rows, out}, std::nanf(""), torch::kFloat32);
  const int64_t mid = (out + 15) / 16 / 2 * 16;
  for (auto [o0, o1] : {std::pair{int64_t(0), mid}, std::pair{mid, out}})
    cg::amx_gemm_packed(wp.data(), out, in, reinterpret_cast<const uint16_t*>(xb.data_ptr()), rows,
                        y.data_ptr<float>(), out, o0, o1);
  return y;
}

std::vector<uint16_t> amx_packed(const torch::Tensor& wb16) {
  const int64_t out = wb16.size(0), in = wb16.size(1);
  std::vector<uint16_t> wp(size_t(cg::amx_packed_size(out, in)));
  cg::amx_pack_weights(reinterpret_cast<const uint16_t*>(wb16.data_ptr()), out, in, wp.data());
  return wp;
}

}  // namespace

BOOST_AUTO_TEST_CASE(amx_prepacked_weights_match_reference_and_gemm_bf16) {
  if (!have_kernels() || !cg::amx_supported()) {
    BOOST_TEST_MESSAGE("no AMX: pre-packed AMX checks skipped");
    return;
  }
  // The pre-packed path multiplies the same bf16 operands with the same
  // TDPBF16PS sums as gemm_bf16 on AMX (weights and rows only swap the A/B
  // roles), so it must equal it bit for bit, and each row must not depend
  // on the others.
  torch::manual_seed(21);
  double worst = 0;
  for (int64_t in : {32, 96, 576, 1536, 17, 100})
    for (int64_t out : {1, 5, 70, 96}) {
      torch::Tensor w = torch::randn({out, in}).to(torch::kBFloat16).contiguous();
      const auto wp = amx_packed(w);
      for (int64_t rows : {1, 5, 16, 17, 40, 70, 176}) {
        torch::Tensor x = torch::randn({rows, in}).to(torch::kBFloat16);
        torch::Tensor y = run_amx_packed(wp, out, in, x);
        const double e = rel_error(y, x, w);
        worst = std::max(worst, e);
        BOOST_CHECK_MESSAGE(e <= kRelTol, "in " << in << " out " << out << " rows " << rows << ": relative error " << e);
        BOOST_CHECK_MESSAGE(torch::equal(y, run_gemm_bf16(cg::wformat::bf16, w.data_ptr(), out, in, x)),
                            "in " << in << " out " << out << " rows " << rows << ": differs from gemm_bf16 (amx)");
        if (rows == 40) {
          BOOST_CHECK(torch::equal(torch::cat({run_amx_packed(wp, out, in, x.narrow(0, 0, 17)),
                                               run_amx_packed(wp, out, in, x.narrow(0, 17, 23))}),
                                   y));
          BOOST_CHECK(torch::equal(run_amx_packed(wp, out, in, x.narrow(0, 39, 1))[0], y[39]));
        }
      }
    }
  BOOST_TEST_MESSAGE("amx_gemm_packed vs float64 of the bf16 operands: worst relative error " << worst);
}

BOOST_AUTO_TEST_CASE(vectorized_exp_silu_and_rms_rows) {
  if (!have_kernels()) return;
  // exp over the whole float range where it is finite and not denormal.
  std::vector<float> x, y;
  for (double v = -87.0; v <= 88.0; v += 0.000731) x.push_back(float(v));
  y.resize(x.size());
  cg::exp_approx(x.data(), y.data(), int64_t(x.size()));
  double worst = 0;
  for (size_t i = 0; i < x.size(); ++i) worst = std::max(worst, std::abs(y[i] / std::exp(double(x[i])) - 1));
  BOOST_TEST_MESSAGE("exp_approx: max relative error " << worst << " over " << x.size() << " points");
  BOOST_CHECK_LE(worst, 3e-7);
  // silu(g) * u, including large |g| (exp overflow / underflow) and a tail.
  torch::Tensor g = torch::cat({torch::randn({1000}) * 6, torch::tensor({-200.f, -90.f, 0.f, 90.f, 200.f})});
  torch::Tensor u = torch::randn({g.numel()});
  torch::Tensor out = torch::empty_like(g);
  cg::silu_mul(g.data_ptr<float>(), u.data_ptr<float>(), out.data_ptr<float>(), g.numel());
  torch::Tensor ref = (torch::silu(g.to(torch::kFloat64)) * u.to(torch::kFloat64));
  const double e = ((out.to(torch::kFloat64) - ref).abs() / (ref.abs() + 1e-30)).max().item<double>();
  BOOST_TEST_MESSAGE("silu_mul: max relative error " << e);
  BOOST_CHECK_LE(e, 1e-6);
  BOOST_CHECK(torch::isfinite(out).all().item<bool>());
  // x += d, then RMSNorm, on rows [1, 3) of 3 rows of 100 values (masked tail).
  torch::Tensor xs = torch::randn({3, 100}), d = torch::randn({3, 100}), w = torch::randn({100});
  torch::Tensor x0 = xs.clone(), h = torch::zeros({3, 100});
  cg::residual_rms_rows(xs.data_ptr<float>(), d.data_ptr<float>(), h.data_ptr<float>(), 100, w.data_ptr<float>(),
                        1e-5, 1, 3);
  torch::Tensor s = (x0 + d).narrow(0, 1, 2).to(torch::kFloat64);
  torch::Tensor hr = s * torch::rsqrt(s.pow(2).mean(-1, true) + 1e-5) * w.to(torch::kFloat64);
  BOOST_CHECK(torch::equal(xs[0], x0[0]));
  BOOST_CHECK(torch::allclose(xs.narrow(0, 1, 2), (x0 + d).narrow(0, 1, 2)));
  BOOST_CHECK_LE((h.narrow(0, 1, 2).to(torch::kFloat64) - hr).abs().max().item<double>(), 1e-5);
  BOOST_CHECK_EQUAL(h[0].abs().sum().item<double>(), 0.0);
}

BOOST_AUTO_TEST_CASE(attention_kernel_matches_softmax_reference) {
  if (!models::cpu_attention::supported(64)) {
    BOOST_TEST_MESSAGE("no AVX-512: attention kernel check skipped");
    return;
  }
  BOOST_CHECK(!models::cpu_attention::supported(40));  // head_dim must be a multiple of 16
  torch::manual_seed(5);
  std::mt19937 rng(5);
  double worst = 0;
  for (bool bf16 : {false, true})
    for (int64_t hd : {16, 48, 64, 128})
      for (int64_t n : {1, 7, 100}) {
        const int64_t n_cells = 2 * n + 3;
        const auto dt = bf16 ? torch::kBFloat16 : torch::kFloat32;
        torch::Tensor k = (2 * torch::randn({n_cells, hd})).to(dt), v = torch::randn({n_cells, hd}).to(dt);
        torch::Tensor q = torch::randn({hd}) / std::sqrt(double(hd));
        std::vector<int64_t> cells(static_cast<size_t>(n_cells));
        std::iota(cells.begin(), cells.end(), 0);
        std::shuffle(cells.begin(), cells.end(), rng);
        cells.resize(size_t(n));
        std::vector<float> scratch(static_cast<size_t>(n)), out(static_cast<size_t>(hd));
        models::cpu_attention::attend_one(q.data_ptr<float>(), k.data_ptr(), v.data_ptr(), bf16, hd, cells.data(), n,
                                          scratch.data(), out.data());
        torch::Tensor idx = torch::tensor(cells, torch::kLong);
        torch::Tensor kd = k.index_select(0, idx).to(torch::kFloat64), vd = v.index_select(0, idx).to(torch::kFloat64);
        torch::Tensor ref = torch::softmax(kd.matmul(q.to(torch::kFloat64)), 0).matmul(vd);
        const double e = (torch::from_blob(out.data(), {hd}).to(torch::kFloat64) - ref).abs().max().item<double>();
        worst = std::max(worst, e);
        BOOST_CHECK_MESSAGE(e <= 1e-5, (bf16 ? "bf16" : "fp32") << " hd " << hd << " n " << n << ": " << e);
      }
  BOOST_TEST_MESSAGE("attention kernel vs float64 softmax: worst |d| " << worst);
}

// ---------------------------------------------------------------- the model

namespace {

const nlohmann::json& golden() {
  static nlohmann::json j = testing::read_golden_json("llm_golden.json");
  return j;
}

std::shared_ptr<llama_model> model(torch::Dtype dt, bool cpu_decode) {
  static std::map<std::pair<int, bool>, std::shared_ptr<llama_model>> memo;
  auto& m = memo[{int(dt), cpu_decode}];
  if (!m) {
    at::set_num_threads(2);
    models::llama_options o;
    o.dtype = dt;
    o.cpu_decode = cpu_decode;
    m = llama_model::load(testing::llm_gguf_path(), o);
  }
  return m;
}

/// Greedy continuation by one-token decode steps; logits of every step in `lg_out`.
std::vector<int64_t> greedy(const llama_model& m, const std::vector<int64_t>& prompt, int n,
                            std::vector<torch::Tensor>* lg_out = nullptr) {
  auto c = m.make_cache(256);
  llm_batch b;
  b.add_tokens(prompt, 0, 0, true);
  torch::Tensor lg = m.step(b, c);
  std::vector<int64_t> out;
  for (int i = 0; i < n; ++i) {
    out.push_back(lg[0].argmax().item<int64_t>());
    if (lg_out) lg_out->push_back(lg[0]);
    b.clear();
    b.add_token(out.back(), 0, int64_t(prompt.size()) + i, true);
    lg = m.step(b, c);
  }
  return out;
}

void auto_vs_off(torch::Dtype dt, double logit_tol) {
  auto on = model(dt, true), off = model(dt, false);
  BOOST_TEST_MESSAGE("cpu_decode auto: " << on->cpu_decode_info() << "; off: " << off->cpu_decode_info());
  BOOST_CHECK_EQUAL(off->cpu_decode_info(), "off");
  BOOST_REQUIRE_NE(on->cpu_decode_info(), "off");
  double worst = 0;
  for (const auto& p : golden()["f32"]) {
    const auto toks = p["tokens"].get<std::vector<int64_t>>();
    std::vector<torch::Tensor> la, lb;
    const int64_t calls = on->cpu_decode_calls();
    const auto a = greedy(*on, toks, 32, &la);
    const auto b = greedy(*off, toks, 32, &lb);
    BOOST_CHECK_GT(on->cpu_decode_calls(), calls);
    BOOST_CHECK_EQUAL(off->cpu_decode_calls(), 0);
    BOOST_CHECK(a == b);
    for (size_t i = 0; i < la.size() && a == b; ++i) worst = std::max(worst, (la[i] - lb[i]).abs().max().item<double>());
  }
  BOOST_TEST_MESSAGE("auto vs off: max |dlogit| over 6 x 32 decode steps " << worst);
  BOOST_CHECK_LE(worst, logit_tol);
}

}  // namespace

BOOST_AUTO_TEST_CASE(fp32_auto_and_off_decode_alike) {
  if (!have_kernels()) return;
  // Same weights (q4_1/q8_0 blocks = the dequantized fp32 values): only the
  // summation order differs.
  auto_vs_off(torch::kFloat32, 1e-3);
}

BOOST_AUTO_TEST_CASE(bf16_auto_is_at_least_as_close_to_fp32_as_off) {
  if (!have_kernels()) return;
  // Not the same model as off by design: with auto, a bf16 model's decode
  // steps compute with the exact q4_1/q8_0 block values, float32 activations
  // and float32 attention instead of bf16 roundings of all three (the KV cache
  // and prefill stay bf16), so auto and off greedy continuations may part at
  // near-ties. Checked instead against the fp32 model, both teacher-forced
  // along its greedy continuations (6 prompts x 32 decode steps): measured
  // mean |dlogit| auto 0.036 vs off 0.076, top-1 agreement 190/192 vs 188/192,
  // max |dlogit| 0.47 vs 0.71.
  auto ref = model(torch::kFloat32, false), on = model(torch::kBFloat16, true), off = model(torch::kBFloat16, false);
  BOOST_REQUIRE_NE(on->cpu_decode_info(), "off");
  struct stats {
    int agree = 0;
    double sum = 0, worst = 0;
  } st_on, st_off;
  int n = 0;
  int64_t elems = 0;
  for (const auto& p : golden()["f32"]) {
    const auto toks = p["tokens"].get<std::vector<int64_t>>();
    std::vector<torch::Tensor> lr;
    const auto r = greedy(*ref, toks, 32, &lr);
    for (auto [m, st] : {std::pair{on, &st_on}, std::pair{off, &st_off}}) {
      auto c = m->make_cache(256);
      llm_batch b;
      b.add_tokens(toks, 0, 0, true);
      torch::Tensor lg = m->step(b, c);
      for (size_t i = 0; i < r.size(); ++i) {
        torch::Tensor d = (lg[0] - lr[i]).abs();
        st->agree += lg[0].argmax().item<int64_t>() == r[i];
        st->sum += d.sum().item<double>();
        st->worst = std::max(st->worst, d.max().item<double>());
        b.clear();
        b.add_token(r[i], 0, int64_t(toks.size() + i), true);
        lg = m->step(b, c);
      }
    }
    n += int(r.size());
    elems += int64_t(r.size()) * ref->n_vocab();
  }
  BOOST_TEST_MESSAGE("bf16 vs fp32 along fp32 greedy paths (" << n << " steps): top-1 agreement auto " << st_on.agree
                     << ", off " << st_off.agree << "; mean |dlogit| auto " << st_on.sum / double(elems) << ", off "
                     << st_off.sum / double(elems) << "; max auto " << st_on.worst << ", off " << st_off.worst);
  BOOST_CHECK_LE(st_on.sum, st_off.sum);
  BOOST_CHECK_GE(st_on.agree, n - n / 50);
  BOOST_CHECK_LE(st_on.worst, 1.0);
}

BOOST_AUTO_TEST_CASE(kernels_only_up_to_max_rows_and_not_in_training) {
  if (!have_kernels()) return;
  auto on = model(torch::kFloat32, true), off = model(torch::kFloat32, false);
  // A model whose kernels stop at 4 rows (llama_options::cpu_decode_max_rows).
  models::llama_options o4;
  o4.cpu_decode_max_rows = 4;
  auto on4 = llama_model::load(testing::llm_gguf_path(), o4);
  const auto toks = golden()["f32"][3]["tokens"].get<std::vector<int64_t>>();
  BOOST_REQUIRE_GT(toks.size(), 5u);
  for (size_t n : {size_t(4), size_t(5)}) {
    auto c1 = on->make_cache(64), c2 = off->make_cache(64), c3 = on4->make_cache(64);
    llm_batch b;
    b.add_tokens(std::vector<int64_t>(toks.begin(), toks.begin() + int64_t(n)), 0, 0, false);
    b.logits.assign(n, 1);
    const int64_t before = on->cpu_decode_calls(), before4 = on4->cpu_decode_calls();
    torch::Tensor la = on->step(b, c1), lb = off->step(b, c2), l4 = on4->step(b, c3);
    // Default limit: both on the kernels (fp32: same values up to summation order).
    BOOST_CHECK_GT(on->cpu_decode_calls(), before);
    BOOST_CHECK_LE((la - lb).abs().max().item<double>(), 1e-3);
    if (n <= 4) {
      BOOST_CHECK_GT(on4->cpu_decode_calls(), before4);
      BOOST_CHECK(torch::equal(l4, la));
    } else {
      // Over the limit: ATen, bit for bit the off model.
      BOOST_CHECK_EQUAL(on4->cpu_decode_calls(), before4);
      BOOST_CHECK(torch::equal(l4, lb));
    }
  }
  // The training forward is always ATen (autograd).
  const int64_t before = on->cpu_decode_calls();
  torch::Tensor e = on->embed_tokens(torch::tensor({toks[0]}, torch::kLong)).unsqueeze(0).requires_grad_(true);
  on->forward_embeddings(e).sum().backward();
  BOOST_CHECK_EQUAL(on->cpu_decode_calls(), before);
  BOOST_CHECK(e.grad().defined());
}

BOOST_AUTO_TEST_CASE(batched_decode_rows_equal_single_rows) {
  if (!have_kernels()) return;
  // Three sequences decoding in one step (3 rows: kernels with rows = 3) give
  // the logits each gets alone (rows = 1).
  auto m = model(torch::kFloat32, true);
  auto c = m->make_cache(256);
  std::vector<std::vector<int64_t>> prompts;
  for (int i = 0; i < 3; ++i) prompts.push_back(golden()["f32"][size_t(i)]["tokens"].get<std::vector<int64_t>>());
  for (int32_t s = 0; s < 3; ++s) {
    llm_batch b;
    b.add_tokens(prompts[size_t(s)], s, 0, false);
    m->step(b, c);
  }
  auto alone = m->make_cache(256);
  llm_batch b;
  for (int32_t s = 0; s < 3; ++s) b.add_token(42 + s, s, int64_t(prompts[size_t(s)].size()), true);
  torch::Tensor together = m->step(b, c);
  for (int32_t s = 0; s < 3; ++s) {
    alone.clear();
    llm_batch p;
    p.add_tokens(prompts[size_t(s)], 0, 0, false);
    m->step(p, alone);
    llm_batch d;
    d.add_token(42 + s, 0, int64_t(prompts[size_t(s)].size()), true);
    torch::Tensor one = m->step(d, alone);
    BOOST_CHECK_LE((together[s] - one[0]).abs().max().item<double>(), 1e-4);
  }
}

BOOST_AUTO_TEST_CASE(bf16_16_row_step_close_to_off_and_rows_independent) {
  if (!have_kernels() || !cg::bf16_supported()) return;
  // 16 sequences (the 6 golden prompts, cut to <= 24 tokens, plus one token
  // each) decode one token each in one 16-row step. auto runs the prefill
  // and the step on gemm_bf16 (bf16 activations and weights, fp32 sums) and
  // cpu_attention (fp32 scores, bf16 cache): the operands of off's ATen bf16
  // path, which however also rounds every product's output, the norms and
  // the attention to bf16. So auto differs from off by bf16 roundings and is
  // the closer of the two to the fp32 model. Measured: auto vs off max
  // |dlogit| 0.64, mean 0.12, top-1 15/16; mean |dlogit| vs fp32: auto 0.07,
  // off 0.14.
  auto on = model(torch::kBFloat16, true), off = model(torch::kBFloat16, false);
  BOOST_REQUIRE_NE(on->cpu_decode_info(), "off");
  std::vector<std::vector<int64_t>> prompts;
  for (int s = 0; s < 16; ++s) {
    auto t = golden()["f32"][size_t(s % 6)]["tokens"].get<std::vector<int64_t>>();
    if (t.size() > 24) t.resize(24);  // prefill steps <= 24 rows: on the kernels too
    t.push_back(100 + s);
    prompts.push_back(t);
  }
  auto prefill = [&](const llama_model& m, models::kv_cache& c) {
    for (int32_t s = 0; s < 16; ++s) {
      llm_batch b;
      b.add_tokens(prompts[size_t(s)], s, 0, false);
      m.step(b, c);
    }
  };
  auto rows = [&](int32_t s0, int32_t s1) {
    llm_batch b;
    for (int32_t s = s0; s < s1; ++s) b.add_token(500 + 7 * s, s, int64_t(prompts[size_t(s)].size()), true);
    return b;
  };
  auto ref = model(torch::kFloat32, false);
  auto c_on = on->make_cache(1024), c_on2 = on->make_cache(1024), c_off = off->make_cache(1024);
  auto c_ref = ref->make_cache(1024);
  prefill(*on, c_on);
  prefill(*on, c_on2);
  prefill(*off, c_off);
  prefill(*ref, c_ref);
  torch::Tensor lr = ref->step(rows(0, 16), c_ref);
  const int64_t calls = on->cpu_decode_calls();
  torch::Tensor la = on->step(rows(0, 16), c_on);
  BOOST_CHECK_GT(on->cpu_decode_calls(), calls);
  torch::Tensor lb = off->step(rows(0, 16), c_off);
  torch::Tensor d = (la - lb).abs();
  const int64_t agree = (la.argmax(-1) == lb.argmax(-1)).sum().item<int64_t>();
  const double e_on = (la - lr).abs().mean().item<double>(), e_off = (lb - lr).abs().mean().item<double>();
  BOOST_TEST_MESSAGE("bf16 16-row step, auto vs off: max |dlogit| " << d.max().item<double>() << ", mean "
                                                                   << d.mean().item<double>() << ", top-1 agreement "
                                                                   << agree << "/16; mean |dlogit| vs fp32: auto "
                                                                   << e_on << ", off " << e_off);
  BOOST_CHECK_LE(d.max().item<double>(), 1.5);
  BOOST_CHECK_LE(d.mean().item<double>(), 0.25);
  BOOST_CHECK_GE(agree, 14);
  BOOST_CHECK_LE(e_on, e_off);
  // The same rows as two 8-row steps: bit for bit (every row's products,
  // attention and norms are computed alone, in the same order).
  torch::Tensor h1 = on->step(rows(0, 8), c_on2), h2 = on->step(rows(8, 16), c_on2);
  BOOST_CHECK(torch::equal(torch::cat({h1, h2}), la));
}

BOOST_AUTO_TEST_CASE(hf_bf16_checkpoint_decodes_on_the_bf16_kernel) {
  if (!have_kernels()) return;
  // A tiny random Qwen2 (q/k/v biases, head_dim 16) from safetensors: no
  // blocks, so a bf16 model's matrices go to the bf16 kernel. Same bf16
  // weights as off; auto keeps activations in float32, so it must be at least
  // as close to the fp32 model as off.
  const std::string dir = testing::source_dir() + "/tests/golden/hf/qwen2";
  auto load = [&](torch::Dtype dt, bool cd) {
    models::llama_options o;
    o.dtype = dt;
    o.cpu_decode = cd;
    return llama_model::load(dir, o);
  };
  auto ref = load(torch::kFloat32, false), on = load(torch::kBFloat16, true), off = load(torch::kBFloat16, false);
  BOOST_TEST_MESSAGE("qwen2 bf16, cpu_decode auto: " << on->cpu_decode_info());
  BOOST_REQUIRE(on->cpu_decode_info().find("bf16 x") != std::string::npos);
  const std::vector<int64_t> prompt{1, 5, 9, 17, 33, 2, 7};
  std::vector<torch::Tensor> lr, la, lb;
  const auto r = greedy(*ref, prompt, 16, &lr);
  const int64_t before = on->cpu_decode_calls();
  const auto a = greedy(*on, prompt, 16, &la);
  BOOST_CHECK_GT(on->cpu_decode_calls(), before);
  const auto b = greedy(*off, prompt, 16, &lb);
  double e_on = 0, e_off = 0;
  size_t same = 0, same_off = 0;
  while (same < r.size() && r[same] == a[same]) ++same;
  while (same_off < r.size() && r[same_off] == b[same_off]) ++same_off;
  // Logits compared where both still follow the fp32 tokens (measured: 8 and
  // 8 tokens; max |dlogit| auto 0.088, off 0.129; this random model's logits
  // are flat, so near-ties come early).
  for (size_t i = 0; i < std::min(same, same_off); ++i) {
    e_on = std::max(e_on, (la[i] - lr[i]).abs().max().item<double>());
    e_off = std::max(e_off, (lb[i] - lr[i]).abs().max().item<double>());
  }
  BOOST_TEST_MESSAGE("greedy identical to fp32 for " << same << "/16 tokens; max |dlogit| vs fp32 auto " << e_on
                                                     << ", off " << e_off);
  BOOST_CHECK_GE(same, 4u);
  BOOST_CHECK_LE(e_on, e_off + 1e-6);
}

BOOST_AUTO_TEST_CASE(bf16_176_row_mixed_step_close_to_off_and_fp32) {
  if (!have_kernels() || !cg::bf16_supported()) return;
  // The server's end-of-turn step: 16 sequences with different contexts
  // (4-29 tokens) each add 11 rows in one 176-row step (logits for every
  // row). auto (pre-packed AMX where it runs, fp32 activations between the
  // products, per-row attention) vs off (ATen bf16) and the fp32 model; then
  // the same rows as two steps of 8 sequences (bit for bit), and (AMX) the
  // same step with per-call tiles from the blocks (gemm_bf16: the same sums).
  // Measured: auto vs off max |dlogit| 0.9, mean 0.13, top-1 ~94 %; mean
  // |dlogit| vs fp32 auto 0.07, off 0.14.
  auto on = model(torch::kBFloat16, true), off = model(torch::kBFloat16, false), ref = model(torch::kFloat32, false);
  BOOST_REQUIRE_GE(models::llama_options{}.cpu_decode_amx_max_rows, 176);
  std::vector<std::vector<int64_t>> ctx;
  for (int s = 0; s < 16; ++s) {
    auto t = golden()["f32"][size_t(s % 6)]["tokens"].get<std::vector<int64_t>>();
    t.resize(std::min(t.size(), size_t(4 + (s * 5) % 26)));
    ctx.push_back(t);
  }
  auto prefill = [&](const llama_model& m, models::kv_cache& c) {
    for (int32_t s = 0; s < 16; ++s) {
      llm_batch b;
      b.add_tokens(ctx[size_t(s)], s, 0, false);
      m.step(b, c);
    }
  };
  auto rows = [&](int32_t s0, int32_t s1) {
    llm_batch b;
    for (int32_t s = s0; s < s1; ++s)
      for (int r = 0; r < 11; ++r) b.add_token(300 + 13 * s + 29 * r, s, int64_t(ctx[size_t(s)].size()) + r, true);
    return b;
  };
  auto c_on = on->make_cache(1024), c_on2 = on->make_cache(1024), c_off = off->make_cache(1024);
  auto c_ref = ref->make_cache(1024);
  prefill(*on, c_on);
  prefill(*on, c_on2);
  prefill(*off, c_off);
  prefill(*ref, c_ref);
  const int64_t calls = on->cpu_decode_calls();
  torch::Tensor la = on->step(rows(0, 16), c_on);
  BOOST_CHECK_GT(on->cpu_decode_calls(), calls);
  torch::Tensor lb = off->step(rows(0, 16), c_off), lr = ref->step(rows(0, 16), c_ref);
  BOOST_REQUIRE_EQUAL(la.size(0), 176);
  torch::Tensor d = (la - lb).abs();
  const int64_t agree = (la.argmax(-1) == lb.argmax(-1)).sum().item<int64_t>();
  const double e_on = (la - lr).abs().mean().item<double>(), e_off = (lb - lr).abs().mean().item<double>();
  BOOST_TEST_MESSAGE("bf16 176-row step (16 x 11), auto vs off: max |dlogit| "
                     << d.max().item<double>() << ", mean " << d.mean().item<double>() << ", top-1 agreement "
                     << agree << "/176; mean |dlogit| vs fp32: auto " << e_on << ", off " << e_off);
  BOOST_CHECK_LE(d.max().item<double>(), 2.0);
  BOOST_CHECK_LE(d.mean().item<double>(), 0.25);
  BOOST_CHECK_GE(agree, 176 * 85 / 100);
  BOOST_CHECK_LE(e_on, e_off);
  torch::Tensor h1 = on->step(rows(0, 8), c_on2), h2 = on->step(rows(8, 16), c_on2);
  BOOST_CHECK(torch::equal(torch::cat({h1, h2}), la));
  if (cg::amx_supported()) {
    BOOST_CHECK(on->cpu_decode_info().find("pre-packed AMX") != std::string::npos);
    models::llama_options o;
    o.dtype = torch::kBFloat16;
    o.cpu_decode_amx_prepack = false;
    o.cpu_decode_max_rows = 256;  // the 176-row step on gemm_bf16 too
    auto np = llama_model::load(testing::llm_gguf_path(), o);
    auto c_np = np->make_cache(1024);
    prefill(*np, c_np);
    BOOST_CHECK(torch::equal(np->step(rows(0, 16), c_np), la));
  }
}
