// undertone: one binary, one subcommand per job (see --help).
#include <iostream>

#include "actors/engine_info.hpp"
#include "apps/common.hpp"
#include "config/config.hpp"
#include "models/runtime.hpp"
#include "transport/wire.hpp"

#ifndef UNDERTONE_VERSION
#define UNDERTONE_VERSION "0.0.0"
#endif

int main(int argc, char** argv) {
  using namespace undertone;
  apps::reexec_with_runtime_env(argc, argv);
  CLI::App app{
      "undertone: a streaming spoken-dialogue engine in which a frozen LLM hears how you speak.\n"
      "Configuration: built-in defaults (see config/default.toml), then --config FILE, then --set key=value."};
  app.set_version_flag("--version",
                       std::string("undertone ") + UNDERTONE_VERSION + " (CAF " + actors::caf_version_string() +
                           ", ZeroMQ " + transport::zmq_version_string() + ", LibTorch " + models::torch_version() +
                           ", protocol " + std::to_string(transport::protocol_version) + ")");
  apps::global_options g;
  app.add_option("-c,--config", g.config_file, "TOML config file (see config/default.toml)")
      ->check(CLI::ExistingFile);
  app.add_option("-s,--set", g.overrides, "override one key, e.g. --set llm.dtype=bf16 (repeatable)")
      ->expected(1)
      ->multi_option_policy(CLI::MultiOptionPolicy::TakeAll);
  app.add_option("--log-level", g.log_level, "trace, debug, info, warn, error or off (= --set general.log_level=...)");
  app.fallthrough();
  app.require_subcommand(1);

  apps::add_run_command(app, g);
  apps::add_chat_command(app, g);
  apps::add_encode_command(app, g);
  apps::add_train_command(app, g);
  apps::add_eval_command(app, g);
  apps::add_config_command(app, g);
  apps::add_models_command(app, g);
  apps::add_model_command(app, g);
  apps::add_data_command(app, g);
  apps::add_send_command(app, g);
  apps::add_talk_command(app, g);
  apps::add_serve_command(app, g);
  apps::add_sessions_command(app, g);
  apps::add_annotate_command(app, g);
  apps::add_replay_command(app, g);
  apps::add_finetune_command(app, g);
  apps::add_worker_command(app, g);

  // Logging is set up before any subcommand runs, from the effective config.
  app.parse_complete_callback([&g] {
    try {
      apps::setup_logging(apps::effective_config(g));
    } catch (const std::exception&) {
      // Reported by the subcommand that loads the config.
      apps::setup_logging(config::undertone_config{});
    }
  });

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  } catch (const config::config_error& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 2;
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 1;
  }
  return apps::exit_code();
}
