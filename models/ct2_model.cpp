#include "models/ct2_model.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <fstream>

#include "models/gguf.hpp"  // fp16/bf16 conversion

namespace undertone::models {
namespace {

class reader {
 public:
  reader(const uint8_t* b, uint64_t n, const std::string& path) : b_(b), n_(n), path_(path) {}
  template <class T>
  T read() {
    need(sizeof(T));
    T v;
    std::memcpy(&v, b_ + pos_, sizeof(T));
    pos_ += sizeof(T);
    return v;
  }
  std::string str() {
    uint16_t len = read<uint16_t>();
    need(len);
    std::string s(reinterpret_cast<const char*>(b_ + pos_), len);
    pos_ += len;
    while (!s.empty() && s.back() == '\0') s.pop_back();
    return s;
  }
  void need(uint64_t k) const {
    if (k > n_ || pos_ > n_ - k)
      throw ct2_error(path_ + ": truncated at offset " + std::to_string(pos_) + " (needs " + std::to_string(k) +
                      " more bytes, file has " + std::to_string(n_) + ")");
  }
  void skip(uint64_t k) {
    need(k);
    pos_ += k;
  }
  uint64_t pos() const { return pos_; }

 private:
  const uint8_t* b_;
  uint64_t n_;
  uint64_t pos_ = 0;
  const std::string& path_;
};

int dtype_size(uint8_t dt) {
  switch (static_cast<ct2_dtype>(dt)) {
    case ct2_dtype::f32: case ct2_dtype::i32: return 4;
    case ct2_dtype::i16: case ct2_dtype::f16: case ct2_dtype::bf16: return 2;
    case ct2_dtype::i8: return 1;
  }
  return 0;
}

}  // namespace

std::string ct2_dtype_name(uint8_t dtype) {
  switch (static_cast<ct2_dtype>(dtype)) {
    case ct2_dtype::f32: return "float32";
    case ct2_dtype::i8: return "int8";
    case ct2_dtype::i16: return "int16";
    case ct2_dtype::i32: return "int32";
    case ct2_dtype::f16: return "float16";
    case ct2_dtype::bf16: return "bfloat16";
  }
  return "dtype" + std::to_string(dtype);
}

int64_t ct2_variable::n_elements() const {
  int64_t n = 1;
  for (auto d : shape) n *= d;
  return n;
}

ct2_model::ct2_model(const std::string& dir) : dir_(dir) {
  std::string path = dir + "/model.bin";
  fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd_ < 0) throw ct2_error(path + ": cannot open: " + std::strerror(errno));
  struct stat st {};
  ::fstat(fd_, &st);
  size_ = uint64_t(st.st_size);
  if (size_ == 0) {
    ::close(fd_);
    throw ct2_error(path + ": empty file");
  }
  void* m = ::mmap(nullptr, size_, PROT_READ, MAP_SHARED, fd_, 0);
  if (m == MAP_FAILED) {
    ::close(fd_);
    throw ct2_error(path + ": mmap failed");
  }
  base_ = static_cast<const uint8_t*>(m);
  try {
    reader r(base_, size_, path);
    version_ = r.read<uint32_t>();
    if (version_ < 5 || version_ > 6)
      throw ct2_error(path + ": unsupported CTranslate2 binary version " + std::to_string(version_) +
                      " (supported: 5, 6)");
    spec_ = r.str();
    revision_ = r.read<uint32_t>();
    uint32_t n = r.read<uint32_t>();
    if (n > size_ / 8) throw ct2_error(path + ": implausible variable count " + std::to_string(n));
    for (uint32_t i = 0; i < n; ++i) {
      ct2_variable v;
      v.name = r.str();
      uint8_t rank = r.read<uint8_t>();
      if (rank > 8) throw ct2_error(path + ": variable " + v.name + " has rank " + std::to_string(rank));
      for (uint8_t d = 0; d < rank; ++d) v.shape.push_back(r.read<uint32_t>());
      v.dtype = r.read<uint8_t>();
      int es = dtype_size(v.dtype);
      if (es == 0) throw ct2_error(path + ": variable " + v.name + " has unknown dtype " + std::to_string(v.dtype));
      v.n_bytes = r.read<uint32_t>();
      if (v.n_bytes != uint64_t(v.n_elements()) * es)
        throw ct2_error(path + ": variable " + v.name + " byte count " + std::to_string(v.n_bytes) +
                        " does not match its shape");
      v.offset = r.pos();
      r.skip(v.n_bytes);
      index_[v.name] = vars_.size();
      vars_.push_back(std::move(v));
    }
    if (r.pos() < size_) {
      uint32_t na = r.read<uint32_t>();
      for (uint32_t i = 0; i < na; ++i) {
        std::string alias = r.str();
        std::string target = r.str();
        aliases_[alias] = target;
      }
    }
  } catch (...) {
    ::munmap(const_cast<uint8_t*>(base_), size_);
    ::close(fd_);
    throw;
  }
  std::ifstream cj(dir + "/config.json");
  if (cj) {
    try {
      cj >> config_;
    } catch (const std::exception& e) {
      ::munmap(const_cast<uint8_t*>(base_), size_);
      ::close(fd_);
      throw ct2_error(dir + "/config.json: invalid JSON: " + e.what());
    }
  }
}

ct2_model::~ct2_model() {
  if (base_) ::munmap(const_cast<uint8_t*>(base_), size_);
  if (fd_ >= 0) ::close(fd_);
}

const ct2_variable* ct2_model::find(const std::string& name) const {
  std::string n = name;
  if (auto a = aliases_.find(n); a != aliases_.end()) n = a->second;
  auto it = index_.find(n);
  return it == index_.end() ? nullptr : &vars_[it->second];
}

const ct2_variable& ct2_model::at(const std::string& name) const {
  if (const auto* v = find(name)) return *v;
  throw ct2_error(dir_ + "/model.bin: variable " + name + " is missing");
}

std::vector<float> ct2_model::to_float(const ct2_variable& v) const {
  std::vector<float> out(size_t(v.n_elements()));
  const uint8_t* p = data(v);
  for (size_t i = 0; i < out.size(); ++i) {
    switch (static_cast<ct2_dtype>(v.dtype)) {
      case ct2_dtype::f32: { float x; std::memcpy(&x, p + 4 * i, 4); out[i] = x; break; }
      case ct2_dtype::i32: { int32_t x; std::memcpy(&x, p + 4 * i, 4); out[i] = float(x); break; }
      case ct2_dtype::i16: { int16_t x; std::memcpy(&x, p + 2 * i, 2); out[i] = float(x); break; }
      case ct2_dtype::i8: out[i] = float(int8_t(p[i])); break;
      case ct2_dtype::f16: { uint16_t x; std::memcpy(&x, p + 2 * i, 2); out[i] = fp16_to_fp32(x); break; }
      case ct2_dtype::bf16: { uint16_t x; std::memcpy(&x, p + 2 * i, 2); out[i] = bf16_to_fp32(x); break; }
    }
  }
  return out;
}

int64_t ct2_model::scalar_int(const std::string& name) const {
  const auto& v = at(name);
  if (v.n_elements() != 1) throw ct2_error(dir_ + ": variable " + name + " is not a scalar");
  return int64_t(to_float(v)[0]);
}

}  // namespace undertone::models
