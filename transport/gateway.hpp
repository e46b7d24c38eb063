// The gateway: the bridge between the clients' ZeroMQ frames and the engine's
// CAF messages (docs/engine.md, docs/protocol.md).
//
//   client --frame--> ROUTER (I/O thread) --raw frame--> gateway actor
//        decode, per-client checks --open_session--> supervisor
//                                  --client_*-----> that client's session
//   session --to_client_* / session_closed--> gateway actor --frame--> client
//
// Threading: ZeroMQ sockets are not thread-safe, so one dedicated I/O thread
// (transport/router_loop.hpp) owns the ROUTER socket. It polls the ROUTER together with an eventfd that the
// actor signals after queueing outgoing frames (a mutex-guarded queue), so the
// actor never blocks a CAF scheduler thread and never touches a socket. Every
// incoming frame is handed to the actor unparsed (caf::anon_send); all client
// state (hello, sequence numbers, rate limit, idle time) lives in the actor and
// is therefore single-threaded. The thread is stopped and the socket closed
// (linger 0) when the actor terminates.
#pragma once

#include <chrono>
#include <cstdint>
#include <string>

#include <caf/fwd.hpp>

#include "actors/messages.hpp"
#include "config/config.hpp"
#include "transport/protocol.hpp"

namespace undertone::transport {

struct gateway_options {
  std::string bind = "tcp://127.0.0.1:5555";  ///< ROUTER endpoint; "tcp://127.0.0.1:*" = ephemeral port
  int64_t max_sessions = 64;                  ///< hello beyond this (open + opening) -> server_full
  int64_t max_frame_bytes = 1 << 20;          ///< all parts of one frame together
  double max_frames_per_second = 200;         ///< per client, token bucket (burst = one second's worth)
  std::chrono::milliseconds idle_timeout{300'000};  ///< no frame for this long -> client_gone
  /// Token a hello must carry ("" = no authentication). A hello without it (or
  /// with another) gets a fatal `unauthorized` error and leaves no state behind.
  std::string auth_token;
  /// Settings a new session starts with (the [session]/[sampling]/[vad] defaults);
  /// sent in open_session and patched by the client's config frames.
  actors::session_settings default_settings;

  /// The [server] keys, the auth token resolved by transport::server_auth_token
  /// (env UNDERTONE_AUTH_TOKEN, auth_token, auth_token_file; throws if the token
  /// file cannot be read). default_settings is left at its defaults: the caller
  /// knows how the config maps onto session settings.
  static gateway_options from(const config::server_config& c);
};

/// Binds a ROUTER at `o.bind` and spawns the gateway actor. Throws
/// std::runtime_error naming the endpoint if the bind fails (address in use,
/// bad endpoint). `bound_endpoint`, if given, receives the endpoint actually
/// bound (useful with port "*").
///
/// Messages the gateway sends:
///   - to `supervisor`: actors::open_session (sender = the gateway) per hello;
///   - to a session: client_audio, client_end_turn, client_text_turn, client_cancel,
///     client_config (the full settings after applying the client's patch),
///     client_annotation, client_gone (bye, idle timeout, or the gateway exiting).
/// Messages it handles (from the supervisor or sessions):
///   - session_opened -> welcome frame, the identity is bound to the session
///     (the gateway monitors it: if it dies without session_closed, the client
///     gets a fatal internal error);
///   - to_client_delta / to_client_turn_end / to_client_event / to_client_error
///     -> frames (an error for a client still waiting for session_opened, e.g.
///     server_full, also drops that pending hello);
///   - session_closed -> the identity is free (matched by session id).
/// Stop it with an exit message (e.g. caf::anon_send_exit(gw, caf::exit_reason::user_shutdown)).
caf::actor spawn_gateway(caf::actor_system& sys, const gateway_options& o, caf::actor supervisor,
                         std::string* bound_endpoint = nullptr);

/// Patches `s` with the fields present in a client config frame; throws
/// protocol_error(bad_config) naming the first out-of-range value (s unchanged).
void apply_config(const config_msg& m, actors::session_settings& s);

}  // namespace undertone::transport
