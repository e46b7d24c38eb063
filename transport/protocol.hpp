// The client <-> server wire protocol (version transport::protocol_version),
// specified in docs/protocol.md. LibTorch- and ZeroMQ-free: a frame is a list
// of byte strings (ZeroMQ message parts), and the ROUTER's routing id is
// handled by the socket code. It shares error_code and turn_timings with the
// engine through actors/messages.hpp, so it needs CAF's headers.
//
// Every frame = part 0: a msgpack map (the header; key "v" = protocol version,
// key "t" = type name), and for audio exactly one more part: raw PCM
// (s16le or f32le, interleaved). Unknown header keys are ignored (forward
// compatible); missing or mistyped required keys are errors.
//
// Thread safety: everything here is a pure function of its arguments.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

#include "actors/messages.hpp"
#include "transport/wire.hpp"

namespace undertone::transport {

using actors::error_code;

/// Thrown by decode_*(): the frame is rejected with an error frame carrying `code`.
class protocol_error : public std::runtime_error {
 public:
  protocol_error(error_code c, const std::string& what) : std::runtime_error(what), code(c) {}
  error_code code;
};

struct frame_limits {
  size_t max_frame_bytes = 1 << 20;   ///< header + payload
  size_t max_header_bytes = 64 << 10;
};

enum class pcm_format : uint8_t { s16le, f32le };

/// Accepted audio header values (anything else is bad_frame).
inline constexpr int32_t min_sample_rate = 1000;    ///< Hz
inline constexpr int32_t max_sample_rate = 384000;  ///< Hz
inline constexpr int32_t max_channels = 32;

/// "bad_frame", "server_full", ...: the wire name of an error code (the
/// `name` key of error frames). Same spelling as actors::to_string, but
/// defined here so light clients need not link the actors library.
const char* error_name(error_code c);

// ------------------------------------------------------ client -> server ----
struct hello_msg { uint32_t version = protocol_version; std::string client; std::string token; };
/// Only the fields present are changed (optional = keep the session's value).
struct config_msg {
  std::optional<std::string> system_prompt;
  std::optional<double> temperature, top_p, repetition_penalty;
  std::optional<int64_t> top_k, max_tokens;
  std::optional<uint64_t> seed;
  std::optional<bool> vad, log;
  std::optional<double> vad_threshold_db;
  std::optional<int32_t> trailing_silence_ms, min_speech_ms, max_turn_ms;
};
struct audio_msg {
  uint64_t seq = 0;
  pcm_format format = pcm_format::s16le;
  int32_t sample_rate = 16000;
  int32_t channels = 1;
  std::string pcm;   ///< raw bytes (frames * channels * sample size)
  /// Samples as float [-1, 1]; throws protocol_error(bad_frame) for NaN/Inf
  /// or a byte count that is not a whole number of frames.
  std::vector<float> to_float() const;
};
/// An audio frame from `n` interleaved samples (n = frames * channels).
/// Float samples are clamped to [-1, 1) for s16le (NaN/Inf become 0); f32le
/// keeps them as they are.
audio_msg make_audio(uint64_t seq, const float* samples, size_t n, int32_t sample_rate, int32_t channels,
                     pcm_format format = pcm_format::s16le);
audio_msg make_audio(uint64_t seq, const int16_t* samples, size_t n, int32_t sample_rate, int32_t channels);
struct end_turn_msg { uint64_t seq = 0; };       ///< seq = number of audio chunks sent in total
struct text_msg { std::string text; };
struct cancel_msg {};
struct annotate_msg { int64_t turn = -1; std::string transcript; std::string emotion; };
struct bye_msg {};
using client_message =
    std::variant<hello_msg, config_msg, audio_msg, end_turn_msg, text_msg, cancel_msg, annotate_msg, bye_msg>;

// ------------------------------------------------------ server -> client ----
struct welcome_msg { uint32_t version = protocol_version; uint64_t session = 0; std::string models; };
struct delta_msg { int64_t turn = 0; std::string text; };
struct turn_end_msg {
  int64_t turn = 0;
  std::string text;
  std::string stop_reason;
  actors::turn_timings timings;
  std::string llm_version, encoder_version;
};
struct event_msg { int64_t turn = 0; std::string name; std::string label; double value = 0; };
struct error_msg { error_code code = error_code::internal; std::string message; bool fatal = false; };
using server_message = std::variant<welcome_msg, delta_msg, turn_end_msg, event_msg, error_msg>;

/// Frame parts for a message (audio: header + PCM; others: header only).
std::vector<std::string> encode(const client_message& m);
std::vector<std::string> encode(const server_message& m);

/// Parse a frame; throws protocol_error with the code to send back:
/// frame_too_large, bad_frame (not msgpack, wrong types, missing keys, wrong part
/// count), unsupported_version, unknown_type.
client_message decode_client(const std::vector<std::string_view>& parts, const frame_limits& lim = {});
server_message decode_server(const std::vector<std::string_view>& parts, const frame_limits& lim = {});

/// "hello", "audio", ... for logs and errors.
const char* type_name(const client_message& m);
const char* type_name(const server_message& m);

}  // namespace undertone::transport
