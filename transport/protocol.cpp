// The msgpack codec of docs/protocol.md. Decoding is strict about what it
// needs and lenient about what it does not know (unknown keys are skipped);
// every failure becomes a protocol_error with the code the client is sent.
#include "transport/protocol.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <type_traits>

#include <msgpack.hpp>

namespace undertone::transport {

namespace {

#if defined(__BYTE_ORDER__) && (__BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__)
#error "transport/protocol.cpp assumes a little-endian host (PCM is s16le/f32le on the wire)"
#endif

[[noreturn]] void fail(error_code c, const std::string& what) { throw protocol_error(c, what); }

// ------------------------------------------------------------ encoding ----
// A header is built as a list of (key, value) writers so the map size is known
// before packing.
class header_writer {
 public:
  explicit header_writer(const char* type) : type_(type) {}
  template <class T>
  header_writer& put(const char* key, const T& v) {
    fields_.push_back([key, v](msgpack::packer<msgpack::sbuffer>& p) {
      p.pack(key);
      p.pack(v);
    });
    return *this;
  }
  template <class T>
  header_writer& put_opt(const char* key, const std::optional<T>& v) {
    if (v) put(key, *v);
    return *this;
  }
  /// A nested map of already-packed values.
  header_writer& put_raw(const char* key, std::function<void(msgpack::packer<msgpack::sbuffer>&)> f) {
    fields_.push_back([key, f = std::move(f)](msgpack::packer<msgpack::sbuffer>& p) {
      p.pack(key);
      f(p);
    });
    return *this;
  }
  std::string finish() const {
    msgpack::sbuffer buf;
    msgpack::packer<msgpack::sbuffer> p(buf);
    p.pack_map(uint32_t(fields_.size() + 2));
    p.pack("v");
    p.pack(protocol_version);
    p.pack("t");
    p.pack(type_);
    for (const auto& f : fields_) f(p);
    return std::string(buf.data(), buf.size());
  }

 private:
  const char* type_;
  std::vector<std::function<void(msgpack::packer<msgpack::sbuffer>&)>> fields_;
};

const char* format_name(pcm_format f) { return f == pcm_format::s16le ? "s16" : "f32"; }
size_t sample_bytes(pcm_format f) { return f == pcm_format::s16le ? 2 : 4; }

struct client_encoder {
  std::vector<std::string> operator()(const hello_msg& m) const {
    header_writer h("hello");
    // The version travels as "v" like in every frame; hello_msg::version only
    // matters on decode (it is what the peer sent).
    h.put("name", m.client);
    if (!m.token.empty()) h.put("token", m.token);
    return {h.finish()};
  }
  std::vector<std::string> operator()(const config_msg& m) const {
    header_writer h("config");
    h.put_opt("system", m.system_prompt)
        .put_opt("temperature", m.temperature)
        .put_opt("top_p", m.top_p)
        .put_opt("repetition_penalty", m.repetition_penalty)
        .put_opt("top_k", m.top_k)
        .put_opt("max_tokens", m.max_tokens)
        .put_opt("seed", m.seed)
        .put_opt("vad", m.vad)
        .put_opt("log", m.log)
        .put_opt("vad_threshold_db", m.vad_threshold_db)
        .put_opt("trailing_silence_ms", m.trailing_silence_ms)
        .put_opt("min_speech_ms", m.min_speech_ms)
        .put_opt("max_turn_ms", m.max_turn_ms);
    return {h.finish()};
  }
  std::vector<std::string> operator()(const audio_msg& m) const {
    header_writer h("audio");
    h.put("seq", m.seq).put("fmt", format_name(m.format)).put("sr", m.sample_rate).put("ch", m.channels);
    return {h.finish(), m.pcm};
  }
  std::vector<std::string> operator()(const end_turn_msg& m) const {
    return {header_writer("end_turn").put("seq", m.seq).finish()};
  }
  std::vector<std::string> operator()(const text_msg& m) const {
    return {header_writer("text").put("text", m.text).finish()};
  }
  std::vector<std::string> operator()(const cancel_msg&) const { return {header_writer("cancel").finish()}; }
  std::vector<std::string> operator()(const annotate_msg& m) const {
    header_writer h("annotate");
    h.put("turn", m.turn).put("transcript", m.transcript).put("emotion", m.emotion);
    return {h.finish()};
  }
  std::vector<std::string> operator()(const bye_msg&) const { return {header_writer("bye").finish()}; }
};

struct server_encoder {
  std::vector<std::string> operator()(const welcome_msg& m) const {
    return {header_writer("welcome").put("session", m.session).put("models", m.models).finish()};
  }
  std::vector<std::string> operator()(const delta_msg& m) const {
    return {header_writer("delta").put("turn", m.turn).put("text", m.text).finish()};
  }
  std::vector<std::string> operator()(const turn_end_msg& m) const {
    header_writer h("turn_end");
    h.put("turn", m.turn).put("text", m.text).put("stop", m.stop_reason);
    const auto t = m.timings;
    h.put_raw("timings", [t](msgpack::packer<msgpack::sbuffer>& p) {
      p.pack_map(9);
      p.pack("eot_ms"), p.pack(t.end_of_turn_to_first_token_ms);
      p.pack("voice_ms"), p.pack(t.last_voice_to_first_token_ms);
      p.pack("audio_ms"), p.pack(t.audio_ms);
      p.pack("encode_ms"), p.pack(t.encode_ms);
      p.pack("flush_ms"), p.pack(t.flush_ms);
      p.pack("prefill_ms"), p.pack(t.prefill_ms);
      p.pack("decode_ms"), p.pack(t.decode_ms);
      p.pack("speech_tokens"), p.pack(t.speech_tokens);
      p.pack("answer_tokens"), p.pack(t.answer_tokens);
    });
    h.put("llm", m.llm_version).put("encoder", m.encoder_version);
    return {h.finish()};
  }
  std::vector<std::string> operator()(const event_msg& m) const {
    header_writer h("event");
    h.put("turn", m.turn).put("name", m.name).put("label", m.label).put("value", m.value);
    return {h.finish()};
  }
  std::vector<std::string> operator()(const error_msg& m) const {
    header_writer h("error");
    // "name" is for humans reading a dump; decoders use "code".
    h.put("code", uint32_t(m.code)).put("name", error_name(m.code)).put("msg", m.message).put("fatal", m.fatal);
    return {h.finish()};
  }
};

// ------------------------------------------------------------ decoding ----
/// The header map, keys looked up by name; every accessor checks the type.
class header_reader {
 public:
  explicit header_reader(const msgpack::object& map, const char* type) : type_(type) {
    if (map.type != msgpack::type::MAP) fail(error_code::bad_frame, "header is not a msgpack map");
    const auto& m = map.via.map;
    for (uint32_t i = 0; i < m.size; ++i) {
      const auto& k = m.ptr[i].key;
      if (k.type != msgpack::type::STR) fail(error_code::bad_frame, "header key is not a string");
      std::string_view name(k.via.str.ptr, k.via.str.size);
      for (const auto& e : entries_)
        if (e.first == name) fail(error_code::bad_frame, "duplicate header key '" + std::string(name) + "'");
      entries_.emplace_back(name, &m.ptr[i].val);
    }
  }
  void set_type(const char* type) { type_ = type; }

  const msgpack::object* find(std::string_view key) const {
    for (const auto& e : entries_)
      if (e.first == key) return e.second;
    return nullptr;
  }
  const msgpack::object& need(const char* key) const {
    const auto* o = find(key);
    if (!o) fail(error_code::bad_frame, std::string(type_) + " frame: missing key '" + key + "'");
    return *o;
  }

  std::string str(const char* key) const { return as_str(key, need(key)); }
  std::string str_or(const char* key, std::string dflt) const {
    const auto* o = find(key);
    return o ? as_str(key, *o) : dflt;
  }
  template <class Int>
  Int integer(const char* key) const { return as_int<Int>(key, need(key)); }
  template <class Int>
  Int integer_or(const char* key, Int dflt) const {
    const auto* o = find(key);
    return o ? as_int<Int>(key, *o) : dflt;
  }
  double real(const char* key) const { return as_real(key, need(key)); }
  double real_or(const char* key, double dflt) const {
    const auto* o = find(key);
    return o ? as_real(key, *o) : dflt;
  }
  bool boolean_or(const char* key, bool dflt) const {
    const auto* o = find(key);
    return o ? as_bool(key, *o) : dflt;
  }
  template <class T>
  void opt(const char* key, std::optional<T>& out) const {
    const auto* o = find(key);
    if (!o) return;
    if constexpr (std::is_same_v<T, std::string>) out = as_str(key, *o);
    else if constexpr (std::is_same_v<T, bool>) out = as_bool(key, *o);
    else if constexpr (std::is_floating_point_v<T>) out = as_real(key, *o);
    else out = as_int<T>(key, *o);
  }

 private:
  [[noreturn]] void wrong(const char* key, const char* want) const {
    fail(error_code::bad_frame, std::string(type_) + " frame: key '" + key + "' must be " + want);
  }
  std::string as_str(const char* key, const msgpack::object& o) const {
    if (o.type != msgpack::type::STR) wrong(key, "a string");
    return std::string(o.via.str.ptr, o.via.str.size);
  }
  template <class Int>
  Int as_int(const char* key, const msgpack::object& o) const {
    static_assert(std::is_integral_v<Int> && sizeof(Int) <= 8);
    if (o.type == msgpack::type::POSITIVE_INTEGER) {
      if (o.via.u64 > uint64_t(std::numeric_limits<Int>::max())) wrong(key, "an integer in range");
      return Int(o.via.u64);
    }
    if (o.type == msgpack::type::NEGATIVE_INTEGER) {
      if constexpr (std::is_unsigned_v<Int>) {
        wrong(key, "a non-negative integer");
      } else {
        if (o.via.i64 < int64_t(std::numeric_limits<Int>::min())) wrong(key, "an integer in range");
        return Int(o.via.i64);
      }
    }
    wrong(key, std::is_unsigned_v<Int> ? "a non-negative integer" : "an integer");
  }
  double as_real(const char* key, const msgpack::object& o) const {
    double v = 0;
    // Integers are accepted where a real is expected: many encoders write 1.0 as 1.
    if (o.type == msgpack::type::FLOAT32 || o.type == msgpack::type::FLOAT64) v = o.via.f64;
    else if (o.type == msgpack::type::POSITIVE_INTEGER) v = double(o.via.u64);
    else if (o.type == msgpack::type::NEGATIVE_INTEGER) v = double(o.via.i64);
    else wrong(key, "a number");
    if (!std::isfinite(v)) wrong(key, "a finite number");
    return v;
  }
  bool as_bool(const char* key, const msgpack::object& o) const {
    if (o.type != msgpack::type::BOOLEAN) wrong(key, "a boolean");
    return o.via.boolean;
  }

  const char* type_;
  std::vector<std::pair<std::string_view, const msgpack::object*>> entries_;
};

/// Parses and checks the common part of every frame; returns the type name.
struct parsed_header {
  msgpack::object_handle handle;
  std::string type;
};

parsed_header parse_header(const std::vector<std::string_view>& parts, const frame_limits& lim) {
  if (parts.empty()) fail(error_code::bad_frame, "empty frame");
  size_t total = 0;
  for (auto p : parts) total += p.size();
  if (total > lim.max_frame_bytes)
    fail(error_code::frame_too_large,
         "frame of " + std::to_string(total) + " bytes exceeds the limit of " + std::to_string(lim.max_frame_bytes));
  const auto h = parts[0];
  if (h.size() > lim.max_header_bytes)
    fail(error_code::frame_too_large, "header of " + std::to_string(h.size()) + " bytes exceeds the limit of " +
                                          std::to_string(lim.max_header_bytes));
  if (h.empty()) fail(error_code::bad_frame, "empty header");
  parsed_header out;
  try {
    // Bounds keep a hostile 5-byte header from claiming a 4-billion-element
    // array (msgpack-c allocates the element table up front).
    const msgpack::unpack_limit limits(/*array*/ 1024, /*map*/ 256, /*str*/ h.size(), /*bin*/ h.size(),
                                       /*ext*/ h.size(), /*depth*/ 8);
    size_t off = 0;
    bool referenced = false;
    out.handle = msgpack::unpack(h.data(), h.size(), off, referenced, nullptr, nullptr, limits);
    if (off != h.size()) fail(error_code::bad_frame, "trailing bytes after the msgpack header");
  } catch (const protocol_error&) {
    throw;
  } catch (const std::exception& e) {
    fail(error_code::bad_frame, std::string("header is not valid msgpack (") + e.what() + ")");
  }
  header_reader r(out.handle.get(), "?");
  const auto* v = r.find("v");
  if (!v) fail(error_code::bad_frame, "header has no version key 'v'");
  const auto ver = r.integer<uint32_t>("v");
  if (ver != protocol_version)
    fail(error_code::unsupported_version, "protocol version " + std::to_string(ver) + " is not supported (server speaks " +
                                              std::to_string(protocol_version) + ")");
  out.type = r.str("t");
  return out;
}

void expect_parts(const std::vector<std::string_view>& parts, size_t n, const std::string& type) {
  if (parts.size() != n)
    fail(error_code::bad_frame, type + " frame must have " + std::to_string(n) + " part(s), got " +
                                    std::to_string(parts.size()));
}

template <class Int>
void check_range(const char* type, const char* key, Int v, Int lo, Int hi) {
  if (v < lo || v > hi)
    fail(error_code::bad_frame, std::string(type) + " frame: '" + key + "' = " + std::to_string(v) +
                                    " is outside [" + std::to_string(lo) + ", " + std::to_string(hi) + "]");
}

}  // namespace

// ----------------------------------------------------------------- public ----
const char* error_name(error_code c) { return actors::to_string(c); }

std::vector<float> audio_msg::to_float() const {
  const size_t sb = sample_bytes(format);
  if (channels <= 0) fail(error_code::bad_frame, "audio: channels must be positive");
  if (pcm.size() % (sb * size_t(channels)) != 0)
    fail(error_code::bad_frame, "audio: " + std::to_string(pcm.size()) + " PCM bytes are not a whole number of " +
                                    std::to_string(channels) + "-channel " + format_name(format) + " frames");
  const size_t n = pcm.size() / sb;
  std::vector<float> out(n);
  const auto* b = reinterpret_cast<const unsigned char*>(pcm.data());
  if (format == pcm_format::s16le) {
    for (size_t i = 0; i < n; ++i) {
      const auto v = int16_t(uint16_t(b[2 * i]) | uint16_t(uint16_t(b[2 * i + 1]) << 8));
      out[i] = float(v) / 32768.0f;
    }
  } else {
    std::memcpy(out.data(), pcm.data(), n * sizeof(float));
    for (size_t i = 0; i < n; ++i)
      if (!std::isfinite(out[i]))
        fail(error_code::bad_frame, "audio: sample " + std::to_string(i) + " is NaN or infinite");
  }
  return out;
}

audio_msg make_audio(uint64_t seq, const float* samples, size_t n, int32_t sample_rate, int32_t channels,
                     pcm_format format) {
  audio_msg m;
  m.seq = seq;
  m.format = format;
  m.sample_rate = sample_rate;
  m.channels = channels;
  if (format == pcm_format::f32le) {
    m.pcm.assign(reinterpret_cast<const char*>(samples), n * sizeof(float));
  } else {
    m.pcm.resize(n * 2);
    for (size_t i = 0; i < n; ++i) {
      const float x = std::isfinite(samples[i]) ? samples[i] : 0.0f;
      const auto v = int16_t(std::lround(std::clamp(x, -1.0f, 32767.0f / 32768.0f) * 32768.0f));
      m.pcm[2 * i] = char(uint16_t(v) & 0xff);
      m.pcm[2 * i + 1] = char(uint16_t(v) >> 8);
    }
  }
  return m;
}

audio_msg make_audio(uint64_t seq, const int16_t* samples, size_t n, int32_t sample_rate, int32_t channels) {
  audio_msg m;
  m.seq = seq;
  m.format = pcm_format::s16le;
  m.sample_rate = sample_rate;
  m.channels = channels;
  m.pcm.resize(n * 2);
  for (size_t i = 0; i < n; ++i) {
    m.pcm[2 * i] = char(uint16_t(samples[i]) & 0xff);
    m.pcm[2 * i + 1] = char(uint16_t(samples[i]) >> 8);
  }
  return m;
}

std::vector<std::string> encode(const client_message& m) { return std::visit(client_encoder{}, m); }
std::vector<std::string> encode(const server_message& m) { return std::visit(server_encoder{}, m); }

client_message decode_client(const std::vector<std::string_view>& parts, const frame_limits& lim) {
  auto ph = parse_header(parts, lim);
  const std::string& t = ph.type;
  header_reader r(ph.handle.get(), t.c_str());
  if (t == "audio") {
    expect_parts(parts, 2, t);
    audio_msg m;
    m.seq = r.integer<uint64_t>("seq");
    const auto fmt = r.str("fmt");
    if (fmt == "s16") m.format = pcm_format::s16le;
    else if (fmt == "f32") m.format = pcm_format::f32le;
    else fail(error_code::bad_frame, "audio frame: 'fmt' must be \"s16\" or \"f32\", got \"" + fmt + "\"");
    m.sample_rate = r.integer<int32_t>("sr");
    check_range<int32_t>("audio", "sr", m.sample_rate, min_sample_rate, max_sample_rate);
    m.channels = r.integer<int32_t>("ch");
    check_range<int32_t>("audio", "ch", m.channels, 1, max_channels);
    const size_t frame_bytes = sample_bytes(m.format) * size_t(m.channels);
    if (parts[1].size() % frame_bytes != 0)
      fail(error_code::bad_frame, "audio frame: " + std::to_string(parts[1].size()) +
                                      " PCM bytes are not a whole number of frames of " + std::to_string(frame_bytes) +
                                      " bytes");
    m.pcm.assign(parts[1].data(), parts[1].size());
    return m;
  }
  expect_parts(parts, 1, t);
  if (t == "hello") {
    hello_msg m;
    m.version = protocol_version;
    m.client = r.str_or("name", "");
    m.token = r.str_or("token", "");
    return m;
  }
  if (t == "config") {
    config_msg m;
    r.opt("system", m.system_prompt);
    r.opt("temperature", m.temperature);
    r.opt("top_p", m.top_p);
    r.opt("repetition_penalty", m.repetition_penalty);
    r.opt("top_k", m.top_k);
    r.opt("max_tokens", m.max_tokens);
    r.opt("seed", m.seed);
    r.opt("vad", m.vad);
    r.opt("log", m.log);
    r.opt("vad_threshold_db", m.vad_threshold_db);
    r.opt("trailing_silence_ms", m.trailing_silence_ms);
    r.opt("min_speech_ms", m.min_speech_ms);
    r.opt("max_turn_ms", m.max_turn_ms);
    return m;
  }
  if (t == "end_turn") return end_turn_msg{r.integer<uint64_t>("seq")};
  if (t == "text") return text_msg{r.str("text")};
  if (t == "cancel") return cancel_msg{};
  if (t == "annotate") {
    annotate_msg m;
    m.turn = r.integer_or<int64_t>("turn", -1);
    m.transcript = r.str_or("transcript", "");
    m.emotion = r.str_or("emotion", "");
    return m;
  }
  if (t == "bye") return bye_msg{};
  fail(error_code::unknown_type, "unknown client frame type \"" + t + "\"");
}

server_message decode_server(const std::vector<std::string_view>& parts, const frame_limits& lim) {
  auto ph = parse_header(parts, lim);
  const std::string& t = ph.type;
  header_reader r(ph.handle.get(), t.c_str());
  const bool known = t == "welcome" || t == "delta" || t == "turn_end" || t == "event" || t == "error";
  if (!known) fail(error_code::unknown_type, "unknown server frame type \"" + t + "\"");
  expect_parts(parts, 1, t);
  if (t == "welcome") {
    welcome_msg m;
    m.version = protocol_version;
    m.session = r.integer<uint64_t>("session");
    m.models = r.str_or("models", "");
    return m;
  }
  if (t == "delta") return delta_msg{r.integer<int64_t>("turn"), r.str("text")};
  if (t == "turn_end") {
    turn_end_msg m;
    m.turn = r.integer<int64_t>("turn");
    m.text = r.str("text");
    m.stop_reason = r.str("stop");
    if (const auto* tm = r.find("timings")) {
      header_reader tr(*tm, "turn_end timings");
      auto& x = m.timings;
      x.end_of_turn_to_first_token_ms = tr.real_or("eot_ms", -1);
      x.last_voice_to_first_token_ms = tr.real_or("voice_ms", -1);
      x.audio_ms = tr.real_or("audio_ms", 0);
      x.encode_ms = tr.real_or("encode_ms", 0);
      x.flush_ms = tr.real_or("flush_ms", -1);
      x.prefill_ms = tr.real_or("prefill_ms", 0);
      x.decode_ms = tr.real_or("decode_ms", 0);
      x.speech_tokens = tr.integer_or<int64_t>("speech_tokens", 0);
      x.answer_tokens = tr.integer_or<int64_t>("answer_tokens", 0);
    }
    m.llm_version = r.str_or("llm", "");
    m.encoder_version = r.str_or("encoder", "");
    return m;
  }
  if (t == "event") {
    event_msg m;
    m.turn = r.integer<int64_t>("turn");
    m.name = r.str("name");
    m.label = r.str_or("label", "");
    m.value = r.real_or("value", 0);
    return m;
  }
  // error
  error_msg m;
  const auto code = r.integer<uint16_t>("code");
  m.code = error_code(code);
  m.message = r.str_or("msg", "");
  m.fatal = r.boolean_or("fatal", false);
  return m;
}

const char* type_name(const client_message& m) {
  static const char* const names[] = {"hello", "config", "audio", "end_turn", "text", "cancel", "annotate", "bye"};
  return names[m.index()];
}
const char* type_name(const server_message& m) {
  static const char* const names[] = {"welcome", "delta", "turn_end", "event", "error"};
  return names[m.index()];
}

}  // namespace undertone::transport
