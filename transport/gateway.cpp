// The gateway actor and its ZeroMQ I/O thread (design in gateway.hpp).
#include "transport/gateway.hpp"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <unordered_map>

#include <caf/all.hpp>

#include "transport/auth.hpp"
#include "transport/router_loop.hpp"

namespace undertone::transport {

gateway_options gateway_options::from(const config::server_config& c) {
  gateway_options o;
  o.bind = c.bind;
  o.max_sessions = c.max_sessions;
  o.max_frame_bytes = c.max_frame_bytes;
  o.max_frames_per_second = double(c.max_frames_per_second);
  o.idle_timeout = std::chrono::milliseconds(c.idle_timeout_s * 1000);
  o.auth_token = server_auth_token(c);
  return o;
}

void apply_config(const config_msg& m, actors::session_settings& s) {
  auto bad = [](const std::string& what) { throw protocol_error(error_code::bad_config, "config: " + what); };
  auto t = s;
  if (m.system_prompt) {
    if (m.system_prompt->size() > 64 * 1024) bad("system prompt longer than 64 KiB");
    t.system_prompt = *m.system_prompt;
  }
  if (m.temperature) {
    if (*m.temperature < 0 || *m.temperature > 10) bad("temperature must be in [0, 10]");
    t.sampling.temperature = *m.temperature;
  }
  if (m.top_p) {
    if (!(*m.top_p > 0 && *m.top_p <= 1)) bad("top_p must be in (0, 1]");
    t.sampling.top_p = *m.top_p;
  }
  if (m.repetition_penalty) {
    if (!(*m.repetition_penalty > 0 && *m.repetition_penalty <= 10)) bad("repetition_penalty must be in (0, 10]");
    t.sampling.repetition_penalty = *m.repetition_penalty;
  }
  if (m.top_k) {
    if (*m.top_k < 0) bad("top_k must be >= 0 (0 = off)");
    t.sampling.top_k = *m.top_k;
  }
  if (m.max_tokens) {
    if (*m.max_tokens < 1 || *m.max_tokens > 1 << 20) bad("max_tokens must be in [1, 1048576]");
    t.sampling.max_tokens = *m.max_tokens;
  }
  if (m.seed) t.sampling.seed = *m.seed;
  if (m.vad) t.vad.enabled = *m.vad;
  if (m.log) t.log = *m.log;
  if (m.vad_threshold_db) {
    if (*m.vad_threshold_db < -120 || *m.vad_threshold_db > 0) bad("vad_threshold_db must be in [-120, 0] dBFS");
    t.vad.threshold_db = *m.vad_threshold_db;
  }
  if (m.trailing_silence_ms) {
    if (*m.trailing_silence_ms < 0 || *m.trailing_silence_ms > 60000) bad("trailing_silence_ms must be in [0, 60000]");
    t.vad.trailing_silence_ms = *m.trailing_silence_ms;
  }
  if (m.min_speech_ms) {
    if (*m.min_speech_ms < 0 || *m.min_speech_ms > 60000) bad("min_speech_ms must be in [0, 60000]");
    t.vad.min_speech_ms = *m.min_speech_ms;
  }
  if (m.max_turn_ms) {
    if (*m.max_turn_ms < 100 || *m.max_turn_ms > 600000) bad("max_turn_ms must be in [100, 600000]");
    t.vad.max_turn_ms = *m.max_turn_ms;
  }
  s = std::move(t);
}

namespace {

using frame_atom = caf::atom_constant<caf::atom("gwframe")>;    ///< I/O thread: one client frame
using oversize_atom = caf::atom_constant<caf::atom("gwbig")>;   ///< I/O thread: a frame over the limit
using sweep_atom = caf::atom_constant<caf::atom("gwsweep")>;    ///< timer: idle clients

using clock_type = std::chrono::steady_clock;

// ----------------------------------------------------------------- actor ----
struct client_state {
  bool open = false;                 ///< false: hello sent to the supervisor, no session yet
  actors::session_id id = 0;
  caf::actor session;
  std::string name;
  actors::session_settings settings;
  uint64_t next_seq = 0;             ///< expected audio seq
  bool resync = false;               ///< frames were dropped (rate limit, size): accept a forward seq jump once
  double tokens = 0;                 ///< rate-limit bucket
  clock_type::time_point refilled, last_seen, last_rate_error;
  std::vector<client_message> pending;  ///< frames that arrived before session_opened
};

struct gateway_state {
  gateway_options opt;
  caf::actor supervisor;
  std::shared_ptr<router_loop> io;
  std::unordered_map<std::string, client_state> clients;
  static inline const char* name = "gateway";

  ~gateway_state() {
    // The clients are unreachable from now on: let their sessions close.
    for (auto& [id, c] : clients)
      if (c.open && c.session) caf::anon_send(c.session, actors::client_gone{});
    if (io) io->stop();
  }
};

using gateway_actor = caf::stateful_actor<gateway_state>;

constexpr size_t max_pending_frames = 1024;

void send_to_client(gateway_actor* self, const std::string& identity, const server_message& m) {
  self->state.io->post(identity, encode(m));
}

void send_error(gateway_actor* self, const std::string& identity, error_code code, std::string message,
                bool fatal = false) {
  send_to_client(self, identity, error_msg{code, std::move(message), fatal});
}

/// Token bucket: true if the frame may pass.
bool take_token(gateway_actor* self, client_state& c, clock_type::time_point now) {
  const double rate = self->state.opt.max_frames_per_second;
  if (rate <= 0) return true;
  const double dt = std::chrono::duration<double>(now - c.refilled).count();
  c.refilled = now;
  c.tokens = std::min(rate, c.tokens + dt * rate);
  if (c.tokens < 1.0) return false;
  c.tokens -= 1.0;
  return true;
}

/// A decoded frame from a client whose session is open.
void dispatch(gateway_actor* self, const std::string& identity, client_state& c, client_message& msg) {
  auto& s = c.session;
  std::visit(
      [&](auto& m) {
        using T = std::decay_t<decltype(m)>;
        if constexpr (std::is_same_v<T, hello_msg>) {
          send_error(self, identity, error_code::bad_frame, "duplicate hello: this connection already has session " +
                                                                std::to_string(c.id));
        } else if constexpr (std::is_same_v<T, audio_msg>) {
          if (m.seq != c.next_seq) {
            const bool forward_jump = m.seq > c.next_seq;
            if (!(c.resync && forward_jump)) {
              send_error(self, identity, error_code::out_of_order,
                         "audio seq " + std::to_string(m.seq) + " but " + std::to_string(c.next_seq) +
                             " was expected: chunk dropped");
              if (forward_jump) c.next_seq = m.seq + 1;  // resynchronise on the client's numbering
              return;
            }
          }
          c.resync = false;
          c.next_seq = m.seq + 1;
          actors::client_audio a;
          a.seq = m.seq;
          a.sample_rate = m.sample_rate;
          a.channels = m.channels;
          try {
            a.samples = m.to_float();
          } catch (const protocol_error& e) {
            send_error(self, identity, e.code, e.what());
            return;
          }
          self->send(s, std::move(a));
        } else if constexpr (std::is_same_v<T, end_turn_msg>) {
          if (c.resync && m.seq >= c.next_seq) {
            c.resync = false;  // the client was already told why chunks were dropped
          } else if (m.seq != c.next_seq) {
            send_error(self, identity, error_code::out_of_order,
                       "end_turn says " + std::to_string(m.seq) + " audio chunks were sent, the server received " +
                           std::to_string(c.next_seq) + " in sequence");
          }
          c.next_seq = std::max(c.next_seq, m.seq);
          self->send(s, actors::client_end_turn{});
        } else if constexpr (std::is_same_v<T, config_msg>) {
          try {
            apply_config(m, c.settings);
          } catch (const protocol_error& e) {
            send_error(self, identity, e.code, e.what());
            return;
          }
          self->send(s, actors::client_config{c.settings});
        } else if constexpr (std::is_same_v<T, text_msg>) {
          self->send(s, actors::client_text_turn{std::move(m.text)});
        } else if constexpr (std::is_same_v<T, cancel_msg>) {
          self->send(s, actors::client_cancel{});
        } else if constexpr (std::is_same_v<T, annotate_msg>) {
          self->send(s, actors::client_annotation{m.turn, std::move(m.transcript), std::move(m.emotion)});
        } else if constexpr (std::is_same_v<T, bye_msg>) {
          // Handled by the caller (it erases the client).
        }
      },
      msg);
}

void drop_client(gateway_actor* self, const std::string& identity) {
  auto it = self->state.clients.find(identity);
  if (it == self->state.clients.end()) return;
  if (it->second.open && it->second.session) {
    self->send(it->second.session, actors::client_gone{});
    self->demonitor(it->second.session);
  }
  self->state.clients.erase(it);
}

void on_frame(gateway_actor* self, const std::string& identity, std::vector<std::string>& parts) {
  auto& st = self->state;
  const auto now = clock_type::now();
  auto it = st.clients.find(identity);
  client_state* c = it == st.clients.end() ? nullptr : &it->second;
  if (c) {
    c->last_seen = now;
    if (!take_token(self, *c, now)) {
      c->resync = true;
      if (now - c->last_rate_error >= std::chrono::seconds(1)) {
        c->last_rate_error = now;
        send_error(self, identity, error_code::rate_limited,
                   "more than " + std::to_string(int64_t(st.opt.max_frames_per_second)) +
                       " frames per second: frames dropped");
      }
      return;
    }
  }
  std::vector<std::string_view> views(parts.begin(), parts.end());
  client_message msg;
  try {
    msg = decode_client(views, frame_limits{size_t(st.opt.max_frame_bytes), 64 << 10});
  } catch (const protocol_error& e) {
    // A malformed hello from a stranger is fatal to the attempt; anything else
    // only loses that frame.
    send_error(self, identity, e.code, e.what(), /*fatal=*/false);
    return;
  }
  const bool is_hello = std::holds_alternative<hello_msg>(msg);
  const bool is_bye = std::holds_alternative<bye_msg>(msg);
  if (!c) {
    if (!is_hello) {
      if (!is_bye)
        send_error(self, identity, error_code::no_session,
                   std::string(type_name(msg)) + " before hello: say hello first");
      return;
    }
    // Before anything else, so a stranger learns nothing (not even whether the
    // server is full) and leaves no client_state behind.
    if (!st.opt.auth_token.empty() && !token_matches(st.opt.auth_token, std::get<hello_msg>(msg).token)) {
      send_error(self, identity, error_code::unauthorized,
                 std::get<hello_msg>(msg).token.empty()
                     ? "this server requires an auth token: pass --token or set UNDERTONE_AUTH_TOKEN"
                     : "wrong auth token",
                 true);
      return;
    }
    if (int64_t(st.clients.size()) >= st.opt.max_sessions) {
      send_error(self, identity, error_code::server_full,
                 "the server has " + std::to_string(st.opt.max_sessions) + " sessions; try again later", true);
      return;
    }
    if (!st.supervisor) {
      send_error(self, identity, error_code::internal, "no engine behind this gateway", true);
      return;
    }
    auto& n = st.clients[identity];
    n.name = std::get<hello_msg>(msg).client;
    n.settings = st.opt.default_settings;
    n.tokens = std::max(0.0, st.opt.max_frames_per_second - 1);
    n.refilled = n.last_seen = now;
    self->send(st.supervisor, actors::open_session{identity, n.name, n.settings});
    return;
  }
  if (is_bye) {
    drop_client(self, identity);
    return;
  }
  if (!c->open) {
    if (is_hello) {
      send_error(self, identity, error_code::bad_frame, "duplicate hello: the session is being opened");
    } else if (c->pending.size() >= max_pending_frames) {
      c->resync = true;
      send_error(self, identity, error_code::rate_limited, "too many frames before the welcome: frame dropped");
    } else {
      c->pending.push_back(std::move(msg));
    }
    return;
  }
  dispatch(self, identity, *c, msg);
}

caf::behavior gateway_behavior(gateway_actor* self, gateway_options opt, caf::actor supervisor,
                               std::shared_ptr<router_loop> io) {
  self->state.opt = std::move(opt);
  self->state.supervisor = std::move(supervisor);
  self->state.io = std::move(io);
  const auto sweep_every = std::clamp<std::chrono::milliseconds>(self->state.opt.idle_timeout / 4,
                                                                  std::chrono::milliseconds(10),
                                                                  std::chrono::milliseconds(1000));
  self->delayed_send(self, sweep_every, sweep_atom::value);
  self->set_down_handler([self](caf::down_msg& dm) {
    for (auto it = self->state.clients.begin(); it != self->state.clients.end(); ++it) {
      if (it->second.open && it->second.session && it->second.session.address() == dm.source) {
        send_error(self, it->first, error_code::internal, "the session ended unexpectedly", true);
        self->state.clients.erase(it);
        return;
      }
    }
  });
  return {
      [self](frame_atom, std::string& identity, std::vector<std::string>& parts) {
        self->state.io->consumed();
        on_frame(self, identity, parts);
      },
      [self](oversize_atom, std::string& identity, uint64_t bytes) {
        self->state.io->consumed();
        auto it = self->state.clients.find(identity);
        if (it != self->state.clients.end()) {
          it->second.last_seen = clock_type::now();
          it->second.resync = true;
        }
        send_error(self, identity, error_code::frame_too_large,
                   "frame of " + std::to_string(bytes) + " bytes exceeds the limit of " +
                       std::to_string(self->state.opt.max_frame_bytes) + ": dropped");
      },
      [self, sweep_every](sweep_atom) {
        const auto now = clock_type::now();
        std::vector<std::string> idle;
        for (auto& [identity, c] : self->state.clients)
          if (now - c.last_seen > self->state.opt.idle_timeout) idle.push_back(identity);
        for (const auto& identity : idle) {
          send_error(self, identity, error_code::no_session, "idle timeout: the session was closed", true);
          drop_client(self, identity);
        }
        self->delayed_send(self, sweep_every, sweep_atom::value);
      },
      [self](actors::session_opened& m) {
        auto it = self->state.clients.find(m.client_identity);
        if (it == self->state.clients.end() || it->second.open) {
          // The client left (bye, idle) while its session was being opened.
          const bool duplicate = it != self->state.clients.end() && it->second.session == m.session;
          if (m.session && !duplicate) self->send(m.session, actors::client_gone{});
          return;
        }
        auto& c = it->second;
        c.open = true;
        c.id = m.id;
        c.session = m.session;
        if (!c.session) {
          send_error(self, m.client_identity, error_code::internal, "the engine opened no session", true);
          self->state.clients.erase(it);
          return;
        }
        self->monitor(c.session);
        send_to_client(self, m.client_identity, welcome_msg{protocol_version, m.id, m.models});
        auto pending = std::move(c.pending);
        c.pending.clear();
        for (auto& p : pending) dispatch(self, m.client_identity, c, p);
      },
      [self](actors::to_client_delta& m) {
        send_to_client(self, m.client_identity, delta_msg{m.turn, std::move(m.text)});
      },
      [self](actors::to_client_turn_end& m) {
        turn_end_msg t;
        t.turn = m.turn;
        t.text = std::move(m.text);
        t.stop_reason = std::move(m.stop_reason);
        t.timings = m.timings;
        t.llm_version = std::move(m.llm_version);
        t.encoder_version = std::move(m.encoder_version);
        send_to_client(self, m.client_identity, t);
      },
      [self](actors::to_client_event& m) {
        send_to_client(self, m.client_identity, event_msg{m.turn, std::move(m.name), std::move(m.label), m.value});
      },
      [self](actors::to_client_error& m) {
        send_error(self, m.client_identity, m.code, std::move(m.message), m.fatal);
        auto it = self->state.clients.find(m.client_identity);
        // A fatal answer to a hello (e.g. server_full): no session will come.
        if (m.fatal && it != self->state.clients.end() && !it->second.open) self->state.clients.erase(it);
      },
      [self](actors::session_closed& m) {
        auto it = self->state.clients.find(m.client_identity);
        if (it != self->state.clients.end() && it->second.open && it->second.id == m.id) {
          if (it->second.session) self->demonitor(it->second.session);
          self->state.clients.erase(it);
        }
      },
  };
}

}  // namespace

caf::actor spawn_gateway(caf::actor_system& sys, const gateway_options& o, caf::actor supervisor,
                         std::string* bound_endpoint) {
  if (o.max_frame_bytes <= 0) throw std::invalid_argument("gateway: max_frame_bytes must be positive");
  router_loop_options ro;
  ro.endpoint = o.bind;
  ro.name = "gateway";
  ro.config_key = "server.bind";
  ro.linger_ms = 0;
  // Hard cap far above the protocol limit: bigger messages make libzmq drop
  // the peer instead of buffering them; those up to it get frame_too_large.
  ro.max_message_bytes = int64_t(std::max<size_t>(size_t(o.max_frame_bytes) * 4, 1 << 20));
  ro.hwm = 10000;
  ro.max_frame_bytes = size_t(o.max_frame_bytes);
  // While the actor has this many frames to work through, stop reading:
  // ZeroMQ's queues then push back on the senders instead of the actor's
  // mailbox growing without bound.
  ro.max_inflight = 4096;
  auto io = std::make_shared<router_loop>(std::move(ro));
  if (bound_endpoint) *bound_endpoint = io->endpoint();
  auto gw = sys.spawn(gateway_behavior, o, std::move(supervisor), io);
  // Every incoming frame goes to the actor unparsed; all client state lives there.
  const auto target = caf::actor_cast<caf::actor_addr>(gw);
  router_loop_callbacks cb;
  cb.on_frame = [target](std::string identity, std::vector<std::string> parts) {
    if (auto hdl = caf::actor_cast<caf::actor>(target))
      caf::anon_send(hdl, frame_atom::value, std::move(identity), std::move(parts));
  };
  cb.on_oversize = [target](std::string identity, uint64_t bytes) {
    if (auto hdl = caf::actor_cast<caf::actor>(target))
      caf::anon_send(hdl, oversize_atom::value, std::move(identity), bytes);
  };
  io->start(std::move(cb));
  return gw;
}

}  // namespace undertone::transport
