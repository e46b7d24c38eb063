// The worker hub (server side) and the worker link (worker side); design in
// worker_link.hpp.
#include "transport/worker_link.hpp"

#include <algorithm>
#include <atomic>
#include <deque>
#include <iostream>
#include <mutex>
#include <stdexcept>
#include <thread>
#include <unordered_map>
#include <unordered_set>

#include <caf/all.hpp>
#include <zmq.hpp>
#include <zmq_addon.hpp>

#include "transport/auth.hpp"
#include "transport/router_loop.hpp"

namespace undertone::transport {

namespace {

using clk = std::chrono::steady_clock;
using namespace std::chrono_literals;

using hub_frame_atom = caf::atom_constant<caf::atom("hubframe")>;  ///< I/O thread: one worker frame
using hub_sweep_atom = caf::atom_constant<caf::atom("hubsweep")>;  ///< timer: heartbeats, timeouts

std::function<void(const std::string&)> or_stderr(std::function<void(const std::string&)> f) {
  if (f) return f;
  return [](const std::string& s) { std::cerr << s << "\n"; };
}

std::string hex_id(const std::string& identity) {
  static const char* d = "0123456789abcdef";
  std::string out;
  for (unsigned char c : identity) {
    out += d[c >> 4];
    out += d[c & 15];
  }
  return out;
}

// =================================================================== hub ====

struct hub_worker {
  std::string identity;
  std::string name;
  int64_t slots = 0;
  int64_t opened = 0;
  std::unordered_set<actors::session_id> sessions;
  clk::time_point last_seen;
  int64_t free_slots() const { return slots - int64_t(sessions.size()); }
};

struct hub_session {
  enum class state { assigned, queued, closed, failed };
  state st = state::closed;
  caf::actor session;
  std::string worker;                ///< assigned: its identity
  std::vector<worker_frame> buffer;  ///< queued: messages since llm_open, in order
  clk::time_point queued_at;
  std::string why;                   ///< failed: the message for a later llm_generate
};

constexpr size_t max_buffered = 100000;  ///< messages of one queued session

struct hub_state {
  worker_hub_options o;
  std::shared_ptr<router_loop> io;
  std::string endpoint;
  std::vector<hub_worker> workers;  ///< live, in order of arrival
  std::unordered_map<actors::session_id, hub_session> sessions;
  std::unordered_map<caf::actor_addr, actors::session_id> by_actor;
  std::deque<actors::session_id> queue;
  worker_hub_stats counters;
  static inline const char* name = "undertone.worker_hub";

  ~hub_state() {
    if (!io) return;
    for (auto& w : workers) io->post(w.identity, encode_worker(worker_bye{"server shutting down"}));
    io->stop();
  }
};

using hub_actor = caf::stateful_actor<hub_state>;

hub_worker* find_worker(hub_state& st, const std::string& identity) {
  for (auto& w : st.workers)
    if (w.identity == identity) return &w;
  return nullptr;
}

void to_worker(hub_state& st, const std::string& identity, const worker_frame& f) {
  st.io->post(identity, encode_worker(f));
}

void log_bad(hub_state& st, const std::string& what) {
  const auto n = ++st.counters.bad_frames;
  // The first ones in full, then a sample: a flood must not flood the log.
  if (n <= 10 || n % 1000 == 0)
    st.o.log("worker hub: dropped a frame (" + what + ")" + (n == 10 ? "; further ones are sampled" : ""));
}

/// Places session `id` on the worker with the most free slots (or queues it).
void assign(hub_actor* self, actors::session_id id) {
  auto& st = self->state;
  auto& s = st.sessions[id];
  hub_worker* best = nullptr;
  for (auto& w : st.workers)
    if (w.free_slots() > 0 && (!best || w.free_slots() > best->free_slots())) best = &w;
  if (!best) {
    if (st.workers.empty()) {
      s.st = hub_session::state::queued;
      s.queued_at = clk::now();
      s.buffer.clear();
      st.queue.push_back(id);
      return;
    }
    int64_t slots = 0;
    for (auto& w : st.workers) slots += w.slots;
    s.st = hub_session::state::failed;
    s.why = "all " + std::to_string(st.workers.size()) + " LLM workers are full (" + std::to_string(slots) +
            " slots in all)";
    self->send(s.session, actors::llm_failed{id, -1, actors::error_code::server_full, s.why});
    return;
  }
  s.st = hub_session::state::assigned;
  s.worker = best->identity;
  best->sessions.insert(id);
  ++best->opened;
  to_worker(st, best->identity, actors::llm_open{id, {}});
}

/// Takes session `id` off its worker (telling the worker) or out of the queue.
void release(hub_state& st, actors::session_id id, hub_session& s) {
  if (s.st == hub_session::state::assigned) {
    if (auto* w = find_worker(st, s.worker)) {
      w->sessions.erase(id);
      to_worker(st, w->identity, actors::llm_close{id});
    }
  } else if (s.st == hub_session::state::queued) {
    st.queue.erase(std::remove(st.queue.begin(), st.queue.end(), id), st.queue.end());
    s.buffer.clear();
  }
  s.worker.clear();
  s.st = hub_session::state::closed;
}

/// Queued sessions go to workers while there are free slots.
void drain_queue(hub_actor* self) {
  auto& st = self->state;
  while (!st.queue.empty()) {
    bool room = false;
    for (auto& w : st.workers) room = room || w.free_slots() > 0;
    if (!room) return;
    const auto id = st.queue.front();
    st.queue.pop_front();
    auto it = st.sessions.find(id);
    if (it == st.sessions.end()) continue;
    auto buffered = std::move(it->second.buffer);
    it->second.buffer.clear();
    assign(self, id);
    if (it->second.st != hub_session::state::assigned) continue;
    for (auto& f : buffered) to_worker(st, it->second.worker, f);
  }
}

/// A worker is gone: its sessions are told to re-open (component_restarted).
void worker_dead(hub_actor* self, const std::string& identity, const std::string& why) {
  auto& st = self->state;
  auto it = std::find_if(st.workers.begin(), st.workers.end(), [&](auto& w) { return w.identity == identity; });
  if (it == st.workers.end()) return;
  hub_worker w = std::move(*it);
  st.workers.erase(it);
  ++st.counters.lost;
  st.o.log("worker hub: worker '" + w.name + "' lost (" + why + "); " + std::to_string(w.sessions.size()) +
           " session(s) move to " + (st.workers.empty() ? std::string("the next worker to connect")
                                                        : std::to_string(st.workers.size()) + " other worker(s)"));
  const auto hub = caf::actor_cast<caf::actor>(self);
  for (auto id : w.sessions) {
    auto s = st.sessions.find(id);
    if (s == st.sessions.end()) continue;
    s->second.st = hub_session::state::closed;
    s->second.worker.clear();
    s->second.why = "the LLM worker '" + w.name + "' was lost (" + why + ")";
    self->send(s->second.session, actors::component_restarted{"llm", hub});
  }
}

std::string check_hello(const hub_state& st, const worker_hello& h) {
  const auto& o = st.o;
  if (h.max_slots < 1) return "it offers " + std::to_string(h.max_slots) + " slots (llm.max_slots must be >= 1)";
  if (!o.llm_version.empty() && h.llm_version != o.llm_version)
    return "it runs the LLM '" + h.llm_version + "' but this server serves '" + o.llm_version +
           "' (set llm.model to the same file on the server and the worker)";
  if (!o.chat_template.empty() && h.chat_template != o.chat_template)
    return "its chat template is '" + h.chat_template + "' but the server's is '" + o.chat_template +
           "' (set llm.chat_template alike on both)";
  if (o.d_model > 0 && h.d_model != o.d_model)
    return "its LLM width is " + std::to_string(h.d_model) + " but the server's encoder makes rows of " +
           std::to_string(o.d_model);
  return {};
}

void on_hello(hub_actor* self, const std::string& identity, const worker_hello& h) {
  auto& st = self->state;
  // First, and without touching any state: a worker without the token learns
  // nothing about the server (not even its LLM) and is not admitted.
  if (!st.o.auth_token.empty() && !token_matches(st.o.auth_token, h.token)) {
    ++st.counters.refused;
    st.o.log("worker hub: refused a worker from " + hex_id(identity) + ": " +
             (h.token.empty() ? "no auth token" : "wrong auth token"));
    to_worker(st, identity,
              worker_refused{std::string("refused by the server: unauthorized: ") +
                             (h.token.empty() ? "it requires an auth token (undertone worker --token, or "
                                                "UNDERTONE_AUTH_TOKEN)"
                                              : "wrong auth token")});
    return;
  }
  if (find_worker(st, identity)) worker_dead(self, identity, "it said hello again");
  const std::string name = h.name.empty() ? hex_id(identity) : h.name;
  if (auto why = check_hello(st, h); !why.empty()) {
    ++st.counters.refused;
    st.o.log("worker hub: refused worker '" + name + "': " + why);
    to_worker(st, identity, worker_refused{"refused by the server: " + why});
    return;
  }
  hub_worker w;
  w.identity = identity;
  w.name = name;
  w.slots = h.max_slots;
  w.last_seen = clk::now();
  st.workers.push_back(std::move(w));
  ++st.counters.joined;
  to_worker(st, identity, worker_welcome{st.endpoint});
  st.o.log("worker hub: worker '" + name + "' joined (" + std::to_string(h.max_slots) + " slots; " +
           std::to_string(st.workers.size()) + " live)");
  drain_queue(self);
}

template <class Reply>
void on_reply(hub_actor* self, hub_worker& w, Reply& m) {
  auto& st = self->state;
  auto s = st.sessions.find(m.id);
  // A reply for a session that moved or closed meanwhile is stale.
  if (s == st.sessions.end() || s->second.st != hub_session::state::assigned || s->second.worker != w.identity)
    return;
  self->send(s->second.session, std::move(m));
}

void on_frame(hub_actor* self, const std::string& identity, std::vector<std::string>& parts) {
  auto& st = self->state;
  hub_worker* w = find_worker(st, identity);
  if (parts.size() == 1 && parts[0].empty()) {  // the I/O thread: the peer's connection closed
    if (w) worker_dead(self, identity, "disconnected");
    return;
  }
  std::vector<std::string_view> views(parts.begin(), parts.end());
  worker_frame f;
  try {
    f = decode_worker(views, st.o.max_frame_bytes);
  } catch (const protocol_error& e) {
    log_bad(st, std::string(w ? "worker '" + w->name + "'" : "unknown peer " + hex_id(identity)) + ": " + e.what());
    // A stranger speaking another version is told so (it should exit).
    if (!w && e.code == error_code::unsupported_version) to_worker(st, identity, worker_refused{e.what()});
    return;
  }
  if (auto* h = std::get_if<worker_hello>(&f)) {
    on_hello(self, identity, *h);
    return;
  }
  if (!w) {
    if (std::holds_alternative<worker_heartbeat>(f) || std::holds_alternative<actors::llm_delta>(f) ||
        std::holds_alternative<actors::llm_done>(f) || std::holds_alternative<actors::llm_failed>(f))
      to_worker(st, identity, worker_reset{"this server does not know you (it restarted, or declared you dead): "
                                           "drop every slot and say hello"});
    else if (!std::holds_alternative<worker_bye>(f))
      log_bad(st, std::string("unknown peer ") + hex_id(identity) + " sent " + worker_type_name(f) + " before hello");
    return;
  }
  w->last_seen = clk::now();
  std::visit(
      [&](auto& m) {
        using T = std::decay_t<decltype(m)>;
        if constexpr (std::is_same_v<T, worker_heartbeat>) {
        } else if constexpr (std::is_same_v<T, worker_bye>) {
          worker_dead(self, identity, "it said bye: " + m.reason);
        } else if constexpr (std::is_same_v<T, actors::llm_delta> || std::is_same_v<T, actors::llm_done> ||
                             std::is_same_v<T, actors::llm_failed>) {
          on_reply(self, *w, m);
        } else {
          log_bad(st, "worker '" + w->name + "' sent " + worker_type_name(f) + ", a server-to-worker frame");
        }
      },
      f);
}

/// A message from a session for its worker.
template <class M>
void route(hub_actor* self, M& m) {
  auto& st = self->state;
  auto it = st.sessions.find(m.id);
  if (it == st.sessions.end()) return;
  auto& s = it->second;
  switch (s.st) {
    case hub_session::state::assigned:
      to_worker(st, s.worker, m);
      break;
    case hub_session::state::queued:
      if (s.buffer.size() < max_buffered) s.buffer.emplace_back(std::move(m));
      break;
    case hub_session::state::closed:
    case hub_session::state::failed:
      // No worker holds this session. A generate must still be answered (the
      // session waits for it); after a worker's death the session also got
      // component_restarted and ignores this for the failed turn.
      if constexpr (std::is_same_v<M, actors::llm_generate>)
        self->send(s.session, actors::llm_failed{m.id, m.turn, error_code::worker_lost,
                                                 s.why.empty() ? "no LLM worker holds this session" : s.why});
      break;
  }
}

void sweep(hub_actor* self) {
  auto& st = self->state;
  const auto now = clk::now();
  std::vector<std::string> silent;
  for (auto& w : st.workers) {
    if (now - w.last_seen > st.o.timeout)
      silent.push_back(w.identity);
    else
      to_worker(st, w.identity, worker_heartbeat{});
  }
  for (auto& id : silent)
    worker_dead(self, id,
                "no heartbeat for " + std::to_string(st.o.timeout.count()) + " ms");
  while (!st.queue.empty()) {
    const auto id = st.queue.front();
    auto it = st.sessions.find(id);
    if (it != st.sessions.end() && now - it->second.queued_at < st.o.open_wait) break;
    st.queue.pop_front();
    if (it == st.sessions.end()) continue;
    auto& s = it->second;
    s.st = hub_session::state::failed;
    s.why = "no LLM worker connected to " + st.endpoint + " within " +
            std::to_string(st.o.open_wait.count() / 1000) + " s (start `undertone worker --connect " + st.endpoint +
            "`)";
    st.o.log("worker hub: session " + std::to_string(id) + ": " + s.why);
    self->send(s.session, actors::llm_failed{id, -1, error_code::worker_lost, s.why});
    for (auto& f : s.buffer)
      if (auto* g = std::get_if<actors::llm_generate>(&f))
        self->send(s.session, actors::llm_failed{id, g->turn, error_code::worker_lost, s.why});
    s.buffer.clear();
  }
}

caf::behavior hub_behavior(hub_actor* self, worker_hub_options o, std::shared_ptr<router_loop> io) {
  auto& st = self->state;
  st.o = std::move(o);
  st.o.log = or_stderr(std::move(st.o.log));
  st.io = std::move(io);
  st.endpoint = st.io->endpoint();
  self->delayed_send(self, st.o.heartbeat, hub_sweep_atom::value);
  self->set_down_handler([self](caf::down_msg& dm) {
    auto& st = self->state;
    auto a = st.by_actor.find(dm.source);
    if (a == st.by_actor.end()) return;
    auto s = st.sessions.find(a->second);
    if (s != st.sessions.end()) {
      release(st, s->first, s->second);
      st.sessions.erase(s);
    }
    st.by_actor.erase(a);
  });
  return {
      [self](hub_frame_atom, std::string& identity, std::vector<std::string>& parts) {
        on_frame(self, identity, parts);
      },
      [self](hub_sweep_atom) {
        sweep(self);
        self->delayed_send(self, self->state.o.heartbeat, hub_sweep_atom::value);
      },
      [self](actors::llm_open& m) {
        auto& st = self->state;
        auto [it, fresh] = st.sessions.try_emplace(m.id);
        auto& s = it->second;
        if (!fresh) release(st, m.id, s);
        if (s.session != m.session) {
          if (s.session) st.by_actor.erase(s.session.address());
          s.session = m.session;
          if (s.session) {
            self->monitor(s.session);
            st.by_actor[s.session.address()] = m.id;
          }
        }
        s.why.clear();
        assign(self, m.id);
      },
      [self](actors::llm_close& m) {
        auto& st = self->state;
        auto it = st.sessions.find(m.id);
        if (it != st.sessions.end()) release(st, m.id, it->second);
      },
      [self](actors::llm_append& m) { route(self, m); },
      [self](actors::llm_generate& m) { route(self, m); },
      [self](actors::llm_cancel& m) { route(self, m); },
      [self](actors::llm_truncate& m) { route(self, m); },
      [self](actors::llm_mark& m) { route(self, m); },
      [self](actors::llm_rewind& m) { route(self, m); },
      [self](actors::stats_atom) { return int64_t(self->state.workers.size()); },
      [self](hub_stats_atom) {
        auto& st = self->state;
        worker_hub_stats s = st.counters;
        s.workers.clear();
        for (auto& w : st.workers) s.workers.push_back({w.name, w.slots, int64_t(w.sessions.size()), w.opened});
        s.queued = int64_t(st.queue.size());
        return s;
      },
  };
}

}  // namespace

worker_hub_options worker_hub_options::from(const config::server_config& c) {
  worker_hub_options o;
  o.bind = c.worker_bind;
  o.timeout = std::chrono::milliseconds(c.worker_timeout_s * 1000);
  o.heartbeat = o.timeout / 5;
  o.open_wait = std::chrono::milliseconds(c.worker_wait_s * 1000);
  o.auth_token = server_auth_token(c);
  return o;
}

caf::actor spawn_worker_hub(caf::actor_system& sys, const worker_hub_options& o, std::string* bound_endpoint) {
  if (o.heartbeat.count() <= 0 || o.timeout <= o.heartbeat)
    throw std::invalid_argument("worker hub: the timeout must be longer than the heartbeat period");
  router_loop_options ro;
  ro.endpoint = o.bind;
  ro.name = "worker hub";
  ro.config_key = "server.worker_bind";
  ro.linger_ms = 200;  // the byes at shutdown go out
  ro.max_message_bytes = int64_t(o.max_frame_bytes);
  ro.hwm = 100000;
  ro.watch_disconnects = true;  // a worker killed with kill -9 is noticed at once
  ro.flush_on_stop = true;
  auto io = std::make_shared<router_loop>(std::move(ro));
  if (bound_endpoint) *bound_endpoint = io->endpoint();
  auto hub = sys.spawn(hub_behavior, o, io);
  // Frames go to the actor unparsed. An empty single part stands for "this
  // peer's connection closed"; a real frame of one empty part gets a second
  // one so the two cannot be confused (frames are never empty).
  const auto target = caf::actor_cast<caf::actor_addr>(hub);
  router_loop_callbacks cb;
  cb.on_frame = [target](std::string identity, std::vector<std::string> parts) {
    if (parts.size() == 1 && parts[0].empty()) parts.push_back({});
    if (auto hdl = caf::actor_cast<caf::actor>(target))
      caf::anon_send(hdl, hub_frame_atom::value, std::move(identity), std::move(parts));
  };
  cb.on_disconnect = [target](std::string identity) {
    if (auto hdl = caf::actor_cast<caf::actor>(target))
      caf::anon_send(hdl, hub_frame_atom::value, std::move(identity), std::vector<std::string>{std::string()});
  };
  io->start(std::move(cb));
  return hub;
}

// ================================================================ worker ====

/// The worker side: the DEALER's thread and the state it shares with the
/// bridge actor (the llm_worker's answers) and the caller (stop, queries).
struct worker_link::impl {
  worker_link_options o;
  caf::actor llm, bridge;
  wake_queue out{"worker link"};
  std::thread thread;
  std::atomic<bool> stopping{false}, is_welcomed{false};
  std::atomic<int64_t> n_sessions{0};
  mutable std::mutex mu;
  std::string failure_, stop_reason;

  void fail(const std::string& why) {
    {
      std::lock_guard<std::mutex> lock(mu);
      if (failure_.empty()) failure_ = why;
    }
    o.log("worker: " + why);
    stopping.store(true);
    out.wake();
  }
  std::string failure() const {
    std::lock_guard<std::mutex> lock(mu);
    return failure_;
  }

  void run() {
    zmq::context_t ctx(1);
    std::unique_ptr<zmq::socket_t> sock;
    std::unordered_set<actors::session_id> slots;  // sessions the server placed here
    auto drop_slots = [&] {
      for (auto id : slots) caf::anon_send(llm, actors::llm_close{id});
      slots.clear();
      n_sessions.store(0);
    };
    auto open_socket = [&] {
      if (sock) sock->close();
      sock = std::make_unique<zmq::socket_t>(ctx, zmq::socket_type::dealer);
      sock->set(zmq::sockopt::linger, 0);
      sock->set(zmq::sockopt::immediate, 1);  // no queueing towards a server that is not there
      sock->set(zmq::sockopt::sndhwm, 100000);
      sock->set(zmq::sockopt::rcvhwm, 100000);
      sock->set(zmq::sockopt::reconnect_ivl, int(o.backoff_min.count()));
      sock->set(zmq::sockopt::reconnect_ivl_max, int(o.backoff_max.count()));
      sock->connect(o.connect);
    };
    try {
      open_socket();
    } catch (const zmq::error_t& e) {
      fail("cannot connect to " + o.connect + " (" + e.what() + ")");
      return;
    }
    auto send_frame = [&](const std::vector<std::string>& parts) {
      send_parts(*sock, parts, nullptr);
    };
    const auto hello = encode_worker(o.hello);
    auto backoff = o.backoff_min;
    auto next_hello = clk::now();
    auto next_beat = clk::now();
    auto last_heard = clk::now();
    bool said_waiting = false;
    while (!stopping.load()) {
      const auto now = clk::now();
      if (!is_welcomed.load()) {
        if (now >= next_hello) {
          // With ZMQ_IMMEDIATE the send fails (EAGAIN) until a connection exists.
          bool sent = false;
          try {
            sent = sock->send(zmq::buffer(hello[0]), zmq::send_flags::dontwait).has_value();
          } catch (const zmq::error_t&) {
          }
          if (!sent && !said_waiting) {
            o.log("worker: waiting for the server at " + o.connect);
            said_waiting = true;
          }
          next_hello = now + backoff;
          backoff = std::min(backoff * 2, o.backoff_max);
        }
      } else {
        if (now - last_heard > o.timeout) {
          o.log("worker: the server at " + o.connect + " is silent for " + std::to_string(o.timeout.count()) +
                " ms; dropping " + std::to_string(slots.size()) + " session(s) and reconnecting");
          is_welcomed.store(false);
          drop_slots();
          try {
            open_socket();  // a fresh socket: nothing stale is delivered to the next server
          } catch (const zmq::error_t& e) {
            fail("cannot reconnect to " + o.connect + " (" + e.what() + ")");
            break;
          }
          backoff = o.backoff_min;
          next_hello = now;
          said_waiting = false;
          continue;
        }
        if (now >= next_beat) {
          send_frame(encode_worker(worker_heartbeat{}));
          next_beat = now + o.heartbeat;
        }
      }
      const auto until = is_welcomed.load() ? std::min(next_beat, last_heard + o.timeout) : next_hello;
      const auto wait = std::max<clk::duration>(until - clk::now(), 1ms);
      zmq::pollitem_t items[2] = {{sock->handle(), 0, ZMQ_POLLIN, 0}, {nullptr, out.fd(), ZMQ_POLLIN, 0}};
      try {
        zmq::poll(items, 2, std::chrono::duration_cast<std::chrono::milliseconds>(wait) + 1ms);
      } catch (const zmq::error_t& e) {
        if (e.num() == EINTR) continue;
        fail(std::string("poll failed: ") + e.what());
        break;
      }
      if (items[1].revents & ZMQ_POLLIN) {
        for (auto& f : out.take())
          if (is_welcomed.load()) send_frame(f.parts);  // else: answers for a server that is gone
      }
      if (!(items[0].revents & ZMQ_POLLIN)) continue;
      for (int i = 0; i < 256; ++i) {
        std::vector<zmq::message_t> msgs;
        std::optional<size_t> got;
        try {
          got = zmq::recv_multipart(*sock, std::back_inserter(msgs), zmq::recv_flags::dontwait);
        } catch (const zmq::error_t&) {
          break;
        }
        if (!got) break;
        std::vector<std::string_view> views;
        for (auto& m : msgs) views.emplace_back(static_cast<const char*>(m.data()), m.size());
        worker_frame f;
        try {
          f = decode_worker(views);
        } catch (const protocol_error& e) {
          o.log(std::string("worker: dropped a malformed frame from the server (") + e.what() + ")");
          continue;
        }
        last_heard = clk::now();
        if (std::holds_alternative<worker_welcome>(f)) {
          o.log("worker: connected to " + o.connect + " as '" + o.hello.name + "' (" +
                std::to_string(o.hello.max_slots) + " slots)");
          is_welcomed.store(true);
          backoff = o.backoff_min;
          next_beat = clk::now();
        } else if (auto* r = std::get_if<worker_refused>(&f)) {
          fail(r->message);
          break;
        } else if (auto* rs = std::get_if<worker_reset>(&f)) {
          o.log("worker: the server reset this link (" + rs->message + ")");
          is_welcomed.store(false);
          drop_slots();
          next_hello = clk::now();
          backoff = o.backoff_min;
        } else if (auto* b = std::get_if<worker_bye>(&f)) {
          o.log("worker: the server said bye (" + b->reason + "); reconnecting");
          is_welcomed.store(false);
          drop_slots();
          backoff = o.backoff_min;
          next_hello = clk::now() + backoff;
          said_waiting = false;
          try {
            open_socket();
          } catch (const zmq::error_t& e) {
            fail("cannot reconnect to " + o.connect + " (" + e.what() + ")");
          }
          break;
        } else if (std::holds_alternative<worker_heartbeat>(f)) {
        } else if (!is_welcomed.load()) {
          // llm_* before the welcome: from a previous connection's server.
        } else if (auto* op = std::get_if<actors::llm_open>(&f)) {
          slots.insert(op->id);
          n_sessions.store(int64_t(slots.size()));
          caf::anon_send(llm, actors::llm_open{op->id, bridge});
        } else if (auto* cl = std::get_if<actors::llm_close>(&f)) {
          slots.erase(cl->id);
          n_sessions.store(int64_t(slots.size()));
          caf::anon_send(llm, *cl);
        } else {
          std::visit(
              [&](auto& m) {
                using T = std::decay_t<decltype(m)>;
                if constexpr (std::is_same_v<T, actors::llm_append> || std::is_same_v<T, actors::llm_generate> ||
                              std::is_same_v<T, actors::llm_cancel> || std::is_same_v<T, actors::llm_truncate> ||
                              std::is_same_v<T, actors::llm_mark> || std::is_same_v<T, actors::llm_rewind>) {
                  if (slots.count(m.id)) caf::anon_send(llm, std::move(m));
                } else {
                  o.log(std::string("worker: ignored a '") + worker_type_name(f) + "' frame from the server");
                }
              },
              f);
        }
      }
    }
    // Leaving: tell the server so its sessions move now, not after the timeout.
    if (is_welcomed.load() && sock) {
      std::string reason;
      {
        std::lock_guard<std::mutex> lock(mu);
        reason = failure_.empty() ? stop_reason : failure_;
      }
      sock->set(zmq::sockopt::linger, 500);
      send_frame(encode_worker(worker_bye{reason}));
    }
    is_welcomed.store(false);
    drop_slots();
    if (sock) sock->close();
  }
};

namespace {
struct bridge_state {
  std::function<void(std::vector<std::string>)> post;  ///< a frame to the server
  std::function<void(const std::string&)> fail;         ///< give up (the LLM actor died)
  static inline const char* name = "undertone.worker_bridge";
};
}  // namespace

worker_link::worker_link(caf::actor_system& sys, caf::actor llm, worker_link_options o)
    : p_(std::make_shared<impl>()) {
  p_->o = std::move(o);
  p_->o.log = or_stderr(std::move(p_->o.log));
  p_->llm = llm;
  // The llm_worker answers the "session" named in llm_open: this actor, for
  // every remote session (answers carry the session id).
  std::shared_ptr<impl> link = p_;
  bridge_state bs;
  bs.post = [link](std::vector<std::string> parts) { link->out.post({}, std::move(parts)); };
  bs.fail = [link](const std::string& why) { link->fail(why); };
  bridge_ = sys.spawn([bs, llm](caf::stateful_actor<bridge_state>* self) -> caf::behavior {
    self->state = bs;
    self->monitor(llm);
    self->set_down_handler([self](caf::down_msg& dm) {
      self->state.fail("the LLM worker actor died (" + caf::to_string(dm.reason) + ")");
    });
    auto post = [self](const worker_frame& f) { self->state.post(encode_worker(f)); };
    return {
        [post](actors::llm_delta& m) { post(m); },
        [post](actors::llm_done& m) { post(m); },
        [post](actors::llm_failed& m) { post(m); },
    };
  });
  p_->bridge = bridge_;
  p_->thread = std::thread([p = p_.get()] { p->run(); });
}

worker_link::~worker_link() { stop(); }

void worker_link::stop(const std::string& reason) {
  if (!p_ || !p_->thread.joinable()) return;
  {
    std::lock_guard<std::mutex> lock(p_->mu);
    p_->stop_reason = reason;
  }
  p_->stopping.store(true);
  p_->out.wake();
  p_->thread.join();
  if (bridge_) caf::anon_send_exit(bridge_, caf::exit_reason::user_shutdown);
}

bool worker_link::welcomed() const { return p_->is_welcomed.load(); }
int64_t worker_link::sessions() const { return p_->n_sessions.load(); }
std::string worker_link::failure() const { return p_->failure(); }

}  // namespace undertone::transport
