// `undertone worker`: LLM decoding for a server in another process or on
// another machine (transport/worker_link.hpp). Ctrl-C / SIGTERM say bye to the
// server (its sessions move at once) and exit.
#include <pthread.h>
#include <unistd.h>

#include <csignal>
#include <ctime>
#include <iostream>

#include <caf/all.hpp>
#include <spdlog/spdlog.h>

#include "actors/llm_worker.hpp"
#include "apps/common.hpp"
#include "models/llm_engine.hpp"
#include "models/runtime.hpp"
#include "transport/auth.hpp"
#include "transport/worker_link.hpp"

namespace undertone::apps {

namespace {
struct worker_flags {
  std::string connect;
  std::string name;
  std::string token;
};

struct worker_system_config : caf::actor_system_config {
  worker_system_config() { actors::register_message_types(*this); }
};

std::string default_name() {
  char host[256] = {0};
  if (::gethostname(host, sizeof host - 1) != 0) host[0] = 0;
  return std::string(host[0] ? host : "worker") + "-" + std::to_string(::getpid());
}
}  // namespace

void add_worker_command(CLI::App& app, global_options& g) {
  static worker_flags f;
  auto* cmd = app.add_subcommand(
      "worker",
      "Decode for a remote `undertone serve` (server.remote_workers > 0): loads the LLM of [llm] (model,\n"
      "device, dtype, context_tokens, kv_cells, max_slots), connects to the server's worker endpoint\n"
      "(server.worker_bind, default tcp://127.0.0.1:5556) and runs the sessions the server places on it with\n"
      "continuous batching. The server refuses a worker whose LLM file or chat template differs from its own\n"
      "(the worker then exits with an error). Heartbeats both ways (server.worker_timeout_s); if the server\n"
      "goes away the worker drops its sessions and reconnects with backoff. Ctrl-C / SIGTERM: says bye (the\n"
      "server moves its sessions to other workers) and exits. A server with an auth token refuses a worker\n"
      "without it (--token or UNDERTONE_AUTH_TOKEN).");
  cmd->add_option("--connect", f.connect,
                  "server endpoint to connect to, e.g. tcp://10.0.0.5:5556 (default: server.worker_bind)");
  cmd->add_option("--name", f.name, "name in the server's logs and stats (default: <hostname>-<pid>)");
  add_token_option(cmd, f.token);
  cmd->callback([&g] {
    auto cfg = effective_config(g);
    const std::string endpoint = f.connect.empty() ? cfg.server.worker_bind : f.connect;
    const std::string name = f.name.empty() ? default_name() : f.name;
    models::set_compute_threads(int(cfg.general.threads));
    // Block the stop signals before any thread starts (threads inherit the mask).
    sigset_t stop;
    sigemptyset(&stop);
    sigaddset(&stop, SIGINT);
    sigaddset(&stop, SIGTERM);
    pthread_sigmask(SIG_BLOCK, &stop, nullptr);
    auto fail = [&](const std::string& what) {
      std::cerr << "error: " << what << "\n";
      pthread_sigmask(SIG_UNBLOCK, &stop, nullptr);
      exit_code() = 1;
    };

    models::llm_engine_options lo;
    std::shared_ptr<models::llm_engine> llm;
    std::string token;
    try {
      token = transport::client_auth_token(f.token, cfg.server);  // before the slow LLM load
      lo.llm = llm_options_from(cfg);
      lo.max_slots = cfg.llm.max_slots;
      lo.max_rows_per_step = cfg.llm.max_batch_rows;
      spdlog::info("loading the LLM {}", lo.llm.path);
      llm = std::make_shared<models::llm_engine>(lo);
    } catch (const std::exception& e) {
      fail(e.what());
      return;
    }
    spdlog::info("LLM: {}", llm->describe());

    worker_system_config sys_cfg;
    caf::actor_system sys{sys_cfg};
    transport::worker_link_options wo;
    wo.connect = endpoint;
    wo.hello.name = name;
    wo.hello.llm_version = llm->model_version();
    wo.hello.chat_template = llm->templ().name();
    wo.hello.d_model = llm->d_model();
    wo.hello.max_slots = cfg.llm.max_slots;
    wo.hello.token = token;
    wo.timeout = std::chrono::milliseconds(cfg.server.worker_timeout_s * 1000);
    wo.heartbeat = wo.timeout / 5;
    wo.log = [](const std::string& line) { spdlog::info("{}", line); };
    actors::llm_worker_options lwo;
    lwo.engine = std::move(llm);
    auto llm_actor = actors::spawn_llm_worker(sys, std::move(lwo));
    std::string failure;
    {
      transport::worker_link link(sys, llm_actor, wo);
      std::cout << "undertone worker: '" << name << "' connecting to " << endpoint << std::endl;
      const timespec tick{0, 200 * 1000 * 1000};
      while (true) {
        const int sig = sigtimedwait(&stop, nullptr, &tick);
        if (sig == SIGINT || sig == SIGTERM) {
          spdlog::info("{}: shutting down", sig == SIGINT ? "SIGINT" : "SIGTERM");
          break;
        }
        failure = link.failure();
        if (!failure.empty()) break;
      }
      link.stop(failure.empty() ? "worker shutting down" : failure);
    }
    caf::anon_send_exit(llm_actor, caf::exit_reason::user_shutdown);
    sys.await_all_actors_done();
    pthread_sigmask(SIG_UNBLOCK, &stop, nullptr);
    if (!failure.empty()) {
      std::cerr << "error: " << failure << "\n";
      exit_code() = 1;
      return;
    }
    std::cout << "undertone worker: stopped" << std::endl;
  });
}

}  // namespace undertone::apps
