// The whole engine in one process (docs/engine.md): loads the models named by
// the config, starts one CAF actor system with the encoder, the LLM worker, the
// logger and the supervisor, and a gateway made by the caller's factory (so
// actors/ does not depend on transport/; apps/cmd_serve.cpp passes
// transport::spawn_gateway).
//
//   actors::engine e(cfg, [&](caf::actor_system& sys, caf::actor sup) {
//     return transport::spawn_gateway(sys, gw_opts, sup, &endpoint);
//   });
//   e.attach(sys.spawn(my_custom_actor));   // receives every session_event
//   ...
//   e.shutdown();                            // or the destructor
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "actors/messages.hpp"
#include "config/config.hpp"

namespace undertone::actors {

/// Makes the gateway once the supervisor exists. May throw (e.g. bind failed).
using gateway_factory = std::function<caf::actor(caf::actor_system&, caf::actor supervisor)>;

/// The session defaults the config describes ([llm] system_prompt, [sampling], [vad]).
session_settings session_settings_from(const config::undertone_config& cfg);

/// The projector the config means: encoder.projector if set (a path or cache
/// name); when empty, the shipped default ("undertone-projector" in the model
/// cache, installed by scripts/setup) if the LLM, encoder and stacking are the
/// defaults it was trained for; else "" (an untrained projector: the pipeline
/// runs, answers to speech are nonsense).
std::string resolve_projector(const config::undertone_config& cfg);

class engine {
 public:
  /// Loads the LLM and the speech encoder (seconds), then spawns the actors and
  /// the gateway. `log` receives human-readable lines (models, warnings); null:
  /// stderr. Throws std::exception (model not found, bind failure, ...).
  explicit engine(const config::undertone_config& cfg, gateway_factory gateway = {},
                  std::function<void(const std::string&)> log = {});
  ~engine();
  engine(const engine&) = delete;
  engine& operator=(const engine&) = delete;

  caf::actor_system& system();
  caf::actor supervisor() const;
  caf::actor gateway() const;  ///< null without a gateway factory
  /// "llm=<describe>; encoder=<describe>".
  const std::string& models() const;
  /// Loud warnings from start-up (e.g. the untrained projector).
  const std::vector<std::string>& warnings() const;

  /// Subscribes a custom actor to every session's events (session_event); it
  /// may send inject_message to supervisor(). It is sent an exit message at
  /// shutdown.
  void attach(caf::actor custom);
  /// Ends the gateway, every session, the components and the custom actors and
  /// waits for them. Idempotent.
  void shutdown();

 private:
  struct impl;
  std::unique_ptr<impl> p_;
};

}  // namespace undertone::actors
