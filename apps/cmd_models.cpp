// `undertone models list|verify|info`: the model cache.
#include <filesystem>
#include <iostream>

#include "apps/common.hpp"
#include "models/model_info.hpp"
#include "models/model_store.hpp"
#include "models/speech_encoder.hpp"

namespace undertone::apps {

namespace {
const char* const pinned[] = {"smollm2-135m-instruct", "whisper-tiny.en", "undertone-projector"};
}

void add_models_command(CLI::App& app, global_options& g) {
  auto* cmd = app.add_subcommand("models", "Inspect and verify the model cache ($UNDERTONE_HOME/models)");
  cmd->require_subcommand(1);

  auto* list = cmd->add_subcommand("list", "List cached models");
  list->callback([&g] {
    auto cfg = effective_config(g);
    std::string home = config::resolve_model_home(cfg);
    std::cout << "model cache: " << home << "\n";
    for (const char* name : pinned) {
      try {
        auto m = models::find_cached_model(home, name);
        models::verify_model(m, false);
        std::cout << "  " << name << "  [" << m.kind << "]  " << m.main << "  (" << m.source << ")\n";
      } catch (const std::exception& e) {
        std::cout << "  " << name << "  MISSING: " << e.what() << "\n";
        exit_code() = 1;
      }
    }
  });

  auto* verify = cmd->add_subcommand("verify", "Re-hash every cached file against its pinned sha256");
  verify->callback([&g] {
    auto cfg = effective_config(g);
    std::string home = config::resolve_model_home(cfg);
    for (const char* name : pinned) {
      try {
        auto m = models::find_cached_model(home, name);
        models::verify_model(m, true);
        std::cout << name << ": ok (" << m.files.size() << " files, sha256 verified)\n";
      } catch (const std::exception& e) {
        std::cerr << name << ": FAILED: " << e.what() << "\n";
        exit_code() = 2;
      }
    }
  });

  auto* info = cmd->add_subcommand("info", "Print a checkpoint's metadata (architecture, sizes, vocabulary)");
  static std::vector<std::string> specs;
  info->add_option("MODEL", specs, "cache names or paths (default: the configured LLM and encoder)");
  info->callback([&g] {
    auto cfg = effective_config(g);
    std::string home = config::resolve_model_home(cfg);
    auto todo = specs.empty() ? std::vector<std::string>{cfg.llm.model, cfg.encoder.model} : specs;
    for (const auto& s : todo) {
      try {
        std::cout << models::summarize_any(models::resolve_model_path(home, s)).to_string() << "\n";
      } catch (const std::exception& e) {
        std::cerr << s << ": " << e.what() << "\n";
        exit_code() = 1;
      }
    }
  });

  auto* conv = cmd->add_subcommand("convert-projector",
                                   "Rewrite a projector checkpoint in another dtype (e.g. bf16 to ship it at half size)");
  static std::string conv_in, conv_out, conv_dtype = "bf16";
  conv->add_option("IN", conv_in, "projector.safetensors from undertone train")->required()->check(CLI::ExistingFile);
  conv->add_option("OUT", conv_out, "file to write")->required();
  conv->add_option("--dtype", conv_dtype, "fp32, bf16 or fp16")->capture_default_str();
  conv->callback([] {
    try {
      models::convert_projector(conv_in, conv_out, conv_dtype);
      std::cout << conv_out << ": written (" << conv_dtype << ", " << std::filesystem::file_size(conv_out)
                << " bytes)\n";
    } catch (const std::exception& e) {
      std::cerr << "convert-projector: " << e.what() << "\n";
      exit_code() = 1;
    }
  });
}

}  // namespace undertone::apps
