// Run-time CPU checks for the hand-written AVX-512 kernels (LLM decode:
// cpu_gemv, cpu_attention; streaming Whisper attention). The kernels are
// compiled per function with target attributes and run only when these hold.
#pragma once

namespace undertone::models {

/// AVX-512 F/BW/VL/DQ plus FMA and F16C (every AVX-512 CPU has the last two).
inline bool cpu_has_avx512() {
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                         __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  return ok;
}

/// cpu_has_avx512() and the AVX512-BF16 dot product (vdpbf16ps).
inline bool cpu_has_avx512_bf16() {
  static const bool ok = cpu_has_avx512() && __builtin_cpu_supports("avx512bf16");
  return ok;
}

}  // namespace undertone::models
