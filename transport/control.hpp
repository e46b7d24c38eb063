// The control endpoint (docs/protocol.md "Control endpoint"): a ZeroMQ ROUTER
// on server.control_bind through which operators and the fine-tune process ask
// a running server for its status and tell it to hot-swap the speech encoder
// (docs/hot-swap.md). One msgpack map per request and per reply:
//
//   {"v":1, "t":"status"}                         -> {"v":1,"t":"status","ok":true, models, llm, encoder{...}, sessions}
//   {"v":1, "t":"encoder_swap", "version":"v0003"} -> {"v":1,"t":"encoder_swap","ok":..., version, previous, message}
//   {"v":1, "t":"encoder_rollback"[, "to":"v0001"]} -> {"v":1,"t":"encoder_rollback","ok":..., version, previous, message}
//   anything else                                 -> {"v":1,"t":"error","ok":false,"code":"bad_frame"|..., "message"}
//
// An "id" in a request is echoed in its reply. Clients may use DEALER (one
// part: the map) or REQ (the empty delimiter is kept in the reply envelope).
//
// Threading: one I/O thread owns the socket and answers requests one at a
// time; each request becomes a blocking CAF request to the supervisor (a swap
// blocks the control endpoint, never the serving actors: the encoder loads
// the checkpoint in its own thread between chunks). With an auth token
// (server.auth_token, transport/auth.hpp) every request must carry it as
// "token" (else: an error reply with code "unauthorized"); without one, bind it
// to loopback (the default) or an ipc:// path.
#pragma once

#include <chrono>
#include <memory>
#include <string>

#include <caf/fwd.hpp>
#include <nlohmann/json.hpp>

namespace undertone::transport {

class control_server {
 public:
  /// Binds a ROUTER at `bind` and starts its thread, which forwards requests
  /// to `supervisor` (actors/supervisor.hpp: status_request, swap_encoder,
  /// rollback_encoder). Requests must carry `auth_token` as "token" unless it
  /// is empty. Throws std::runtime_error naming the endpoint if the bind
  /// fails. Destroy it before the actor system (it joins its thread).
  control_server(caf::actor_system& sys, caf::actor supervisor, const std::string& bind,
                 const std::string& auth_token = "");
  ~control_server();
  control_server(const control_server&) = delete;
  control_server& operator=(const control_server&) = delete;

  /// The endpoint actually bound (resolves a "*" port).
  const std::string& endpoint() const;

 private:
  struct impl;
  std::unique_ptr<impl> p_;
};

/// Sends one request (a JSON object; "v" is added if missing, and "token" =
/// `token` if that is non-empty) to a control endpoint and waits for the reply,
/// decoded from msgpack. Throws std::runtime_error naming the endpoint if
/// nothing answers within `timeout` or the reply is not a msgpack map. A
/// refused swap or a wrong token is not an exception: the reply has "ok": false
/// and a "message" (and "code": "unauthorized" for the token).
nlohmann::json control_call(const std::string& endpoint, nlohmann::json request,
                            std::chrono::milliseconds timeout = std::chrono::seconds(60),
                            const std::string& token = "");

}  // namespace undertone::transport
