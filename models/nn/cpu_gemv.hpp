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

/// For tests: false makes the bf16 kernel use the AVX512F path even where
/// AVX512-BF16 exists, and bf16_supported() false (default true). Not thread-safe; set before decoding.
void use_avx512_bf16(bool on);

}  // namespace undertone::models::cpu_gemv
