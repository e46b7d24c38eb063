// Torch runtime facts and settings behind a torch-free header, so apps/ and
// actors/ can set threads or print versions without including <torch/torch.h>.
#pragma once

#include <string>
#include <utility>
#include <vector>

namespace undertone::models {

/// LibTorch version, e.g. "1.13.1".
std::string torch_version();
/// Parallel backend summary (intra-op threads, OpenMP/MKL, BLAS).
std::string torch_parallel_info();
/// Sets LibTorch's intra-op threads; 0 = all cores. Returns the count in use.
int set_compute_threads(int threads);
/// True if a CUDA device is usable.
bool cuda_available();

/// OpenBLAS's kernel family ("SkylakeX", "Haswell", "Prescott" = generic
/// fallback), or "" when the BLAS in use is not OpenBLAS.
std::string openblas_core();

/// Environment settings that make LibTorch fast here and are read only when
/// the libraries load, so they must be in place before the process starts:
///  - OMP_WAIT_POLICY=PASSIVE: spinning OpenMP workers stall (30x slower steps
///    measured) as soon as another thread or process wants the same cores;
///  - OPENBLAS_CORETYPE=SkylakeX (AVX-512) or Haswell (AVX2) when OpenBLAS did
///    not recognise the CPU and fell back to its generic kernels (~10x slower
///    fp32 matmul; Debian 12's OpenBLAS 0.3.21 on Sapphire Rapids).
/// Returns only the variables that are not already set.
std::vector<std::pair<std::string, std::string>> recommended_runtime_env();

/// True if this CPU runs bf16 matmul natively (AVX512-BF16 or AMX-BF16 in
/// /proc/cpuinfo), i.e. oneDNN's bf16 path is fast rather than emulated.
bool cpu_has_fast_bf16();

/// Resolves a configured dtype: "auto" -> "bf16" on CUDA devices and on CPUs
/// with cpu_has_fast_bf16(), else "fp32"; any other value is returned as is.
std::string resolve_dtype(const std::string& dtype, const std::string& device);

}  // namespace undertone::models
