// A small blocking client for the undertone wire protocol (docs/protocol.md):
// one DEALER socket, one session. Used by `undertone send` / `undertone talk`
// and by end-to-end tests.
//
// Thread rules: a client object is used by one thread at a time (ZeroMQ
// sockets are not thread-safe): sending and receiving from two threads at once
// needs external locking. Distinct client objects are independent and may run
// in parallel threads; they may share one zmq context (see the constructor).
//
//   transport::client c;
//   auto w = c.connect("tcp://127.0.0.1:5555", "me", std::chrono::seconds(5));
//   c.send_audio(samples.data(), samples.size(), 16000, 1);
//   c.end_turn();
//   while (auto m = c.receive(std::chrono::seconds(30)))
//     if (auto* d = std::get_if<transport::delta_msg>(&*m)) std::cout << d->text;
//     else if (std::holds_alternative<transport::turn_end_msg>(*m)) break;
#pragma once

#include <chrono>
#include <functional>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "transport/protocol.hpp"

namespace zmq {
class context_t;
class socket_t;
}  // namespace zmq

namespace undertone::transport {

/// The server refused us (error frame during connect), or no server answered.
class client_error : public std::runtime_error {
 public:
  client_error(error_code c, const std::string& what) : std::runtime_error(what), code(c) {}
  error_code code;  ///< none = timeout / transport failure
};

class client {
 public:
  /// `ctx`: a shared ZeroMQ context (must outlive the client); nullptr = own one.
  explicit client(zmq::context_t* ctx = nullptr);
  ~client();
  client(const client&) = delete;
  client& operator=(const client&) = delete;

  /// Connects, sends hello and waits for the welcome. Throws client_error with
  /// the server's code if it answers with an error frame (e.g. server_full),
  /// or with code none and a message naming the endpoint if nothing answers
  /// within `timeout`. May be called again after bye() or a failure.
  welcome_msg connect(const std::string& endpoint, const std::string& name,
                      std::chrono::milliseconds timeout = std::chrono::seconds(10),
                      const std::string& token = "");
  bool connected() const { return connected_; }
  uint64_t session() const { return session_; }

  void send_config(const config_msg& m);
  /// Sends `n` interleaved samples (n = frames * channels) as one audio frame
  /// with the next sequence number. Float samples go as s16le (half the bytes;
  /// clamped to [-1, 1)) unless `format` says f32le; int16 samples as s16le.
  void send_audio(const float* samples, size_t n, int32_t sample_rate, int32_t channels,
                  pcm_format format = pcm_format::s16le);
  void send_audio(const int16_t* samples, size_t n, int32_t sample_rate, int32_t channels);
  /// The user finished speaking (carries the number of audio chunks sent).
  void end_turn();
  void send_text(const std::string& text);
  void cancel();
  void annotate(const std::string& transcript, const std::string& emotion, int64_t turn = -1);
  /// Says goodbye and closes the socket (no wait). Safe to call twice.
  void bye();
  /// Closes the connection WITHOUT a bye (as a crashed or unplugged client
  /// would): the server only notices through server.idle_timeout_s. For tests
  /// and failure drills.
  void abandon();

  /// Next frame from the server, or nullopt after `timeout` (0 = poll) or when
  /// a signal interrupts the wait. Frames of unknown type are skipped (newer
  /// server); throws protocol_error if the server sends something undecodable.
  std::optional<server_message> receive(std::chrono::milliseconds timeout);

  /// Audio frames sent in this session so far (= the next sequence number).
  uint64_t audio_chunks_sent() const { return seq_; }

  /// Sends raw frame parts as they are (tests use this to send malformed frames).
  void send_raw(const std::vector<std::string>& parts);

 private:
  void send(const client_message& m);
  void require_connected(const char* what) const;
  void close_socket();

  std::unique_ptr<zmq::context_t> own_ctx_;
  zmq::context_t* ctx_ = nullptr;
  std::unique_ptr<zmq::socket_t> sock_;
  bool connected_ = false;
  uint64_t session_ = 0;
  uint64_t seq_ = 0;
};


/// One user turn for run_turn(): audio (samples non-empty) or text.
struct turn_input {
  std::vector<float> samples;   ///< interleaved, any rate/channels (the server resamples)
  int32_t sample_rate = 16000;
  int32_t channels = 1;
  std::string text;             ///< a text turn when `samples` is empty
  double speed = 1.0;           ///< 1 = stream at real time, 2 = twice as fast, 0 = as fast as possible
  int64_t chunk_ms = 20;        ///< audio per frame
  /// Labels stored with the turn (annotate frame; sent before end_turn for
  /// audio turns, after the answer for text turns). Empty: none sent.
  std::string transcript, emotion;
  std::chrono::milliseconds answer_timeout{120000};
};

/// The turn as the client saw it.
struct turn_outcome {
  bool completed = false;        ///< a turn_end arrived (false: timeout, see `failure`)
  int64_t turn = -1;
  std::string answer;            ///< turn_end's text (equals the concatenated deltas)
  std::string stop_reason;
  /// Client clock: end_turn (or text) sent -> first delta, ms; -1 if no delta.
  double first_token_ms = -1;
  double answer_ms = 0;          ///< end_turn sent -> turn_end, ms
  actors::turn_timings timings;  ///< the server's own measurements
  std::string llm_version, encoder_version;
  std::vector<error_msg> errors; ///< non-fatal errors/warnings during the turn
  std::vector<event_msg> events;
  std::string failure;           ///< why not completed ("" if completed)
};

/// Runs one client-ended turn on a connected client: streams the audio in
/// chunk_ms frames paced by `speed` (frames from the server are handled while
/// streaming), sends end_turn (or the text), waits for turn_end or the timeout.
/// Deltas go to `on_delta` as they arrive. A fatal error frame ends the turn
/// with completed = false. Requires a session with server VAD off (the config
/// frame's vad = false), so that the turn ends exactly where the input does.
turn_outcome run_turn(client& c, const turn_input& in,
                      const std::function<void(const delta_msg&)>& on_delta = {});

}  // namespace undertone::transport
