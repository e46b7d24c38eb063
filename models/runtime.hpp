// Torch runtime facts and settings behind a torch-free header, so apps/ and
// actors/ can set threads or print versions without including <torch/torch.h>.
#pragma once

#include <string>

namespace undertone::models {

/// LibTorch version, e.g. "1.13.1".
std::string torch_version();
/// Parallel backend summary (intra-op threads, OpenMP/MKL, BLAS).
std::string torch_parallel_info();
/// Sets LibTorch's intra-op threads; 0 = all cores. Returns the count in use.
int set_compute_threads(int threads);
/// True if a CUDA device is usable.
bool cuda_available();

}  // namespace undertone::models
