// Versioned encoder checkpoints (models/encoder_registry.hpp).
#include "models/encoder_registry.hpp"

#include <fcntl.h>
#include <signal.h>
#include <sys/file.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>

#include "models/model_store.hpp"
#include "models/safetensors.hpp"

namespace undertone::models {

namespace fs = std::filesystem;

namespace {

constexpr const char* k_projector = "projector.safetensors";
constexpr const char* k_layers = "encoder_layers.safetensors";
constexpr const char* k_meta = "meta.json";
constexpr const char* k_tmp_prefix = ".tmp-";

[[noreturn]] void fail(const std::string& what) { throw registry_error(what); }

std::string sys_err(const std::string& what) { return what + ": " + std::strerror(errno); }

// fsync a file or directory by path (durability of renames needs the directory).
void fsync_path(const std::string& path, bool dir) {
  int fd = ::open(path.c_str(), (dir ? O_RDONLY | O_DIRECTORY : O_RDONLY) | O_CLOEXEC);
  if (fd < 0) fail(sys_err("encoder registry: cannot open " + path + " to fsync"));
  int rc = ::fsync(fd);
  int err = errno;
  ::close(fd);
  // Some file systems refuse fsync on directories (EINVAL); the data is then as
  // durable as that file system makes it.
  if (rc != 0 && !(dir && (err == EINVAL || err == EBADF)))
    fail("encoder registry: fsync of " + path + " failed: " + std::strerror(err));
}

void write_all(int fd, const char* p, size_t n, const std::string& path) {
  while (n > 0) {
    ssize_t w = ::write(fd, p, n);
    if (w < 0) {
      if (errno == EINTR) continue;
      fail(sys_err("encoder registry: write to " + path + " failed"));
    }
    p += w;
    n -= size_t(w);
  }
}

// Writes `content` to `path` and fsyncs it (no rename).
void write_synced(const std::string& path, const std::string& content) {
  int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) fail(sys_err("encoder registry: cannot create " + path));
  try {
    write_all(fd, content.data(), content.size(), path);
    if (::fsync(fd) != 0) fail(sys_err("encoder registry: fsync of " + path + " failed"));
  } catch (...) {
    ::close(fd);
    throw;
  }
  ::close(fd);
}

// Copies src to dst and fsyncs dst.
void copy_synced(const std::string& src, const std::string& dst) {
  int in = ::open(src.c_str(), O_RDONLY | O_CLOEXEC);
  if (in < 0) fail(sys_err("encoder registry: cannot read " + src));
  int out = ::open(dst.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (out < 0) {
    ::close(in);
    fail(sys_err("encoder registry: cannot create " + dst));
  }
  std::vector<char> buf(1 << 20);
  try {
    for (;;) {
      ssize_t r = ::read(in, buf.data(), buf.size());
      if (r < 0) {
        if (errno == EINTR) continue;
        fail(sys_err("encoder registry: read of " + src + " failed"));
      }
      if (r == 0) break;
      write_all(out, buf.data(), size_t(r), dst);
    }
    if (::fsync(out) != 0) fail(sys_err("encoder registry: fsync of " + dst + " failed"));
  } catch (...) {
    ::close(in);
    ::close(out);
    throw;
  }
  ::close(in);
  ::close(out);
}

// Replaces `path` atomically by `content`: temp file, fsync, rename, fsync dir.
void replace_atomically(const std::string& path, const std::string& content) {
  const std::string tmp = path + ".tmp-" + std::to_string(::getpid());
  write_synced(tmp, content);
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    const std::string e = sys_err("encoder registry: cannot rename " + tmp + " to " + path);
    ::unlink(tmp.c_str());
    fail(e);
  }
  fsync_path(fs::path(path).parent_path().string(), true);
}

std::string now_iso(std::time_t t) {
  std::tm tm{};
  ::gmtime_r(&t, &tm);
  char b[32];
  std::strftime(b, sizeof b, "%Y-%m-%dT%H:%M:%SZ", &tm);
  return b;
}

double now_unix() {
  return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
}

// Exclusive flock on <dir>/.lock for the lifetime of the object.
class dir_lock {
 public:
  explicit dir_lock(const std::string& dir) {
    std::error_code ec;
    fs::create_directories(fs::path(dir) / "versions", ec);
    if (ec) fail("encoder registry: cannot create " + dir + "/versions: " + ec.message());
    const std::string p = (fs::path(dir) / ".lock").string();
    fd_ = ::open(p.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    if (fd_ < 0) fail(sys_err("encoder registry: cannot open " + p));
    while (::flock(fd_, LOCK_EX) != 0) {
      if (errno == EINTR) continue;
      const std::string e = sys_err("encoder registry: cannot lock " + p);
      ::close(fd_);
      fail(e);
    }
  }
  ~dir_lock() {
    if (fd_ >= 0) ::close(fd_);  // releases the flock
  }
  dir_lock(const dir_lock&) = delete;
  dir_lock& operator=(const dir_lock&) = delete;

 private:
  int fd_ = -1;
};

bool process_alive(long pid) {
  if (pid <= 0) return false;
  return ::kill(pid_t(pid), 0) == 0 || errno == EPERM;
}

bool valid_name(const std::string& v) {
  if (v.empty() || v.size() > 128 || v[0] == '.') return false;
  return std::all_of(v.begin(), v.end(), [](char c) {
    return std::isalnum(static_cast<unsigned char>(c)) || c == '-' || c == '_' || c == '.';
  });
}

// Number of a "v0001"-style name, or -1.
long version_number(const std::string& v) {
  if (v.size() < 2 || v[0] != 'v') return -1;
  for (size_t i = 1; i < v.size(); ++i)
    if (!std::isdigit(static_cast<unsigned char>(v[i]))) return -1;
  return std::stol(v.substr(1));
}

std::string read_text(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) fail("encoder registry: cannot read " + path);
  std::ostringstream o;
  o << f.rdbuf();
  return o.str();
}

void append_history(const std::string& dir, const nlohmann::json& ev) {
  const std::string hist = (fs::path(dir) / "history.jsonl").string();
  int fd = ::open(hist.c_str(), O_RDWR | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
  if (fd < 0) fail(sys_err("encoder registry: cannot append to " + hist));
  std::string line = ev.dump() + "\n";
  // After a torn line (a crash while appending) start on a fresh line, so that
  // only the torn event is lost.
  const off_t end = ::lseek(fd, 0, SEEK_END);
  char last = '\n';
  if (end > 0 && ::pread(fd, &last, 1, end - 1) == 1 && last != '\n') line.insert(line.begin(), '\n');
  try {
    write_all(fd, line.data(), line.size(), hist);
  } catch (...) {
    ::close(fd);
    throw;
  }
  ::fsync(fd);
  ::close(fd);
}

}  // namespace

// ------------------------------------------------------------ projector file

std::string projector_shape::to_string() const {
  std::ostringstream o;
  o << "stack=" << stack << " d_in=" << d_in << " d_hidden=" << d_hidden << " d_out=" << d_out << " dtype=" << dtype;
  return o.str();
}

projector_shape check_projector_file(const std::string& path) {
  auto bad = [&](const std::string& what) -> void { fail("projector checkpoint " + path + ": " + what); };
  try {
    safetensors_file f(path);
    const auto& md = f.metadata();
    auto key = [&](const std::string& k) -> std::string {
      auto it = md.find(k);
      if (it == md.end()) bad("metadata lacks \"" + k + "\" (not written by projector::save?)");
      return it->second;
    };
    if (key("format") != "undertone.projector") bad("metadata format is \"" + key("format") + "\", not undertone.projector");
    if (key("version") != "1") bad("unsupported projector format version " + key("version"));
    auto num = [&](const std::string& k) -> int64_t {
      const std::string v = key(k);
      try {
        size_t used = 0;
        long long x = std::stoll(v, &used);
        if (used == v.size() && x > 0) return int64_t(x);
      } catch (const std::exception&) {
      }
      bad("metadata \"" + k + "\" = \"" + v + "\" is not a positive integer");
      return 0;
    };
    projector_shape s;
    s.stack = num("stack");
    s.d_in = num("d_in");
    s.d_hidden = num("d_hidden");
    s.d_out = num("d_out");
    const std::vector<std::pair<std::string, std::vector<int64_t>>> want{
        {"gate.weight", {s.d_hidden, s.stack * s.d_in}},
        {"up.weight", {s.d_hidden, s.stack * s.d_in}},
        {"down.weight", {s.d_out, s.d_hidden}}};
    std::vector<float> vals;
    for (const auto& [name, shape] : want) {
      const auto* t = f.find(name);
      if (!t) bad("missing tensor " + name);
      if (t->shape != shape) bad("tensor " + name + " has the wrong shape for its metadata (" + s.to_string() + ")");
      s.dtype = st_dtype_name(t->dtype);
      vals.resize(size_t(t->n_elements()));
      f.to_float32(*t, vals.data());
      for (float v : vals)
        if (!std::isfinite(v)) bad("tensor " + name + " has non-finite values (corrupt?)");
    }
    return s;
  } catch (const safetensors_error& e) {
    fail(std::string("projector checkpoint ") + e.what());
  }
}

// ----------------------------------------------------------------- registry

encoder_registry::encoder_registry(std::string dir) : dir_(std::move(dir)) {
  if (dir_.empty()) throw registry_error("encoder registry: directory is empty (set encoder.registry)");
  dir_ = fs::absolute(dir_).lexically_normal().string();
  if (dir_.size() > 1 && dir_.back() == '/') dir_.pop_back();
}

std::optional<std::string> encoder_registry::current() const {
  const fs::path p = fs::path(dir_) / "current";
  std::error_code ec;
  if (!fs::exists(p, ec)) return std::nullopt;
  std::string s = read_text(p.string());
  while (!s.empty() && (s.back() == '\n' || s.back() == '\r' || s.back() == ' ')) s.pop_back();
  if (s.empty()) return std::nullopt;
  return s;
}

std::string encoder_registry::dir_of(const std::string& version) const {
  if (!valid_name(version)) fail("encoder registry " + dir_ + ": \"" + version + "\" is not a version name");
  const fs::path d = fs::path(dir_) / "versions" / version;
  std::error_code ec;
  if (!fs::is_directory(d, ec))
    fail("encoder registry " + dir_ + ": no version " + version + " (see `undertone model list`)");
  return d.string();
}

std::string encoder_registry::path_of(const std::string& version) const {
  return (fs::path(dir_of(version)) / k_projector).string();
}

std::string encoder_registry::encoder_layers_of(const std::string& version) const {
  const fs::path p = fs::path(dir_of(version)) / k_layers;
  std::error_code ec;
  return fs::exists(p, ec) ? p.string() : std::string();
}

nlohmann::json encoder_registry::meta_of(const std::string& version) const {
  const std::string p = (fs::path(dir_of(version)) / k_meta).string();
  std::error_code ec;
  if (!fs::exists(p, ec)) fail("encoder registry: version " + version + " has no " + k_meta + " (incomplete)");
  try {
    auto j = nlohmann::json::parse(read_text(p));
    if (!j.is_object()) fail(p + " is not a JSON object");
    return j;
  } catch (const nlohmann::json::exception& e) {
    fail("encoder registry: " + p + " is not valid JSON (" + e.what() + ")");
  }
}

void encoder_registry::verify(const std::string& version) const {
  const std::string d = dir_of(version);
  const auto meta = meta_of(version);
  if (!meta.contains("files") || !meta["files"].is_object() || !meta["files"].contains(k_projector))
    fail("encoder registry: version " + version + ": meta.json lists no " + k_projector);
  for (const auto& [name, info] : meta["files"].items()) {
    const std::string p = (fs::path(d) / name).string();
    std::error_code ec;
    if (!fs::exists(p, ec)) fail("encoder registry: version " + version + ": " + p + " is missing");
    const uint64_t size = fs::file_size(p, ec);
    if (ec || size != info.value("size", uint64_t(0)))
      fail("encoder registry: version " + version + ": " + p + " has " + std::to_string(size) + " bytes, meta.json says " +
           std::to_string(info.value("size", uint64_t(0))) + " (truncated or replaced)");
    std::string h;
    try {
      h = sha256_file(p);
    } catch (const std::exception& e) {
      fail("encoder registry: version " + version + ": " + e.what());
    }
    if (h != info.value("sha256", std::string()))
      fail("encoder registry: version " + version + ": " + p + " sha256 " + h + " != " +
           info.value("sha256", std::string()) + " in meta.json (corrupt)");
  }
  check_projector_file(path_of(version));
  const std::string layers = encoder_layers_of(version);
  if (!layers.empty()) {
    try {
      safetensors_file f(layers);
    } catch (const safetensors_error& e) {
      fail(std::string("encoder registry: version ") + version + ": " + e.what());
    }
  }
}

std::string encoder_registry::publish(const std::string& projector_path, const nlohmann::json& meta,
                                      bool make_current, const std::string& encoder_layers_path) {
  if (!meta.is_null() && !meta.is_object()) fail("encoder registry: publish meta must be a JSON object");
  // Refuse a bad source before copying anything.
  const projector_shape shape = check_projector_file(projector_path);
  if (!encoder_layers_path.empty()) {
    try {
      safetensors_file f(encoder_layers_path);
      if (f.tensors().empty()) fail("encoder layers " + encoder_layers_path + " hold no tensor");
    } catch (const safetensors_error& e) {
      fail(std::string("encoder registry: ") + e.what());
    }
  }
  const fs::path versions = fs::path(dir_) / "versions";
  std::error_code ec;
  fs::create_directories(versions, ec);
  if (ec) fail("encoder registry: cannot create " + versions.string() + ": " + ec.message());

  static std::atomic<uint64_t> counter{0};
  std::random_device rd;
  const fs::path tmp = versions / (std::string(k_tmp_prefix) + std::to_string(::getpid()) + "-" +
                                   std::to_string(rd() % 1000000) + "-" + std::to_string(counter++));
  struct remover {
    fs::path p;
    bool armed = true;
    ~remover() {
      std::error_code e;
      if (armed) fs::remove_all(p, e);
    }
  } rm{tmp};
  if (!fs::create_directory(tmp, ec)) fail("encoder registry: cannot create " + tmp.string() + ": " + ec.message());

  nlohmann::json files = nlohmann::json::object();
  auto add = [&](const std::string& src, const char* name) {
    const std::string dst = (tmp / name).string();
    copy_synced(src, dst);
    files[name] = {{"sha256", sha256_file(dst)}, {"size", fs::file_size(dst)}};
  };
  add(projector_path, k_projector);
  check_projector_file((tmp / k_projector).string());  // the copy, as it is on disk
  if (!encoder_layers_path.empty()) add(encoder_layers_path, k_layers);

  dir_lock lock(dir_);
  clean_temp();
  const auto cur = current();
  if (cur) {
    // The served version defines what fits the running encoder and LLM.
    projector_shape cs;
    try {
      cs = check_projector_file(path_of(*cur));
    } catch (const registry_error&) {
      cs = projector_shape{};  // a broken current does not block publishing a good one
    }
    if (cs.stack > 0 && (cs.stack != shape.stack || cs.d_in != shape.d_in || cs.d_out != shape.d_out))
      fail("encoder registry: " + projector_path + " has shape " + shape.to_string() + " but the current version " +
           *cur + " has " + cs.to_string() + " (stack, d_in and d_out must match the encoder and LLM)");
  }
  long next = 0;
  for (const auto& e : fs::directory_iterator(versions, ec)) next = std::max(next, version_number(e.path().filename().string()));
  char name_buf[32];
  std::snprintf(name_buf, sizeof name_buf, "v%04ld", next + 1);
  const std::string name = name_buf;

  nlohmann::json m = meta.is_object() ? meta : nlohmann::json::object();
  const std::time_t t = std::time(nullptr);
  m["version"] = name;
  if (!m.contains("parent")) m["parent"] = cur ? nlohmann::json(*cur) : nlohmann::json(nullptr);
  m["created"] = now_iso(t);
  m["created_unix"] = int64_t(t);
  if (!m.contains("source")) m["source"] = fs::absolute(projector_path).string();
  if (!m.contains("metrics")) m["metrics"] = nlohmann::json::object();
  m["files"] = files;
  m["projector"] = {{"stack", shape.stack}, {"d_in", shape.d_in}, {"d_hidden", shape.d_hidden},
                    {"d_out", shape.d_out}, {"dtype", shape.dtype}};
  write_synced((tmp / k_meta).string(), m.dump(2) + "\n");
  fsync_path(tmp.string(), true);

  const fs::path final_dir = versions / name;
  if (::rename(tmp.c_str(), final_dir.c_str()) != 0)
    fail(sys_err("encoder registry: cannot rename " + tmp.string() + " to " + final_dir.string()));
  rm.armed = false;
  fsync_path(versions.string(), true);

  if (make_current) replace_atomically((fs::path(dir_) / "current").string(), name + "\n");
  append_history(dir_, {{"event", "publish"}, {"version", name}, {"time", now_iso(t)}, {"unix", now_unix()},
                        {"current", make_current}, {"previous", cur ? nlohmann::json(*cur) : nlohmann::json(nullptr)}});
  return name;
}

void encoder_registry::set_current(const std::string& version, const std::string& event) {
  verify(version);
  dir_lock lock(dir_);
  const auto cur = current();
  if (cur && *cur == version) return;
  replace_atomically((fs::path(dir_) / "current").string(), version + "\n");
  append_history(dir_, {{"event", event}, {"version", version}, {"time", now_iso(std::time(nullptr))},
                        {"unix", now_unix()}, {"current", true},
                        {"previous", cur ? nlohmann::json(*cur) : nlohmann::json(nullptr)}});
}

std::optional<std::string> encoder_registry::rollback_target() const {
  // The stack of versions made current: every change pushes, an undo
  // (rollback without a target) pops.
  std::vector<std::string> stack;
  for (const auto& ev : history()) {
    if (!ev.value("current", false)) continue;
    const std::string v = ev.value("version", std::string());
    if (ev.value("event", std::string()) == "rollback" && ev.value("undo", false)) {
      if (!stack.empty()) stack.pop_back();
      if (stack.empty() || stack.back() != v) stack.push_back(v);
    } else {
      stack.push_back(v);
    }
  }
  const auto cur = current();
  while (!stack.empty() && cur && stack.back() == *cur) stack.pop_back();
  if (stack.empty()) return std::nullopt;
  return stack.back();
}

std::string encoder_registry::rollback(const std::string& to) {
  std::string target = to;
  if (target.empty()) {
    auto t = rollback_target();
    if (!t) fail("encoder registry " + dir_ + ": nothing to roll back to (no earlier current version in history.jsonl)");
    target = *t;
  }
  verify(target);
  dir_lock lock(dir_);
  const auto cur = current();
  replace_atomically((fs::path(dir_) / "current").string(), target + "\n");
  append_history(dir_, {{"event", "rollback"}, {"version", target}, {"time", now_iso(std::time(nullptr))},
                        {"unix", now_unix()}, {"current", true}, {"undo", to.empty()},
                        {"previous", cur ? nlohmann::json(*cur) : nlohmann::json(nullptr)}});
  return target;
}

std::vector<version_info> encoder_registry::list() const {
  std::vector<version_info> out;
  const fs::path versions = fs::path(dir_) / "versions";
  std::error_code ec;
  if (!fs::is_directory(versions, ec)) return out;
  const auto cur = current();
  for (const auto& e : fs::directory_iterator(versions, ec)) {
    const std::string n = e.path().filename().string();
    if (!e.is_directory() || !valid_name(n)) continue;  // .tmp-* and stray files
    version_info v;
    v.name = n;
    v.dir = e.path().string();
    v.current = cur && *cur == n;
    try {
      v.meta = meta_of(n);
    } catch (const std::exception& ex) {
      v.ok = false;
      v.error = ex.what();
    }
    out.push_back(std::move(v));
  }
  std::sort(out.begin(), out.end(), [](const version_info& a, const version_info& b) { return a.name < b.name; });
  return out;
}

std::vector<nlohmann::json> encoder_registry::history() const {
  std::vector<nlohmann::json> out;
  std::ifstream f(fs::path(dir_) / "history.jsonl");
  std::string line;
  while (std::getline(f, line)) {
    if (line.empty()) continue;
    try {
      auto j = nlohmann::json::parse(line);
      if (j.is_object()) out.push_back(std::move(j));
    } catch (const nlohmann::json::exception&) {
      // a torn line from a crash: skipped (documented)
    }
  }
  return out;
}

size_t encoder_registry::clean_temp() {
  const fs::path versions = fs::path(dir_) / "versions";
  std::error_code ec;
  size_t n = 0;
  if (!fs::is_directory(versions, ec)) return 0;
  std::vector<fs::path> dead;
  for (const auto& e : fs::directory_iterator(versions, ec)) {
    const std::string name = e.path().filename().string();
    if (name.rfind(k_tmp_prefix, 0) != 0) continue;
    long pid = 0;
    try {
      pid = std::stol(name.substr(std::strlen(k_tmp_prefix)));
    } catch (const std::exception&) {
    }
    // A running process's publish (this one's included) is still copying.
    if (!process_alive(pid)) dead.push_back(e.path());
  }
  for (const auto& p : dead) {
    fs::remove_all(p, ec);
    if (!ec) ++n;
  }
  return n;
}

}  // namespace undertone::models
