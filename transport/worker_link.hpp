// Remote LLM workers (docs/engine.md, "Remote workers"; frames in
// docs/protocol.md, "Worker frames").
//
// Server side, the *hub*: an actor that stands in for the LLM worker. Sessions
// send it the usual llm_* messages and get llm_delta / llm_done / llm_failed
// back, as from the in-process worker. Behind it, `undertone worker` processes
// connect to a ROUTER bound at server.worker_bind (DEALER, one per worker),
// say hello (protocol version, name, LLM version, chat template, d_model,
// slots) and are accepted if they run the server's LLM. Each llm_open goes to
// the live worker with the most free slots; every later message of that
// session goes to the same worker. A worker that says bye, disconnects, or
// sends nothing (heartbeats included) for `timeout` is dead: each of its
// sessions is sent component_restarted{"llm", hub}, so it fails the running
// answer with worker_lost and re-opens its context (llm_open + appends from
// its history), which the hub places on another worker. An llm_open while no
// worker is connected waits (with the session's later messages) up to
// `open_wait`, then fails with llm_failed{worker_lost}; a later llm_generate of
// such a session fails at once, so no session hangs. Malformed frames are
// logged and dropped.
//
// Worker side, the *link*: owns the DEALER, says hello, forwards the server's
// llm_* frames to a local llm_worker actor (actors/llm_worker.hpp) and its
// answers back, heartbeats, and reconnects with backoff when the server goes
// away (its slots are dropped: the server re-opens the sessions elsewhere).
//
// Threading: one I/O thread per socket owns it, polling it with an eventfd
// that wakes it for queued outgoing frames (the hub: transport/router_loop.hpp,
// as the gateway; the worker: its own DEALER loop on the same wake_queue); the
// actors never touch a socket.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include <caf/fwd.hpp>

#include "actors/messages.hpp"
#include "config/config.hpp"
#include "transport/worker_protocol.hpp"

namespace undertone::transport {

// ---------------------------------------------------------------- server ----
struct worker_hub_options {
  std::string bind = "tcp://127.0.0.1:5556";  ///< ROUTER endpoint; port "*" = ephemeral
  /// What a worker must run (compared with its hello; "" / 0 = not checked).
  std::string llm_version, chat_template;
  int64_t d_model = 0;
  std::chrono::milliseconds heartbeat{1000};   ///< heartbeat period (both ways)
  std::chrono::milliseconds timeout{5000};     ///< a worker silent this long is dead
  std::chrono::milliseconds open_wait{30000};  ///< an llm_open with no worker fails after this
  size_t max_frame_bytes = 64u << 20;          ///< larger worker frames are dropped
  /// Token a worker's hello must carry ("" = none); others get `refused`.
  std::string auth_token;
  /// Log lines (worker joined/lost/refused, malformed frames). Null: stderr.
  std::function<void(const std::string&)> log;

  /// From [server]: worker_bind, worker_timeout_s (heartbeat = timeout / 5),
  /// worker_wait_s (open_wait), the auth token (transport::server_auth_token;
  /// throws if the token file cannot be read); the expected LLM is left for
  /// the caller.
  static worker_hub_options from(const config::server_config& c);
};

/// One live worker, as hub_stats_atom reports it.
struct worker_hub_worker {
  std::string name;
  int64_t slots = 0;     ///< from its hello
  int64_t sessions = 0;  ///< sessions placed on it now
  int64_t opened = 0;    ///< llm_opens it was given in total
};
struct worker_hub_stats {
  std::vector<worker_hub_worker> workers;  ///< live workers, in order of arrival
  int64_t queued = 0;       ///< sessions waiting for a worker
  int64_t joined = 0;       ///< hellos accepted
  int64_t lost = 0;         ///< workers declared dead (bye, disconnect, timeout)
  int64_t refused = 0;      ///< hellos refused (mismatch or wrong auth token)
  int64_t bad_frames = 0;   ///< undecodable or misdirected frames dropped
};
template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, worker_hub_worker& x) {
  return f(caf::meta::type_name("worker_hub_worker"), x.name, x.slots, x.sessions, x.opened);
}
template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, worker_hub_stats& x) {
  return f(caf::meta::type_name("worker_hub_stats"), x.workers, x.queued, x.joined, x.lost, x.refused,
           x.bad_frames);
}

/// Request -> worker_hub_stats.
using hub_stats_atom = caf::atom_constant<caf::atom("hubstats")>;

/// Binds the ROUTER (throws std::runtime_error naming the endpoint and
/// server.worker_bind if that fails) and spawns the hub. Messages: the llm_*
/// of actors/llm_worker.hpp (from sessions); actors::stats_atom -> int64_t
/// live workers; hub_stats_atom -> worker_hub_stats. On exit it says bye to
/// every worker. `bound_endpoint` receives the endpoint actually bound.
caf::actor spawn_worker_hub(caf::actor_system& sys, const worker_hub_options& o,
                            std::string* bound_endpoint = nullptr);

// ---------------------------------------------------------------- worker ----
struct worker_link_options {
  std::string connect;                 ///< the server's worker_bind, e.g. tcp://10.0.0.5:5556
  worker_hello hello;                  ///< name, llm version, template, d_model, slots, auth token
  std::chrono::milliseconds heartbeat{1000};
  std::chrono::milliseconds timeout{5000};      ///< server silent this long: reconnect
  std::chrono::milliseconds backoff_min{250};   ///< first hello retry ...
  std::chrono::milliseconds backoff_max{5000};  ///< ... doubling up to this
  std::function<void(const std::string&)> log;  ///< null: stderr
};

/// Connects a local llm_worker actor to a server. Starts at construction (the
/// server may come later: hellos are retried with backoff).
class worker_link {
 public:
  /// `llm` = a spawned llm_worker; the link monitors it: if it dies the link
  /// says bye and failure() tells why.
  worker_link(caf::actor_system& sys, caf::actor llm, worker_link_options o);
  ~worker_link();
  worker_link(const worker_link&) = delete;
  worker_link& operator=(const worker_link&) = delete;

  /// Says bye (when welcomed), closes the socket and joins the thread. Idempotent.
  void stop(const std::string& reason = "worker shutting down");
  /// True while the server has accepted the hello and is heard from.
  bool welcomed() const;
  /// Sessions the server placed here now.
  int64_t sessions() const;
  /// Non-empty once the link gave up: the server refused this worker (model
  /// mismatch), or the LLM actor died. The process should exit with an error.
  std::string failure() const;

 private:
  struct impl;
  std::shared_ptr<impl> p_;
  caf::actor bridge_;
};

}  // namespace undertone::transport
