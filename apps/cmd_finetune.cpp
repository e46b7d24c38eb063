// `undertone finetune`: online fine-tuning rounds in their own process, from
// manifests (docs/finetune.md). The work is models/finetune.hpp's
// finetune_round(); this file maps flags and config onto it, shows progress,
// prints the gate table and writes round.json.
#include <atomic>
#include <chrono>
#include <csignal>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <memory>
#include <thread>

#include "actors/engine.hpp"
#include "actors/finetune_actor.hpp"
#include "apps/common.hpp"
#include "models/finetune.hpp"
#include "models/encoder_registry.hpp"
#include "models/train_metrics.hpp"
#include "transport/auth.hpp"
#include "transport/control.hpp"

namespace undertone::apps {

namespace {

namespace fs = std::filesystem;
using nlohmann::json;

std::atomic<bool> g_stop{false};
void on_stop_signal(int) { g_stop.store(true); }

struct finetune_flags {
  std::vector<std::string> sessions, replay, val;
  std::string projector, out, cache_dir, metric, progress = "auto";
  std::string registry, server;  // publish target; running server's control endpoint ("none" = do not notify)
  std::string token;             // --token: the server's auth token
  int64_t steps = 0, batch = 0, max_val = -1, max_response_tokens = 0, min_new_turns = -1;
  double lr = 0, margin = -1, replay_ratio = -1, interval = 0;
  int threads = 0, nice = -1;
  uint64_t seed = 1;
  bool once = false;
};

int run_finetune(const finetune_flags& f, const global_options& g) {
  auto cfg = effective_config(g);
  models::finetune_options base = actors::finetune_options_from(cfg);
  // Flags override the config ([finetune], [llm], [encoder]).
  if (!f.replay.empty()) base.replay_manifests = f.replay;
  if (!f.val.empty()) base.val_manifests = f.val;
  if (!f.projector.empty()) base.projector = f.projector;
  if (!f.cache_dir.empty()) base.cache_dir = f.cache_dir;
  if (!f.metric.empty()) base.gate_metric = models::parse_gate_metric(f.metric);
  if (f.steps > 0) base.steps = f.steps;
  if (f.batch > 0) base.batch = f.batch;
  if (f.max_val >= 0) base.max_val = f.max_val;
  if (f.max_response_tokens > 0) base.max_response_tokens = f.max_response_tokens;
  if (f.lr > 0) base.lr = f.lr;
  if (f.margin >= 0) base.gate_margin = f.margin;
  if (f.replay_ratio >= 0) base.replay_ratio = f.replay_ratio;
  if (f.threads > 0) base.threads = f.threads;
  if (f.nice >= 0) base.nice = f.nice;
  base.seed = f.seed;
  base.session_manifests = f.sessions;
  if (base.projector.empty()) {
    std::cerr << "error: no projector to start from (encoder.projector is \"\" and no default in the model cache); "
                 "pass --projector FILE\n";
    return 2;
  }
  if (base.val_manifests.empty()) {
    std::cerr << "error: no held-out manifest: pass --val FILE (or set finetune.val_manifest)\n";
    return 2;
  }
  const std::string out_root = f.out.empty() ? actors::finetune_out_root(cfg) : f.out;
  const int tty = f.progress == "bar" ? 1 : f.progress == "lines" ? 0 : -1;
  const int64_t min_new = f.min_new_turns >= 0 ? f.min_new_turns : cfg.finetune.min_new_turns;

  std::signal(SIGINT, on_stop_signal);
  std::signal(SIGTERM, on_stop_signal);

  // A passing candidate goes into the encoder registry (verified, made current) and the
  // running server is told over its control endpoint (ZeroMQ) to swap to it now.
  const std::string registry_dir = f.registry.empty() ? actors::resolve_encoder_registry(cfg) : f.registry;
  const std::string server = f.server.empty() ? (cfg.server.control_bind.empty()
                                                     ? std::string("none")
                                                     : connectable_endpoint(cfg.server.control_bind))
                                              : f.server;
  const std::string token = server == "none" ? std::string() : transport::client_auth_token(f.token, cfg.server);
  models::publish_fn publish = [registry_dir, server, token](const std::string& projector_path, const json& meta) {
    models::encoder_registry reg(registry_dir);
    const std::string version = reg.publish(projector_path, meta, /*make_current=*/true);
    std::cout << "published " << version << " in " << registry_dir << "\n";
    if (server != "none") {
      try {
        const json r = transport::control_call(server, json{{"t", "encoder_swap"}, {"version", version}},
                                               std::chrono::seconds(30), token);
        std::cout << "server " << server << ": " << (r.value("ok", false) ? "swapped to " : "did not swap to ")
                  << version << (r.contains("message") ? " (" + r["message"].get<std::string>() + ")" : "") << "\n";
      } catch (const std::exception& e) {
        std::cout << "server " << server << " not told (" << e.what()
                  << "); it serves " << version << " from its next start, or run `undertone model use " << version
                  << " --server ENDPOINT`\n";
      }
    }
    return version;
  };

  // Serving first: between training steps, wait while the server has sessions open.
  if (server != "none" && cfg.finetune.pause_while_sessions > 0) {
    const int64_t threshold = cfg.finetune.pause_while_sessions;
    auto warned = std::make_shared<bool>(false);
    base.paused = [server, threshold, token, warned]() {
      try {
        const json r = transport::control_call(server, json{{"t", "status"}}, std::chrono::seconds(2), token);
        if (!r.value("ok", false) && !*warned) {
          *warned = true;
          std::cerr << "warning: server " << server << " refused the status request (" << r.value("message", r.dump())
                    << "); training will not wait for its sessions\n";
        }
        return r.value("sessions", int64_t(0)) >= threshold;
      } catch (const std::exception&) {
        return false;  // no server there: nothing to yield to
      }
    };
  }
  std::string projector = base.projector;
  int64_t last_turns = -1;
  int rc = 0;
  for (bool first = true; !g_stop.load(); first = false) {
    if (!first) {
      for (double waited = 0; waited < f.interval && !g_stop.load(); waited += 0.2)
        std::this_thread::sleep_for(std::chrono::milliseconds(200));
      if (g_stop.load()) break;
    }
    int64_t turns = 0;
    try {
      turns = models::count_annotated_turns(f.sessions, base.calm_as_neutral);
    } catch (const std::exception& e) {
      std::cerr << "error: " << e.what() << "\n";
      rc = 1;
      if (f.once) break;
      continue;
    }
    if (!f.once && last_turns >= 0 && turns - last_turns < min_new) {
      std::cout << turns - last_turns << " new annotated turns (< " << min_new << "); next check in " << f.interval
                << " s\n";
      continue;
    }
    last_turns = turns;
    models::finetune_options o = base;
    o.projector = projector;
    o.out_dir = models::new_round_dir(out_root);
    o.publish = publish;
    o.cancelled = [] { return g_stop.load(); };
    o.log = [](const std::string& s) { std::cout << s << std::endl; };
    std::unique_ptr<models::progress_bar> bar;
    std::string phase;
    o.progress = [&](const std::string& ph, int64_t d, int64_t n, const std::string& info) {
      if (ph != phase) {
        if (bar) bar->finish();
        bar = std::make_unique<models::progress_bar>(ph, tty, 30.0);
        phase = ph;
      }
      bar->update(d, n, 0, info);
    };
    std::cout << "round " << o.out_dir << ": " << turns << " annotated turns in " << f.sessions.size()
              << " sessions manifest(s); start from " << projector << "\n";
    json out;
    try {
      auto r = models::finetune_round(o);
      if (bar) bar->finish();
      bar.reset();
      std::cout << "\n" << models::gate_table(r);
      std::cout << "round: " << r.steps << " steps, train loss " << r.first_loss << " -> " << r.last_loss << ", "
                << r.seconds << " s (train " << r.train_seconds << " s, gate " << r.gate_seconds << " s; "
                << r.priority << ")\n";
      if (r.published) projector = r.candidate;
      out = r.to_json();
      rc = 0;
    } catch (const std::exception& e) {
      if (bar) bar->finish();
      bar.reset();
      std::cerr << "error: " << e.what() << "\n";
      out = {{"error", e.what()}, {"published", false}, {"out_dir", o.out_dir}};
      rc = 1;
    }
    const std::string rj = (fs::path(o.out_dir) / "round.json").string();
    std::ofstream(rj) << out.dump(2) << "\n";
    std::cout << "wrote " << rj << "\n";
    if (f.once) break;
  }
  return rc;
}

}  // namespace

void add_finetune_command(CLI::App& app, global_options& g) {
  static finetune_flags f;
  auto* cmd = app.add_subcommand(
      "finetune",
      "Online fine-tuning rounds (docs/finetune.md): continue alignment training of the projector from annotated "
      "logged sessions mixed with a replay buffer of the original training data, then publish the candidate only "
      "if the gate metric on held-out speakers does not regress by more than the margin. Runs at low priority "
      "(finetune.nice, finetune.threads). Defaults come from [finetune], [llm] and [encoder]; each round goes to "
      "OUT/round-<UTC time>/ with round.json.");
  cmd->add_option("--registry", f.registry, "encoder registry to publish into (default: encoder.registry, "
                                            "\"\" = <model_home>/encoders)");
  cmd->add_option("--server", f.server,
                  "control endpoint of the running server to swap after a publish (default: server.control_bind; "
                  "\"none\" = do not tell a server)");
  add_token_option(cmd, f.token);
  cmd->add_option("--sessions", f.sessions, "manifest(s) of annotated logged turns (the session store's export)")
      ->required()
      ->check(CLI::ExistingFile);
  cmd->add_option("--replay", f.replay,
                  "original training manifest(s); their split=train rows are the replay buffer "
                  "(default finetune.replay_manifests; repeatable)")
      ->check(CLI::ExistingFile);
  cmd->add_option("--val", f.val, "manifest(s) with the held-out speakers (split val/test rows; default "
                                  "finetune.val_manifest; repeatable)")
      ->check(CLI::ExistingFile);
  cmd->add_option("--projector", f.projector, "projector to start from (default: the one serving, encoder.projector)");
  cmd->add_option("-o,--out", f.out, "root of the round directories (default finetune.out_dir)");
  cmd->add_option("--steps", f.steps, "optimizer steps per round (default finetune.steps_per_round)");
  cmd->add_option("--lr", f.lr, "peak learning rate (default finetune.learning_rate)");
  cmd->add_option("--margin", f.margin, "gate margin in the metric's units (default finetune.gate_margin)");
  cmd->add_option("--metric", f.metric, "gate metric: val_loss, ranking or both (default finetune.gate_metric)")
      ->check(CLI::IsMember({"val_loss", "ranking", "both"}));
  cmd->add_option("--batch", f.batch, "examples per step (default finetune.batch)");
  cmd->add_option("--replay-ratio", f.replay_ratio, "share of every batch from the replay buffer, [0, 1)");
  cmd->add_option("--max-val", f.max_val, "held-out utterances used by the gate (0 = all)");
  cmd->add_option("--max-response-tokens", f.max_response_tokens,
                  "teacher answer cap (default finetune.max_response_tokens; keep it as in training)");
  cmd->add_option("--threads", f.threads, "LibTorch threads of the round (default finetune.threads)");
  cmd->add_option("--nice", f.nice, "nice of the round's threads, 0..19 (default finetune.nice)")
      ->check(CLI::Range(0, 19));
  cmd->add_option("--cache-dir", f.cache_dir, "teacher answers + features cache (default finetune.cache_dir)");
  cmd->add_option("--seed", f.seed, "data order and replay subset")->capture_default_str();
  auto* once = cmd->add_flag("--once", f.once, "run one round and exit (the default)");
  cmd->add_option("--interval", f.interval,
                  "keep running: every S seconds re-read --sessions and run a round when it holds at least "
                  "--min-new-turns new annotated turns (Ctrl-C stops, cancelling a running round)")
      ->excludes(once)
      ->check(CLI::PositiveNumber);
  cmd->add_option("--min-new-turns", f.min_new_turns, "with --interval (default finetune.min_new_turns)");
  cmd->add_option("--progress", f.progress, "auto, bar or lines")
      ->capture_default_str()
      ->check(CLI::IsMember({"auto", "bar", "lines"}));
  cmd->callback([&g] {
    if (f.interval <= 0) f.once = true;
    try {
      exit_code() = run_finetune(f, g);
    } catch (const std::exception& e) {
      std::cerr << "error: " << e.what() << "\n";
      exit_code() = 1;
    }
  });
}

}  // namespace undertone::apps
