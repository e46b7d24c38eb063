// `undertone chat`: text chat with the frozen LLM, streamed, multi-turn (the
// KV cache keeps the conversation, so each turn only pays for its new tokens).
#include <unistd.h>

#include <iostream>
#include <optional>
#include <random>

#include <spdlog/spdlog.h>

#include "apps/common.hpp"
#include "models/chat_llm.hpp"
#include "models/model_store.hpp"
#include "models/runtime.hpp"

namespace undertone::apps {

namespace {
struct chat_flags {
  std::string prompt;
  std::string system;
  std::optional<double> temperature, top_p, repetition_penalty;
  std::optional<int64_t> top_k, seed, max_tokens;
  bool stats = false;
};
}  // namespace

models::chat_llm_options llm_options_from(const config::undertone_config& cfg) {
  models::chat_llm_options o;
  o.path = models::resolve_model_path(config::resolve_model_home(cfg), cfg.llm.model);
  o.device = cfg.llm.device;
  o.dtype = models::resolve_dtype(cfg.llm.dtype, cfg.llm.device);
  o.context_tokens = cfg.llm.context_tokens;
  o.kv_cells = cfg.llm.kv_cells;
  o.max_batch_rows = cfg.llm.max_batch_rows;
  o.chat_template = cfg.llm.chat_template;
  o.cpu_decode = cfg.llm.cpu_decode;
  return o;
}

models::generation_request request_from(const config::undertone_config& cfg) {
  models::generation_request r;
  r.sampling.temperature = cfg.sampling.temperature;
  r.sampling.top_k = cfg.sampling.top_k;
  r.sampling.top_p = cfg.sampling.top_p;
  r.sampling.repetition_penalty = cfg.sampling.repetition_penalty;
  r.sampling.seed = cfg.sampling.seed < 0 ? uint64_t(std::random_device{}()) : uint64_t(cfg.sampling.seed);
  r.max_tokens = cfg.sampling.max_tokens;
  return r;
}

void add_chat_command(CLI::App& app, global_options& g) {
  static chat_flags f;
  auto* cmd = app.add_subcommand("chat",
                                 "Text chat with the frozen LLM (streamed). Without --prompt: a REPL; type /reset "
                                 "to start over, /quit (or Ctrl-D) to leave.");
  cmd->add_option("-p,--prompt", f.prompt, "one-shot: answer this user message and exit");
  cmd->add_option("--system", f.system, "system prompt (default: the model's own, if its template has one)");
  cmd->add_option("--temperature", f.temperature, "0 = greedy (= --set sampling.temperature=...)");
  cmd->add_option("--top-k", f.top_k, "keep the k most likely tokens, 0 = all");
  cmd->add_option("--top-p", f.top_p, "nucleus mass, 1 = off");
  cmd->add_option("--repetition-penalty", f.repetition_penalty, "1 = off");
  cmd->add_option("--seed", f.seed, "sampling seed, -1 = random");
  cmd->add_option("--max-tokens", f.max_tokens, "answer length cap, tokens");
  cmd->add_flag("--stats", f.stats, "print prompt/answer token counts and timings after each answer");
  cmd->callback([&g] {
    auto gg = g;
    auto set = [&](const char* key, const auto& v) {
      if (v) gg.overrides.push_back(std::string(key) + "=" + std::to_string(*v));
    };
    set("sampling.temperature", f.temperature);
    set("sampling.top_p", f.top_p);
    set("sampling.repetition_penalty", f.repetition_penalty);
    set("sampling.top_k", f.top_k);
    set("sampling.seed", f.seed);
    set("sampling.max_tokens", f.max_tokens);
    auto cfg = effective_config(gg);
    models::set_compute_threads(int(cfg.general.threads));
    std::unique_ptr<models::chat_llm> llm;
    try {
      llm = std::make_unique<models::chat_llm>(llm_options_from(cfg));
    } catch (const std::exception& e) {
      std::cerr << "error: " << e.what() << "\n";
      exit_code() = 1;
      return;
    }
    spdlog::info("LLM: {}", llm->describe());
    auto req = request_from(cfg);
    std::vector<models::chat_message> conv;
    auto start = [&] {
      conv.clear();
      if (!f.system.empty()) conv.push_back({"system", f.system});
      llm->reset(0);
    };
    auto answer = [&](const std::string& user) {
      conv.push_back({"user", user});
      auto res = llm->generate(0, {models::prompt_part::from_text(llm->format_chat(conv))}, req,
                               [](const std::string& delta) {
                                 std::cout << delta << std::flush;
                                 return true;
                               });
      std::cout << "\n";
      conv.push_back({"assistant", res.text});
      if (f.stats)
        std::cerr << "[prompt " << res.prompt_tokens << " rows (" << res.reused_tokens << " reused), answer "
                  << res.tokens.size() << " tokens, first token " << int(1000 * res.first_token_s) << " ms, "
                  << (res.tokens.size() > 1 ? double(res.tokens.size() - 1) / res.decode_s : 0.0) << " tok/s, stop: "
                  << res.stop_reason << "]\n";
    };
    start();
    try {
      if (!f.prompt.empty()) {
        answer(f.prompt);
        return;
      }
      bool tty = ::isatty(0);
      std::string line;
      while (true) {
        if (tty) std::cout << "> " << std::flush;
        if (!std::getline(std::cin, line)) break;
        if (line == "/quit" || line == "/exit") break;
        if (line == "/reset") {
          start();
          std::cout << "(conversation reset)\n";
          continue;
        }
        if (line.empty()) continue;
        answer(line);
      }
    } catch (const std::exception& e) {
      std::cerr << "error: " << e.what() << "\n";
      exit_code() = 1;
    }
  });
}

}  // namespace undertone::apps
