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
#include "models/chat_template.hpp"

namespace undertone::actors {

/// Makes the gateway once the supervisor exists. May throw (e.g. bind failed).
using gateway_factory = std::function<caf::actor(caf::actor_system&, caf::actor supervisor)>;

/// What the engine needs to know of its LLM, read from the model file's
/// metadata (tokenizer, chat template, width) without loading the weights.
struct llm_identity {
  std::string path;              ///< resolved llm.model
  std::string version;           ///< "<file>|<bytes>", as llm_engine::model_version()
  models::chat_template templ;   ///< as the loaded LLM would select it (llm.chat_template)
  int64_t d_model = 0;           ///< width of a speech row
};
/// Reads llm_identity for cfg.llm.model (GGUF file or HF directory); throws
/// std::runtime_error naming the file when it cannot.
llm_identity identify_llm(const config::undertone_config& cfg);

/// With server.remote_workers > 0: makes the actor that stands in for the LLM
/// worker (transport::spawn_worker_hub, given by apps/ so actors/ stays
/// ZeroMQ-free). It must answer actors::stats_atom with the number of live
/// workers (int64_t). May throw (e.g. bind failed).
using llm_hub_factory = std::function<caf::actor(caf::actor_system&, const llm_identity&)>;

/// The session defaults the config describes ([llm] system_prompt, [sampling], [vad]).
session_settings session_settings_from(const config::undertone_config& cfg);

/// The projector the config means: encoder.projector if set (a path or cache
/// name); when empty, the shipped default ("undertone-projector" in the model
/// cache, installed by scripts/setup) if the LLM, encoder and stacking are the
/// defaults it was trained for; else "" (an untrained projector: the pipeline
/// runs, answers to speech are nonsense).
std::string resolve_projector(const config::undertone_config& cfg);

/// The encoder registry directory (models/encoder_registry.hpp): encoder.registry,
/// or <model_home>/encoders when it is "".
std::string resolve_encoder_registry(const config::undertone_config& cfg);

/// Version name of a projector checkpoint that is not in the registry (the
/// configured one at start): "<file name>@<first 12 hex digits of its
/// sha256>"; "untrained-seed-<seed>" for "" (an untrained projector).
std::string projector_file_version(const std::string& projector_path, uint64_t seed = 0);

class engine {
 public:
  /// Loads the LLM and the speech encoder (seconds), then spawns the actors and
  /// the gateway. The encoder serves the encoder registry's current version if
  /// it has one and it verifies, else the configured projector (resolve_projector;
  /// version projector_file_version), with a warning when a current version was
  /// refused (docs/hot-swap.md). `log` receives human-readable lines (models, warnings); null:
  /// stderr. Throws std::exception (model not found, bind failure, ...).
  ///
  /// With server.remote_workers = N > 0 the LLM weights are not loaded here:
  /// `remote_llm` makes the hub that sessions use instead of an in-process
  /// worker, and the constructor waits up to server.worker_wait_s for N
  /// workers to connect (logging who is missing), then serves anyway (with
  /// fewer workers, or none: sessions then wait for one, see
  /// transport/worker_link.hpp). Throws if N > 0 and `remote_llm` is empty.
  explicit engine(const config::undertone_config& cfg, gateway_factory gateway = {},
                  std::function<void(const std::string&)> log = {}, llm_hub_factory remote_llm = {});
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
