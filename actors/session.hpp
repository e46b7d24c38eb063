// The session actor: one per client (docs/engine.md, "A turn").
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "actors/messages.hpp"
#include "models/chat_template.hpp"

namespace undertone::actors {

/// What every session of one engine shares (read-only after start).
struct session_env {
  models::chat_template templ;   ///< the LLM's chat template (prompt pieces are cut from it)
  int64_t context_tokens = 2048; ///< llm.context_tokens: rows per slot
  std::string llm_version, encoder_version;
  std::string models;            ///< "llm=...; encoder=..." for the welcome frame
  double idle_timeout_s = 300;   ///< no client message for this long: the session closes
  bool store = true;             ///< store.enabled (a session may still opt out: settings.log)
  /// How long a turn_end waits for the logger's commit before it is sent anyway
  /// (with a store_failed event; docs/store.md).
  double store_commit_timeout_s = 5;
};

struct session_options {
  session_id id = 0;
  std::string client_identity, client_name;
  session_settings settings;
  std::shared_ptr<const session_env> env;
  caf::actor gateway, supervisor, encoder, llm, logger;
  std::vector<caf::actor> subscribers;
};

/// Spawns a session (a scheduled actor: its handlers are short). Messages:
/// client_* (from the gateway), speech_rows (encoder), llm_delta / llm_done /
/// llm_failed (worker), inject_message, subscribe_events / unsubscribe_events
/// and component_restarted (supervisor). It sends to_client_* and
/// session_closed to the gateway, session_event to subscribers, turn_record to
/// the logger (a request: a stored turn's turn_end waits for the commit), and
/// quits after client_gone (or idle timeout, or a fatal error).
caf::actor spawn_session(caf::actor_system& sys, session_options opt);

}  // namespace undertone::actors
