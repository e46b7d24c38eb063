#include "models/gguf.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cmath>
#include <algorithm>
#include <cstring>

namespace undertone::models {
namespace {

constexpr uint64_t max_string_bytes = 1ull << 30;  // sanity bound for any single string
constexpr uint64_t max_array_items = 1ull << 32;

// Bounds-checked cursor over the mapping.
class cursor {
 public:
  cursor(const uint8_t* base, uint64_t size, const std::string& path) : base_(base), size_(size), path_(path) {}
  template <class T>
  T read() {
    need(sizeof(T));
    T v;
    std::memcpy(&v, base_ + pos_, sizeof(T));
    pos_ += sizeof(T);
    return v;
  }
  std::string read_string() {
    uint64_t n = read<uint64_t>();
    if (n > max_string_bytes) fail("string length " + std::to_string(n) + " is implausible");
    need(n);
    std::string s(reinterpret_cast<const char*>(base_ + pos_), n);
    pos_ += n;
    return s;
  }
  void need(uint64_t n) {
    if (n > size_ || pos_ > size_ - n)
      fail("truncated: needs " + std::to_string(n) + " bytes at offset " + std::to_string(pos_) + " of " +
           std::to_string(size_));
  }
  uint64_t pos() const { return pos_; }
  [[noreturn]] void fail(const std::string& what) const { throw gguf_error(path_ + ": " + what); }

 private:
  const uint8_t* base_;
  uint64_t size_;
  uint64_t pos_ = 0;
  const std::string& path_;
};

enum : uint32_t {
  t_u8 = 0, t_i8 = 1, t_u16 = 2, t_i16 = 3, t_u32 = 4, t_i32 = 5, t_f32 = 6, t_bool = 7,
  t_string = 8, t_array = 9, t_u64 = 10, t_i64 = 11, t_f64 = 12,
};

bool read_scalar_int(cursor& c, uint32_t type, int64_t& out) {
  switch (type) {
    case t_u8: out = c.read<uint8_t>(); return true;
    case t_i8: out = c.read<int8_t>(); return true;
    case t_u16: out = c.read<uint16_t>(); return true;
    case t_i16: out = c.read<int16_t>(); return true;
    case t_u32: out = c.read<uint32_t>(); return true;
    case t_i32: out = c.read<int32_t>(); return true;
    case t_i64: out = c.read<int64_t>(); return true;
    case t_u64: out = static_cast<int64_t>(c.read<uint64_t>()); return true;
    case t_bool: out = c.read<uint8_t>() != 0; return true;
    default: return false;
  }
}

gguf_value read_value(cursor& c, uint32_t type, const std::string& key) {
  switch (type) {
    case t_u64: return c.read<uint64_t>();
    case t_f32: return double(c.read<float>());
    case t_f64: return c.read<double>();
    case t_bool: return c.read<uint8_t>() != 0;
    case t_string: return c.read_string();
    case t_array: {
      uint32_t et = c.read<uint32_t>();
      uint64_t n = c.read<uint64_t>();
      if (n > max_array_items) c.fail("array " + key + " has implausible length " + std::to_string(n));
      if (et == t_string) {
        std::vector<std::string> v;
        v.reserve(std::min<uint64_t>(n, 1 << 20));
        for (uint64_t i = 0; i < n; ++i) v.push_back(c.read_string());
        return v;
      }
      if (et == t_f32 || et == t_f64) {
        c.need(n * (et == t_f32 ? 4 : 8));
        std::vector<double> v(n);
        for (auto& x : v) x = et == t_f32 ? double(c.read<float>()) : c.read<double>();
        return v;
      }
      std::vector<int64_t> v;
      v.reserve(std::min<uint64_t>(n, 1 << 24));
      int64_t x;
      for (uint64_t i = 0; i < n; ++i) {
        if (!read_scalar_int(c, et, x)) c.fail("array " + key + " has unsupported element type " + std::to_string(et));
        v.push_back(x);
      }
      return v;
    }
    default: {
      int64_t x;
      if (!read_scalar_int(c, type, x)) c.fail("metadata " + key + " has unknown value type " + std::to_string(type));
      return x;
    }
  }
}

struct type_traits {
  int64_t block;   // elements per block
  uint64_t bytes;  // bytes per block
};

bool traits_of(uint32_t type, type_traits& t) {
  switch (static_cast<ggml_type>(type)) {
    case ggml_type::f32: t = {1, 4}; return true;
    case ggml_type::f16: t = {1, 2}; return true;
    case ggml_type::bf16: t = {1, 2}; return true;
    case ggml_type::q4_0: t = {32, 18}; return true;
    case ggml_type::q4_1: t = {32, 20}; return true;
    case ggml_type::q5_0: t = {32, 22}; return true;
    case ggml_type::q5_1: t = {32, 24}; return true;
    case ggml_type::q8_0: t = {32, 34}; return true;
    case ggml_type::q8_1: t = {32, 36}; return true;
    case ggml_type::q2_k: t = {256, 84}; return true;
    case ggml_type::q3_k: t = {256, 110}; return true;
    case ggml_type::q4_k: t = {256, 144}; return true;
    case ggml_type::q5_k: t = {256, 176}; return true;
    case ggml_type::q6_k: t = {256, 210}; return true;
    case ggml_type::q8_k: t = {256, 292}; return true;
  }
  return false;
}

uint16_t rd16(const uint8_t* p) {
  uint16_t v;
  std::memcpy(&v, p, 2);
  return v;
}

// K-quant 6-bit packed scales/mins (q4_k, q5_k): 12 bytes hold 8 scales and 8 mins.
void k_scale_min(int j, const uint8_t* q, uint8_t& sc, uint8_t& m) {
  if (j < 4) {
    sc = q[j] & 63;
    m = q[j + 4] & 63;
  } else {
    sc = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
    m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
  }
}

}  // namespace

float fp16_to_fp32(uint16_t h) {
  uint32_t sign = uint32_t(h & 0x8000) << 16;
  uint32_t exp = (h >> 10) & 0x1F;
  uint32_t mant = h & 0x3FF;
  uint32_t bits;
  if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {  // subnormal: normalize
      int e = -1;
      do { ++e; mant <<= 1; } while ((mant & 0x400) == 0);
      bits = sign | uint32_t(127 - 15 - e) << 23 | (mant & 0x3FF) << 13;
    }
  } else if (exp == 31) {
    bits = sign | 0x7F800000u | mant << 13;
  } else {
    bits = sign | (exp + 112) << 23 | mant << 13;
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

float bf16_to_fp32(uint16_t h) {
  uint32_t bits = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

std::string ggml_type_name(uint32_t type) {
  switch (static_cast<ggml_type>(type)) {
    case ggml_type::f32: return "f32";
    case ggml_type::f16: return "f16";
    case ggml_type::bf16: return "bf16";
    case ggml_type::q4_0: return "q4_0";
    case ggml_type::q4_1: return "q4_1";
    case ggml_type::q5_0: return "q5_0";
    case ggml_type::q5_1: return "q5_1";
    case ggml_type::q8_0: return "q8_0";
    case ggml_type::q8_1: return "q8_1";
    case ggml_type::q2_k: return "q2_k";
    case ggml_type::q3_k: return "q3_k";
    case ggml_type::q4_k: return "q4_k";
    case ggml_type::q5_k: return "q5_k";
    case ggml_type::q6_k: return "q6_k";
    case ggml_type::q8_k: return "q8_k";
  }
  return "type" + std::to_string(type);
}

uint64_t ggml_row_bytes(uint32_t type, int64_t n) {
  type_traits t;
  if (!traits_of(type, t)) throw gguf_error("unknown ggml type " + std::to_string(type));
  if (n < 0 || n % t.block != 0)
    throw gguf_error(std::to_string(n) + " elements is not a multiple of the " + ggml_type_name(type) +
                     " block size " + std::to_string(t.block));
  return uint64_t(n / t.block) * t.bytes;
}

void dequantize_row(uint32_t type, const uint8_t* src, float* out, int64_t n) {
  switch (static_cast<ggml_type>(type)) {
    case ggml_type::f32:
      std::memcpy(out, src, size_t(n) * 4);
      return;
    case ggml_type::f16:
      for (int64_t i = 0; i < n; ++i) out[i] = fp16_to_fp32(rd16(src + 2 * i));
      return;
    case ggml_type::bf16:
      for (int64_t i = 0; i < n; ++i) out[i] = bf16_to_fp32(rd16(src + 2 * i));
      return;
    case ggml_type::q4_0:
      for (int64_t b = 0; b < n / 32; ++b, src += 18, out += 32) {
        float d = fp16_to_fp32(rd16(src));
        for (int j = 0; j < 16; ++j) {
          out[j] = d * (int(src[2 + j] & 0xF) - 8);
          out[j + 16] = d * (int(src[2 + j] >> 4) - 8);
        }
      }
      return;
    case ggml_type::q4_1:
      for (int64_t b = 0; b < n / 32; ++b, src += 20, out += 32) {
        float d = fp16_to_fp32(rd16(src)), m = fp16_to_fp32(rd16(src + 2));
        for (int j = 0; j < 16; ++j) {
          out[j] = d * float(src[4 + j] & 0xF) + m;
          out[j + 16] = d * float(src[4 + j] >> 4) + m;
        }
      }
      return;
    case ggml_type::q5_0:
    case ggml_type::q5_1: {
      bool has_min = static_cast<ggml_type>(type) == ggml_type::q5_1;
      uint64_t bs = has_min ? 24 : 22;
      for (int64_t b = 0; b < n / 32; ++b, src += bs, out += 32) {
        float d = fp16_to_fp32(rd16(src));
        float m = has_min ? fp16_to_fp32(rd16(src + 2)) : 0.f;
        const uint8_t* qh_p = src + (has_min ? 4 : 2);
        uint32_t qh;
        std::memcpy(&qh, qh_p, 4);
        const uint8_t* qs = qh_p + 4;
        for (int j = 0; j < 16; ++j) {
          int lo = (qs[j] & 0xF) | (((qh >> j) & 1) << 4);
          int hi = (qs[j] >> 4) | (((qh >> (j + 16)) & 1) << 4);
          out[j] = has_min ? d * lo + m : d * (lo - 16);
          out[j + 16] = has_min ? d * hi + m : d * (hi - 16);
        }
      }
      return;
    }
    case ggml_type::q8_0:
      for (int64_t b = 0; b < n / 32; ++b, src += 34, out += 32) {
        float d = fp16_to_fp32(rd16(src));
        for (int j = 0; j < 32; ++j) out[j] = d * float(int8_t(src[2 + j]));
      }
      return;
    case ggml_type::q4_k:
      for (int64_t b = 0; b < n / 256; ++b, src += 144) {
        float d = fp16_to_fp32(rd16(src)), dmin = fp16_to_fp32(rd16(src + 2));
        const uint8_t* scales = src + 4;
        const uint8_t* q = src + 16;
        for (int j = 0; j < 8; j += 2, q += 32) {
          uint8_t sc, m;
          k_scale_min(j, scales, sc, m);
          float d1 = d * sc, m1 = dmin * m;
          k_scale_min(j + 1, scales, sc, m);
          float d2 = d * sc, m2 = dmin * m;
          for (int l = 0; l < 32; ++l) *out++ = d1 * (q[l] & 0xF) - m1;
          for (int l = 0; l < 32; ++l) *out++ = d2 * (q[l] >> 4) - m2;
        }
      }
      return;
    case ggml_type::q5_k:
      for (int64_t b = 0; b < n / 256; ++b, src += 176) {
        float d = fp16_to_fp32(rd16(src)), dmin = fp16_to_fp32(rd16(src + 2));
        const uint8_t* scales = src + 4;
        const uint8_t* qh = src + 16;
        const uint8_t* ql = src + 48;
        uint8_t u1 = 1, u2 = 2;
        for (int j = 0; j < 8; j += 2, ql += 32, u1 <<= 2, u2 <<= 2) {
          uint8_t sc, m;
          k_scale_min(j, scales, sc, m);
          float d1 = d * sc, m1 = dmin * m;
          k_scale_min(j + 1, scales, sc, m);
          float d2 = d * sc, m2 = dmin * m;
          for (int l = 0; l < 32; ++l) *out++ = d1 * ((ql[l] & 0xF) + (qh[l] & u1 ? 16 : 0)) - m1;
          for (int l = 0; l < 32; ++l) *out++ = d2 * ((ql[l] >> 4) + (qh[l] & u2 ? 16 : 0)) - m2;
        }
      }
      return;
    case ggml_type::q6_k:
      for (int64_t b = 0; b < n / 256; ++b, src += 210) {
        const uint8_t* ql = src;
        const uint8_t* qh = src + 128;
        const int8_t* sc = reinterpret_cast<const int8_t*>(src + 192);
        float d = fp16_to_fp32(rd16(src + 208));
        for (int half = 0; half < 2; ++half, ql += 64, qh += 32, sc += 8, out += 128) {
          for (int l = 0; l < 32; ++l) {
            int is = l / 16;
            int q1 = int((ql[l] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32;
            int q2 = int((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32;
            int q3 = int((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
            int q4 = int((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
            out[l] = d * sc[is] * q1;
            out[l + 32] = d * sc[is + 2] * q2;
            out[l + 64] = d * sc[is + 4] * q3;
            out[l + 96] = d * sc[is + 6] * q4;
          }
        }
      }
      return;
    default:
      break;
  }
  throw gguf_error("unsupported ggml type " + ggml_type_name(type));
}

int64_t gguf_tensor_info::n_elements() const {
  int64_t n = 1;
  for (auto d : shape) n *= d;
  return n;
}

gguf_file::gguf_file(const std::string& path) : path_(path) {
  fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd_ < 0) throw gguf_error(path + ": cannot open: " + std::strerror(errno));
  struct stat st {};
  if (::fstat(fd_, &st) != 0) {
    ::close(fd_);
    throw gguf_error(path + ": cannot stat");
  }
  size_ = uint64_t(st.st_size);
  if (size_ < 24) {
    ::close(fd_);
    throw gguf_error(path + ": too small to be a GGUF file (" + std::to_string(size_) + " bytes)");
  }
  void* m = ::mmap(nullptr, size_, PROT_READ, MAP_SHARED, fd_, 0);
  if (m == MAP_FAILED) {
    ::close(fd_);
    throw gguf_error(path + ": mmap failed: " + std::strerror(errno));
  }
  base_ = static_cast<const uint8_t*>(m);
  try {
    cursor c(base_, size_, path_);
    uint32_t magic = c.read<uint32_t>();
    if (magic != 0x46554747u) c.fail("not a GGUF file (bad magic)");
    version_ = c.read<uint32_t>();
    if (version_ < 2 || version_ > 3) c.fail("unsupported GGUF version " + std::to_string(version_));
    uint64_t n_tensors = c.read<uint64_t>();
    uint64_t n_kv = c.read<uint64_t>();
    // Each entry needs at least a few bytes, so counts beyond the file size are corrupt.
    if (n_tensors > size_ / 8 || n_kv > size_ / 8) c.fail("implausible tensor/metadata counts");
    for (uint64_t i = 0; i < n_kv; ++i) {
      std::string key = c.read_string();
      uint32_t type = c.read<uint32_t>();
      kv_[key] = read_value(c, type, key);
    }
    tensors_.reserve(n_tensors);
    for (uint64_t i = 0; i < n_tensors; ++i) {
      gguf_tensor_info t;
      t.name = c.read_string();
      uint32_t nd = c.read<uint32_t>();
      if (nd == 0 || nd > 8) c.fail("tensor " + t.name + " has " + std::to_string(nd) + " dimensions");
      for (uint32_t d = 0; d < nd; ++d) {
        uint64_t v = c.read<uint64_t>();
        if (v == 0 || v > (1ull << 40)) c.fail("tensor " + t.name + " has implausible dimension " + std::to_string(v));
        t.shape.push_back(int64_t(v));
      }
      t.type = c.read<uint32_t>();
      t.offset = c.read<uint64_t>();
      type_traits tr;
      if (!traits_of(t.type, tr)) c.fail("tensor " + t.name + " has unknown type " + std::to_string(t.type));
      if (t.shape[0] % tr.block != 0)
        c.fail("tensor " + t.name + " row length " + std::to_string(t.shape[0]) + " is not a multiple of " +
               ggml_type_name(t.type) + " blocks");
      t.n_bytes = uint64_t(t.n_elements() / tr.block) * tr.bytes;
      tensors_.push_back(std::move(t));
    }
    uint64_t align = 32;
    if (auto it = kv_.find("general.alignment"); it != kv_.end()) {
      if (auto* v = std::get_if<int64_t>(&it->second)) align = uint64_t(*v);
      if (align == 0 || (align & (align - 1))) c.fail("general.alignment must be a power of two");
    }
    data_offset_ = (c.pos() + align - 1) / align * align;
    for (const auto& t : tensors_) {
      if (data_offset_ > size_ || t.offset > size_ - data_offset_ || t.n_bytes > size_ - data_offset_ - t.offset)
        c.fail("tensor " + t.name + " data lies outside the file (truncated?)");
    }
  } catch (...) {
    ::munmap(const_cast<uint8_t*>(base_), size_);
    ::close(fd_);
    throw;
  }
}

gguf_file::~gguf_file() {
  if (base_) ::munmap(const_cast<uint8_t*>(base_), size_);
  if (fd_ >= 0) ::close(fd_);
}

namespace {
template <class T>
const T& get_as(const std::map<std::string, gguf_value>& kv, const std::string& key, const std::string& path,
                const char* what) {
  auto it = kv.find(key);
  if (it == kv.end()) throw gguf_error(path + ": metadata key " + key + " is missing");
  if (auto* v = std::get_if<T>(&it->second)) return *v;
  throw gguf_error(path + ": metadata key " + key + " is not " + what);
}
}  // namespace

std::string gguf_file::get_string(const std::string& key) const {
  return get_as<std::string>(kv_, key, path_, "a string");
}

int64_t gguf_file::get_int(const std::string& key) const {
  auto it = kv_.find(key);
  if (it != kv_.end()) {
    if (auto* u = std::get_if<uint64_t>(&it->second)) return int64_t(*u);
  }
  return get_as<int64_t>(kv_, key, path_, "an integer");
}

double gguf_file::get_float(const std::string& key) const {
  auto it = kv_.find(key);
  if (it != kv_.end()) {
    if (auto* i = std::get_if<int64_t>(&it->second)) return double(*i);
    if (auto* u = std::get_if<uint64_t>(&it->second)) return double(*u);
  }
  return get_as<double>(kv_, key, path_, "a number");
}

const std::vector<std::string>& gguf_file::get_strings(const std::string& key) const {
  return get_as<std::vector<std::string>>(kv_, key, path_, "an array of strings");
}

std::vector<int64_t> gguf_file::get_ints(const std::string& key) const {
  return get_as<std::vector<int64_t>>(kv_, key, path_, "an array of integers");
}

std::vector<double> gguf_file::get_floats(const std::string& key) const {
  auto it = kv_.find(key);
  if (it != kv_.end())
    if (auto* i = std::get_if<std::vector<int64_t>>(&it->second)) return {i->begin(), i->end()};
  return get_as<std::vector<double>>(kv_, key, path_, "an array of numbers");
}

int64_t gguf_file::get_int_or(const std::string& key, int64_t dflt) const { return has(key) ? get_int(key) : dflt; }
double gguf_file::get_float_or(const std::string& key, double dflt) const { return has(key) ? get_float(key) : dflt; }
std::string gguf_file::get_string_or(const std::string& key, const std::string& dflt) const {
  return has(key) ? get_string(key) : dflt;
}

const gguf_tensor_info* gguf_file::find_tensor(const std::string& name) const {
  for (const auto& t : tensors_)
    if (t.name == name) return &t;
  return nullptr;
}

const uint8_t* gguf_file::tensor_data(const gguf_tensor_info& t) const { return base_ + data_offset_ + t.offset; }

void gguf_file::dequantize(const gguf_tensor_info& t, float* out) const {
  try {
    dequantize_row(t.type, tensor_data(t), out, t.n_elements());
  } catch (const gguf_error& e) {
    throw gguf_error(path_ + ": tensor " + t.name + ": " + e.what());
  }
}

}  // namespace undertone::models
