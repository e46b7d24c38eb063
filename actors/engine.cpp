// The one-process engine (actors/engine.hpp).
#include "actors/engine.hpp"

#include <chrono>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <random>
#include <thread>

#include <nlohmann/json.hpp>

#include "actors/encoder_actor.hpp"
#include "actors/finetune_actor.hpp"
#include "actors/llm_worker.hpp"
#include "actors/logger.hpp"
#include "actors/session.hpp"
#include "actors/supervisor.hpp"
#include "models/gguf.hpp"
#include "models/encoder_registry.hpp"
#include "models/session_store.hpp"
#include "models/llm_engine.hpp"
#include "models/model_store.hpp"
#include "models/runtime.hpp"
#include "models/speech_encoder.hpp"
#include "models/tokenizer.hpp"

namespace undertone::actors {

namespace fs = std::filesystem;

session_settings session_settings_from(const config::undertone_config& cfg) {
  session_settings s;
  s.system_prompt = cfg.llm.system_prompt;
  s.sampling.temperature = cfg.sampling.temperature;
  s.sampling.top_k = cfg.sampling.top_k;
  s.sampling.top_p = cfg.sampling.top_p;
  s.sampling.repetition_penalty = cfg.sampling.repetition_penalty;
  s.sampling.seed = cfg.sampling.seed < 0 ? uint64_t(std::random_device{}()) : uint64_t(cfg.sampling.seed);
  s.sampling.max_tokens = cfg.sampling.max_tokens;
  s.vad.enabled = cfg.vad.enabled;
  s.vad.threshold_db = cfg.vad.threshold_db;
  s.vad.snr_db = cfg.vad.snr_db;
  s.vad.min_speech_ms = int32_t(cfg.vad.min_speech_ms);
  s.vad.trailing_silence_ms = int32_t(cfg.vad.end_silence_ms);
  s.vad.max_turn_ms = int32_t(cfg.vad.max_turn_seconds * 1000);
  s.log = cfg.store.enabled;
  return s;
}

std::string resolve_projector(const config::undertone_config& cfg) {
  const std::string home = config::resolve_model_home(cfg);
  if (!cfg.encoder.projector.empty()) return models::resolve_model_path(home, cfg.encoder.projector);
  // The shipped default (models/checkpoints/, installed into the cache by
  // scripts/setup as "undertone-projector") was trained for the default LLM and
  // encoder only; anything else gets "" (untrained, the caller warns).
  const config::undertone_config defaults;
  if (cfg.llm.model != defaults.llm.model || cfg.encoder.model != defaults.encoder.model ||
      cfg.encoder.stack_frames != defaults.encoder.stack_frames)
    return "";
  try {
    return models::resolve_model_path(home, "undertone-projector");
  } catch (const std::exception&) {
    return "";
  }
}

llm_identity identify_llm(const config::undertone_config& cfg) {
  const std::string home = config::resolve_model_home(cfg);
  llm_identity id;
  id.path = models::resolve_model_path(home, cfg.llm.model);
  const fs::path path(id.path);
  // Same naming and size rule as models/nn/llm_common.cpp (load_llm), so the
  // version equals what a worker loading this file reports in its hello.
  std::string file_name = path.filename().string();
  if (file_name.empty()) file_name = path.parent_path().filename().string();
  uintmax_t bytes = 0;
  std::unique_ptr<models::tokenizer> tok;
  try {
    if (fs::is_directory(path)) {
      std::error_code ec;
      for (const auto& e : fs::directory_iterator(path, ec))
        if (e.is_regular_file(ec)) bytes += e.file_size(ec);
      tok = models::tokenizer::from_hf_dir(id.path);
      std::ifstream in(path / "config.json");
      const auto j = nlohmann::json::parse(in);
      id.d_model = j.at("hidden_size").get<int64_t>();
    } else {
      bytes = fs::file_size(path);
      models::gguf_file g(id.path);
      tok = models::tokenizer::from_gguf(g);
      id.d_model = g.get_int(g.get_string("general.architecture") + ".embedding_length");
    }
  } catch (const std::exception& e) {
    throw std::runtime_error("cannot read the LLM's metadata from " + id.path + ": " + e.what());
  }
  id.version = file_name + "|" + std::to_string(bytes);
  const std::string bos_text = tok->bos_id() >= 0 ? tok->piece(tok->bos_id()) : "<|begin_of_text|>";
  id.templ = models::chat_template::select(cfg.llm.chat_template == "llama-3" ? "llama3" : cfg.llm.chat_template,
                                           tok->chat_template_text(), bos_text);
  return id;
}

std::string resolve_encoder_registry(const config::undertone_config& cfg) {
  if (!cfg.encoder.registry.empty()) return cfg.encoder.registry;
  return (fs::path(config::resolve_model_home(cfg)) / "encoders").string();
}

std::string projector_file_version(const std::string& projector_path, uint64_t seed) {
  if (projector_path.empty()) return "untrained-seed-" + std::to_string(seed);
  return fs::path(projector_path).filename().string() + "@" + models::sha256_file(projector_path).substr(0, 12);
}

namespace {
struct system_config : caf::actor_system_config {
  system_config() { register_message_types(*this); }
};

/// Polls the hub until server.remote_workers workers are connected or
/// server.worker_wait_s passed (logged either way).
void wait_for_workers(caf::actor_system& sys, const caf::actor& hub, const config::undertone_config& cfg,
                      const std::function<void(const std::string&)>& log) {
  using clk = std::chrono::steady_clock;
  const int64_t want = cfg.server.remote_workers;
  const auto deadline = clk::now() + std::chrono::seconds(cfg.server.worker_wait_s);
  auto next_log = clk::now();
  caf::scoped_actor self{sys};
  int64_t have = 0;
  while (true) {
    self->request(hub, std::chrono::seconds(5), stats_atom::value)
        .receive([&](int64_t n) { have = n; }, [&](caf::error&) {});
    if (have >= want) {
      log("undertone engine: " + std::to_string(have) + " remote LLM worker(s) connected");
      return;
    }
    const auto now = clk::now();
    if (now >= deadline) {
      log("WARNING: only " + std::to_string(have) + " of " + std::to_string(want) +
          " remote LLM workers connected to " + cfg.server.worker_bind + " within server.worker_wait_s = " +
          std::to_string(cfg.server.worker_wait_s) + " s; serving anyway (sessions go to workers as they connect)");
      return;
    }
    if (now >= next_log) {
      log("undertone engine: waiting for " + std::to_string(want - have) + " more remote LLM worker(s) on " +
          cfg.server.worker_bind + " (`undertone worker --connect ...`)");
      next_log = now + std::chrono::seconds(5);
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
}

}  // namespace

struct engine::impl {
  system_config sys_cfg;
  std::unique_ptr<caf::actor_system> sys;
  caf::actor supervisor, gateway;
  std::vector<caf::actor> custom;
  std::string models;
  std::vector<std::string> warnings;
  bool down = false;
};

engine::engine(const config::undertone_config& cfg, gateway_factory gateway,
               std::function<void(const std::string&)> log, llm_hub_factory remote_llm)
    : p_(std::make_unique<impl>()) {
  if (!log) log = [](const std::string& s) { std::cerr << s << "\n"; };
  const std::string home = config::resolve_model_home(cfg);
  const bool remote = cfg.server.remote_workers > 0;
  if (remote && !remote_llm)
    throw std::runtime_error("server.remote_workers = " + std::to_string(cfg.server.remote_workers) +
                             " but this program cannot host remote LLM workers (no hub factory); set it to 0");

  // ---- LLM: loaded here, or only its identity when remote workers decode
  models::llm_engine_options lo;
  lo.llm.path = models::resolve_model_path(home, cfg.llm.model);
  lo.llm.device = cfg.llm.device;
  lo.llm.dtype = models::resolve_dtype(cfg.llm.dtype, cfg.llm.device);
  lo.llm.context_tokens = cfg.llm.context_tokens;
  lo.llm.kv_cells = cfg.llm.kv_cells;
  lo.llm.max_batch_rows = cfg.llm.max_batch_rows;
  lo.llm.chat_template = cfg.llm.chat_template;
  lo.llm.cpu_decode = cfg.llm.cpu_decode;
  lo.max_slots = cfg.llm.max_slots;
  lo.max_rows_per_step = cfg.llm.max_batch_rows;
  std::shared_ptr<models::llm_engine> llm;
  llm_identity llm_id;
  if (remote) {
    llm_id = identify_llm(cfg);
  } else {
    llm = std::make_shared<models::llm_engine>(lo);
    llm_id.path = lo.llm.path;
    llm_id.version = llm->model_version();
    llm_id.templ = llm->templ();
    llm_id.d_model = llm->d_model();
  }

  // ---- speech encoder
  models::speech_encoder_options eo;
  eo.model = models::resolve_model_path(home, cfg.encoder.model);
  eo.projector = resolve_projector(cfg);
  eo.d_llm = llm_id.d_model;
  eo.device = cfg.encoder.device;
  eo.dtype = cfg.encoder.dtype;
  eo.chunk_ms = cfg.encoder.chunk_ms;
  eo.stack_frames = cfg.encoder.stack_frames;
  eo.window_blocks = cfg.encoder.window_blocks;
  eo.normalization = cfg.encoder.normalization;
  eo.max_batch = cfg.encoder.max_batch;
  eo.version = projector_file_version(eo.projector, eo.projector_seed);
  auto enc = std::make_shared<models::speech_encoder>(eo);
  // The registry's current version, if any, replaces the configured projector.
  const std::string registry = resolve_encoder_registry(cfg);
  bool from_registry = false;
  try {
    models::encoder_registry reg(registry);
    if (auto cur = reg.current()) {
      try {
        reg.verify(*cur);
        enc->replace_weights(reg.path_of(*cur), reg.encoder_layers_of(*cur), *cur);
        from_registry = true;
      } catch (const std::exception& e) {
        p_->warnings.push_back("WARNING: the encoder registry's current version " + *cur + " was refused (" +
                               e.what() + "); serving " + eo.version +
                               " instead. `undertone model verify` / `undertone model rollback` fix the registry.");
      }
    }
  } catch (const std::exception& e) {
    p_->warnings.push_back("WARNING: cannot read the encoder registry " + registry + ": " + e.what());
  }
  if (eo.projector.empty() && !from_registry) {
    p_->warnings.push_back(
        "WARNING: no trained projector (encoder.projector is \"\" and the default \"undertone-projector\" is not in " + home +
        "/models; scripts/setup installs it): using an UNTRAINED projector. The pipeline runs, "
        "but answers to speech are nonsense. Train one (undertone train) and set encoder.projector.");
  }
  const std::string enc_version = enc->version();
  const std::string llm_describe =
      llm ? llm->describe()
          : fs::path(llm_id.path).filename().string() + " (template " + llm_id.templ.name() + ", d " +
                std::to_string(llm_id.d_model) + ", on " + std::to_string(cfg.server.remote_workers) +
                " remote worker(s))";
  p_->models = "llm=" + llm_describe + "; encoder=" + enc->describe();

  auto env = std::make_shared<session_env>();
  env->templ = llm_id.templ;
  env->context_tokens = cfg.llm.context_tokens;
  env->llm_version = llm_id.version;
  env->encoder_version = enc_version;
  env->models = p_->models;
  env->idle_timeout_s = double(cfg.server.idle_timeout_s);
  env->store = cfg.store.enabled;

  // ---- actors
  p_->sys = std::make_unique<caf::actor_system>(p_->sys_cfg);
  auto& sys = *p_->sys;
  encoder_actor_options ea;
  ea.encoder = enc;
  ea.registry = registry;
  ea.max_batch = cfg.encoder.max_batch;
  ea.max_wait_ms = cfg.encoder.max_wait_ms;
  auto respawn_encoder = [&sys, ea]() { return spawn_encoder_actor(sys, ea); };

  std::string store_dir = cfg.store.dir.empty() ? (fs::path(home) / "sessions").string() : cfg.store.dir;
  supervisor_options so;
  so.env = env;
  so.max_sessions = cfg.server.max_sessions;
  // The store first: a corrupt index throws before any other actor runs.
  if (cfg.store.enabled) {
    logger_options lg;
    lg.dir = store_dir;
    lg.retention_days = double(cfg.store.retention_days);
    lg.max_bytes = cfg.store.max_megabytes * 1048576;
    so.logger = spawn_logger(sys, lg);
    so.respawn_logger = [&sys, lg]() { return spawn_logger(sys, lg); };
  }
  so.encoder = spawn_encoder_actor(sys, ea);
  if (remote) {
    // The hub is not respawned: it owns the bound worker endpoint.
    try {
      so.llm = remote_llm(sys, llm_id);
    } catch (...) {
      caf::anon_send_exit(so.encoder, caf::exit_reason::user_shutdown);
      if (so.logger) caf::anon_send_exit(so.logger, caf::exit_reason::user_shutdown);
      throw;
    }
  } else {
    llm_worker_options wo;
    wo.factory = [lo]() { return std::make_shared<models::llm_engine>(lo); };
    so.respawn_llm = [&sys, wo]() { return spawn_llm_worker(sys, wo); };
    wo.engine = std::move(llm);
    so.llm = spawn_llm_worker(sys, std::move(wo));
  }
  so.respawn_encoder = respawn_encoder;
  const caf::actor llm_actor = so.llm;
  p_->supervisor = spawn_supervisor(sys, std::move(so));
  log("undertone engine: " + p_->models);
  log("undertone engine: encoder version " + enc_version + (from_registry ? " (registry " : " (not in the registry ") +
      registry + ")");
  log(std::string("undertone engine: session store ") + (cfg.store.enabled ? store_dir : "disabled"));
  for (auto& w : p_->warnings) log(w);
  if (remote) wait_for_workers(sys, llm_actor, cfg, log);
  // Online fine-tuning in this process (docs/finetune.md): annotated stored turns ->
  // gated round -> registry -> the supervisor swaps the encoders.
  if (cfg.finetune.enabled) {
    if (!cfg.store.enabled) {
      log("WARNING: finetune.enabled needs store.enabled (it trains on stored, annotated turns): not started");
    } else {
      finetune_actor_options fo;
      fo.round = finetune_options_from(cfg);
      fo.out_root = finetune_out_root(cfg);
      fo.projector = from_registry ? models::encoder_registry(registry).path_of(enc->version()) : eo.projector;
      fo.interval_s = cfg.finetune.interval_s;
      fo.min_new_turns = cfg.finetune.min_new_turns;
      const std::string manifest = (fs::path(fo.out_root) / "sessions.jsonl").string();
      fo.data_source = [store_dir, manifest]() {
        fs::create_directories(fs::path(manifest).parent_path());
        models::session_store st(store_dir);
        finetune_data d;
        d.manifest = manifest;
        d.annotated_turns = int64_t(st.export_manifest(manifest, models::export_options{}));
        return d;
      };
      fo.publish = [registry](const std::string& projector_path, const nlohmann::json& meta) {
        return models::encoder_registry(registry).publish(projector_path, meta, /*make_current=*/true);
      };
      fo.notify = p_->supervisor;
      fo.log = log;
      if (cfg.finetune.pause_while_sessions > 0) {
        caf::actor sup = p_->supervisor;
        caf::actor_system* sysp = &sys;
        const int64_t threshold = cfg.finetune.pause_while_sessions;
        fo.round.paused = [sup, sysp, threshold]() {
          caf::scoped_actor self{*sysp};
          int64_t n = 0;
          self->request(sup, std::chrono::seconds(5), stats_atom::value)
              .receive([&](int64_t v) { n = v; }, [&](caf::error&) { n = 0; });
          return n >= threshold;
        };
      }
      p_->custom.push_back(spawn_finetune_actor(sys, std::move(fo)));  // stopped at shutdown like custom actors
      log("undertone engine: online fine-tuning on (every " + std::to_string(int64_t(cfg.finetune.interval_s)) +
          " s when >= " + std::to_string(cfg.finetune.min_new_turns) + " new annotated turns; publishes into " +
          registry + ")");
    }
  }
  if (gateway) {
    try {
      p_->gateway = gateway(sys, p_->supervisor);
    } catch (...) {
      shutdown();
      throw;
    }
  }
}

engine::~engine() { shutdown(); }

caf::actor_system& engine::system() { return *p_->sys; }
caf::actor engine::supervisor() const { return p_->supervisor; }
caf::actor engine::gateway() const { return p_->gateway; }
const std::string& engine::models() const { return p_->models; }
const std::vector<std::string>& engine::warnings() const { return p_->warnings; }

void engine::attach(caf::actor custom) {
  if (!custom) return;
  p_->custom.push_back(custom);
  caf::anon_send(p_->supervisor, subscribe_events{custom});
}

void engine::shutdown() {
  if (!p_ || p_->down || !p_->sys) return;
  p_->down = true;
  if (p_->gateway) caf::anon_send_exit(p_->gateway, caf::exit_reason::user_shutdown);
  for (auto& c : p_->custom) caf::anon_send_exit(c, caf::exit_reason::user_shutdown);
  caf::anon_send_exit(p_->supervisor, caf::exit_reason::user_shutdown);
  p_->sys->await_all_actors_done();
}

}  // namespace undertone::actors
