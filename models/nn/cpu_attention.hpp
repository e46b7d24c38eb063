// Single-query attention over a KV cache for CPU decoding (the companion of
// cpu_gemv.hpp): one query head against the cached keys/values of its
// sequence, float32 arithmetic, AVX-512 with a run-time CPU check.
// Torch-free; llama.cpp splits the (row, head) pairs over threads.
#pragma once

#include <cstdint>

namespace undertone::models::cpu_attention {

/// True if this CPU runs attend_one for heads of `head_dim` values (AVX-512
/// F/BW/VL and head_dim a multiple of 16).
bool supported(int64_t head_dim);

/// out[hd] = sum_j softmax_j(q . K_j) V_j over the n cache rows `cells`:
/// K_j = k + cells[j] * hd (and V_j likewise) in float32, or in bf16 if
/// `bf16`. q [hd] float32, already scaled by 1/sqrt(hd). `scratch`: n floats.
/// Requires n >= 1 and supported(hd).
void attend_one(const float* q, const void* k, const void* v, bool bf16, int64_t hd, const int64_t* cells,
                int64_t n, float* scratch, float* out);

/// attend_one for the nq query heads q [nq, hd] (contiguous) that share one
/// KV head (grouped-query attention): out [nq, hd]. Reads each key and value
/// once for all nq heads (head_dim 64 and 128; other sizes run attend_one
/// per head). `scratch`: nq * n floats.
void attend_heads(const float* q, int64_t nq, const void* k, const void* v, bool bf16, int64_t hd,
                  const int64_t* cells, int64_t n, float* scratch, float* out);

}  // namespace undertone::models::cpu_attention
