// Small helpers shared by the tests.
#pragma once

#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <random>
#include <stdexcept>
#include <string>

#include <nlohmann/json.hpp>

namespace undertone::testing {

/// The model cache the tests read ($UNDERTONE_HOME or ~/.cache/undertone),
/// filled by scripts/setup.
inline std::string model_home() {
  if (const char* e = std::getenv("UNDERTONE_HOME"); e && *e) return e;
  const char* home = std::getenv("HOME");
  return std::string(home ? home : "/tmp") + "/.cache/undertone";
}

inline std::string llm_gguf_path() {
  return model_home() + "/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf";
}
inline std::string whisper_ct2_dir() { return model_home() + "/models/whisper-tiny.en"; }

inline std::string source_dir() { return UT_SOURCE_DIR; }

/// The RAVDESS training clips: $UT_RAVDESS_DIR, else the shared/ folder beside
/// the checkout (where CI puts it), else /work/shared.
inline std::string ravdess_dir() {
  if (const char* e = std::getenv("UT_RAVDESS_DIR"); e && *e) return e;
  std::string beside = source_dir() + "/../shared/data/ravdess-train";
  if (std::filesystem::is_directory(beside)) return beside;
  return "/work/shared/data/ravdess-train";
}

/// Parses tests/golden/<name> (a golden file written by a tests/golden/make_*.py
/// script); throws with the script to run if it is missing or malformed.
inline nlohmann::json read_golden_json(const std::string& name) {
  std::string path = source_dir() + "/tests/golden/" + name;
  std::ifstream in(path);
  if (!in) throw std::runtime_error("missing golden file " + path + " (see tests/golden/make_*.py)");
  return nlohmann::json::parse(in);
}

/// A fresh directory under $TMPDIR, removed with everything in it on scope exit.
struct temp_dir {
  std::filesystem::path path;
  temp_dir() {
    std::random_device rd;
    path = std::filesystem::temp_directory_path() /
           ("undertone-test-" + std::to_string(::getpid()) + "-" + std::to_string(rd()));
    std::filesystem::create_directories(path);
  }
  ~temp_dir() {
    std::error_code ec;
    std::filesystem::remove_all(path, ec);
  }
  std::string str() const { return path.string(); }
};

/// Copies the first `n` bytes of `src` to `dst`.
inline void copy_prefix(const std::string& src, const std::string& dst, size_t n) {
  std::ifstream in(src, std::ios::binary);
  std::ofstream out(dst, std::ios::binary);
  std::string buf(n, '\0');
  in.read(buf.data(), std::streamsize(n));
  out.write(buf.data(), in.gcount());
}

/// Flips bits of the byte at `offset` in place.
inline void corrupt_byte(const std::string& path, size_t offset) {
  std::fstream f(path, std::ios::binary | std::ios::in | std::ios::out);
  f.seekg(std::streamoff(offset));
  char c = 0;
  f.read(&c, 1);
  c = char(c ^ 0x5A);
  f.seekp(std::streamoff(offset));
  f.write(&c, 1);
}

}  // namespace undertone::testing
