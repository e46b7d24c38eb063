#include "apps/common.hpp"

#include <algorithm>

#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/spdlog.h>
#include <unistd.h>

#include <cstdlib>

#include "models/runtime.hpp"

namespace undertone::apps {

config::undertone_config effective_config(const global_options& g) {
  config::undertone_config cfg =
      g.config_file.empty() ? config::undertone_config{} : config::load_file(g.config_file);
  for (const auto& o : g.overrides) config::apply_override(cfg, o);
  if (!g.log_level.empty()) config::apply_override(cfg, "general.log_level=" + g.log_level);
  config::validate(cfg);
  return cfg;
}

void setup_logging(const config::undertone_config& cfg) {
  auto logger = spdlog::stderr_color_mt("undertone");
  spdlog::set_default_logger(logger);
  spdlog::set_level(spdlog::level::from_str(cfg.general.log_level));
  spdlog::set_pattern("[%H:%M:%S.%e] [%^%l%$] %v");
}

void reexec_with_runtime_env(int argc, char** argv) {
  (void)argc;
  if (std::getenv("UNDERTONE_NO_REEXEC")) return;
  auto env = models::recommended_runtime_env();
  if (env.empty()) return;
  for (const auto& [k, v] : env) ::setenv(k.c_str(), v.c_str(), 0);
  ::setenv("UNDERTONE_NO_REEXEC", "1", 1);  // never loop
  ::execv("/proc/self/exe", argv);
  // execv failed: carry on with the slower settings rather than not at all.
}

int& exit_code() {
  static int code = 0;
  return code;
}

std::string connectable_endpoint(std::string ep) {
  for (const std::string wild : {"//*:", "//0.0.0.0:"}) {
    auto p = ep.find(wild);
    if (p != std::string::npos) ep.replace(p, wild.size(), "//127.0.0.1:");
  }
  return ep;
}

double percentile(std::vector<double> v, double p) {
  if (v.empty()) return -1;
  std::sort(v.begin(), v.end());
  const size_t i = std::min(v.size() - 1, size_t(p / 100.0 * double(v.size() - 1) + 0.5));
  return v[i];
}

CLI::Option* add_token_option(CLI::App* cmd, std::string& token) {
  return cmd->add_option("--token", token,
                         "the server's auth token (default: env UNDERTONE_AUTH_TOKEN, then server.auth_token / "
                         "server.auth_token_file); prefer the variable or the file: a --token is visible in ps");
}

}  // namespace undertone::apps
