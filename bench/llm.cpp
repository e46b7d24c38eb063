// bench/llm: prefill and decode throughput of undertone's frozen LLM at several
// batch sizes, the same workload as bench/llm_reference.py runs on llama.cpp.
//
// Workload per batch size B: prefill B prompts of P random tokens (one step per
// prompt), then N decode steps, each ONE batched step of B rows (one per
// sequence) with greedy argmax on the returned logits. Median of --repeats.
// Output: one JSON object per line (engine, dtype, cpu_decode, batch,
// prefill_tok_s, decode_tok_s, decode_ms_per_step, peak_rss_mb).
// --cpu-decode both runs the two modes of llm.cpu_decode in one process
// (models loaded one after the other), so their ratio is an A/B on the same
// machine state; more modes may be listed (e.g. `off f32act auto`: f32act is
// auto with fp32 activations at every step size, the kernels' crossover).
// --max-rows sets llama_options::cpu_decode_max_rows (largest step on the
// kernels), so `--batch 5 8 16 32 64 --max-rows 256 --cpu-decode both` shows
// where the kernels stop beating ATen for decode steps (B rows) and
// `--prompt-tokens 128` for prefill steps (P rows, prefill_ms_per_step).
// --step-rows R makes each decode step B sequences x R rows (after the
// P-token prompts), e.g. `--batch 16 --step-rows 11 --prompt-tokens 64` for
// the server's 16-session end-of-turn step of 176 rows.
#include <sys/resource.h>

#include <algorithm>
#include <chrono>
#include <iostream>
#include <limits>
#include <random>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "models/nn/llama.hpp"
#include "models/runtime.hpp"

using namespace undertone::models;
using clk = std::chrono::steady_clock;

namespace {
double peak_rss_mb() {
  rusage ru{};
  getrusage(RUSAGE_SELF, &ru);
  return double(ru.ru_maxrss) / 1024.0;
}
double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}
std::string default_model() {
  const char* h = std::getenv("UNDERTONE_HOME");
  std::string home = h && *h ? h : std::string(std::getenv("HOME")) + "/.cache/undertone";
  return home + "/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf";
}
}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"undertone LLM throughput benchmark (see bench/run_llm.sh for the comparison with llama.cpp)"};
  std::string model = default_model(), dtype = "fp32", device = "cpu";
  std::vector<std::string> cpu_decode{"auto"};
  const llama_options dflt;
  int64_t max_rows = dflt.cpu_decode_max_rows, bf16_rows = dflt.cpu_decode_bf16_rows;
  std::vector<int> batches{1, 4, 16, 64};
  bool amx_prepack = true;
  int prompt_tokens = 64, decode_tokens = 32, threads = 2, repeats = 3, step_rows = 1;
  app.add_option("--model", model, "GGUF file or HF directory")->capture_default_str();
  app.add_option("--dtype", dtype, "fp32, bf16 or fp16")->capture_default_str();
  app.add_option("--device", device, "cpu or cuda:N")->capture_default_str();
  app.add_option("--batch", batches, "batch sizes")->capture_default_str();
  app.add_option("--prompt-tokens", prompt_tokens)->capture_default_str();
  app.add_option("--decode-tokens", decode_tokens, "decode steps per batch size")->capture_default_str();
  app.add_option("--step-rows", step_rows,
                 "rows per sequence in each decode step (R > 1: B sequences x R new rows on top of the prompt, "
                 "logits for each sequence's last row, like the server's end-of-turn step; steps of B*R rows)")
      ->check(CLI::Range(1, 4096))
      ->capture_default_str();
  app.add_option("--threads", threads, "compute threads")->capture_default_str();
  app.add_option("--repeats", repeats)->capture_default_str();
  app.add_option("--cpu-decode", cpu_decode,
                 "CPU decode kernels (llm.cpu_decode), one or more of: auto, off, both (= off auto), f32act (auto "
                 "with fp32 activations at every step size); one row per mode and batch, modes interleaved")
      ->check(CLI::IsMember({"auto", "off", "both", "f32act"}))
      ->capture_default_str();
  int64_t amx_max_rows = dflt.cpu_decode_amx_max_rows;
  auto* mr = app.add_option("--max-rows", max_rows,
                            "largest step (rows) on the CPU decode kernels (llama_options::cpu_decode_max_rows; when "
                            "given, also cpu_decode_amx_max_rows)")
                 ->capture_default_str();
  app.add_option("--amx-max-rows", amx_max_rows,
                 "largest step on pre-packed AMX tiles (bf16 models; llama_options::cpu_decode_amx_max_rows)")
      ->capture_default_str();
  app.add_flag("!--no-amx-prepack", amx_prepack, "bf16 models: no pre-packed AMX tiles (gemm_bf16 per call)");
  app.add_option("--bf16-rows", bf16_rows,
                 "bf16 models: steps of at least this many rows use bf16 activations (llama_options::cpu_decode_bf16_rows)")
      ->capture_default_str();
  CLI11_PARSE(app, argc, argv);
  if (mr->count() > 0 && app.get_option("--amx-max-rows")->count() == 0) amx_max_rows = max_rows;

  set_compute_threads(threads);
  std::vector<std::string> modes;
  for (const auto& c : cpu_decode) {
    if (c == "both") {
      modes.push_back("off");
      modes.push_back("auto");
    } else {
      modes.push_back(c);
    }
  }
  struct loaded {
    std::string mode;
    std::shared_ptr<llama_model> m;
    double load_s;
  };
  std::vector<loaded> ms;
  for (const auto& mode : modes) {
    llama_options opt;
    opt.device = torch::Device(device);
    opt.dtype = dtype == "bf16" ? torch::kBFloat16 : dtype == "fp16" ? torch::kFloat16 : torch::kFloat32;
    opt.cpu_decode = mode != "off";
    opt.cpu_decode_max_rows = max_rows;
    opt.cpu_decode_amx_max_rows = amx_max_rows;
    opt.cpu_decode_amx_prepack = amx_prepack;
    opt.cpu_decode_bf16_rows = mode == "f32act" ? std::numeric_limits<int64_t>::max() : bf16_rows;
    auto t0 = clk::now();
    auto m = llama_model::load(model, opt);
    double load_s = std::chrono::duration<double>(clk::now() - t0).count();
    std::cerr << "loaded " << model << " (" << dtype << ", cpu_decode " << mode << ": " << m->cpu_decode_info()
              << ") in " << load_s << " s\n";
    ms.push_back({mode, m, load_s});
  }

  for (int B : batches) {
    // Repeats alternate between the modes (A/B interleaved), so that a change
    // of machine load hits both.
    std::vector<std::vector<double>> prefill_s(ms.size()), decode_s(ms.size());
    std::vector<std::mt19937> rngs(ms.size(), std::mt19937(0));
    for (int rep = 0; rep < repeats; ++rep) {
      for (size_t mi = 0; mi < ms.size(); ++mi) {
        const auto& m = ms[mi].m;
        std::uniform_int_distribution<int64_t> tok(100, m->n_vocab() - 100);
        auto cache = m->make_cache(int64_t(B) * (prompt_tokens + int64_t(decode_tokens) * step_rows + 8));
        std::vector<int64_t> last(static_cast<size_t>(B));
        auto a = clk::now();
        for (int s = 0; s < B; ++s) {
          std::vector<int64_t> ids(static_cast<size_t>(prompt_tokens));
          for (auto& x : ids) x = tok(rngs[mi]);
          llm_batch b;
          b.add_tokens(ids, s, 0, true);
          last[size_t(s)] = m->step(b, cache).argmax(-1).item<int64_t>();
        }
        auto c = clk::now();
        for (int step = 0; step < decode_tokens; ++step) {
          llm_batch b;
          for (int s = 0; s < B; ++s)
            for (int r = 0; r < step_rows; ++r)  // the same token R times: the cost does not depend on it
              b.add_token(last[size_t(s)], s, prompt_tokens + int64_t(step) * step_rows + r, r + 1 == step_rows);
          auto next = m->step(b, cache).argmax(-1).to(torch::kCPU);
          for (int s = 0; s < B; ++s) last[size_t(s)] = next[s].item<int64_t>();
        }
        auto d = clk::now();
        prefill_s[mi].push_back(std::chrono::duration<double>(c - a).count());
        decode_s[mi].push_back(std::chrono::duration<double>(d - c).count());
      }
    }
    for (size_t mi = 0; mi < ms.size(); ++mi) {
      double p = median(prefill_s[mi]), dd = median(decode_s[mi]);
      nlohmann::json j{{"engine", "undertone"}, {"dtype", dtype}, {"cpu_decode", ms[mi].mode}, {"batch", B},
                       {"threads", threads}, {"prompt_tokens", prompt_tokens}, {"decode_tokens", decode_tokens},
                       {"step_rows", step_rows},
                       {"prefill_tok_s", std::round(10 * B * prompt_tokens / p) / 10},
                       {"decode_tok_s", std::round(10 * B * decode_tokens * step_rows / dd) / 10},
                       {"decode_ms_per_step", std::round(100 * 1000 * dd / decode_tokens) / 100},
                       {"prefill_ms_per_step", std::round(100 * 1000 * p / B) / 100},
                       {"peak_rss_mb", std::round(peak_rss_mb())}, {"load_s", std::round(100 * ms[mi].load_s) / 100}};
      std::cout << j.dump() << std::endl;
    }
  }
  return 0;
}
