#include "models/runtime.hpp"

#include <fstream>
#include <sstream>

#include <dlfcn.h>

#include <ATen/Parallel.h>
#include <torch/cuda.h>
#include <torch/version.h>

#include <cstdlib>
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

std::string openblas_core() {
  using fn = char* (*)();
  auto f = reinterpret_cast<fn>(::dlsym(RTLD_DEFAULT, "openblas_get_corename"));
  return f ? std::string(f()) : std::string();
}

std::vector<std::pair<std::string, std::string>> recommended_runtime_env() {
  std::vector<std::pair<std::string, std::string>> env;
  if (!std::getenv("OMP_WAIT_POLICY")) env.emplace_back("OMP_WAIT_POLICY", "PASSIVE");
  if (!std::getenv("OPENBLAS_CORETYPE")) {
    std::string core = openblas_core();
    for (auto& c : core) c = char(std::tolower(static_cast<unsigned char>(c)));
    if (core == "prescott" || core == "core2" || core == "nehalem") {
      __builtin_cpu_init();
      if (__builtin_cpu_supports("avx512f")) env.emplace_back("OPENBLAS_CORETYPE", "SkylakeX");
      else if (__builtin_cpu_supports("avx2")) env.emplace_back("OPENBLAS_CORETYPE", "Haswell");
    }
  }
  return env;
}

bool cpu_has_fast_bf16() {
  std::ifstream in("/proc/cpuinfo");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("flags", 0) != 0) continue;
    std::istringstream words(line);
    std::string w;
    while (words >> w)
      if (w == "avx512_bf16" || w == "amx_bf16") return true;
    return false;  // the first CPU's flags speak for all
  }
  return false;
}

std::string resolve_dtype(const std::string& dtype, const std::string& device) {
  if (dtype != "auto") return dtype;
  if (device.rfind("cuda", 0) == 0) return "bf16";
  return cpu_has_fast_bf16() ? "bf16" : "fp32";
}

}  // namespace undertone::models
