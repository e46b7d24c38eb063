// Reader for CTranslate2 model directories (model.bin + config.json), torch-free.
//
// model.bin layout (binary version 6, little endian): u32 version; u16-length
// NUL-terminated spec name; u32 spec revision; u32 variable count; per variable:
// name, u8 rank, rank x u32 dims, u8 dtype, u32 byte count, data; then u32 alias
// count and (alias, target) name pairs. Every read is bounds-checked.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace undertone::models {

class ct2_error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// CTranslate2 storage dtypes.
enum class ct2_dtype : uint8_t { f32 = 0, i8 = 1, i16 = 2, i32 = 3, f16 = 4, bf16 = 5 };
std::string ct2_dtype_name(uint8_t dtype);

struct ct2_variable {
  std::string name;
  std::vector<int64_t> shape;  ///< row-major, as stored
  uint8_t dtype = 0;
  uint64_t offset = 0;  ///< of the data in model.bin
  uint64_t n_bytes = 0;
  int64_t n_elements() const;
};

class ct2_model {
 public:
  /// Opens `dir`/model.bin (memory-mapped) and `dir`/config.json (if present).
  explicit ct2_model(const std::string& dir);
  ~ct2_model();
  ct2_model(const ct2_model&) = delete;
  ct2_model& operator=(const ct2_model&) = delete;

  const std::string& dir() const { return dir_; }
  uint32_t binary_version() const { return version_; }
  const std::string& spec_name() const { return spec_; }  ///< e.g. "WhisperSpec"
  uint32_t spec_revision() const { return revision_; }
  const std::vector<ct2_variable>& variables() const { return vars_; }
  const std::map<std::string, std::string>& aliases() const { return aliases_; }
  const nlohmann::json& config() const { return config_; }

  /// Variable by name (aliases resolved) or nullptr.
  const ct2_variable* find(const std::string& name) const;
  /// Variable by name; throws ct2_error naming it if missing.
  const ct2_variable& at(const std::string& name) const;
  /// Values converted to float32 (f32, f16, bf16, i8, i16, i32).
  std::vector<float> to_float(const ct2_variable& v) const;
  /// A scalar int variable (e.g. "encoder/num_heads").
  int64_t scalar_int(const std::string& name) const;
  const uint8_t* data(const ct2_variable& v) const { return base_ + v.offset; }

 private:
  std::string dir_;
  int fd_ = -1;
  const uint8_t* base_ = nullptr;
  uint64_t size_ = 0;
  uint32_t version_ = 0;
  std::string spec_;
  uint32_t revision_ = 0;
  std::vector<ct2_variable> vars_;
  std::map<std::string, size_t> index_;
  std::map<std::string, std::string> aliases_;
  nlohmann::json config_;
};

}  // namespace undertone::models
