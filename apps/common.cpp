#include "apps/common.hpp"

#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/spdlog.h>

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

int& exit_code() {
  static int code = 0;
  return code;
}

}  // namespace undertone::apps
