// Online fine-tuning actor (actors/finetune_actor.hpp).
#include "actors/finetune_actor.hpp"

#include <atomic>
#include <chrono>
#include <iostream>
#include <memory>
#include <thread>

#include "actors/engine.hpp"
#include "models/model_store.hpp"
#include "models/runtime.hpp"

namespace undertone::actors {

namespace {

struct finetune_state {
  finetune_actor_options o;
  finetune_status st;
  std::thread worker;
  std::shared_ptr<std::atomic<bool>> cancel = std::make_shared<std::atomic<bool>>(false);
  static inline const char* name = "undertone.finetune";

  void log(const std::string& s) const {
    if (o.log) o.log(s);
    else std::cerr << "undertone finetune: " << s << "\n";
  }
  ~finetune_state() {
    cancel->store(true);
    if (worker.joinable()) worker.join();
  }
};

/// One trigger, on the worker thread: data source, threshold, round. Never throws.
finetune_round_done run_trigger(const finetune_actor_options& o, const std::string& projector, int64_t last_turns,
                                bool force, const std::shared_ptr<std::atomic<bool>>& cancel,
                                const std::function<void(const std::string&)>& log) {
  finetune_round_done d;
  try {
    if (!o.data_source) throw std::logic_error("the finetune actor has no data source");
    finetune_data data = o.data_source();
    d.turns = data.annotated_turns;
    const int64_t fresh = data.annotated_turns - last_turns;
    if (!force && fresh < o.min_new_turns) {
      d.outcome = "skipped";
      log(std::to_string(fresh) + " new annotated turns (< finetune.min_new_turns = " +
          std::to_string(o.min_new_turns) + "); no round");
      return d;
    }
    models::finetune_options ro = o.round;
    ro.session_manifests = {data.manifest};
    ro.projector = projector;
    ro.out_dir = models::new_round_dir(o.out_root);
    ro.publish = o.publish;
    ro.cancelled = [cancel] { return cancel->load(); };
    if (!ro.log) ro.log = log;
    log("round in " + ro.out_dir + ": " + std::to_string(data.annotated_turns) + " annotated turns (" +
        std::to_string(fresh) + " new), starting from " + projector);
    const auto r = o.run_round ? o.run_round(ro) : models::finetune_round(ro);
    d.result = r.to_json().dump();
    d.outcome = r.published ? "published" : r.passed ? "passed" : "rejected";
    d.version = r.published_version;
    d.projector = r.candidate;
    log("round done (" + d.outcome + "): " + r.reason);
  } catch (const std::exception& e) {
    d.outcome = "error";
    d.error = e.what();
    log(std::string("round failed: ") + e.what());
  }
  return d;
}

caf::behavior finetune_behavior(caf::stateful_actor<finetune_state>* self, finetune_actor_options opt) {
  self->state.o = std::move(opt);
  self->state.st.current_projector = self->state.o.projector;
  auto start = [self](bool force) {
    auto& s = self->state;
    if (s.st.running) return false;
    if (s.worker.joinable()) s.worker.join();  // the previous trigger's thread, already finished
    s.st.running = true;
    // A weak handle: the worker must not keep the actor alive (or be the one to destroy it).
    caf::actor_addr me = self->address();
    auto log = [self_log = s.o.log](const std::string& line) {
      if (self_log) self_log(line);
      else std::cerr << "undertone finetune: " << line << "\n";
    };
    s.worker = std::thread([o = s.o, projector = s.st.current_projector, last = s.st.turns_at_last_round, force,
                            cancel = s.cancel, me, log] {
      auto d = run_trigger(o, projector, last, force, cancel, log);
      if (auto a = caf::actor_cast<caf::actor>(me)) caf::anon_send(a, std::move(d));
    });
    return true;
  };
  if (self->state.o.interval_s > 0)
    self->delayed_send(self, std::chrono::milliseconds(int64_t(self->state.o.interval_s * 1000)), tick_atom::value);
  return {
      [=](tick_atom) {
        start(false);
        self->delayed_send(self, std::chrono::milliseconds(int64_t(self->state.o.interval_s * 1000)),
                           tick_atom::value);
      },
      [=](finetune_now& m) { return start(m.force); },
      [=](finetune_round_done& d) {
        auto& s = self->state;
        auto& st = s.st;
        if (s.worker.joinable()) s.worker.join();
        st.running = false;
        st.last_outcome = d.outcome;
        if (d.turns >= 0 && d.outcome != "skipped") st.turns_at_last_round = d.turns;
        if (!d.result.empty()) st.last_result = d.result;
        if (d.outcome == "error") {
          ++st.errors;
          st.last_error = d.error;
          return;
        }
        st.last_error.clear();
        if (d.outcome == "skipped") {
          ++st.skipped;
          return;
        }
        ++st.rounds;
        if (d.outcome == "rejected") ++st.rejected;
        if (d.outcome == "published") {
          ++st.published;
          st.current_projector = d.projector;
          if (s.o.notify) self->send(s.o.notify, encoder_published{d.version, d.projector});
        }
      },
      [=](finetune_status_atom) { return self->state.st; },
  };
}

}  // namespace

caf::actor spawn_finetune_actor(caf::actor_system& sys, finetune_actor_options opt) {
  if (opt.out_root.empty()) throw std::invalid_argument("finetune actor: out_root is empty");
  return sys.spawn<caf::detached>(finetune_behavior, std::move(opt));
}

std::string finetune_out_root(const config::undertone_config& cfg) {
  return cfg.finetune.out_dir.empty() ? config::resolve_model_home(cfg) + "/finetune" : cfg.finetune.out_dir;
}

models::finetune_options finetune_options_from(const config::undertone_config& cfg) {
  const std::string home = config::resolve_model_home(cfg);
  const auto& f = cfg.finetune;
  models::finetune_options o;
  o.replay_manifests = models::split_list(f.replay_manifests);
  o.val_manifests = models::split_list(f.val_manifest);
  o.replay_ratio = f.replay_ratio;
  o.max_val = f.max_val;
  o.projector = resolve_projector(cfg);
  o.llm_path = models::resolve_model_path(home, cfg.llm.model);
  o.llm_device = cfg.llm.device;
  o.llm_dtype = models::resolve_dtype(cfg.llm.dtype, cfg.llm.device);
  if (o.llm_dtype == "fp16") o.llm_dtype = "fp32";  // the trainer runs fp32 or bf16
  o.chat_template = cfg.llm.chat_template;
  o.encoder_path = models::resolve_model_path(home, cfg.encoder.model);
  o.encoder_device = cfg.encoder.device;
  o.chunk_ms = cfg.encoder.chunk_ms;
  o.context_blocks = cfg.encoder.window_blocks > 0 ? cfg.encoder.window_blocks : -1;
  o.mel_normalization = cfg.encoder.normalization;
  o.max_response_tokens = f.max_response_tokens;
  o.steps = f.steps_per_round;
  o.batch = f.batch;
  o.lr = f.learning_rate;
  o.cache_dir = f.cache_dir.empty() ? home + "/train-cache" : f.cache_dir;
  o.gate_metric = models::parse_gate_metric(f.gate_metric);
  o.gate_margin = f.gate_margin;
  o.threads = int(f.threads);
  o.nice = int(f.nice);
  return o;
}

}  // namespace undertone::actors
