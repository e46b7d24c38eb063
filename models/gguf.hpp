// GGUF reader (llama.cpp's single-file checkpoint format), torch-free.
//
// The file is memory-mapped read-only; every length, count and offset read from
// it is checked against the file size first, so a truncated or corrupted file
// raises gguf_error instead of reading out of bounds.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <variant>
#include <vector>

namespace undertone::models {

class gguf_error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// ggml tensor element types (numbering as in the GGUF spec).
enum class ggml_type : uint32_t {
  f32 = 0, f16 = 1, q4_0 = 2, q4_1 = 3, q5_0 = 6, q5_1 = 7, q8_0 = 8, q8_1 = 9,
  q2_k = 10, q3_k = 11, q4_k = 12, q5_k = 13, q6_k = 14, q8_k = 15, bf16 = 30,
};

/// Name of a ggml type ("q4_1"), or "type<N>" if unknown.
std::string ggml_type_name(uint32_t type);

/// One metadata value. Arrays keep their element type; arrays of strings are
/// std::vector<std::string>, numeric arrays are widened to int64/double vectors.
using gguf_value = std::variant<uint64_t, int64_t, double, bool, std::string,
                                std::vector<std::string>, std::vector<int64_t>, std::vector<double>>;

struct gguf_tensor_info {
  std::string name;
  std::vector<int64_t> shape;  ///< ggml order: shape[0] is the fastest-varying (row length)
  uint32_t type = 0;           ///< ggml_type value
  uint64_t offset = 0;         ///< from the start of the data section
  uint64_t n_bytes = 0;        ///< size of the tensor's data
  int64_t n_elements() const;
};

class gguf_file {
 public:
  /// Opens and parses the header; throws gguf_error naming the file and problem.
  explicit gguf_file(const std::string& path);
  ~gguf_file();
  gguf_file(const gguf_file&) = delete;
  gguf_file& operator=(const gguf_file&) = delete;

  const std::string& path() const { return path_; }
  uint32_t version() const { return version_; }
  uint64_t file_size() const { return size_; }
  const std::map<std::string, gguf_value>& metadata() const { return kv_; }
  const std::vector<gguf_tensor_info>& tensors() const { return tensors_; }

  bool has(const std::string& key) const { return kv_.count(key) != 0; }
  /// Typed metadata lookups; throw gguf_error if missing or of another type.
  std::string get_string(const std::string& key) const;
  int64_t get_int(const std::string& key) const;  ///< any integer type
  double get_float(const std::string& key) const; ///< float or integer
  const std::vector<std::string>& get_strings(const std::string& key) const;
  std::vector<int64_t> get_ints(const std::string& key) const;
  std::vector<double> get_floats(const std::string& key) const;
  /// Same, with a default when the key is absent.
  int64_t get_int_or(const std::string& key, int64_t dflt) const;
  double get_float_or(const std::string& key, double dflt) const;
  std::string get_string_or(const std::string& key, const std::string& dflt) const;

  /// Tensor by name, or nullptr.
  const gguf_tensor_info* find_tensor(const std::string& name) const;
  /// Raw bytes of a tensor inside the mapping (valid while this object lives).
  const uint8_t* tensor_data(const gguf_tensor_info& t) const;

  /// Dequantizes a tensor to float32 in ggml order (n_elements() values).
  /// Supports f32, f16, bf16, q4_0, q4_1, q5_0, q5_1, q8_0, q4_k, q5_k, q6_k;
  /// others throw gguf_error naming the tensor and type.
  void dequantize(const gguf_tensor_info& t, float* out) const;

 private:
  std::string path_;
  int fd_ = -1;
  const uint8_t* base_ = nullptr;
  uint64_t size_ = 0;
  uint32_t version_ = 0;
  uint64_t data_offset_ = 0;
  std::map<std::string, gguf_value> kv_;
  std::vector<gguf_tensor_info> tensors_;
};

/// Dequantizes `n` elements (a multiple of the type's block size) of ggml type
/// `type` from `src` into `out`. Throws gguf_error for unsupported types.
void dequantize_row(uint32_t type, const uint8_t* src, float* out, int64_t n);

/// Bytes used by `n` elements of a ggml type; throws for unknown types or if n
/// is not a multiple of the block size.
uint64_t ggml_row_bytes(uint32_t type, int64_t n);

/// IEEE half / bfloat16 to float.
float fp16_to_fp32(uint16_t h);
float bf16_to_fp32(uint16_t h);

}  // namespace undertone::models
