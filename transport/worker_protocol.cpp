// The msgpack codec of the worker frames (docs/protocol.md, "Worker frames").
#include "transport/worker_protocol.hpp"

#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>

#include <msgpack.hpp>

namespace undertone::transport {

namespace {

#if defined(__BYTE_ORDER__) && (__BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__)
#error "transport/worker_protocol.cpp assumes a little-endian host (rows are f32le on the wire)"
#endif

using packer = msgpack::packer<msgpack::sbuffer>;

[[noreturn]] void fail(error_code c, const std::string& what) { throw protocol_error(c, what); }

/// Starts a header map of `n` fields besides "v" and "t".
void begin(packer& p, const char* type, uint32_t n) {
  p.pack_map(n + 2);
  p.pack("v");
  p.pack(worker_protocol_version);
  p.pack("t");
  p.pack(type);
}
template <class T>
void kv(packer& p, const char* key, const T& v) {
  p.pack(key);
  p.pack(v);
}
std::string done(const msgpack::sbuffer& b) { return std::string(b.data(), b.size()); }

struct encoder {
  msgpack::sbuffer buf;
  packer p{buf};

  std::vector<std::string> operator()(const worker_hello& m) {
    // "token" is optional (absent when empty), so a worker without one still
    // speaks version 1 to a server without authentication.
    begin(p, "hello", m.token.empty() ? 5 : 6);
    kv(p, "name", m.name);
    kv(p, "llm", m.llm_version);
    kv(p, "template", m.chat_template);
    kv(p, "d_model", m.d_model);
    kv(p, "slots", m.max_slots);
    if (!m.token.empty()) kv(p, "token", m.token);
    return {done(buf)};
  }
  std::vector<std::string> operator()(const worker_welcome& m) {
    begin(p, "welcome", 1);
    kv(p, "server", m.server);
    return {done(buf)};
  }
  std::vector<std::string> operator()(const worker_refused& m) {
    begin(p, "refused", 1);
    kv(p, "msg", m.message);
    return {done(buf)};
  }
  std::vector<std::string> operator()(const worker_reset& m) {
    begin(p, "reset", 1);
    kv(p, "msg", m.message);
    return {done(buf)};
  }
  std::vector<std::string> operator()(const worker_heartbeat&) {
    begin(p, "heartbeat", 0);
    return {done(buf)};
  }
  std::vector<std::string> operator()(const worker_bye& m) {
    begin(p, "bye", 1);
    kv(p, "reason", m.reason);
    return {done(buf)};
  }
  std::vector<std::string> operator()(const actors::llm_open& m) {
    begin(p, "llm_open", 1);
    kv(p, "id", m.id);
    return {done(buf)};
  }
  std::vector<std::string> operator()(const actors::llm_append& m) {
    begin(p, "llm_append", 3);
    kv(p, "id", m.id);
    kv(p, "text", m.text);
    kv(p, "n", m.n_rows);
    if (m.n_rows <= 0) return {done(buf)};
    std::string rows(m.rows.size() * sizeof(float), '\0');
    if (!m.rows.empty()) std::memcpy(rows.data(), m.rows.data(), rows.size());
    return {done(buf), std::move(rows)};
  }
  std::vector<std::string> operator()(const actors::llm_generate& m) {
    begin(p, "llm_generate", 4);
    kv(p, "id", m.id);
    kv(p, "turn", m.turn);
    p.pack("sampling");
    p.pack_map(6);
    kv(p, "temperature", m.sampling.temperature);
    kv(p, "top_k", m.sampling.top_k);
    kv(p, "top_p", m.sampling.top_p);
    kv(p, "repetition_penalty", m.sampling.repetition_penalty);
    kv(p, "seed", m.sampling.seed);
    kv(p, "max_tokens", m.sampling.max_tokens);
    kv(p, "stop", m.stop_strings);
    return {done(buf)};
  }
  std::vector<std::string> operator()(const actors::llm_cancel& m) {
    begin(p, "llm_cancel", 2);
    kv(p, "id", m.id);
    kv(p, "keep", m.keep_answer);
    return {done(buf)};
  }
  std::vector<std::string> operator()(const actors::llm_truncate& m) {
    begin(p, "llm_truncate", 2);
    kv(p, "id", m.id);
    kv(p, "n", m.n_rows);
    return {done(buf)};
  }
  std::vector<std::string> operator()(const actors::llm_mark& m) {
    begin(p, "llm_mark", 2);
    kv(p, "id", m.id);
    kv(p, "mark", m.mark);
    return {done(buf)};
  }
  std::vector<std::string> operator()(const actors::llm_rewind& m) {
    begin(p, "llm_rewind", 2);
    kv(p, "id", m.id);
    kv(p, "mark", m.mark);
    return {done(buf)};
  }
  std::vector<std::string> operator()(const actors::llm_close& m) {
    begin(p, "llm_close", 1);
    kv(p, "id", m.id);
    return {done(buf)};
  }
  std::vector<std::string> operator()(const actors::llm_delta& m) {
    begin(p, "llm_delta", 3);
    kv(p, "id", m.id);
    kv(p, "turn", m.turn);
    kv(p, "text", m.text);
    return {done(buf)};
  }
  std::vector<std::string> operator()(const actors::llm_done& m) {
    begin(p, "llm_done", 9);
    kv(p, "id", m.id);
    kv(p, "turn", m.turn);
    kv(p, "text", m.text);
    kv(p, "stop", m.stop_reason);
    kv(p, "tokens", m.tokens);
    kv(p, "context_rows", m.context_rows);
    kv(p, "prefill_ms", m.prefill_ms);
    kv(p, "decode_ms", m.decode_ms);
    kv(p, "llm", m.llm_version);
    return {done(buf)};
  }
  std::vector<std::string> operator()(const actors::llm_failed& m) {
    begin(p, "llm_failed", 4);
    kv(p, "id", m.id);
    kv(p, "turn", m.turn);
    kv(p, "code", uint32_t(m.code));
    kv(p, "msg", m.message);
    return {done(buf)};
  }
};

/// A msgpack map, keys looked up by name; every accessor checks the type.
class reader {
 public:
  reader(const msgpack::object& map, std::string what) : what_(std::move(what)) {
    if (map.type != msgpack::type::MAP) fail(error_code::bad_frame, what_ + " is not a msgpack map");
    map_ = &map.via.map;
    for (uint32_t i = 0; i < map_->size; ++i)
      if (map_->ptr[i].key.type != msgpack::type::STR) fail(error_code::bad_frame, what_ + ": a key is not a string");
  }
  const msgpack::object* find(std::string_view key) const {
    for (uint32_t i = 0; i < map_->size; ++i) {
      const auto& k = map_->ptr[i].key;
      if (std::string_view(k.via.str.ptr, k.via.str.size) == key) return &map_->ptr[i].val;
    }
    return nullptr;
  }
  const msgpack::object& need(const char* key) const {
    const auto* o = find(key);
    if (!o) fail(error_code::bad_frame, what_ + ": missing key '" + key + "'");
    return *o;
  }
  std::string str(const char* key) const {
    const auto& o = need(key);
    if (o.type != msgpack::type::STR) wrong(key, "a string");
    return std::string(o.via.str.ptr, o.via.str.size);
  }
  template <class Int>
  Int integer(const char* key) const {
    const auto& o = need(key);
    if (o.type == msgpack::type::POSITIVE_INTEGER) {
      if (o.via.u64 > uint64_t(std::numeric_limits<Int>::max())) wrong(key, "an integer in range");
      return Int(o.via.u64);
    }
    if (o.type == msgpack::type::NEGATIVE_INTEGER) {
      if constexpr (std::is_signed_v<Int>) {
        if (o.via.i64 >= int64_t(std::numeric_limits<Int>::min())) return Int(o.via.i64);
      }
      wrong(key, "an integer in range");
    }
    wrong(key, "an integer");
  }
  double real(const char* key) const {
    const auto& o = need(key);
    double v = 0;
    if (o.type == msgpack::type::FLOAT32 || o.type == msgpack::type::FLOAT64) v = o.via.f64;
    else if (o.type == msgpack::type::POSITIVE_INTEGER) v = double(o.via.u64);
    else if (o.type == msgpack::type::NEGATIVE_INTEGER) v = double(o.via.i64);
    else wrong(key, "a number");
    if (!std::isfinite(v)) wrong(key, "a finite number");
    return v;
  }
  bool boolean(const char* key) const {
    const auto& o = need(key);
    if (o.type != msgpack::type::BOOLEAN) wrong(key, "a boolean");
    return o.via.boolean;
  }
  std::vector<std::string> strings(const char* key) const {
    const auto& o = need(key);
    if (o.type != msgpack::type::ARRAY) wrong(key, "an array of strings");
    std::vector<std::string> out;
    for (uint32_t i = 0; i < o.via.array.size; ++i) {
      const auto& e = o.via.array.ptr[i];
      if (e.type != msgpack::type::STR) wrong(key, "an array of strings");
      out.emplace_back(e.via.str.ptr, e.via.str.size);
    }
    return out;
  }
  reader map(const char* key) const { return reader(need(key), what_ + "." + key); }

 private:
  [[noreturn]] void wrong(const char* key, const char* want) const {
    fail(error_code::bad_frame, what_ + ": key '" + key + "' must be " + want);
  }
  std::string what_;
  const msgpack::object_map* map_ = nullptr;
};

void expect_parts(const std::vector<std::string_view>& parts, size_t n, const std::string& type) {
  if (parts.size() != n)
    fail(error_code::bad_frame, type + " frame must have " + std::to_string(n) + " part(s), got " +
                                    std::to_string(parts.size()));
}

}  // namespace

std::vector<std::string> encode_worker(const worker_frame& m) {
  return std::visit([](const auto& x) { return encoder{}(x); }, m);
}

worker_frame decode_worker(const std::vector<std::string_view>& parts, size_t max_frame_bytes) {
  if (parts.empty()) fail(error_code::bad_frame, "empty frame");
  size_t total = 0;
  for (auto p : parts) total += p.size();
  if (total > max_frame_bytes)
    fail(error_code::frame_too_large,
         "frame of " + std::to_string(total) + " bytes exceeds the limit of " + std::to_string(max_frame_bytes));
  const auto h = parts[0];
  if (h.empty()) fail(error_code::bad_frame, "empty header");
  if (h.size() > (1u << 20)) fail(error_code::frame_too_large, "header over 1 MiB");
  msgpack::object_handle oh;
  try {
    // Bounds keep a hostile header from claiming a huge element table.
    const msgpack::unpack_limit limits(/*array*/ 4096, /*map*/ 256, /*str*/ h.size(), /*bin*/ h.size(),
                                       /*ext*/ h.size(), /*depth*/ 8);
    size_t off = 0;
    bool referenced = false;
    oh = msgpack::unpack(h.data(), h.size(), off, referenced, nullptr, nullptr, limits);
    if (off != h.size()) fail(error_code::bad_frame, "trailing bytes after the msgpack header");
  } catch (const protocol_error&) {
    throw;
  } catch (const std::exception& e) {
    fail(error_code::bad_frame, std::string("header is not valid msgpack (") + e.what() + ")");
  }
  const reader top(oh.get(), "worker frame header");
  if (!top.find("v")) fail(error_code::bad_frame, "header has no version key 'v'");
  const auto ver = top.integer<uint32_t>("v");
  if (ver != worker_protocol_version)
    fail(error_code::unsupported_version, "worker protocol version " + std::to_string(ver) +
                                              " is not supported (this build speaks " +
                                              std::to_string(worker_protocol_version) + ")");
  const std::string t = top.str("t");
  const reader r(oh.get(), t + " frame");
  if (t != "llm_append") expect_parts(parts, 1, t);  // llm_append: 1 or 2, checked below

  if (t == "hello") {
    worker_hello m;
    m.version = ver;
    m.name = r.str("name");
    m.llm_version = r.str("llm");
    m.chat_template = r.str("template");
    m.d_model = r.integer<int64_t>("d_model");
    m.max_slots = r.integer<int64_t>("slots");
    if (r.find("token")) m.token = r.str("token");
    return m;
  }
  if (t == "welcome") return worker_welcome{r.str("server")};
  if (t == "refused") return worker_refused{r.str("msg")};
  if (t == "reset") return worker_reset{r.str("msg")};
  if (t == "heartbeat") return worker_heartbeat{};
  if (t == "bye") return worker_bye{r.str("reason")};
  if (t == "llm_open") return actors::llm_open{r.integer<uint64_t>("id"), {}};
  if (t == "llm_append") {
    actors::llm_append m;
    m.id = r.integer<uint64_t>("id");
    m.text = r.str("text");
    m.n_rows = r.integer<int64_t>("n");
    if (m.n_rows < 0) fail(error_code::bad_frame, "llm_append frame: 'n' must be >= 0");
    if (m.n_rows == 0) {
      expect_parts(parts, 1, t);
      return m;
    }
    expect_parts(parts, 2, t);
    if (!m.text.empty()) fail(error_code::bad_frame, "llm_append frame: both text and rows");
    const auto rows = parts[1];
    if (rows.empty() || rows.size() % (sizeof(float) * size_t(m.n_rows)) != 0)
      fail(error_code::bad_frame, "llm_append frame: " + std::to_string(rows.size()) + " row bytes are not " +
                                      std::to_string(m.n_rows) + " rows of float32");
    m.rows.resize(rows.size() / sizeof(float));
    std::memcpy(m.rows.data(), rows.data(), rows.size());
    return m;
  }
  if (t == "llm_generate") {
    actors::llm_generate m;
    m.id = r.integer<uint64_t>("id");
    m.turn = r.integer<int64_t>("turn");
    const reader s = r.map("sampling");
    m.sampling.temperature = s.real("temperature");
    m.sampling.top_k = s.integer<int64_t>("top_k");
    m.sampling.top_p = s.real("top_p");
    m.sampling.repetition_penalty = s.real("repetition_penalty");
    m.sampling.seed = s.integer<uint64_t>("seed");
    m.sampling.max_tokens = s.integer<int64_t>("max_tokens");
    m.stop_strings = r.strings("stop");
    return m;
  }
  if (t == "llm_cancel") return actors::llm_cancel{r.integer<uint64_t>("id"), r.boolean("keep")};
  if (t == "llm_truncate") return actors::llm_truncate{r.integer<uint64_t>("id"), r.integer<int64_t>("n")};
  if (t == "llm_mark") return actors::llm_mark{r.integer<uint64_t>("id"), r.integer<int32_t>("mark")};
  if (t == "llm_rewind") return actors::llm_rewind{r.integer<uint64_t>("id"), r.integer<int32_t>("mark")};
  if (t == "llm_close") return actors::llm_close{r.integer<uint64_t>("id")};
  if (t == "llm_delta") return actors::llm_delta{r.integer<uint64_t>("id"), r.integer<int64_t>("turn"), r.str("text")};
  if (t == "llm_done") {
    actors::llm_done m;
    m.id = r.integer<uint64_t>("id");
    m.turn = r.integer<int64_t>("turn");
    m.text = r.str("text");
    m.stop_reason = r.str("stop");
    m.tokens = r.integer<int64_t>("tokens");
    m.context_rows = r.integer<int64_t>("context_rows");
    m.prefill_ms = r.real("prefill_ms");
    m.decode_ms = r.real("decode_ms");
    m.llm_version = r.str("llm");
    return m;
  }
  if (t == "llm_failed") {
    actors::llm_failed m;
    m.id = r.integer<uint64_t>("id");
    m.turn = r.integer<int64_t>("turn");
    m.code = error_code(r.integer<uint16_t>("code"));
    m.message = r.str("msg");
    return m;
  }
  fail(error_code::unknown_type, "unknown worker frame type '" + t + "'");
}

const char* worker_type_name(const worker_frame& m) {
  static const char* const names[] = {"hello",        "welcome",    "refused",    "reset",      "heartbeat",
                                      "bye",          "llm_open",   "llm_append", "llm_generate", "llm_cancel",
                                      "llm_truncate", "llm_mark",   "llm_rewind", "llm_close",  "llm_delta",
                                      "llm_done",     "llm_failed"};
  static_assert(std::size(names) == std::variant_size_v<worker_frame>);
  return names[m.index()];
}

}  // namespace undertone::transport
