// The blocking DEALER client (transport/client.hpp).
#include "transport/client.hpp"

#include <algorithm>
#include <cerrno>

#include <zmq.hpp>
#include <zmq_addon.hpp>

namespace undertone::transport {

client::client(zmq::context_t* ctx) {
  if (ctx) {
    ctx_ = ctx;
  } else {
    own_ctx_ = std::make_unique<zmq::context_t>(1);
    ctx_ = own_ctx_.get();
  }
}

client::~client() {
  try {
    bye();
  } catch (...) {
    // Destructors do not throw; the socket is closed below either way.
  }
  close_socket();
}

void client::close_socket() {
  if (sock_) {
    sock_->close();
    sock_.reset();
  }
  connected_ = false;
}

welcome_msg client::connect(const std::string& endpoint, const std::string& name, std::chrono::milliseconds timeout,
                            const std::string& token) {
  close_socket();
  sock_ = std::make_unique<zmq::socket_t>(*ctx_, zmq::socket_type::dealer);
  // A short linger so a final bye still leaves; a send timeout so a dead
  // server (queue full) surfaces as an error instead of a hang.
  sock_->set(zmq::sockopt::linger, 500);
  sock_->set(zmq::sockopt::sndtimeo, 5000);
  try {
    sock_->connect(endpoint);
  } catch (const zmq::error_t& e) {
    close_socket();
    throw client_error(error_code::none, "cannot connect to " + endpoint + ": " + e.what());
  }
  seq_ = 0;
  session_ = 0;
  hello_msg h;
  h.client = name;
  h.token = token;
  send(h);
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  for (;;) {
    const auto left =
        std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
    std::optional<server_message> m;
    if (left.count() > 0) m = receive(left);
    if (!m) {
      close_socket();
      throw client_error(error_code::none, "no undertone server answered at " + endpoint + " within " +
                                               std::to_string(timeout.count()) +
                                               " ms (is `undertone serve` running there?)");
    }
    if (auto* w = std::get_if<welcome_msg>(&*m)) {
      connected_ = true;
      session_ = w->session;
      return *w;
    }
    if (auto* e = std::get_if<error_msg>(&*m)) {
      close_socket();
      throw client_error(e->code, std::string("server refused the session: ") + error_name(e->code) + ": " +
                                      e->message);
    }
    // Anything else before the welcome is stale (a previous session): skip it.
  }
}

void client::require_connected(const char* what) const {
  if (!sock_ || !connected_)
    throw client_error(error_code::no_session, std::string(what) + ": not connected (call connect() first)");
}

void client::send_raw(const std::vector<std::string>& parts) {
  if (!sock_) throw client_error(error_code::no_session, "send_raw: no socket (call connect() first)");
  for (size_t i = 0; i < parts.size(); ++i) {
    const auto sent =
        sock_->send(zmq::buffer(parts[i]), i + 1 < parts.size() ? zmq::send_flags::sndmore : zmq::send_flags::none);
    if (!sent) {
      close_socket();
      throw client_error(error_code::none, "the server has not accepted frames for 5 s (gone?); connection closed");
    }
  }
}

void client::send(const client_message& m) { send_raw(encode(m)); }

void client::send_config(const config_msg& m) {
  require_connected("send_config");
  send(m);
}

void client::send_audio(const float* samples, size_t n, int32_t sample_rate, int32_t channels, pcm_format format) {
  require_connected("send_audio");
  send(make_audio(seq_, samples, n, sample_rate, channels, format));
  ++seq_;
}

void client::send_audio(const int16_t* samples, size_t n, int32_t sample_rate, int32_t channels) {
  require_connected("send_audio");
  send(make_audio(seq_, samples, n, sample_rate, channels));
  ++seq_;
}

void client::end_turn() {
  require_connected("end_turn");
  send(end_turn_msg{seq_});
}

void client::send_text(const std::string& text) {
  require_connected("send_text");
  send(text_msg{text});
}

void client::cancel() {
  require_connected("cancel");
  send(cancel_msg{});
}

void client::annotate(const std::string& transcript, const std::string& emotion, int64_t turn) {
  require_connected("annotate");
  send(annotate_msg{turn, transcript, emotion});
}

void client::abandon() {
  if (sock_) sock_->set(zmq::sockopt::linger, 0);
  close_socket();
}

void client::bye() {
  if (sock_ && connected_) send(bye_msg{});
  close_socket();
}

std::optional<server_message> client::receive(std::chrono::milliseconds timeout) {
  if (!sock_) throw client_error(error_code::no_session, "receive: no socket (call connect() first)");
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  for (;;) {
    const auto left = std::max(std::chrono::milliseconds(0), std::chrono::duration_cast<std::chrono::milliseconds>(
                                                                  deadline - std::chrono::steady_clock::now()));
    zmq::pollitem_t item{sock_->handle(), 0, ZMQ_POLLIN, 0};
    try {
      if (zmq::poll(&item, 1, left) == 0) return std::nullopt;
    } catch (const zmq::error_t& e) {
      if (e.num() == EINTR) return std::nullopt;  // a signal (Ctrl-C): let the caller look at its flags
      throw;
    }
    std::vector<zmq::message_t> msgs;
    if (!zmq::recv_multipart(*sock_, std::back_inserter(msgs), zmq::recv_flags::dontwait)) return std::nullopt;
    std::vector<std::string_view> parts;
    parts.reserve(msgs.size());
    for (const auto& m : msgs) parts.emplace_back(static_cast<const char*>(m.data()), m.size());
    try {
      // Server frames are trusted more than client frames: generous limits.
      return decode_server(parts, frame_limits{size_t(64) << 20, size_t(64) << 20});
    } catch (const protocol_error& e) {
      // A frame type from a newer server: ignorable by the protocol's rules.
      if (e.code != error_code::unknown_type) throw;
    }
  }
}


turn_outcome run_turn(client& c, const turn_input& in, const std::function<void(const delta_msg&)>& on_delta) {
  using clk = std::chrono::steady_clock;
  using ms_d = std::chrono::duration<double, std::milli>;
  turn_outcome out;
  clk::time_point end_sent{};
  bool first_seen = false, fatal = false;
  auto handle = [&](const server_message& m) {
    if (auto* d = std::get_if<delta_msg>(&m)) {
      if (!first_seen && end_sent != clk::time_point{}) {
        first_seen = true;
        out.first_token_ms = ms_d(clk::now() - end_sent).count();
      }
      if (on_delta) on_delta(*d);
    } else if (auto* t = std::get_if<turn_end_msg>(&m)) {
      out.completed = true;
      out.turn = t->turn;
      out.answer = t->text;
      out.stop_reason = t->stop_reason;
      out.timings = t->timings;
      out.llm_version = t->llm_version;
      out.encoder_version = t->encoder_version;
      out.answer_ms = ms_d(clk::now() - end_sent).count();
    } else if (auto* e = std::get_if<error_msg>(&m)) {
      out.errors.push_back(*e);
      if (e->fatal) fatal = true;
    } else if (auto* ev = std::get_if<event_msg>(&m)) {
      out.events.push_back(*ev);
    }
  };
  auto pump_until = [&](clk::time_point until) {
    while (!fatal) {
      const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(until - clk::now());
      auto m = c.receive(std::max(left, std::chrono::milliseconds(0)));
      if (!m) return;
      handle(*m);
    }
  };

  if (!in.samples.empty()) {
    const size_t ch = size_t(std::max(in.channels, 1));
    const size_t piece = std::max<size_t>(1, size_t(in.sample_rate * in.chunk_ms / 1000)) * ch;
    const auto t0 = clk::now();
    const double chunk_ms = in.speed > 0 ? double(in.chunk_ms) / in.speed : 0.0;
    size_t k = 0;
    for (size_t off = 0; off < in.samples.size() && !fatal; off += piece, ++k) {
      pump_until(t0 + std::chrono::duration_cast<clk::duration>(ms_d(chunk_ms * double(k))));
      c.send_audio(in.samples.data() + off, std::min(piece, in.samples.size() - off), in.sample_rate, in.channels);
    }
    pump_until(t0 + std::chrono::duration_cast<clk::duration>(ms_d(chunk_ms * double(k))));
    if (!in.transcript.empty() || !in.emotion.empty()) c.annotate(in.transcript, in.emotion);
    if (!fatal) {
      c.end_turn();
      end_sent = clk::now();
    }
  } else {
    c.send_text(in.text);
    end_sent = clk::now();
  }
  const auto deadline = clk::now() + in.answer_timeout;
  while (!out.completed && !fatal && clk::now() < deadline) {
    if (auto m = c.receive(std::chrono::milliseconds(50))) handle(*m);
  }
  if (out.completed && in.samples.empty() && (!in.transcript.empty() || !in.emotion.empty()))
    c.annotate(in.transcript, in.emotion, out.turn);
  if (!out.completed)
    out.failure = fatal ? "the server closed the session: " + (out.errors.empty() ? std::string("?") : out.errors.back().message)
                        : "no turn_end within " + std::to_string(in.answer_timeout.count()) + " ms";
  return out;
}

}  // namespace undertone::transport
