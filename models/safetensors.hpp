// safetensors reader and writer (Hugging Face's tensor file format), torch-free.
//
// Layout: 8-byte little-endian header length N, N bytes of JSON
//   {"__metadata__": {"k": "v", ...},
//    "<name>": {"dtype": "F32", "shape": [2, 3], "data_offsets": [begin, end]}, ...}
// then the data section; offsets are relative to its start, tensors are
// row-major (C order), little-endian, and together cover the data section
// exactly, without holes or overlaps.
//
// The reader memory-maps the file read-only and validates the whole header
// before any tensor is touched: a header length beyond the file, malformed
// JSON, an unknown dtype, a size that is not numel * element size, offsets
// outside the data section, overlaps or holes all raise safetensors_error
// naming the file (and tensor), never an out-of-bounds read.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <stdexcept>
#include <string>
#include <vector>

namespace undertone::models {

class safetensors_error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// Element types of the safetensors format.
enum class st_dtype {
  f64, f32, f16, bf16, i64, i32, i16, i8, u64, u32, u16, u8, boolean, f8_e4m3, f8_e5m2,
};

/// Name as written in the header ("F32", "BF16", "BOOL", ...).
std::string st_dtype_name(st_dtype t);
/// Parses a header dtype name; throws safetensors_error for unknown names.
st_dtype st_dtype_from_name(const std::string& name);
/// Bytes per element.
size_t st_dtype_size(st_dtype t);

/// One tensor of a safetensors header.
struct st_tensor_info {
  std::string name;
  st_dtype dtype = st_dtype::f32;
  std::vector<int64_t> shape;  ///< row-major, outermost first ([] = scalar)
  uint64_t begin = 0;          ///< byte offset from the start of the data section
  uint64_t end = 0;            ///< one past the last byte
  int64_t n_elements() const;  ///< product of shape (1 for a scalar)
  uint64_t n_bytes() const { return end - begin; }
};

class safetensors_file {
 public:
  /// Maps and validates `path`; throws safetensors_error naming the file (and
  /// tensor) and what is wrong.
  explicit safetensors_file(const std::string& path);
  ~safetensors_file();
  safetensors_file(const safetensors_file&) = delete;
  safetensors_file& operator=(const safetensors_file&) = delete;

  const std::string& path() const { return path_; }
  uint64_t file_size() const { return size_; }
  /// The "__metadata__" string map (empty if absent).
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  /// All tensors, sorted by data offset.
  const std::vector<st_tensor_info>& tensors() const { return tensors_; }

  /// Tensor by name, or nullptr.
  const st_tensor_info* find(const std::string& name) const;
  /// Tensor by name; throws safetensors_error naming the file and tensor if absent.
  const st_tensor_info& at(const std::string& name) const;
  /// Raw little-endian bytes of a tensor inside the mapping (t.n_bytes() of
  /// them; valid while this object lives; not necessarily aligned).
  const uint8_t* data(const st_tensor_info& t) const;

  /// Converts a tensor to float32 (t.n_elements() values into `out`). Works for
  /// every dtype but f8; int64/uint64 lose precision beyond 2^24.
  void to_float32(const st_tensor_info& t, float* out) const;

 private:
  std::string path_;
  int fd_ = -1;
  const uint8_t* base_ = nullptr;
  uint64_t size_ = 0;
  uint64_t data_offset_ = 0;  ///< 8 + header length
  std::map<std::string, std::string> metadata_;
  std::vector<st_tensor_info> tensors_;
  std::map<std::string, size_t> index_;
};

/// A tensor to write: `data` points to n_elements * st_dtype_size(dtype) bytes
/// in row-major order, little-endian.
struct st_tensor_view {
  std::string name;
  st_dtype dtype = st_dtype::f32;
  std::vector<int64_t> shape;
  const void* data = nullptr;
};

/// Writes a safetensors file atomically: to a temporary file in the same
/// directory, fsync, rename over `path`, fsync the directory. Tensors are
/// stored in the order given; the header is space-padded so that the data
/// section starts at a multiple of 8 bytes. Throws safetensors_error on
/// duplicate or empty names, the reserved name "__metadata__", negative
/// dimensions or I/O errors (the temporary file is removed).
void write_safetensors(const std::string& path, const std::vector<st_tensor_view>& tensors,
                       const std::map<std::string, std::string>& metadata = {});

}  // namespace undertone::models
