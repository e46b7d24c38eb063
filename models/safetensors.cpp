#include "models/safetensors.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <random>
#include <set>

#include <nlohmann/json.hpp>

#include "models/gguf.hpp"  // fp16_to_fp32, bf16_to_fp32

namespace undertone::models {

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__,
              "safetensors data is little-endian; this reader maps it without byte swapping");

namespace {

// The reference implementation refuses headers above 100 MB; so do we, so that a
// corrupted length cannot make us copy gigabytes before failing.
constexpr uint64_t max_header_bytes = 100ull * 1000 * 1000;

struct dtype_entry {
  st_dtype type;
  const char* name;
  size_t size;
};
constexpr dtype_entry dtype_table[] = {
    {st_dtype::f64, "F64", 8},  {st_dtype::f32, "F32", 4},   {st_dtype::f16, "F16", 2},
    {st_dtype::bf16, "BF16", 2}, {st_dtype::i64, "I64", 8},  {st_dtype::i32, "I32", 4},
    {st_dtype::i16, "I16", 2},  {st_dtype::i8, "I8", 1},     {st_dtype::u64, "U64", 8},
    {st_dtype::u32, "U32", 4},  {st_dtype::u16, "U16", 2},   {st_dtype::u8, "U8", 1},
    {st_dtype::boolean, "BOOL", 1}, {st_dtype::f8_e4m3, "F8_E4M3", 1}, {st_dtype::f8_e5m2, "F8_E5M2", 1},
};

const dtype_entry& entry(st_dtype t) {
  for (const auto& e : dtype_table)
    if (e.type == t) return e;
  throw safetensors_error("safetensors: invalid st_dtype value " + std::to_string(int(t)));
}

std::string sys_error(const std::string& what) { return what + ": " + std::strerror(errno); }

template <class T>
T load(const uint8_t* p, int64_t i) {
  T v;
  std::memcpy(&v, p + i * int64_t(sizeof(T)), sizeof(T));
  return v;
}

template <class T>
void widen(const uint8_t* src, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = float(load<T>(src, i));
}

void write_all(int fd, const void* data, size_t n, const std::string& path) {
  const char* p = static_cast<const char*>(data);
  while (n > 0) {
    ssize_t w = ::write(fd, p, n);
    if (w < 0) {
      if (errno == EINTR) continue;
      throw safetensors_error(sys_error(path + ": write failed"));
    }
    p += w;
    n -= size_t(w);
  }
}

}  // namespace

std::string st_dtype_name(st_dtype t) { return entry(t).name; }

st_dtype st_dtype_from_name(const std::string& name) {
  for (const auto& e : dtype_table)
    if (name == e.name) return e.type;
  throw safetensors_error("unknown safetensors dtype \"" + name + "\"");
}

size_t st_dtype_size(st_dtype t) { return entry(t).size; }

int64_t st_tensor_info::n_elements() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

safetensors_file::safetensors_file(const std::string& path) : path_(path) {
  auto fail = [&](const std::string& what) -> void { throw safetensors_error(path_ + ": " + what); };

  fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd_ < 0) throw safetensors_error(sys_error("cannot open safetensors file " + path));
  try {
    struct stat st {};
    if (::fstat(fd_, &st) != 0) fail(sys_error("fstat failed"));
    if (!S_ISREG(st.st_mode)) fail("not a regular file");
    size_ = uint64_t(st.st_size);
    if (size_ < 8)
      fail("file has " + std::to_string(size_) + " bytes, too small for a safetensors header (needs 8+)");
    void* m = ::mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd_, 0);
    if (m == MAP_FAILED) fail(sys_error("mmap failed"));
    base_ = static_cast<const uint8_t*>(m);

    uint64_t n_header = 0;
    std::memcpy(&n_header, base_, 8);
    if (n_header > size_ - 8)
      fail("header length " + std::to_string(n_header) + " exceeds the file (" + std::to_string(size_) +
           " bytes): truncated or not a safetensors file");
    if (n_header > max_header_bytes)
      fail("header length " + std::to_string(n_header) + " is implausible (limit " +
           std::to_string(max_header_bytes) + ")");
    if (n_header < 2 || base_[8] != '{') fail("header does not start with '{': not a safetensors file");
    data_offset_ = 8 + n_header;
    const uint64_t data_size = size_ - data_offset_;

    nlohmann::json header;
    try {
      const char* h = reinterpret_cast<const char*>(base_ + 8);
      header = nlohmann::json::parse(h, h + n_header);
    } catch (const nlohmann::json::exception& e) {
      fail(std::string("header is not valid JSON: ") + e.what());
    }
    if (!header.is_object()) fail("header is not a JSON object");

    for (const auto& [key, value] : header.items()) {
      if (key == "__metadata__") {
        if (!value.is_object()) fail("__metadata__ is not a JSON object");
        for (const auto& [mk, mv] : value.items()) {
          if (!mv.is_string()) fail("__metadata__ value of \"" + mk + "\" is not a string");
          metadata_[mk] = mv.get<std::string>();
        }
        continue;
      }
      auto tfail = [&](const std::string& what) { fail("tensor '" + key + "': " + what); };
      if (!value.is_object()) tfail("header entry is not a JSON object");
      st_tensor_info t;
      t.name = key;
      auto dt = value.find("dtype");
      if (dt == value.end() || !dt->is_string()) tfail("missing or non-string \"dtype\"");
      try {
        t.dtype = st_dtype_from_name(dt->get<std::string>());
      } catch (const safetensors_error& e) {
        tfail(e.what());
      }
      auto sh = value.find("shape");
      if (sh == value.end() || !sh->is_array()) tfail("missing or non-array \"shape\"");
      uint64_t numel = 1;
      for (const auto& d : *sh) {
        if (!d.is_number_unsigned()) tfail("shape " + sh->dump() + " has an entry that is not a non-negative integer");
        uint64_t v = d.get<uint64_t>();
        if (v > uint64_t(INT64_MAX) || __builtin_mul_overflow(numel, v, &numel))
          tfail("shape " + sh->dump() + " overflows");
        t.shape.push_back(int64_t(v));
      }
      uint64_t n_bytes = 0;
      if (numel > uint64_t(INT64_MAX) || __builtin_mul_overflow(numel, uint64_t(st_dtype_size(t.dtype)), &n_bytes))
        tfail("shape " + sh->dump() + " overflows");
      auto off = value.find("data_offsets");
      if (off == value.end() || !off->is_array() || off->size() != 2 || !(*off)[0].is_number_unsigned() ||
          !(*off)[1].is_number_unsigned())
        tfail("\"data_offsets\" must be two non-negative integers");
      t.begin = (*off)[0].get<uint64_t>();
      t.end = (*off)[1].get<uint64_t>();
      if (t.end < t.begin) tfail("data_offsets " + off->dump() + " end before they begin");
      if (t.end - t.begin != n_bytes)
        tfail("data_offsets " + off->dump() + " span " + std::to_string(t.end - t.begin) + " bytes but " +
              st_dtype_name(t.dtype) + " " + sh->dump() + " needs " + std::to_string(n_bytes));
      if (t.end > data_size)
        tfail("data_offsets " + off->dump() + " reach beyond the data section (" + std::to_string(data_size) +
              " bytes): truncated file?");
      tensors_.push_back(std::move(t));
    }

    std::sort(tensors_.begin(), tensors_.end(), [](const st_tensor_info& a, const st_tensor_info& b) {
      return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
    });
    uint64_t expected = 0;
    const st_tensor_info* prev = nullptr;
    for (const auto& t : tensors_) {
      if (t.begin < expected)
        fail("tensor '" + t.name + "' overlaps tensor '" + prev->name + "' (bytes " + std::to_string(t.begin) +
             " < " + std::to_string(expected) + ")");
      if (t.begin > expected)
        fail("hole of " + std::to_string(t.begin - expected) + " bytes before tensor '" + t.name +
             "' in the data section");
      expected = t.end;
      prev = &t;
    }
    if (expected != data_size)
      fail("data section has " + std::to_string(data_size) + " bytes but the tensors cover " +
           std::to_string(expected) + ": trailing garbage or wrong header");
    for (size_t i = 0; i < tensors_.size(); ++i) index_[tensors_[i].name] = i;
  } catch (...) {
    if (base_) ::munmap(const_cast<uint8_t*>(base_), size_);
    ::close(fd_);
    throw;
  }
}

safetensors_file::~safetensors_file() {
  if (base_) ::munmap(const_cast<uint8_t*>(base_), size_);
  if (fd_ >= 0) ::close(fd_);
}

const st_tensor_info* safetensors_file::find(const std::string& name) const {
  auto it = index_.find(name);
  return it == index_.end() ? nullptr : &tensors_[it->second];
}

const st_tensor_info& safetensors_file::at(const std::string& name) const {
  const st_tensor_info* t = find(name);
  if (!t) throw safetensors_error(path_ + ": no tensor named '" + name + "'");
  return *t;
}

const uint8_t* safetensors_file::data(const st_tensor_info& t) const {
  // Guard against infos that did not come from this file.
  if (t.end < t.begin || t.end > size_ - data_offset_)
    throw safetensors_error(path_ + ": tensor '" + t.name + "' lies outside the data section");
  return base_ + data_offset_ + t.begin;
}

void safetensors_file::to_float32(const st_tensor_info& t, float* out) const {
  const uint8_t* p = data(t);
  const int64_t n = t.n_elements();
  if (n == 0) return;  // `out` may be null for an empty tensor
  switch (t.dtype) {
    case st_dtype::f32: std::memcpy(out, p, size_t(n) * 4); return;
    case st_dtype::f64: widen<double>(p, out, n); return;
    case st_dtype::f16:
      for (int64_t i = 0; i < n; ++i) out[i] = fp16_to_fp32(load<uint16_t>(p, i));
      return;
    case st_dtype::bf16:
      for (int64_t i = 0; i < n; ++i) out[i] = bf16_to_fp32(load<uint16_t>(p, i));
      return;
    case st_dtype::i64: widen<int64_t>(p, out, n); return;
    case st_dtype::i32: widen<int32_t>(p, out, n); return;
    case st_dtype::i16: widen<int16_t>(p, out, n); return;
    case st_dtype::i8: widen<int8_t>(p, out, n); return;
    case st_dtype::u64: widen<uint64_t>(p, out, n); return;
    case st_dtype::u32: widen<uint32_t>(p, out, n); return;
    case st_dtype::u16: widen<uint16_t>(p, out, n); return;
    case st_dtype::u8: widen<uint8_t>(p, out, n); return;
    case st_dtype::boolean:
      for (int64_t i = 0; i < n; ++i) out[i] = p[i] != 0 ? 1.0f : 0.0f;
      return;
    case st_dtype::f8_e4m3:
    case st_dtype::f8_e5m2: break;
  }
  throw safetensors_error(path_ + ": tensor '" + t.name + "': conversion of " + st_dtype_name(t.dtype) +
                          " to float32 is not supported");
}

void write_safetensors(const std::string& path, const std::vector<st_tensor_view>& tensors,
                       const std::map<std::string, std::string>& metadata) {
  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  if (!metadata.empty()) {
    nlohmann::ordered_json m = nlohmann::ordered_json::object();
    for (const auto& [k, v] : metadata) m[k] = v;
    header["__metadata__"] = std::move(m);
  }
  std::set<std::string> seen;
  std::vector<uint64_t> sizes;
  uint64_t offset = 0;
  for (const auto& t : tensors) {
    auto tfail = [&](const std::string& what) {
      throw safetensors_error(path + ": cannot write tensor '" + t.name + "': " + what);
    };
    if (t.name.empty()) tfail("empty name");
    if (t.name == "__metadata__") tfail("the name is reserved for metadata");
    if (!seen.insert(t.name).second) tfail("duplicate name");
    uint64_t numel = 1;
    for (int64_t d : t.shape) {
      if (d < 0) tfail("negative dimension");
      if (__builtin_mul_overflow(numel, uint64_t(d), &numel)) tfail("shape overflows");
    }
    uint64_t n_bytes = 0;
    if (__builtin_mul_overflow(numel, uint64_t(st_dtype_size(t.dtype)), &n_bytes)) tfail("shape overflows");
    if (n_bytes > 0 && !t.data) tfail("null data pointer");
    header[t.name] = {{"dtype", st_dtype_name(t.dtype)},
                      {"shape", t.shape},
                      {"data_offsets", {offset, offset + n_bytes}}};
    offset += n_bytes;
    sizes.push_back(n_bytes);
  }
  std::string text = header.dump();
  // Pad with spaces (valid JSON whitespace) so the data section is 8-byte aligned.
  text.append((8 - (8 + text.size()) % 8) % 8, ' ');
  const uint64_t n_header = text.size();

  namespace fs = std::filesystem;
  fs::path target(path);
  fs::path dir = target.has_parent_path() ? target.parent_path() : fs::path(".");
  std::random_device rd;
  const std::string tmp =
      (dir / ("." + target.filename().string() + ".tmp-" + std::to_string(::getpid()) + "-" + std::to_string(rd())))
          .string();
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
  if (fd < 0) throw safetensors_error(sys_error("cannot create " + tmp));
  try {
    uint8_t len[8];
    std::memcpy(len, &n_header, 8);
    write_all(fd, len, 8, tmp);
    write_all(fd, text.data(), text.size(), tmp);
    for (size_t i = 0; i < tensors.size(); ++i)
      if (sizes[i] > 0) write_all(fd, tensors[i].data, size_t(sizes[i]), tmp);
    if (::fsync(fd) != 0) throw safetensors_error(sys_error(tmp + ": fsync failed"));
    int rc = ::close(fd);
    fd = -1;
    if (rc != 0) throw safetensors_error(sys_error(tmp + ": close failed"));
    if (::rename(tmp.c_str(), path.c_str()) != 0)
      throw safetensors_error(sys_error("cannot rename " + tmp + " to " + path));
  } catch (...) {
    if (fd >= 0) ::close(fd);
    ::unlink(tmp.c_str());
    throw;
  }
  // Make the rename itself durable. Some file systems refuse fsync on a
  // directory (EINVAL); the data is already safe then, so that is not an error.
  int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd >= 0) {
    int rc = ::fsync(dfd);
    int err = errno;
    ::close(dfd);
    if (rc != 0 && err != EINVAL && err != EROFS)
      throw safetensors_error(path + ": fsync of directory " + dir.string() + " failed: " + std::strerror(err));
  }
}

}  // namespace undertone::models
