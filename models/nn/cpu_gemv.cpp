#include "models/nn/cpu_gemv.hpp"

// GCC 12's AVX-512 headers pass _mm512_undefined_*() as the unused merge
// source of masked builtins, which -Wmaybe-uninitialized then reports inside
// the headers (GCC PR 105593): not our code.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "models/nn/cpu_features.hpp"
#include "models/nn/cpu_simd.hpp"

// Each kernel is compiled for AVX-512 through a function attribute (not a
// file-wide -mavx512f), so the rest of the binary stays baseline x86-64 and the
// kernels only run after the CPU check in supported().
#define UT_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,f16c,fma")))
#define UT_AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,f16c,fma")))
#define UT_AMX \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,f16c,fma,amx-tile,amx-bf16")))

namespace undertone::models::cpu_gemv {

namespace {

// Input rows per pass over W: fp32 activations (2 accumulators per row), bf16
// activations (1 accumulator per row; 16 of the 32 zmm registers).
constexpr int kF32Rows = 4;
constexpr int kWideRows = 16;

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
    #pragma GCC unroll 16
    for (int k = 0; k < 4; ++k)
      #pragma GCC unroll 16
      for (int r = 0; r < R; ++r) acc[k][r] = _mm512_setzero_ps();
    const uint16_t* wr = w + o * in;
    for (int64_t i = 0; i < full; i += 32) {
      __m512i xv[R];
      #pragma GCC unroll 16
      for (int r = 0; r < R; ++r) xv[r] = _mm512_loadu_si512(x + r * in + i);
      #pragma GCC unroll 16
      for (int k = 0; k < 4; ++k) {
        const __m512i wv = _mm512_loadu_si512(wr + k * in + i);
        #pragma GCC unroll 16
        for (int r = 0; r < R; ++r) acc[k][r] = _mm512_dpbf16_ps(acc[k][r], (__m512bh)wv, (__m512bh)xv[r]);
      }
    }
    if (tail) {
      __m512i xv[R];
      #pragma GCC unroll 16
      for (int r = 0; r < R; ++r) xv[r] = _mm512_maskz_loadu_epi16(tail, x + r * in + full);
      #pragma GCC unroll 16
      for (int k = 0; k < 4; ++k) {
        const __m512i wv = _mm512_maskz_loadu_epi16(tail, wr + k * in + full);
        #pragma GCC unroll 16
        for (int r = 0; r < R; ++r) acc[k][r] = _mm512_dpbf16_ps(acc[k][r], (__m512bh)wv, (__m512bh)xv[r]);
      }
    }
    #pragma GCC unroll 16
    for (int k = 0; k < 4; ++k)
      #pragma GCC unroll 16
      for (int r = 0; r < R; ++r) y[r * ldy + o + k] = _mm512_reduce_add_ps(acc[k][r]);
  }
  for (; o < o1; ++o) {
    __m512 acc[R];
    #pragma GCC unroll 16
    for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
    const uint16_t* wr = w + o * in;
    for (int64_t i = 0; i < full; i += 32) {
      const __m512i wv = _mm512_loadu_si512(wr + i);
      #pragma GCC unroll 16
      for (int r = 0; r < R; ++r)
        acc[r] = _mm512_dpbf16_ps(acc[r], (__m512bh)wv, (__m512bh)_mm512_loadu_si512(x + r * in + i));
    }
    if (tail) {
      const __m512i wv = _mm512_maskz_loadu_epi16(tail, wr + full);
      #pragma GCC unroll 16
      for (int r = 0; r < R; ++r)
        acc[r] = _mm512_dpbf16_ps(acc[r], (__m512bh)wv, (__m512bh)_mm512_maskz_loadu_epi16(tail, x + r * in + full));
    }
    #pragma GCC unroll 16
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
    #pragma GCC unroll 16
    for (int r = 0; r < R; ++r) acc[0][r] = acc[1][r] = _mm512_setzero_ps();
    const uint16_t* wr = w + o * in;
    int64_t i = 0, step = 0;
    for (; i < in; i += 16, ++step) {
      const __mmask16 m = in - i >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (in - i)) - 1);
      const __m512 wv = widen16(wr + i, m);
      #pragma GCC unroll 16
      for (int r = 0; r < R; ++r)
        acc[step & 1][r] = _mm512_fmadd_ps(wv, widen16(x + r * in + i, m), acc[step & 1][r]);
    }
    #pragma GCC unroll 16
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
    #pragma GCC unroll 16
    for (int r = 0; r < R; ++r) acc[0][r] = acc[1][r] = _mm512_setzero_ps();
    const uint8_t* b = w + o * rb;
    for (int64_t j = 0; j < nb; ++j, b += 20) {
      const __m512 d = bcast_f16(b), m = bcast_f16(b + 2);
      const __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 4)));
      const __m512 lo = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(q, low4)), d, m);
      const __m512 hi = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(q, 4)), d, m);
      #pragma GCC unroll 16
      for (int r = 0; r < R; ++r) {
        const float* xr = x + r * in + j * kBlock;
        acc[0][r] = _mm512_fmadd_ps(lo, _mm512_loadu_ps(xr), acc[0][r]);
        acc[1][r] = _mm512_fmadd_ps(hi, _mm512_loadu_ps(xr + 16), acc[1][r]);
      }
    }
    #pragma GCC unroll 16
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
    #pragma GCC unroll 16
    for (int r = 0; r < R; ++r) acc[0][r] = acc[1][r] = _mm512_setzero_ps();
    const uint8_t* b = w + o * rb;
    for (int64_t j = 0; j < nb; ++j, b += 34) {
      const __m512 d = bcast_f16(b);
      const __m512 lo = _mm512_mul_ps(
          _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 2)))), d);
      const __m512 hi = _mm512_mul_ps(
          _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 18)))), d);
      #pragma GCC unroll 16
      for (int r = 0; r < R; ++r) {
        const float* xr = x + r * in + j * kBlock;
        acc[0][r] = _mm512_fmadd_ps(lo, _mm512_loadu_ps(xr), acc[0][r]);
        acc[1][r] = _mm512_fmadd_ps(hi, _mm512_loadu_ps(xr + 16), acc[1][r]);
      }
    }
    #pragma GCC unroll 16
    for (int r = 0; r < R; ++r) y[r * ldy + o] = _mm512_reduce_add_ps(_mm512_add_ps(acc[0][r], acc[1][r]));
  }
}

// a * b + c with two roundings, as the loader's scalar code computes it: the
// _round_ forms keep the compiler from contracting them into one FMA.
UT_AVX512 inline __m512 mul_add(__m512 a, __m512 b, __m512 c) {
  constexpr int rn = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  return _mm512_add_round_ps(_mm512_mul_round_ps(a, b, rn), c, rn);
}

// One q4_1 / q8_0 block (32 weights at b) as bf16: d * q + m / d * q in fp32
// with a separate multiply and add, rounded to nearest even (see below).
UT_AVX512_BF16 inline __m512bh q4_1_block_bf16(const uint8_t* b) {
  const __m512 d = bcast_f16(b), m = bcast_f16(b + 2);
  const __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 4)));
  const __m512 lo = mul_add(_mm512_cvtepi32_ps(_mm512_and_si512(q, _mm512_set1_epi32(0xF))), d, m);
  const __m512 hi = mul_add(_mm512_cvtepi32_ps(_mm512_srli_epi32(q, 4)), d, m);
  return _mm512_cvtne2ps_pbh(hi, lo);  // lanes 0-15 = lo (elements 0-15), 16-31 = hi
}
UT_AVX512_BF16 inline __m512bh q8_0_block_bf16(const uint8_t* b) {
  const __m512 d = bcast_f16(b);
  const __m512 lo = _mm512_mul_ps(
      _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 2)))), d);
  const __m512 hi = _mm512_mul_ps(
      _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 18)))), d);
  return _mm512_cvtne2ps_pbh(hi, lo);
}

// ---- bf16 activations (AVX512-BF16) for steps of many rows: each weight is
// made bf16 ONCE per pass over W (q4_1: d * q + m, q8_0: d * q, both in fp32
// with a separate multiply and add as models/gguf.cpp's dequantize_row, then
// rounded to nearest even by vcvtne2ps2bf16, as torch's fp32 -> bf16 cast of
// the loader's copy), and multiplied with up to 16 input rows by vdpbf16ps,
// one accumulator per row: per 32-weight block ~17 instructions of
// dequantization + 16 dot products for 16 rows, where the fp32 kernels repeat
// the dequantization per chunk of 4 rows and spend two FMAs per row.
// Each output is summed in the same order whatever R, so a row's result does
// not depend on the other rows of the call.
template <int R>
UT_AVX512_BF16 void q4_1_bf16(const uint8_t* w, int64_t in, const uint16_t* x, float* y, int64_t ldy, int64_t o0,
                              int64_t o1) {
  const int64_t nb = in / kBlock, rb = nb * 20;
  for (int64_t o = o0; o < o1; ++o) {
    __m512 acc[R];
    #pragma GCC unroll 16
    for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
    const uint8_t* b = w + o * rb;
    for (int64_t j = 0; j < nb; ++j, b += 20) {
      const __m512bh wv = q4_1_block_bf16(b);
      const uint16_t* xj = x + j * kBlock;
      #pragma GCC unroll 16
      for (int r = 0; r < R; ++r) acc[r] = _mm512_dpbf16_ps(acc[r], wv, (__m512bh)_mm512_loadu_si512(xj + r * in));
    }
    #pragma GCC unroll 16
    for (int r = 0; r < R; ++r) y[r * ldy + o] = _mm512_reduce_add_ps(acc[r]);
  }
}

template <int R>
UT_AVX512_BF16 void q8_0_bf16(const uint8_t* w, int64_t in, const uint16_t* x, float* y, int64_t ldy, int64_t o0,
                              int64_t o1) {
  const int64_t nb = in / kBlock, rb = nb * 34;
  for (int64_t o = o0; o < o1; ++o) {
    __m512 acc[R];
    #pragma GCC unroll 16
    for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
    const uint8_t* b = w + o * rb;
    for (int64_t j = 0; j < nb; ++j, b += 34) {
      const __m512bh wv = q8_0_block_bf16(b);
      const uint16_t* xj = x + j * kBlock;
      #pragma GCC unroll 16
      for (int r = 0; r < R; ++r) acc[r] = _mm512_dpbf16_ps(acc[r], wv, (__m512bh)_mm512_loadu_si512(xj + r * in));
    }
    #pragma GCC unroll 16
    for (int r = 0; r < R; ++r) y[r * ldy + o] = _mm512_reduce_add_ps(acc[r]);
  }
}

// bf16 weights, one output against R <= 16 rows (bf16_dp's 4 outputs x R
// accumulators would not fit the registers); same summation order per output
// as bf16_dp, so the two give identical results.
template <int R>
UT_AVX512_BF16 void bf16_dp_wide(const uint16_t* w, int64_t in, const uint16_t* x, float* y, int64_t ldy, int64_t o0,
                                 int64_t o1) {
  const int64_t full = in / 32 * 32;
  const __mmask32 tail = in > full ? __mmask32((uint64_t(1) << (in - full)) - 1) : 0;
  for (int64_t o = o0; o < o1; ++o) {
    __m512 acc[R];
    #pragma GCC unroll 16
    for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
    const uint16_t* wr = w + o * in;
    for (int64_t i = 0; i < full; i += 32) {
      const __m512bh wv = (__m512bh)_mm512_loadu_si512(wr + i);
      #pragma GCC unroll 16
      for (int r = 0; r < R; ++r) acc[r] = _mm512_dpbf16_ps(acc[r], wv, (__m512bh)_mm512_loadu_si512(x + r * in + i));
    }
    if (tail) {
      const __m512bh wv = (__m512bh)_mm512_maskz_loadu_epi16(tail, wr + full);
      #pragma GCC unroll 16
      for (int r = 0; r < R; ++r)
        acc[r] = _mm512_dpbf16_ps(acc[r], wv, (__m512bh)_mm512_maskz_loadu_epi16(tail, x + r * in + full));
    }
    #pragma GCC unroll 16
    for (int r = 0; r < R; ++r) y[r * ldy + o] = _mm512_reduce_add_ps(acc[r]);
  }
}

// ---- AMX (tile) path of gemm_bf16: the same bf16 weights and activations,
// products summed in fp32 by TDPBF16PS. Per tile of 16 outputs the weights
// are dequantized (or copied) ONCE into a [16, K] bf16 scratch, whatever the
// number of input rows; the rows, packed per call into the tiles' pair-
// interleaved ("VNNI") layout, are multiplied 16 at a time, up to 4 tiles of
// 16 rows per load of a weight tile. One TDPBF16PS = 16 x 16 x 32 products, so
// the dequantization, not the products, bounds a step of 16-256 rows.

// TILECFG (palette 1) as LDTILECONFIG reads it.
struct alignas(64) tile_config {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Linux needs each process to ask for the AMX register state once
// (arch_prctl ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA); without it the first
// tile instruction is SIGILL. CPUID leaf 7: EDX bit 22 AMX-BF16, bit 24 AMX-TILE.
bool amx_usable() {
  static const bool ok = [] {
    unsigned a, b, c, d;
    if (!cpu_has_avx512_bf16() || !__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    if (!(d & (1u << 22)) || !(d & (1u << 24))) return false;
    constexpr long arch_req_xcomp_perm = 0x1023, xfeature_xtiledata = 18;
    return syscall(SYS_arch_prctl, arch_req_xcomp_perm, xfeature_xtiledata) == 0;
  }();
  return ok;
}

// Packs rows [0, rows) of x [rows, in] bf16 into tiles: for chunk c of 16 rows
// and block j of 32 inputs, 16 lines (input pairs kk) of 16 rows x 2 values:
// dst[((c * nb + j) * 16 + kk) * 32 + n * 2 + p] = x[(16c + n) * in + 32j + 2kk + p],
// zero past the rows and past `in`.
void pack_rows(const uint16_t* x, int64_t in, int64_t rows, int64_t nb, uint16_t* dst) {
  const int64_t chunks = (rows + 15) / 16;
  std::memset(dst, 0, size_t(chunks * nb * 512) * 2);
  if (in % 2 == 0) {  // whole pairs: 32-bit moves
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t c = r / 16, n = r % 16;
      const uint16_t* xr = x + r * in;
      uint16_t* dc = dst + c * nb * 512 + n * 2;
      for (int64_t i = 0; i < in; i += 2) std::memcpy(dc + (i / 32) * 512 + ((i % 32) / 2) * 32, xr + i, 4);
    }
    return;
  }
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t c = r / 16, n = r % 16;
    const uint16_t* xr = x + r * in;
    for (int64_t i = 0; i < in; ++i) {
      const int64_t j = i / 32, kk = (i % 32) / 2, p = i % 2;
      dst[((c * nb + j) * 16 + kk) * 32 + n * 2 + p] = xr[i];
    }
  }
}

// Block j (32 inputs) of row o's weights as bf16 into dst[0, 32) (zero past `in`).
template <wformat F>
UT_AVX512_BF16 inline void block_bf16(const uint8_t* w, int64_t in, int64_t o, int64_t j, uint16_t* dst) {
  if constexpr (F == wformat::bf16) {
    const int64_t n = std::min<int64_t>(32, in - j * 32);
    const __mmask32 m = n >= 32 ? ~__mmask32(0) : __mmask32((uint64_t(1) << n) - 1);
    _mm512_storeu_si512(dst, _mm512_maskz_loadu_epi16(m, reinterpret_cast<const uint16_t*>(w) + o * in + j * 32));
  } else if constexpr (F == wformat::q4_1) {
    _mm512_storeu_si512(dst, (__m512i)q4_1_block_bf16(w + (o * (in / kBlock) + j) * 20));
  } else {
    _mm512_storeu_si512(dst, (__m512i)q8_0_block_bf16(w + (o * (in / kBlock) + j) * 34));
  }
}

// Writes the valid part of a 16 (outputs) x 16 (rows) fp32 tile to y.
inline void scatter_tile(const float* t, int64_t mo, int64_t nr, float* y, int64_t ldy) {
  for (int64_t n = 0; n < nr; ++n)
    for (int64_t m = 0; m < mo; ++m) y[n * ldy + m] = t[m * 16 + n];
}

// out += W_tile x X for q (1-4) chunks of 16 rows: C tiles 0..q-1; tile 4 the
// weights; 5-7 the rows.
UT_AMX inline void amx_block(const uint16_t* a, long astride, const uint16_t* xc, int64_t cstride, int q) {
  _tile_loadd(4, a, astride);
  _tile_loadd(5, xc, 64);
  _tile_dpbf16ps(0, 4, 5);
  if (q > 1) {
    _tile_loadd(6, xc + cstride, 64);
    _tile_dpbf16ps(1, 4, 6);
  }
  if (q > 2) {
    _tile_loadd(7, xc + 2 * cstride, 64);
    _tile_dpbf16ps(2, 4, 7);
  }
  if (q > 3) {
    _tile_loadd(5, xc + 3 * cstride, 64);
    _tile_dpbf16ps(3, 4, 5);
  }
}

template <wformat F>
UT_AMX void amx_gemm(const uint8_t* w, int64_t in, const uint16_t* x, int64_t rows, float* y, int64_t ldy, int64_t o0,
                     int64_t o1) {
  const int64_t K = (in + 31) / 32 * 32, nb = K / 32, chunks = (rows + 15) / 16;
  thread_local std::vector<uint16_t> xs, ws;
  xs.resize(size_t(chunks * nb * 512));
  pack_rows(x, in, rows, nb, xs.data());
  tile_config cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.rows[t] = 16;
    cfg.colsb[t] = 64;
  }
  _tile_loadconfig(&cfg);
  alignas(64) float tmp[4][256];
  alignas(64) uint16_t ab[2][16 * 32] = {};  // weight tiles of one block (<= 64 rows)
  const int64_t cstride = nb * 512;
  if (chunks > 4) ws.resize(size_t(16 * K));
  for (int64_t o = o0; o < o1; o += 16) {
    const int64_t mo = std::min<int64_t>(16, o1 - o);
    if (chunks > 4)  // the weight tile dequantized once for all passes over the rows
      for (int64_t m = 0; m < mo; ++m)
        for (int64_t j = 0; j < nb; ++j) block_bf16<F>(w, in, o + m, j, ws.data() + m * K + j * 32);
    for (int64_t c = 0; c < chunks; c += 4) {
      const int q = int(std::min<int64_t>(4, chunks - c));
      const uint16_t* xc = xs.data() + c * cstride;
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      if (chunks > 4) {
        for (int64_t j = 0; j < nb; ++j) amx_block(ws.data() + j * 32, long(K * 2), xc + j * 512, cstride, q);
      } else {
        // One pass: block j + 1 is dequantized while the tiles multiply
        // block j (a tile load right after the stores it reads would wait).
        for (int64_t m = 0; m < mo; ++m) block_bf16<F>(w, in, o + m, 0, ab[0] + m * 32);
        for (int64_t j = 0; j < nb; ++j) {
          if (j + 1 < nb)
            for (int64_t m = 0; m < mo; ++m) block_bf16<F>(w, in, o + m, j + 1, ab[(j + 1) & 1] + m * 32);
          amx_block(ab[j & 1], 64, xc + j * 512, cstride, q);
        }
      }
      _tile_stored(0, tmp[0], 64);
      if (q > 1) _tile_stored(1, tmp[1], 64);
      if (q > 2) _tile_stored(2, tmp[2], 64);
      if (q > 3) _tile_stored(3, tmp[3], 64);
      for (int t = 0; t < q; ++t) {
        const int64_t r0 = (c + t) * 16;
        scatter_tile(tmp[t], mo, std::min<int64_t>(16, rows - r0), y + r0 * ldy + o, ldy);
      }
    }
  }
  _tile_release();
}

// ---- AMX on pre-packed weights: tiles 0-3 accumulate C[row chunk a][weight
// tile b] (tile 2a + b), 4-5 hold two chunks of 16 input rows (A, row-major
// as they are), 6-7 two tiles of 16 outputs (B, packed at load). Per block of
// 32 inputs: 4 tile loads, 4 TDPBF16PS. Weights outer: a thread's pair of
// weight tiles is read from memory once and reused (from L1/L2) for every
// pair of row chunks; the rows of the step (<= 256 x 4 KiB) stay in L2.

// Copies the valid part of a 16 x 16 C tile (rows from r0, outputs from o) to y.
inline void copy_part(const float* tmp, float* y, int64_t ldy, int64_t r0, int64_t o, int64_t rows, int64_t o1) {
  const int64_t nr = std::min<int64_t>(16, rows - r0), mo = std::min<int64_t>(16, o1 - o);
  for (int64_t n = 0; n < nr; ++n) std::memcpy(y + (r0 + n) * ldy + o, tmp + n * 16, size_t(mo) * 4);
}
// Writes C tile T to y: straight when whole, else through tmp (GCC's tile
// intrinsics take the tile number as a literal, hence a macro).
#define UT_STORE_C(T, R0, O)                                   \
  do {                                                         \
    if ((R0) + 16 <= rows && (O) + 16 <= o1) {                 \
      _tile_stored(T, y + (R0) * ldy + (O), long(ldy * 4));    \
    } else {                                                   \
      _tile_stored(T, tmp, 64);                                \
      copy_part(tmp, y, ldy, R0, O, rows, o1);                 \
    }                                                          \
  } while (0)

UT_AMX void amx_packed_kernel(const uint16_t* wp, int64_t in, const uint16_t* xb, int64_t rows, float* y, int64_t ldy,
                              int64_t o0, int64_t o1) {
  const int64_t K = amx_k(in), nb = K / 32, chunks = (rows + 15) / 16;
  const long xs = long(K * 2);
  tile_config cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.rows[t] = 16;
    cfg.colsb[t] = 64;
  }
  _tile_loadconfig(&cfg);
  alignas(64) float tmp[256];
  for (int64_t o = o0; o < o1; o += 32) {
    const bool two_w = o + 16 < o1;
    const uint16_t* w0 = wp + (o / 16) * nb * 512;
    const uint16_t* w1 = w0 + nb * 512;
    for (int64_t c = 0; c < chunks; c += 2) {
      const bool two_r = c + 1 < chunks;
      const uint16_t* x0 = xb + c * 16 * K;
      const uint16_t* x1 = x0 + 16 * K;
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      if (two_w && two_r) {
        for (int64_t j = 0; j < nb; ++j) {
          _tile_loadd(4, x0 + j * 32, xs);
          _tile_loadd(6, w0 + j * 512, 64);
          _tile_dpbf16ps(0, 4, 6);
          _tile_loadd(7, w1 + j * 512, 64);
          _tile_dpbf16ps(1, 4, 7);
          _tile_loadd(5, x1 + j * 32, xs);
          _tile_dpbf16ps(2, 5, 6);
          _tile_dpbf16ps(3, 5, 7);
        }
      } else if (two_w) {
        for (int64_t j = 0; j < nb; ++j) {
          _tile_loadd(4, x0 + j * 32, xs);
          _tile_loadd(6, w0 + j * 512, 64);
          _tile_dpbf16ps(0, 4, 6);
          _tile_loadd(7, w1 + j * 512, 64);
          _tile_dpbf16ps(1, 4, 7);
        }
      } else if (two_r) {
        for (int64_t j = 0; j < nb; ++j) {
          _tile_loadd(4, x0 + j * 32, xs);
          _tile_loadd(6, w0 + j * 512, 64);
          _tile_dpbf16ps(0, 4, 6);
          _tile_loadd(5, x1 + j * 32, xs);
          _tile_dpbf16ps(2, 5, 6);
        }
      } else {
        for (int64_t j = 0; j < nb; ++j) {
          _tile_loadd(4, x0 + j * 32, xs);
          _tile_loadd(6, w0 + j * 512, 64);
          _tile_dpbf16ps(0, 4, 6);
        }
      }
      const int64_t r0 = c * 16;
      UT_STORE_C(0, r0, o);
      if (two_w) UT_STORE_C(1, r0, o + 16);
      if (two_r) UT_STORE_C(2, r0 + 16, o);
      if (two_w && two_r) UT_STORE_C(3, r0 + 16, o + 16);
    }
  }
  _tile_release();
}
#undef UT_STORE_C

UT_AVX512_BF16 void to_bf16_kernel(const float* x, int64_t in, uint16_t* dst, int64_t ldd, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const float* xr = x + r * in;
    uint16_t* dr = dst + r * ldd;
    int64_t i = 0;
    for (; i + 16 <= in; i += 16)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dr + i), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(xr + i)));
    if (i < in) {
      const __mmask16 m = __mmask16((1u << (in - i)) - 1);
      _mm256_mask_storeu_epi16(dr + i, m, (__m256i)_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(m, xr + i)));
    }
    for (i = in; i < ldd; ++i) dr[i] = 0;
  }
}

UT_AVX512 void silu_mul_kernel(const float* g, const float* u, float* out, int64_t n) {
  const __m512 one = _mm512_set1_ps(1.0f);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = n - i >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - i)) - 1);
    const __m512 gv = _mm512_maskz_loadu_ps(m, g + i);
    const __m512 s = _mm512_div_ps(gv, _mm512_add_ps(one, simd::exp16(_mm512_sub_ps(_mm512_setzero_ps(), gv))));
    _mm512_mask_storeu_ps(out + i, m, _mm512_mul_ps(s, _mm512_maskz_loadu_ps(m, u + i)));
  }
}

UT_AVX512 void exp_kernel(const float* x, float* out, int64_t n) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = n - i >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - i)) - 1);
    _mm512_mask_storeu_ps(out + i, m, simd::exp16(_mm512_maskz_loadu_ps(m, x + i)));
  }
}

UT_AVX512 void residual_rms_kernel(float* x, const float* d, float* y, int64_t n, const float* w, double eps,
                                   int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    float* xr = x + r * n;
    float* yr = y + r * n;
    __m512d a0 = _mm512_setzero_pd(), a1 = _mm512_setzero_pd();
    for (int64_t i = 0; i < n; i += 16) {
      const __mmask16 m = n - i >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - i)) - 1);
      __m512 v = _mm512_maskz_loadu_ps(m, xr + i);
      if (d) {
        v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(m, d + r * n + i));
        _mm512_mask_storeu_ps(xr + i, m, v);
      }
      const __m512d lo = _mm512_cvtps_pd(_mm512_castps512_ps256(v));
      const __m512d hi = _mm512_cvtps_pd(_mm512_castps512_ps256(_mm512_shuffle_f32x4(v, v, _MM_SHUFFLE(3, 2, 3, 2))));
      a0 = _mm512_fmadd_pd(lo, lo, a0);
      a1 = _mm512_fmadd_pd(hi, hi, a1);
    }
    const double ss = _mm512_reduce_add_pd(_mm512_add_pd(a0, a1));
    const __m512 s = _mm512_set1_ps(float(1.0 / std::sqrt(ss / double(n) + eps)));
    for (int64_t i = 0; i < n; i += 16) {
      const __mmask16 m = n - i >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - i)) - 1);
      _mm512_mask_storeu_ps(yr + i, m,
                            _mm512_mul_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(m, xr + i), s),
                                          _mm512_maskz_loadu_ps(m, w + i)));
    }
  }
}

bool g_use_bf16_dp = true;
bool g_use_amx = true;

// Runs kernel K<R> over the input rows in chunks of at most C (the weights
// are read once per chunk; all rows' outputs of a chunk before the next).
template <int R, template <int> class K, class W, class X>
void chunk(int64_t n, const W* w, int64_t in, const X* x, float* y, int64_t ldy, int64_t o0, int64_t o1) {
  if constexpr (R > 1) {
    if (n < R) return chunk<R - 1, K>(n, w, in, x, y, ldy, o0, o1);
  }
  K<R>::run(w, in, x, y, ldy, o0, o1);
}
template <int C, template <int> class K, class W, class X>
void by_rows(const W* w, int64_t in, const X* x, int64_t rows, float* y, int64_t ldy, int64_t o0, int64_t o1) {
  for (int64_t r0 = 0; r0 < rows; r0 += C)
    chunk<C, K>(std::min<int64_t>(C, rows - r0), w, in, x + r0 * in, y + r0 * ldy, ldy, o0, o1);
}
#define UT_KERNEL(name, fn, W, X)                                                                       \
  template <int R>                                                                                       \
  struct name {                                                                                          \
    static void run(const W* w, int64_t in, const X* x, float* y, int64_t ldy, int64_t a, int64_t b) { \
      fn<R>(w, in, x, y, ldy, a, b);                                                                     \
    }                                                                                                    \
  };
UT_KERNEL(k_bf16_dp, bf16_dp, uint16_t, uint16_t)
UT_KERNEL(k_bf16_f32, bf16_f32, uint16_t, uint16_t)
UT_KERNEL(k_q4_1, q4_1_f32, uint8_t, float)
UT_KERNEL(k_q8_0, q8_0_f32, uint8_t, float)
UT_KERNEL(k_bf16_wide, bf16_dp_wide, uint16_t, uint16_t)
UT_KERNEL(k_q4_1_bf16, q4_1_bf16, uint8_t, uint16_t)
UT_KERNEL(k_q8_0_bf16, q8_0_bf16, uint8_t, uint16_t)
#undef UT_KERNEL

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

const char* isa() {
  if (amx_supported()) return "avx512-bf16+amx";
  return cpu_has_avx512_bf16() && g_use_bf16_dp ? "avx512-bf16" : cpu_has_avx512() ? "avx512" : "none";
}

void use_avx512_bf16(bool on) { g_use_bf16_dp = on; }

bool bf16_supported() { return cpu_has_avx512_bf16() && g_use_bf16_dp; }

bool amx_supported() { return bf16_supported() && g_use_amx && amx_usable(); }

void use_amx(bool on) { g_use_amx = on; }

void gemm_bf16(wformat f, const void* w, int64_t in, const uint16_t* xb, int64_t rows, float* y, int64_t ldy,
               int64_t o0, int64_t o1) {
  if (rows <= 0 || o1 <= o0) return;
  if (amx_supported()) {
    const auto* wb = static_cast<const uint8_t*>(w);
    switch (f) {
      case wformat::bf16: amx_gemm<wformat::bf16>(wb, in, xb, rows, y, ldy, o0, o1); return;
      case wformat::q4_1: amx_gemm<wformat::q4_1>(wb, in, xb, rows, y, ldy, o0, o1); return;
      case wformat::q8_0: amx_gemm<wformat::q8_0>(wb, in, xb, rows, y, ldy, o0, o1); return;
      case wformat::none: return;
    }
  }
  switch (f) {
    case wformat::bf16:
      by_rows<kWideRows, k_bf16_wide>(static_cast<const uint16_t*>(w), in, xb, rows, y, ldy, o0, o1);
      return;
    case wformat::q4_1:
      by_rows<kWideRows, k_q4_1_bf16>(static_cast<const uint8_t*>(w), in, xb, rows, y, ldy, o0, o1);
      return;
    case wformat::q8_0:
      by_rows<kWideRows, k_q8_0_bf16>(static_cast<const uint8_t*>(w), in, xb, rows, y, ldy, o0, o1);
      return;
    case wformat::none: return;
  }
}

int64_t amx_packed_size(int64_t out, int64_t in) { return (out + 15) / 16 * 16 * amx_k(in); }

void amx_pack_weights(const uint16_t* w, int64_t out, int64_t in, uint16_t* dst) {
  const int64_t nb = amx_k(in) / 32;
  std::memset(dst, 0, size_t(amx_packed_size(out, in)) * 2);
  for (int64_t o = 0; o < out; ++o) {
    const uint16_t* wr = w + o * in;
    uint16_t* dt = dst + (o / 16) * nb * 512 + (o % 16) * 2;
    if (in % 2 == 0) {
      for (int64_t i = 0; i < in; i += 2) std::memcpy(dt + (i / 32) * 512 + ((i % 32) / 2) * 32, wr + i, 4);
    } else {
      for (int64_t i = 0; i < in; ++i) dt[(i / 32) * 512 + ((i % 32) / 2) * 32 + i % 2] = wr[i];
    }
  }
}

void amx_gemm_packed(const uint16_t* wp, int64_t out, int64_t in, const uint16_t* xb, int64_t rows, float* y,
                     int64_t ldy, int64_t o0, int64_t o1) {
  o1 = std::min(o1, out);
  if (rows <= 0 || o1 <= o0) return;
  amx_packed_kernel(wp, in, xb, rows, y, ldy, o0, o1);
}

void to_bf16_rows(const float* x, int64_t in, uint16_t* dst, int64_t ldd, int64_t r0, int64_t r1) {
  to_bf16_kernel(x, in, dst, ldd, r0, r1);
}

void residual_rms_rows(float* x, const float* d, float* y, int64_t n, const float* w, double eps, int64_t r0,
                       int64_t r1) {
  residual_rms_kernel(x, d, y, n, w, eps, r0, r1);
}

void silu_mul(const float* g, const float* u, float* out, int64_t n) { silu_mul_kernel(g, u, out, n); }

void exp_approx(const float* x, float* out, int64_t n) { exp_kernel(x, out, n); }

void gemv(wformat f, const void* w, int64_t in, const float* x, const uint16_t* xb, int64_t rows, float* y,
          int64_t ldy, int64_t o0, int64_t o1) {
  if (rows <= 0 || o1 <= o0) return;
  switch (f) {
    case wformat::bf16:
      if (cpu_has_avx512_bf16() && g_use_bf16_dp)
        by_rows<4, k_bf16_dp>(static_cast<const uint16_t*>(w), in, xb, rows, y, ldy, o0, o1);
      else
        by_rows<4, k_bf16_f32>(static_cast<const uint16_t*>(w), in, xb, rows, y, ldy, o0, o1);
      return;
    case wformat::q4_1: by_rows<kF32Rows, k_q4_1>(static_cast<const uint8_t*>(w), in, x, rows, y, ldy, o0, o1); return;
    case wformat::q8_0: by_rows<kF32Rows, k_q8_0>(static_cast<const uint8_t*>(w), in, x, rows, y, ldy, o0, o1); return;
    case wformat::none: return;
  }
}

}  // namespace undertone::models::cpu_gemv
