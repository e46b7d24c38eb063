#include "models/nn/cpu_attention.hpp"

// See cpu_gemv.cpp: GCC 12 header false positive (PR 105593); here also as
// -Wuninitialized, from _mm512_reduce_max_ps's _mm512_undefined_pd() once inlined.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "models/nn/cpu_features.hpp"
#include "models/nn/cpu_simd.hpp"

#define UT_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma")))

namespace undertone::models::cpu_attention {

namespace {

template <bool BF16>
UT_AVX512 inline __m512 load16(const void* base, int64_t i) {
  if constexpr (BF16) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(base) + i));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  } else {
    return _mm512_loadu_ps(static_cast<const float*>(base) + i);
  }
}

template <bool BF16>
UT_AVX512 void attend_t(const float* q, const void* k, const void* v, int64_t hd, const int64_t* cells, int64_t n,
                        float* s, float* out) {
  const size_t es = BF16 ? 2 : 4;
  const auto* kb = static_cast<const char*>(k);
  const auto* vb = static_cast<const char*>(v);
  float mx = -std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < n; ++j) {
    const char* row = kb + size_t(cells[j] * hd) * es;
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    int64_t c = 0;
    for (; c + 32 <= hd; c += 32) {
      a0 = _mm512_fmadd_ps(_mm512_loadu_ps(q + c), load16<BF16>(row, c), a0);
      a1 = _mm512_fmadd_ps(_mm512_loadu_ps(q + c + 16), load16<BF16>(row, c + 16), a1);
    }
    if (c < hd) a0 = _mm512_fmadd_ps(_mm512_loadu_ps(q + c), load16<BF16>(row, c), a0);
    s[j] = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
    mx = s[j] > mx ? s[j] : mx;
  }
  float sum = 0;
  for (int64_t j = 0; j < n; ++j) sum += (s[j] = std::exp(s[j] - mx));
  for (int64_t c = 0; c < hd; c += 16) _mm512_storeu_ps(out + c, _mm512_setzero_ps());
  for (int64_t j = 0; j < n; ++j) {
    const char* row = vb + size_t(cells[j] * hd) * es;
    const __m512 p = _mm512_set1_ps(s[j]);
    for (int64_t c = 0; c < hd; c += 16)
      _mm512_storeu_ps(out + c, _mm512_fmadd_ps(p, load16<BF16>(row, c), _mm512_loadu_ps(out + c)));
  }
  const __m512 inv = _mm512_set1_ps(1.0f / sum);
  for (int64_t c = 0; c < hd; c += 16) _mm512_storeu_ps(out + c, _mm512_mul_ps(_mm512_loadu_ps(out + c), inv));
}

// NQ query heads [NQ, 16 HV] sharing one KV head: the keys are read (and
// widened to fp32) once per block of 16 for all NQ heads, 16 scores at a time
// (simd::hsum16), softmax with the vectorized exp, and the values read once
// per key for all heads into NQ x HV register accumulators.
template <bool BF16, int HV, int NQ>
UT_AVX512 void attend_g(const float* q, const void* k, const void* v, const int64_t* cells, int64_t n, float* s,
                        float* out) {
  constexpr int64_t hd = HV * 16;
  const size_t es = BF16 ? 2 : 4;
  const auto* kb = static_cast<const char*>(k);
  const auto* vb = static_cast<const char*>(v);
  alignas(64) float kf[16][hd];
  for (int64_t j0 = 0; j0 < n; j0 += 16) {
    const int64_t m = std::min<int64_t>(16, n - j0);
    for (int64_t i = 0; i < m; ++i) {
      const char* row = kb + size_t(cells[j0 + i] * hd) * es;
      #pragma GCC unroll 8
      for (int c = 0; c < HV; ++c) _mm512_store_ps(kf[i] + c * 16, load16<BF16>(row, c * 16));
    }
    const __mmask16 mk = m >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << m) - 1);
    #pragma GCC unroll 4
    for (int h = 0; h < NQ; ++h) {
      __m512 acc[16];
      #pragma GCC unroll 16
      for (int i = 0; i < 16; ++i) {
        acc[i] = _mm512_setzero_ps();
        if (i < m) {
          #pragma GCC unroll 8
          for (int c = 0; c < HV; ++c)
            acc[i] = _mm512_fmadd_ps(_mm512_loadu_ps(q + h * hd + c * 16), _mm512_load_ps(kf[i] + c * 16), acc[i]);
        }
      }
      _mm512_mask_storeu_ps(s + h * n + j0, mk, simd::hsum16(acc));
    }
  }
  float inv[NQ];
  for (int h = 0; h < NQ; ++h) {
    float* sh = s + h * n;
    __m512 mx = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    for (int64_t j = 0; j < n; j += 16) {
      const __mmask16 m = n - j >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - j)) - 1);
      mx = _mm512_mask_max_ps(mx, m, mx, _mm512_maskz_loadu_ps(m, sh + j));
    }
    const __m512 mxv = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
    __m512 sum = _mm512_setzero_ps();
    for (int64_t j = 0; j < n; j += 16) {
      const __mmask16 m = n - j >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - j)) - 1);
      const __m512 e = simd::exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, sh + j), mxv));
      _mm512_mask_storeu_ps(sh + j, m, e);
      sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(m, e));
    }
    inv[h] = 1.0f / _mm512_reduce_add_ps(sum);
  }
  __m512 o[NQ][HV];
  #pragma GCC unroll 4
  for (int h = 0; h < NQ; ++h)
    #pragma GCC unroll 8
    for (int c = 0; c < HV; ++c) o[h][c] = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; ++j) {
    const char* row = vb + size_t(cells[j] * hd) * es;
    __m512 vv[HV];
    #pragma GCC unroll 8
    for (int c = 0; c < HV; ++c) vv[c] = load16<BF16>(row, c * 16);
    #pragma GCC unroll 4
    for (int h = 0; h < NQ; ++h) {
      const __m512 p = _mm512_set1_ps(s[h * n + j]);
      #pragma GCC unroll 8
      for (int c = 0; c < HV; ++c) o[h][c] = _mm512_fmadd_ps(p, vv[c], o[h][c]);
    }
  }
  #pragma GCC unroll 4
  for (int h = 0; h < NQ; ++h)
    #pragma GCC unroll 8
    for (int c = 0; c < HV; ++c) _mm512_storeu_ps(out + h * hd + c * 16, _mm512_mul_ps(o[h][c], _mm512_set1_ps(inv[h])));
}

template <bool BF16, int HV>
void attend_heads_t(const float* q, int64_t nq, const void* k, const void* v, const int64_t* cells, int64_t n,
                    float* s, float* out) {
  constexpr int64_t hd = HV * 16;
  constexpr int64_t chunk = HV <= 4 ? 4 : 2;  // NQ x HV output accumulators <= 16 registers
  for (int64_t h = 0; h < nq; h += chunk) {
    const int64_t c = std::min(chunk, nq - h);
    const float* qh = q + h * hd;
    float* oh = out + h * hd;
    if (c == 4) attend_g<BF16, HV, (chunk >= 4 ? 4 : 1)>(qh, k, v, cells, n, s, oh);
    else if (c == 3) attend_g<BF16, HV, (chunk >= 3 ? 3 : 1)>(qh, k, v, cells, n, s, oh);
    else if (c == 2) attend_g<BF16, HV, 2>(qh, k, v, cells, n, s, oh);
    else attend_g<BF16, HV, 1>(qh, k, v, cells, n, s, oh);
  }
}

}  // namespace

bool supported(int64_t head_dim) { return head_dim > 0 && head_dim % 16 == 0 && cpu_has_avx512(); }

void attend_one(const float* q, const void* k, const void* v, bool bf16, int64_t hd, const int64_t* cells,
                int64_t n, float* scratch, float* out) {
  if (bf16)
    attend_t<true>(q, k, v, hd, cells, n, scratch, out);
  else
    attend_t<false>(q, k, v, hd, cells, n, scratch, out);
}

}  // namespace undertone::models::cpu_attention

namespace undertone::models::cpu_attention {

void attend_heads(const float* q, int64_t nq, const void* k, const void* v, bool bf16, int64_t hd,
                  const int64_t* cells, int64_t n, float* scratch, float* out) {
  if (hd == 64) {
    if (bf16)
      attend_heads_t<true, 4>(q, nq, k, v, cells, n, scratch, out);
    else
      attend_heads_t<false, 4>(q, nq, k, v, cells, n, scratch, out);
    return;
  }
  if (hd == 128) {
    if (bf16)
      attend_heads_t<true, 8>(q, nq, k, v, cells, n, scratch, out);
    else
      attend_heads_t<false, 8>(q, nq, k, v, cells, n, scratch, out);
    return;
  }
  for (int64_t h = 0; h < nq; ++h) attend_one(q + h * hd, k, v, bf16, hd, cells, n, scratch, out + h * hd);
}

}  // namespace undertone::models::cpu_attention
