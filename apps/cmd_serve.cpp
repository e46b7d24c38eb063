// `undertone serve`: the whole engine in one process (actors/engine.hpp) behind
// the ZeroMQ gateway (transport/gateway.hpp). Ctrl-C / SIGTERM shut it down.
#include <pthread.h>

#include <csignal>
#include <iostream>

#include <spdlog/spdlog.h>

#include "actors/engine.hpp"
#include "apps/common.hpp"
#include "models/runtime.hpp"
#include "transport/auth.hpp"
#include "transport/control.hpp"
#include "transport/gateway.hpp"
#include "transport/worker_link.hpp"

namespace undertone::apps {

namespace {
struct serve_flags {
  std::string bind;
  std::string control_bind;
};

/// A warning per endpoint that other machines can reach while no auth token
/// is set (anyone there could talk to the server, swap its encoder, or pose
/// as an LLM worker and read every session's prompt).
void warn_about_open_endpoints(const config::server_config& s, const std::string& token) {
  if (!token.empty()) {
    spdlog::info("clients, workers and control requests must present the auth token");
    return;
  }
  std::vector<std::pair<const char*, std::string>> eps{{"server.bind", s.bind}};
  if (s.remote_workers > 0) eps.emplace_back("server.worker_bind", s.worker_bind);
  if (!s.control_bind.empty()) eps.emplace_back("server.control_bind", s.control_bind);
  for (const auto& [key, ep] : eps)
    if (!transport::is_loopback_endpoint(ep))
      spdlog::warn("{} = {} is reachable from other machines and no auth token is set: anyone who can reach it "
                   "can use this server. Set server.auth_token_file or UNDERTONE_AUTH_TOKEN (docs/protocol.md, "
                   "\"Authentication\")",
                   key, ep);
}
}  // namespace

void add_serve_command(CLI::App& app, global_options& g) {
  static serve_flags f;
  auto* cmd = app.add_subcommand(
      "serve",
      "Run the spoken-dialogue server: a ZeroMQ ROUTER for clients (`undertone send`, `undertone talk`,\n"
      "transport/client.hpp), one session actor per client (16 kHz resampling, energy VAD + endpointing,\n"
      "barge-in), the streaming speech encoder (speech tokens go straight into the LLM prompt), the frozen\n"
      "LLM with continuous batching, and the session store (SQLite index + FLAC per turn under store.dir,\n"
      "docs/store.md; a turn_end is sent once its turn is durable).\n"
      "Binds server.bind (default tcp://127.0.0.1:5555: loopback only; use --bind tcp://0.0.0.0:5555 to\n"
      "accept other machines). Keys: [llm] (model, device, dtype, context_tokens, max_slots, system_prompt),\n"
      "[encoder] (model, projector, chunk_ms, max_batch, max_wait_ms), [sampling], [vad], [server]\n"
      "(max_sessions, idle_timeout_s, max_frame_bytes), [store]. With server.remote_workers = N > 0 the LLM\n"
      "is not loaded here: `undertone worker --connect` processes decode (they connect to\n"
      "server.worker_bind; serve waits up to server.worker_wait_s for N of them). Without a trained projector\n"
      "(encoder.projector = \"\" and no \"undertone-projector\" in the model cache) an untrained one is\n"
      "used: the pipeline runs, answers to speech are nonsense. The speech encoder serves the encoder\n"
      "registry's current version if there is one (encoder.registry, `undertone model list`), and\n"
      "server.control_bind (default tcp://127.0.0.1:5557, \"\" = off) takes status / hot-swap requests\n"
      "(`undertone model ... --server`, docs/hot-swap.md). With an auth token (server.auth_token,\n"
      "server.auth_token_file or env UNDERTONE_AUTH_TOKEN) every client hello, worker hello and control\n"
      "request must carry it; without one serve warns if it binds a non-loopback address. Ctrl-C shuts\n"
      "down cleanly.");
  cmd->add_option("--bind", f.bind, "client endpoint (= --set server.bind=...), e.g. tcp://127.0.0.1:5555");
  auto* control_opt = cmd->add_option("--control-bind", f.control_bind,
                  "control endpoint (= --set server.control_bind=...); \"\" disables it");
  cmd->callback([&g, control_opt] {
    auto cfg = effective_config(g);
    if (!f.bind.empty()) cfg.server.bind = f.bind;
    if (control_opt->count() > 0) cfg.server.control_bind = f.control_bind;
    models::set_compute_threads(int(cfg.general.threads));
    // Block the stop signals before any thread starts (threads inherit the mask);
    // the main thread then waits for them with sigwait.
    sigset_t stop;
    sigemptyset(&stop);
    sigaddset(&stop, SIGINT);
    sigaddset(&stop, SIGTERM);
    pthread_sigmask(SIG_BLOCK, &stop, nullptr);
    transport::gateway_options gw_opt;
    std::string endpoint, worker_endpoint;
    std::unique_ptr<actors::engine> eng;
    std::unique_ptr<transport::control_server> control;
    try {
      gw_opt = transport::gateway_options::from(cfg.server);  // resolves the auth token (may throw)
      gw_opt.default_settings = actors::session_settings_from(cfg);
      warn_about_open_endpoints(cfg.server, gw_opt.auth_token);
      spdlog::info("loading models (llm {}, encoder {})", cfg.llm.model, cfg.encoder.model);
      auto log = [](const std::string& line) {
        if (line.rfind("WARNING", 0) == 0)
          spdlog::warn("{}", line);
        else
          spdlog::info("{}", line);
      };
      actors::llm_hub_factory hub;
      if (cfg.server.remote_workers > 0) {
        hub = [&](caf::actor_system& sys, const actors::llm_identity& id) {
          auto o = transport::worker_hub_options::from(cfg.server);
          o.llm_version = id.version;
          o.chat_template = id.templ.name();
          o.d_model = id.d_model;
          o.auth_token = gw_opt.auth_token;  // the one token, resolved once
          o.log = log;
          auto h = transport::spawn_worker_hub(sys, o, &worker_endpoint);
          spdlog::info("remote LLM workers connect to {}", worker_endpoint);
          return h;
        };
      }
      eng = std::make_unique<actors::engine>(
          cfg,
          [&](caf::actor_system& sys, caf::actor sup) { return transport::spawn_gateway(sys, gw_opt, sup, &endpoint); },
          log, hub);
      if (!cfg.server.control_bind.empty())
        control = std::make_unique<transport::control_server>(eng->system(), eng->supervisor(), cfg.server.control_bind,
                                                              gw_opt.auth_token);
    } catch (const std::exception& e) {
      std::cerr << "error: " << e.what() << "\n";
      control.reset();
      eng.reset();
      pthread_sigmask(SIG_UNBLOCK, &stop, nullptr);
      exit_code() = 1;
      return;
    }
    spdlog::info("listening on {} (max {} sessions); Ctrl-C to stop", endpoint, cfg.server.max_sessions);
    if (control) spdlog::info("control endpoint on {} (status, encoder swap/rollback)", control->endpoint());
    std::cout << "undertone serve: ready on " << endpoint << std::endl;
    int sig = 0;
    sigwait(&stop, &sig);
    spdlog::info("{}: shutting down", sig == SIGINT ? "SIGINT" : "SIGTERM");
    control.reset();  // before the actor system goes
    eng->shutdown();
    eng.reset();
    pthread_sigmask(SIG_UNBLOCK, &stop, nullptr);
    std::cout << "undertone serve: stopped" << std::endl;
  });
}

}  // namespace undertone::apps
