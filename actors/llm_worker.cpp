// LLM worker actor: continuous batching over sessions (actors/llm_worker.hpp).
#include "actors/llm_worker.hpp"

#include <array>
#include <stdexcept>
#include <unordered_map>

#include "models/llm_engine.hpp"

namespace undertone::actors {

namespace {

struct slot_info {
  int32_t slot = -1;
  caf::actor session;
  uint64_t answer = 0;  // id from generate(); 0 = none
  int64_t turn = 0;
  std::array<int64_t, 4> marks{};
};

struct llm_worker_state {
  std::shared_ptr<models::llm_engine> eng;
  std::string version;
  std::unordered_map<session_id, slot_info> slots;
  std::unordered_map<int32_t, session_id> by_slot;
  bool tick_pending = false;
  static inline const char* name = "undertone.llm_worker";

  void fail(caf::event_based_actor* self, const caf::actor& to, session_id id, int64_t turn, error_code c,
            std::string msg) {
    self->send(to, llm_failed{id, turn, c, std::move(msg)});
  }

  void schedule(caf::event_based_actor* self) {
    if (!tick_pending && eng->has_work()) {
      tick_pending = true;
      self->send(self, tick_atom::value);
    }
  }

  void close(session_id id) {
    auto it = slots.find(id);
    if (it == slots.end()) return;
    if (eng->has_slot(it->second.slot)) eng->close_slot(it->second.slot);
    by_slot.erase(it->second.slot);
    slots.erase(it);
  }

  void step(caf::event_based_actor* self) {
    auto events = eng->step();
    for (auto& ev : events) {
      auto bs = by_slot.find(ev.slot);
      if (bs == by_slot.end()) continue;
      auto& si = slots[bs->second];
      if (ev.answer_id != 0 && ev.answer_id != si.answer) continue;  // a cancelled answer
      switch (ev.what) {
        case models::llm_event::kind::delta:
          self->send(si.session, llm_delta{bs->second, si.turn, std::move(ev.text)});
          break;
        case models::llm_event::kind::finished: {
          llm_done d;
          d.id = bs->second;
          d.turn = si.turn;
          d.text = std::move(ev.text);
          d.stop_reason = ev.result.stop_reason;
          d.tokens = int64_t(ev.result.tokens.size());
          d.context_rows = eng->context_rows(ev.slot);
          d.prefill_ms = ev.result.prefill_s * 1000.0;
          d.decode_ms = ev.result.decode_s * 1000.0;
          d.llm_version = version;
          si.answer = 0;
          self->send(si.session, std::move(d));
          break;
        }
        case models::llm_event::kind::error: {
          const bool ctx = ev.text.find("context") != std::string::npos;
          si.answer = 0;
          fail(self, si.session, bs->second, si.turn, ctx ? error_code::context_full : error_code::internal,
               ev.text);
          break;
        }
      }
    }
  }
};

models::sampling_params to_params(const sampling_settings& s) {
  models::sampling_params p;
  p.temperature = s.temperature;
  p.top_k = s.top_k;
  p.top_p = s.top_p;
  p.repetition_penalty = s.repetition_penalty;
  p.seed = s.seed;
  return p;
}

caf::behavior llm_worker_behavior(caf::stateful_actor<llm_worker_state>* self, llm_worker_options opt) {
  auto& st = self->state;
  st.eng = opt.engine ? std::move(opt.engine) : opt.factory();
  st.version = st.eng->model_version();
  return {
      [=](llm_open& m) {
        auto& s = self->state;
        s.close(m.id);
        try {
          slot_info si;
          si.slot = s.eng->open_slot();
          si.session = m.session;
          s.by_slot[si.slot] = m.id;
          s.slots[m.id] = std::move(si);
        } catch (const std::exception& e) {
          s.fail(self, m.session, m.id, -1, error_code::server_full, e.what());
        }
      },
      [=](llm_append& m) {
        auto& s = self->state;
        auto it = s.slots.find(m.id);
        if (it == s.slots.end()) return;
        models::prompt_part part;
        part.text = std::move(m.text);
        part.embeddings = std::move(m.rows);
        part.n_embeddings = m.n_rows;
        try {
          s.eng->append(it->second.slot, part);
        } catch (const std::logic_error& e) {  // includes invalid_argument
          s.fail(self, it->second.session, m.id, -1,
                 dynamic_cast<const std::invalid_argument*>(&e) ? error_code::internal : error_code::busy, e.what());
        } catch (const std::runtime_error& e) {
          s.fail(self, it->second.session, m.id, -1, error_code::context_full, e.what());
        }
        s.schedule(self);
      },
      [=](llm_generate& m) {
        auto& s = self->state;
        auto it = s.slots.find(m.id);
        if (it == s.slots.end()) return;
        models::generation_request req;
        req.sampling = to_params(m.sampling);
        req.max_tokens = m.sampling.max_tokens;
        req.stop_strings = m.stop_strings;
        try {
          it->second.turn = m.turn;
          it->second.answer = s.eng->generate(it->second.slot, req);
        } catch (const std::exception& e) {
          s.fail(self, it->second.session, m.id, m.turn, error_code::internal, e.what());
        }
        s.schedule(self);
      },
      [=](llm_cancel& m) {
        auto& s = self->state;
        auto it = s.slots.find(m.id);
        if (it == s.slots.end()) return;
        s.eng->cancel(it->second.slot, m.keep_answer);
        it->second.answer = 0;
      },
      [=](llm_truncate& m) {
        auto& s = self->state;
        auto it = s.slots.find(m.id);
        if (it == s.slots.end()) return;
        s.eng->truncate(it->second.slot, m.n_rows);
      },
      [=](llm_mark& m) {
        auto& s = self->state;
        auto it = s.slots.find(m.id);
        if (it == s.slots.end() || m.mark < 0 || m.mark >= 4) return;
        it->second.marks[size_t(m.mark)] = s.eng->context_rows(it->second.slot);
      },
      [=](llm_rewind& m) {
        auto& s = self->state;
        auto it = s.slots.find(m.id);
        if (it == s.slots.end() || m.mark < 0 || m.mark >= 4) return;
        if (s.eng->is_generating(it->second.slot)) s.eng->cancel(it->second.slot, false);
        it->second.answer = 0;
        const int64_t to = it->second.marks[size_t(m.mark)];
        if (s.eng->context_rows(it->second.slot) > to) s.eng->truncate(it->second.slot, to);
      },
      [=](llm_close& m) { self->state.close(m.id); },
      [=](tick_atom) {
        auto& s = self->state;
        s.tick_pending = false;
        if (s.eng->has_work()) s.step(self);
        s.schedule(self);
      },
  };
}

}  // namespace

caf::actor spawn_llm_worker(caf::actor_system& sys, llm_worker_options opt) {
  return sys.spawn<caf::detached>(llm_worker_behavior, std::move(opt));
}

}  // namespace undertone::actors
