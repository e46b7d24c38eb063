// `undertone config check FILE` and `undertone config show`.
#include <iostream>

#include "apps/common.hpp"

namespace undertone::apps {

void add_config_command(CLI::App& app, global_options& g) {
  auto* cmd = app.add_subcommand("config", "Validate or print configuration");
  cmd->require_subcommand(1);

  auto* check = cmd->add_subcommand("check", "Validate a TOML config file (unknown keys, types, ranges)");
  static std::string file;
  check->add_option("FILE", file, "config file to check")->required();
  check->callback([&g] {
    try {
      auto gg = g;
      gg.config_file = file;
      effective_config(gg);
      std::cout << file << ": ok\n";
    } catch (const config::config_error& e) {
      std::cerr << "error: " << e.what() << "\n";
      exit_code() = 2;
    }
  });

  auto* show = cmd->add_subcommand("show", "Print the effective configuration (defaults + --config + --set) as TOML");
  show->callback([&g] {
    std::cout << config::to_toml(effective_config(g));
  });
}

}  // namespace undertone::apps
