// Matrix kernels for CPU decoding: y = x W^T for the input rows x of a step
// (one per sequence of a decode step, or a short prefill) and a weight matrix
// W [out, in]: gemv (fp32 activations, 1-4 rows per pass over W) and
// gemm_bf16 (bf16 activations, AMX tiles or 16 rows per pass). Torch-free, on raw pointers; the
// caller splits the output rows over threads (llama.cpp's at::parallel_for).
//
// Weight formats:
//  - bf16 [out, in] row-major (a model loaded in bf16);
//  - ggml q4_1 blocks as stored in a GGUF file, each row `in / 32` blocks of
//    20 bytes {fp16 d, fp16 m, 16 bytes of nibbles}; w = d * q + m;
//  - ggml q8_0 blocks, each row `in / 32` blocks of 34 bytes {fp16 d, 32 int8};
//    w = d * q.
// The quantized kernels compute with the exact block values (no activation
// quantization, unlike llama.cpp's q8_1 dot products): per block
// d * (q . x) + m * sum(x), i.e. the dequantized model up to summation order.
//
// The kernels use AVX-512 (F/BW/VL, plus AVX512-BF16 for bf16 when present),
// compiled per function with target attributes and chosen at run time, so the
// binary runs on any x86-64; supported() says whether they can run here.
#pragma once

#include <cstdint>

namespace undertone::models::cpu_gemv {

/// Weight formats the kernels read.
enum class wformat : uint8_t { none = 0, bf16, q4_1, q8_0 };

/// Elements per q4_1 / q8_0 block; row lengths must be multiples of it.
inline constexpr int64_t kBlock = 32;
/// Bytes of one row of `in` weights in `f` (bf16: 2 * in).
int64_t row_bytes(wformat f, int64_t in);

/// True if this CPU runs the kernels for `f` (AVX-512 F/BW/VL; the bf16 kernel
/// uses AVX512-BF16 dot products when present, else widens to fp32).
bool supported(wformat f);
/// "avx512-bf16+amx", "avx512-bf16", "avx512" or "none": what the bf16 kernels run on here.
const char* isa();

/// y[r * ldy + o] = sum_i x[r * in + i] * W[o, i] for r < rows, o in [o0, o1).
/// `w` points at row 0 of W (row_bytes(f, in) bytes per row). x is fp32 for
/// q4_1/q8_0; for bf16 weights pass it as bf16 (`xb`, [rows, in]) instead.
/// Any rows >= 1 (in chunks of 4 rows per pass over W: best at 1..4); in need not be a multiple of
/// the vector width for bf16, and must be a multiple of kBlock for q4_1/q8_0.
/// Call only when supported(f).
void gemv(wformat f, const void* w, int64_t in, const float* x, const uint16_t* xb, int64_t rows, float* y,
          int64_t ldy, int64_t o0, int64_t o1);

/// True if gemm_bf16 runs here (AVX512-BF16, and not switched off by
/// use_avx512_bf16(false)).
bool bf16_supported();

/// y[r * ldy + o] = sum_i xb[r * in + i] * bf16(W[o, i]) for r < rows, o in
/// [o0, o1): bf16 activations xb [rows, in] for any weight format. q4_1/q8_0
/// weights are dequantized in fp32 (d * q + m / d * q, as the loader does) and
/// rounded to bf16 (nearest even), i.e. the values of a bf16 model's ATen
/// weight; products summed in fp32: on AMX tiles where amx_supported() (the
/// weights made bf16 once per call, 64 rows per pass over them), else
/// vdpbf16ps with up to 16 rows per pass over W. For batched decode and
/// prefill steps.
/// A row's result does not depend on the other rows. Call only when
/// bf16_supported().
void gemm_bf16(wformat f, const void* w, int64_t in, const uint16_t* xb, int64_t rows, float* y, int64_t ldy,
               int64_t o0, int64_t o1);

/// True if gemm_bf16 runs on AMX tiles here (AMX-BF16, granted by the kernel;
/// else it runs on AVX512-BF16 dot products, same operands).
bool amx_supported();
/// For tests: false makes gemm_bf16 use AVX512-BF16 even where AMX runs.
void use_amx(bool on);

/// ---- AMX on pre-packed bf16 weights (bf16 models, steps of many rows).
/// The weight matrix W [out, in] is packed ONCE (at model load) into the
/// layout TDPBF16PS reads as its B operand: per tile of 16 outputs and block
/// of 32 inputs, 16 lines (input pairs) x 16 outputs x 2 values (1 KiB), out
/// padded to 16 and in to 32 with zeros. A step then only loads tiles and
/// multiplies: the activations, bf16 row-major, are the A operand as they are.

/// Input length of packed rows / weights: `in` rounded up to 32.
inline int64_t amx_k(int64_t in) { return (in + 31) / 32 * 32; }
/// uint16 elements of W [out, in] packed by amx_pack_weights.
int64_t amx_packed_size(int64_t out, int64_t in);
/// Packs bf16 W [out, in] (row-major, row stride `in`) into dst
/// (amx_packed_size(out, in) elements).
void amx_pack_weights(const uint16_t* w, int64_t out, int64_t in, uint16_t* dst);
/// y[r * ldy + o] = sum_i xb[r * amx_k(in) + i] * W[o, i] for r < rows and o in
/// [o0, o1), from W packed by amx_pack_weights (`out` rows). xb: bf16 rows
/// with row stride amx_k(in), zero from `in` on, and allocated for `rows`
/// rounded up to 16 (the padding rows' values are read but their results
/// dropped). o0 must be a multiple of 16. Products summed in fp32 in the same
/// order as gemm_bf16 on AMX (bit for bit the same results for the same bf16
/// weights); a row's result does not depend on the other rows. Call only
/// when amx_supported().
void amx_gemm_packed(const uint16_t* wp, int64_t out, int64_t in, const uint16_t* xb, int64_t rows, float* y,
                     int64_t ldy, int64_t o0, int64_t o1);
/// dst[r * ldd + i] = bf16(x[r * in + i]) (round to nearest even, as torch's
/// cast) for i < in, 0 for in <= i < ldd; rows [r0, r1). AVX512-BF16.
void to_bf16_rows(const float* x, int64_t in, uint16_t* dst, int64_t ldd, int64_t r0, int64_t r1);

/// ---- float32 row helpers of the CPU decode path (AVX-512; call only when
/// supported(wformat::q4_1)).

/// For rows [r0, r1) of n values: x += d (if d is not null), then
/// y = x / sqrt(mean(x^2) + eps) * w (sum of squares in double).
void residual_rms_rows(float* x, const float* d, float* y, int64_t n, const float* w, double eps, int64_t r0,
                       int64_t r1);
/// out[i] = silu(g[i]) * u[i] = g / (1 + exp(-g)) * u for i < n. exp is a
/// polynomial after range reduction (Cephes expf: relative error ~1e-7 over
/// the float range; measured 8e-8 for exp in tests/test_cpu_decode.cpp).
void silu_mul(const float* g, const float* u, float* out, int64_t n);
/// out[i] = exp(x[i]) for i < n (the approximation silu_mul uses; for tests).
void exp_approx(const float* x, float* out, int64_t n);

/// For tests: false makes the bf16 kernel use the AVX512F path even where
/// AVX512-BF16 exists, and bf16_supported() false (default true). Not thread-safe; set before decoding.
void use_avx512_bf16(bool on);

}  // namespace undertone::models::cpu_gemv
