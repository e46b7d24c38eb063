// `undertone run`: the main job on the embedded default (one process, real
// models). Today it loads and checks both pinned models and prints their
// metadata; it grows into serve + a demo conversation as the engine lands.
#include <algorithm>
#include <chrono>
#include <iostream>
#include <vector>

#include <spdlog/spdlog.h>

#include "apps/common.hpp"
#include "models/chat_llm.hpp"
#include "models/ct2_model.hpp"
#include "models/gguf.hpp"
#include "models/model_info.hpp"
#include "models/model_store.hpp"
#include "models/runtime.hpp"

namespace undertone::apps {

namespace {

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// Dequantizes every tensor once: proves the weights are readable end to end.
int64_t load_gguf_weights(const std::string& path) {
  models::gguf_file g(path);
  std::vector<float> buf;
  int64_t n = 0;
  for (const auto& t : g.tensors()) {
    buf.resize(size_t(t.n_elements()));
    g.dequantize(t, buf.data());
    n += t.n_elements();
  }
  return n;
}

int64_t load_ct2_weights(const std::string& dir) {
  models::ct2_model m(dir);
  int64_t n = 0;
  for (const auto& v : m.variables()) n += int64_t(m.to_float(v).size());
  return n;
}

}  // namespace

void add_run_command(CLI::App& app, global_options& g) {
  auto* cmd = app.add_subcommand(
      "run",
      "The main job on the embedded default: load the pinned LLM and speech model, report on them, and have the "
      "LLM answer a text turn");
  cmd->callback([&g] {
    auto cfg = effective_config(g);
    int threads = models::set_compute_threads(int(cfg.general.threads));
    std::string home = config::resolve_model_home(cfg);
    spdlog::info("undertone run: model cache {}, {} compute threads, torch {}", home, threads,
                 models::torch_version());
    try {
      auto t0 = std::chrono::steady_clock::now();
      std::string llm = models::resolve_model_path(home, cfg.llm.model);
      auto llm_summary = models::summarize_any(llm);
      int64_t llm_params = load_gguf_weights(llm);
      spdlog::info("LLM weights dequantized: {} values in {:.2f} s", llm_params, seconds_since(t0));
      std::cout << "== frozen LLM ==\n" << llm_summary.to_string() << "\n";

      t0 = std::chrono::steady_clock::now();
      std::string enc = models::resolve_model_path(home, cfg.encoder.model);
      auto enc_summary = models::summarize_any(enc);
      int64_t enc_params = load_ct2_weights(enc);
      spdlog::info("speech encoder weights read: {} values in {:.2f} s", enc_params, seconds_since(t0));
      std::cout << "== speech model ==\n" << enc_summary.to_string() << "\n";

      // The frozen LLM answers a text turn (the speech path joins once the
      // engine lands): proves model, tokenizer, template and sampler end to end.
      t0 = std::chrono::steady_clock::now();
      models::chat_llm chat(llm_options_from(cfg));
      spdlog::info("LLM ready in {:.2f} s: {}", seconds_since(t0), chat.describe());
      const std::string question = "In one sentence, what does the tone of someone's voice tell you?";
      std::cout << "== text turn ==\nuser: " << question << "\nassistant: " << std::flush;
      auto req = request_from(cfg);
      req.max_tokens = std::min<int64_t>(req.max_tokens, 64);
      auto res = chat.generate(0, {models::prompt_part::from_text(chat.format_chat({{"user", question}}))}, req,
                               [](const std::string& d) {
                                 std::cout << d << std::flush;
                                 return true;
                               });
      std::cout << std::endl;
      spdlog::info("{} prompt tokens, {} answer tokens, first token after {:.0f} ms, {:.1f} tok/s ({})",
                   res.prompt_tokens, res.tokens.size(), 1000 * res.first_token_s,
                   res.tokens.size() > 1 ? double(res.tokens.size() - 1) / res.decode_s : 0.0, res.stop_reason);
      std::cout << "\nThe streaming speech path (encoder -> speech tokens -> LLM) and the server are the open "
                   "issues; see `issues list`.\n";
    } catch (const std::exception& e) {
      spdlog::error("{}", e.what());
      exit_code() = 1;
    }
  });
}

}  // namespace undertone::apps
