// The supervisor (docs/engine.md): spawns and monitors sessions, enforces
// server.max_sessions, restarts the encoder / LLM worker / logger when they die
// and tells the sessions, and relays subscriptions and injections.
#pragma once

#include <functional>
#include <memory>

#include "actors/messages.hpp"
#include "actors/session.hpp"

namespace undertone::actors {

struct supervisor_options {
  std::shared_ptr<const session_env> env;
  int64_t max_sessions = 64;
  caf::actor encoder, llm, logger;  ///< the running components (logger may be null: store disabled)
  /// Respawn a component after it died (called by the supervisor; may throw).
  std::function<caf::actor()> respawn_encoder, respawn_llm, respawn_logger;
  /// Restarts of one component allowed within a minute before it is given up.
  int max_restarts_per_minute = 5;
};

/// Messages it handles:
///   open_session (from the gateway; the sender is the gateway) -> replies
///     session_opened, or to_client_error{server_full, fatal} when full;
///   subscribe_events / unsubscribe_events (any actor, e.g. engine::attach);
///   inject_message{id, ...} -> that session (id 0: every session);
///   stats_atom -> int64_t open sessions;
///   swap_encoder / rollback_encoder -> delegated to the encoder actor, which
///     replies swap_result to the requester (docs/hot-swap.md);
///   status_request -> engine_status (asks the encoder for its version).
/// On an exit message it ends every session and component, then itself.
caf::actor spawn_supervisor(caf::actor_system& sys, supervisor_options opt);

}  // namespace undertone::actors
