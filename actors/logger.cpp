// Logger actor: turn records into the session store (actors/logger.hpp).
#include "actors/logger.hpp"

#include <unistd.h>

#include <ctime>
#include <iostream>
#include <memory>

#include <nlohmann/json.hpp>

#include "models/session_store.hpp"

namespace undertone::actors {

namespace {

using prune_atom = caf::atom_constant<caf::atom("prune")>;

struct logger_state {
  std::shared_ptr<models::session_store> store;
  std::string run;
  std::chrono::seconds prune_every{3600};
  int64_t written = 0;
  static inline const char* name = "undertone.logger";

  int64_t write(turn_record& r) {
    models::stored_turn t;
    t.run = run;
    t.session = r.id;
    t.client = r.client_name;
    t.turn = r.turn;
    t.started_unix_s = r.started_unix_s;
    t.user_text = r.user_text;
    t.answer = r.answer;
    t.stop_reason = r.stop_reason;
    t.llm_version = r.llm_version;
    t.encoder_version = r.encoder_version;
    t.events = r.events;
    t.transcript = r.transcript;
    t.emotion = r.emotion;
    const auto& x = r.timings;
    t.timings = {{"end_of_turn_to_first_token_ms", x.end_of_turn_to_first_token_ms},
                 {"last_voice_to_first_token_ms", x.last_voice_to_first_token_ms},
                 {"audio_ms", x.audio_ms},
                 {"encode_ms", x.encode_ms},
                 {"flush_ms", x.flush_ms},
                 {"prefill_ms", x.prefill_ms},
                 {"decode_ms", x.decode_ms},
                 {"speech_tokens", x.speech_tokens},
                 {"answer_tokens", x.answer_tokens}};
    const int64_t id = store->append(t, r.audio_16k);
    ++written;
    return id;
  }

  void prune() {
    try {
      const auto p = store->prune();
      if (p.sessions > 0)
        std::cerr << "undertone logger: retention removed " << p.sessions << " sessions (" << p.turns << " turns, "
                  << p.bytes / 1048576.0 << " MiB of audio) from " << store->dir() << "\n";
    } catch (const std::exception& e) {
      std::cerr << "undertone logger: retention failed: " << e.what() << "\n";
    }
  }
};

caf::behavior logger_behavior(caf::stateful_actor<logger_state>* self, std::shared_ptr<models::session_store> store,
                              std::chrono::seconds prune_every) {
  auto& st = self->state;
  st.store = std::move(store);
  st.run = "run-" + std::to_string(int64_t(std::time(nullptr))) + "-" + std::to_string(::getpid());
  st.prune_every = prune_every;
  st.prune();
  if (prune_every.count() > 0) self->delayed_send(self, prune_every, prune_atom::value);
  return {
      [=](turn_record& r) -> caf::result<int64_t> {
        auto& s = self->state;
        try {
          if (r.stop_reason == "annotation") {
            s.store->annotate(s.run, r.id, r.turn, r.transcript, r.emotion, "client");
            return int64_t(0);
          }
          return s.write(r);
        } catch (const std::exception& e) {
          std::cerr << "undertone logger: session " << r.id << " turn " << r.turn
                    << (r.stop_reason == "annotation" ? " annotation" : "") << " not stored: " << e.what() << "\n";
          return caf::make_error(caf::sec::runtime_error, std::string(e.what()));
        }
      },
      [=](prune_atom) {
        self->state.prune();
        self->delayed_send(self, self->state.prune_every, prune_atom::value);
      },
      [=](stats_atom) { return self->state.written; },
  };
}

}  // namespace

caf::actor spawn_logger(caf::actor_system& sys, const logger_options& opt) {
  models::store_options so;
  so.retention_days = opt.retention_days;
  so.max_bytes = opt.max_bytes;
  auto store = std::make_shared<models::session_store>(opt.dir, so);
  if (store->opened().orphans_removed > 0)
    std::cerr << "undertone logger: removed " << store->opened().orphans_removed
              << " audio files with no row in " << store->index_path() << " (a crash between audio and commit)\n";
  return sys.spawn<caf::detached>(logger_behavior, std::move(store), opt.prune_every);
}

}  // namespace undertone::actors
