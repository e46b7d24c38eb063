#include "models/runtime.hpp"

#include <ATen/Parallel.h>
#include <torch/cuda.h>
#include <torch/version.h>

#include <thread>

namespace undertone::models {

std::string torch_version() { return TORCH_VERSION; }

std::string torch_parallel_info() { return at::get_parallel_info(); }

int set_compute_threads(int threads) {
  if (threads <= 0) threads = int(std::max(1u, std::thread::hardware_concurrency()));
  at::set_num_threads(threads);
  return at::get_num_threads();
}

bool cuda_available() { return torch::cuda::is_available(); }

}  // namespace undertone::models
