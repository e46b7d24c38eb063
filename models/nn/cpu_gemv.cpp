#include "models/nn/cpu_gemv.hpp"

// GCC 12's AVX-512 headers pass _mm512_undefined_*() as the unused merge
// source of masked builtins, which -Wmaybe-uninitialized then reports inside
// the headers (GCC PR 105593): not our code.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "models/nn/cpu_features.hpp"

// Each kernel is compiled for AVX-512 through a function attribute (not a
// file-wide -mavx512f), so the rest of the binary stays baseline x86-64 and the
// kernels only run after the CPU check in supported().
#define UT_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,f16c,fma")))
#define UT_AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,f16c,fma")))

namespace undertone::models::cpu_gemv {

namespace {

// ---- bf16 weights, AVX512-BF16: pairs of bf16 multiplied and summed into fp32
// lanes (vdpbf16ps). Four output rows at a time so that 4 * R independent
// accumulators hide the instruction's latency.
template <int R>
UT_AVX512_BF16 void bf16_dp(const uint16_t* w, int64_t in, const uint16_t* x, float* y, int64_t ldy, int64_t o0,
                            int64_t o1) {
  const int64_t full = in / 32 * 32;
  const __mmask32 tail = in > full ? __mmask32((uint64_t(1) << (in - full)) - 1) : 0;
  int64_t o = o0;
  for (; o + 4 <= o1; o += 4) {
    __m512 acc[4][R];
    for (int k = 0; k < 4; ++k)
      for (int r = 0; r < R; ++r) acc[k][r] = _mm512_setzero_ps();
    const uint16_t* wr = w + o * in;
    for (int64_t i = 0; i < full; i += 32) {
      __m512i xv[R];
      for (int r = 0; r < R; ++r) xv[r] = _mm512_loadu_si512(x + r * in + i);
      for (int k = 0; k < 4; ++k) {
        const __m512i wv = _mm512_loadu_si512(wr + k * in + i);
        for (int r = 0; r < R; ++r) acc[k][r] = _mm512_dpbf16_ps(acc[k][r], (__m512bh)wv, (__m512bh)xv[r]);
      }
    }
    if (tail) {
      __m512i xv[R];
      for (int r = 0; r < R; ++r) xv[r] = _mm512_maskz_loadu_epi16(tail, x + r * in + full);
      for (int k = 0; k < 4; ++k) {
        const __m512i wv = _mm512_maskz_loadu_epi16(tail, wr + k * in + full);
        for (int r = 0; r < R; ++r) acc[k][r] = _mm512_dpbf16_ps(acc[k][r], (__m512bh)wv, (__m512bh)xv[r]);
      }
    }
    for (int k = 0; k < 4; ++k)
      for (int r = 0; r < R; ++r) y[r * ldy + o + k] = _mm512_reduce_add_ps(acc[k][r]);
  }
  for (; o < o1; ++o) {
    __m512 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
    const uint16_t* wr = w + o * in;
    for (int64_t i = 0; i < full; i += 32) {
      const __m512i wv = _mm512_loadu_si512(wr + i);
      for (int r = 0; r < R; ++r)
        acc[r] = _mm512_dpbf16_ps(acc[r], (__m512bh)wv, (__m512bh)_mm512_loadu_si512(x + r * in + i));
    }
    if (tail) {
      const __m512i wv = _mm512_maskz_loadu_epi16(tail, wr + full);
      for (int r = 0; r < R; ++r)
        acc[r] = _mm512_dpbf16_ps(acc[r], (__m512bh)wv, (__m512bh)_mm512_maskz_loadu_epi16(tail, x + r * in + full));
    }
    for (int r = 0; r < R; ++r) y[r * ldy + o] = _mm512_reduce_add_ps(acc[r]);
  }
}

// bf16 -> fp32 of 16 values: the bf16 bits are the high half of the fp32.
UT_AVX512 inline __m512 widen16(const uint16_t* p, __mmask16 m) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}

// ---- bf16 weights, AVX512F only (no BF16 dot product): widen and FMA in fp32.
template <int R>
UT_AVX512 void bf16_f32(const uint16_t* w, int64_t in, const uint16_t* x, float* y, int64_t ldy, int64_t o0,
                        int64_t o1) {
  for (int64_t o = o0; o < o1; ++o) {
    __m512 acc[2][R];
    for (int r = 0; r < R; ++r) acc[0][r] = acc[1][r] = _mm512_setzero_ps();
    const uint16_t* wr = w + o * in;
    int64_t i = 0, step = 0;
    for (; i < in; i += 16, ++step) {
      const __mmask16 m = in - i >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (in - i)) - 1);
      const __m512 wv = widen16(wr + i, m);
      for (int r = 0; r < R; ++r)
        acc[step & 1][r] = _mm512_fmadd_ps(wv, widen16(x + r * in + i, m), acc[step & 1][r]);
    }
    for (int r = 0; r < R; ++r) y[r * ldy + o] = _mm512_reduce_add_ps(_mm512_add_ps(acc[0][r], acc[1][r]));
  }
}

// Broadcasts of a block's fp16 scale (and min) at p.
UT_AVX512 inline __m512 bcast_f16(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return _mm512_set1_ps(_cvtsh_ss(h));
}

// ---- q4_1: each block's 32 weights are dequantized in registers (d * q + m,
// the same values the dequantize-at-load path holds) and FMA'd with x, so the
// result is the dequantized model's up to rounding order. Low and high
// nibbles (elements 0-15 and 16-31) go to separate accumulators.
template <int R>
UT_AVX512 void q4_1_f32(const uint8_t* w, int64_t in, const float* x, float* y, int64_t ldy, int64_t o0,
                        int64_t o1) {
  const int64_t nb = in / kBlock, rb = nb * 20;
  const __m512i low4 = _mm512_set1_epi32(0xF);
  for (int64_t o = o0; o < o1; ++o) {
    __m512 acc[2][R];
    for (int r = 0; r < R; ++r) acc[0][r] = acc[1][r] = _mm512_setzero_ps();
    const uint8_t* b = w + o * rb;
    for (int64_t j = 0; j < nb; ++j, b += 20) {
      const __m512 d = bcast_f16(b), m = bcast_f16(b + 2);
      const __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 4)));
      const __m512 lo = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(q, low4)), d, m);
      const __m512 hi = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(q, 4)), d, m);
      for (int r = 0; r < R; ++r) {
        const float* xr = x + r * in + j * kBlock;
        acc[0][r] = _mm512_fmadd_ps(lo, _mm512_loadu_ps(xr), acc[0][r]);
        acc[1][r] = _mm512_fmadd_ps(hi, _mm512_loadu_ps(xr + 16), acc[1][r]);
      }
    }
    for (int r = 0; r < R; ++r) y[r * ldy + o] = _mm512_reduce_add_ps(_mm512_add_ps(acc[0][r], acc[1][r]));
  }
}

// ---- q8_0: w = d * q, dequantized in registers as above.
template <int R>
UT_AVX512 void q8_0_f32(const uint8_t* w, int64_t in, const float* x, float* y, int64_t ldy, int64_t o0,
                        int64_t o1) {
  const int64_t nb = in / kBlock, rb = nb * 34;
  for (int64_t o = o0; o < o1; ++o) {
    __m512 acc[2][R];
    for (int r = 0; r < R; ++r) acc[0][r] = acc[1][r] = _mm512_setzero_ps();
    const uint8_t* b = w + o * rb;
    for (int64_t j = 0; j < nb; ++j, b += 34) {
      const __m512 d = bcast_f16(b);
      const __m512 lo = _mm512_mul_ps(
          _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 2)))), d);
      const __m512 hi = _mm512_mul_ps(
          _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 18)))), d);
      for (int r = 0; r < R; ++r) {
        const float* xr = x + r * in + j * kBlock;
        acc[0][r] = _mm512_fmadd_ps(lo, _mm512_loadu_ps(xr), acc[0][r]);
        acc[1][r] = _mm512_fmadd_ps(hi, _mm512_loadu_ps(xr + 16), acc[1][r]);
      }
    }
    for (int r = 0; r < R; ++r) y[r * ldy + o] = _mm512_reduce_add_ps(_mm512_add_ps(acc[0][r], acc[1][r]));
  }
}

bool g_use_bf16_dp = true;

// Runs kernel K<R> over the input rows in chunks of at most 4 (the weights are
// read once per chunk).
template <template <int> class K, class W, class X>
void by_rows(const W* w, int64_t in, const X* x, int64_t rows, float* y, int64_t ldy, int64_t o0, int64_t o1) {
  for (int64_t r0 = 0; r0 < rows; r0 += 4) {
    const X* xr = x + r0 * in;
    float* yr = y + r0 * ldy;
    switch (std::min<int64_t>(4, rows - r0)) {
      case 1: K<1>::run(w, in, xr, yr, ldy, o0, o1); break;
      case 2: K<2>::run(w, in, xr, yr, ldy, o0, o1); break;
      case 3: K<3>::run(w, in, xr, yr, ldy, o0, o1); break;
      default: K<4>::run(w, in, xr, yr, ldy, o0, o1); break;
    }
  }
}
template <int R> struct k_bf16_dp { static void run(const uint16_t* w, int64_t in, const uint16_t* x, float* y, int64_t ldy, int64_t a, int64_t b) { bf16_dp<R>(w, in, x, y, ldy, a, b); } };
template <int R> struct k_bf16_f32 { static void run(const uint16_t* w, int64_t in, const uint16_t* x, float* y, int64_t ldy, int64_t a, int64_t b) { bf16_f32<R>(w, in, x, y, ldy, a, b); } };
template <int R> struct k_q4_1 { static void run(const uint8_t* w, int64_t in, const float* x, float* y, int64_t ldy, int64_t a, int64_t b) { q4_1_f32<R>(w, in, x, y, ldy, a, b); } };
template <int R> struct k_q8_0 { static void run(const uint8_t* w, int64_t in, const float* x, float* y, int64_t ldy, int64_t a, int64_t b) { q8_0_f32<R>(w, in, x, y, ldy, a, b); } };

}  // namespace

int64_t row_bytes(wformat f, int64_t in) {
  switch (f) {
    case wformat::bf16: return 2 * in;
    case wformat::q4_1: return in / kBlock * 20;
    case wformat::q8_0: return in / kBlock * 34;
    case wformat::none: break;
  }
  return 0;
}

bool supported(wformat f) { return f != wformat::none && cpu_has_avx512(); }

const char* isa() { return cpu_has_avx512_bf16() && g_use_bf16_dp ? "avx512-bf16" : cpu_has_avx512() ? "avx512" : "none"; }

void use_avx512_bf16(bool on) { g_use_bf16_dp = on; }

void gemv(wformat f, const void* w, int64_t in, const float* x, const uint16_t* xb, int64_t rows, float* y,
          int64_t ldy, int64_t o0, int64_t o1) {
  if (rows <= 0 || o1 <= o0) return;
  switch (f) {
    case wformat::bf16:
      if (cpu_has_avx512_bf16() && g_use_bf16_dp)
        by_rows<k_bf16_dp>(static_cast<const uint16_t*>(w), in, xb, rows, y, ldy, o0, o1);
      else
        by_rows<k_bf16_f32>(static_cast<const uint16_t*>(w), in, xb, rows, y, ldy, o0, o1);
      return;
    case wformat::q4_1: by_rows<k_q4_1>(static_cast<const uint8_t*>(w), in, x, rows, y, ldy, o0, o1); return;
    case wformat::q8_0: by_rows<k_q8_0>(static_cast<const uint8_t*>(w), in, x, rows, y, ldy, o0, o1); return;
    case wformat::none: return;
  }
}

}  // namespace undertone::models::cpu_gemv
