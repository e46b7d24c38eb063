#include "models/nn/cpu_attention.hpp"

// See cpu_gemv.cpp: GCC 12 header false positive (PR 105593).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include <cmath>
#include <limits>

#include "models/nn/cpu_features.hpp"

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
