// `undertone eval`: emotion and fidelity evaluation of trained projectors against
// baselines (docs/evaluation.md). The work is done by models/evaluation.hpp;
// this file maps flags and config onto it and writes the report.
#include <filesystem>
#include <fstream>
#include <iostream>

#include <nlohmann/json.hpp>

#include "apps/common.hpp"
#include "models/evaluation.hpp"
#include "models/model_store.hpp"
#include "models/runtime.hpp"

namespace undertone::apps {

namespace {

namespace fs = std::filesystem;

struct eval_flags {
  std::vector<std::string> manifests;
  std::string projector;
  bool fresh = false;
  std::vector<std::string> baselines;
  std::string split = "val", probe_split = "train";
  bool calm_as_neutral = false;
  std::string out = "eval-out";
  int64_t max_eval = 0, max_probe_train = 0;
  bool bf16 = false;
  int64_t max_response_tokens = 0, teacher_batch = 16, answer_tokens = 24, batch = 8;
  std::string teacher_dtype = "fp32";
  double probe_l2 = 1e-3;
  int64_t probe_iterations = 300;
  bool no_text = false, no_encoder_probe = false;
  std::string cache_dir;
  uint64_t seed = 1;
  int64_t fresh_hidden = 1024;
  std::string progress = "auto";
};

/// "NAME=PATH" -> {NAME, PATH}; a bare PATH gets `default_name`.
models::eval_system_spec parse_system(const std::string& s, const std::string& default_name) {
  auto eq = s.find('=');
  if (eq == std::string::npos || eq == 0) return {default_name, s};
  return {s.substr(0, eq), s.substr(eq + 1)};
}

/// The training run's max_response_tokens (run.json in the projector's run
/// directory: the path itself, or up to 3 parents of a checkpoint file); 0 if none.
int64_t run_response_cap(const std::string& projector) {
  if (projector.empty()) return 0;
  fs::path p = fs::absolute(projector);
  for (int up = 0; up < 4 && !p.empty(); ++up, p = p.parent_path()) {
    fs::path rj = p / "run.json";
    if (fs::is_regular_file(rj)) {
      std::ifstream in(rj);
      auto j = nlohmann::json::parse(in, nullptr, false);
      if (!j.is_discarded() && j.contains("max_response_tokens")) return j["max_response_tokens"].get<int64_t>();
    }
    if (p == p.parent_path()) break;
  }
  return 0;
}

int run_eval(const eval_flags& f, const global_options& g) {
  namespace M = models;
  if (f.manifests.empty()) {
    std::cerr << "error: --manifest is required (build one with `undertone data ravdess --out FILE`)\n";
    return 2;
  }
  if (f.projector.empty() && !f.fresh) {
    std::cerr << "error: give --projector (a projector.safetensors, trainables.safetensors or a training run "
                 "directory) or --fresh-projector\n";
    return 2;
  }
  auto cfg = effective_config(g);
  M::set_compute_threads(int(cfg.general.threads));
  const std::string home = config::resolve_model_home(cfg);

  M::eval_options o;
  o.manifests = f.manifests;
  o.split = f.split;
  o.probe_split = f.probe_split;
  o.calm_as_neutral = f.calm_as_neutral;
  o.max_eval = f.max_eval;
  o.max_probe_train = f.max_probe_train;
  o.seed = f.seed;
  o.systems.push_back(parse_system(f.projector, "speech"));
  for (const auto& b : f.baselines) {
    auto s = parse_system(b, "");
    if (s.name.empty()) {
      std::cerr << "error: --baseline-projector needs NAME=PATH (e.g. stage1=runs/s1), got " << b << "\n";
      return 2;
    }
    o.systems.push_back(s);
  }
  o.text_baseline = !f.no_text;
  o.encoder_probe = !f.no_encoder_probe;
  o.fresh_hidden = f.fresh_hidden;
  o.llm_path = M::resolve_model_path(home, cfg.llm.model);
  o.llm_device = cfg.llm.device;
  o.llm_dtype = f.bf16 ? "bf16" : models::resolve_dtype(cfg.llm.dtype, cfg.llm.device);
  o.chat_template = cfg.llm.chat_template;
  o.encoder_path = M::resolve_model_path(home, cfg.encoder.model);
  o.encoder_device = cfg.encoder.device;
  o.chunk_ms = cfg.encoder.chunk_ms;
  o.context_blocks = cfg.encoder.window_blocks > 0 ? cfg.encoder.window_blocks : -1;
  o.stack_frames = cfg.encoder.stack_frames;
  o.mel_normalization = cfg.encoder.normalization;
  o.cache_dir = f.cache_dir.empty() ? home + "/train-cache" : f.cache_dir;
  o.max_response_tokens = f.max_response_tokens;
  if (o.max_response_tokens <= 0) {
    o.max_response_tokens = run_response_cap(f.projector);
    if (o.max_response_tokens > 0)
      std::cout << "teacher answer cap " << o.max_response_tokens << " tokens (from the training run's run.json)\n";
    else
      o.max_response_tokens = 48;
  }
  o.teacher_dtype = f.teacher_dtype;
  o.teacher_batch = f.teacher_batch;
  o.answer_tokens = f.answer_tokens;
  o.batch = f.batch;
  o.probe_l2 = f.probe_l2;
  o.probe_iterations = f.probe_iterations;
  o.progress_tty = f.progress == "bar" ? 1 : f.progress == "lines" ? 0 : -1;

  auto rep = M::run_evaluation(o);
  rep.setup["torch"] = M::torch_version();
  rep.setup["threads"] = M::torch_parallel_info();
  auto problems = M::write_eval_outputs(rep, f.out);
  std::cout << "\n" << M::eval_markdown(rep) << "\n";
  for (const auto& p : problems) std::cerr << "note: no confusion plot: " << p << "\n";
  std::cout << "wrote " << (fs::path(f.out) / "eval.md").string() << ", eval.json and confusion_*.png\n";
  return 0;
}

}  // namespace

void add_eval_command(CLI::App& app, global_options& g) {
  static eval_flags f;
  auto* cmd = app.add_subcommand(
      "eval",
      "Evaluate aligned speech encoders on a manifest's held-out speakers: linear-probe emotion accuracy, the LLM's "
      "own answer to \"How does the speaker feel?\", ranking of emotion-specific teacher answers, semantic fidelity; "
      "against baselines (other projectors, frozen encoder, transcript-only text, chance). Writes DIR/eval.md, "
      "DIR/eval.json, DIR/confusion_<system>_<metric>.png (docs/evaluation.md). LLM and encoder come from llm.* / "
      "encoder.* of the config, as in training.");
  cmd->add_option("-m,--manifest", f.manifests, "JSONL manifest(s); splits are by speaker")->check(CLI::ExistingFile);
  cmd->add_option("-p,--projector", f.projector,
                  "the system under test, [NAME=]PATH (name 'speech' by default): projector.safetensors, a "
                  "checkpoint's trainables.safetensors or a training run directory (its final projector, else its "
                  "latest checkpoint)");
  cmd->add_flag("--fresh-projector", f.fresh,
                "evaluate a freshly initialized projector as the system under test (a floor; no --projector)");
  cmd->add_option("-b,--baseline-projector", f.baselines,
                  "NAME=PATH of a baseline projector, e.g. stage1=runs/s1 (repeatable)")
      ->expected(1)
      ->multi_option_policy(CLI::MultiOptionPolicy::TakeAll);
  cmd->add_option("--split", f.split, "evaluated split (speakers never trained on)")
      ->capture_default_str()
      ->check(CLI::IsMember({"train", "val", "test"}));
  cmd->add_option("--probe-split", f.probe_split, "split the linear probe is trained on (other speakers)")
      ->capture_default_str()
      ->check(CLI::IsMember({"train", "val", "test"}));
  cmd->add_flag("--calm-as-neutral", f.calm_as_neutral, "count RAVDESS calm as neutral (default: calm is excluded)");
  cmd->add_option("-o,--out", f.out, "output directory (eval.md, eval.json, confusion_*.png)")->capture_default_str();
  cmd->add_option("--max", f.max_eval, "evaluate at most N utterances, class-balanced (0 = all)")
      ->capture_default_str();
  cmd->add_option("--max-probe-train", f.max_probe_train, "train the probe on at most N utterances (0 = all)")
      ->capture_default_str();
  cmd->add_flag("--bf16", f.bf16, "run the frozen LLM in bf16 (about 2-3x faster on CPU; scores shift slightly)");
  cmd->add_option("--max-response-tokens", f.max_response_tokens,
                  "teacher answer cap as used in training (part of the teacher cache key); 0 = from the "
                  "projector's run.json, else 48")
      ->capture_default_str();
  cmd->add_option("--teacher-dtype", f.teacher_dtype, "teacher precision as used in training (part of the cache key)")
      ->capture_default_str()
      ->check(CLI::IsMember({"fp32", "bf16"}));
  cmd->add_option("--teacher-batch", f.teacher_batch, "sequences per batched teacher decode step (only for misses)")
      ->capture_default_str();
  cmd->add_option("--answer-tokens", f.answer_tokens, "cap of the LLM's answer to \"How does the speaker feel?\"")
      ->capture_default_str();
  cmd->add_option("--batch", f.batch, "sequences per generation / scoring forward")->capture_default_str();
  cmd->add_option("--probe-l2", f.probe_l2, "L2 weight of the linear probe (on standardized features)")
      ->capture_default_str();
  cmd->add_option("--probe-iterations", f.probe_iterations, "LBFGS iterations of the probe")->capture_default_str();
  cmd->add_flag("--no-text-baseline", f.no_text, "skip the transcript-only text cascade row");
  cmd->add_flag("--no-encoder-probe", f.no_encoder_probe, "skip the probe on the frozen encoder's outputs");
  cmd->add_option("--cache-dir", f.cache_dir,
                  "teacher answers + features cache shared with training (default <model_home>/train-cache)");
  cmd->add_option("--seed", f.seed, "subsets (--max) and the fresh projector")->capture_default_str();
  cmd->add_option("--fresh-hidden", f.fresh_hidden, "hidden width of --fresh-projector")->capture_default_str();
  cmd->add_option("--progress", f.progress, "auto, bar or lines")
      ->capture_default_str()
      ->check(CLI::IsMember({"auto", "bar", "lines"}));
  cmd->callback([&g] {
    try {
      exit_code() = run_eval(f, g);
    } catch (const std::exception& e) {
      std::cerr << "error: " << e.what() << "\n";
      exit_code() = 1;
    }
  });
}

}  // namespace undertone::apps
