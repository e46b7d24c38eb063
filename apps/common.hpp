// Shared plumbing for the undertone subcommands: global options, effective
// configuration, logging. Each subcommand lives in its own cmd_*.cpp and
// registers itself with add_*_command().
#pragma once

#include <functional>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>

#include "config/config.hpp"
#include "models/chat_llm.hpp"

namespace undertone::apps {

/// Options every subcommand understands.
struct global_options {
  std::string config_file;           ///< --config FILE
  std::vector<std::string> overrides;  ///< --set section.key=value (repeatable)
  std::string log_level;             ///< --log-level (shortcut for --set general.log_level=...)
};

/// Builds the effective configuration: defaults, then --config, then --set, then
/// --log-level; validated. Throws config::config_error.
config::undertone_config effective_config(const global_options& g);

/// Configures spdlog's default logger from the config (level, stderr sink).
void setup_logging(const config::undertone_config& cfg);

/// Every subcommand: builds its CLI11 subcommand on `app` and sets its callback.
void add_config_command(CLI::App& app, global_options& g);
void add_models_command(CLI::App& app, global_options& g);
void add_model_command(CLI::App& app, global_options& g);  ///< encoder registry, apps/cmd_model.cpp
void add_run_command(CLI::App& app, global_options& g);
void add_chat_command(CLI::App& app, global_options& g);
void add_encode_command(CLI::App& app, global_options& g);
void add_train_command(CLI::App& app, global_options& g);
void add_eval_command(CLI::App& app, global_options& g);
void add_data_command(CLI::App& app, global_options& g);
void add_send_command(CLI::App& app, global_options& g);  ///< (transport) apps/cmd_send.cpp
void add_talk_command(CLI::App& app, global_options& g);  ///< (transport) apps/cmd_talk.cpp
void add_serve_command(CLI::App& app, global_options& g);  ///< (engine) apps/cmd_serve.cpp
void add_sessions_command(CLI::App& app, global_options& g);  ///< (store) apps/cmd_sessions.cpp
void add_annotate_command(CLI::App& app, global_options& g);  ///< (store) apps/cmd_sessions.cpp
void add_replay_command(CLI::App& app, global_options& g);  ///< (transport) apps/cmd_replay.cpp
void add_finetune_command(CLI::App& app, global_options& g);  ///< (issue 7) apps/cmd_finetune.cpp
void add_worker_command(CLI::App& app, global_options& g);  ///< (remote LLM worker) apps/cmd_worker.cpp

/// The LLM options and generation request that the config describes (model
/// resolved in the cache).
models::chat_llm_options llm_options_from(const config::undertone_config& cfg);
models::generation_request request_from(const config::undertone_config& cfg);

/// Re-executes the program once with models::recommended_runtime_env() set
/// (OpenMP wait policy, OpenBLAS kernels), which only take effect at process
/// start. No-op when nothing is missing or UNDERTONE_NO_REEXEC is set.
void reexec_with_runtime_env(int argc, char** argv);

/// A client endpoint for a bind endpoint: a wildcard host becomes loopback
/// ("tcp://*:5555" or "tcp://0.0.0.0:5555" -> "tcp://127.0.0.1:5555").
std::string connectable_endpoint(std::string bind);

/// The p-th percentile (0..100, nearest rank) of `v`; -1 when `v` is empty.
double percentile(std::vector<double> v, double p);

/// Exit code set by a subcommand callback (callbacks cannot return one).
int& exit_code();

/// Adds `--token TOKEN` (the server's shared-secret auth token) to a command
/// that talks to a server. Resolve it with transport::client_auth_token(token,
/// cfg.server): --token, then env UNDERTONE_AUTH_TOKEN, then server.auth_token /
/// server.auth_token_file of the config.
CLI::Option* add_token_option(CLI::App* cmd, std::string& token);

}  // namespace undertone::apps
