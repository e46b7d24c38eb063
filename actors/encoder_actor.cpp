// Encoder actor: speech_encoder + one stream per session, batched chunks
// (actors/encoder_actor.hpp).
#include "actors/encoder_actor.hpp"

#include <chrono>
#include <unordered_map>

#include "models/speech_encoder.hpp"

namespace undertone::actors {

namespace {

using clk = std::chrono::steady_clock;

struct encoder_state {
  struct entry {
    std::unique_ptr<models::speech_stream> stream;
    caf::actor session;
    double encode_ms = 0;  // compute time of chunks whose rows are not sent yet
  };
  std::shared_ptr<const models::speech_encoder> enc;
  encoder_actor_options opt;
  std::unordered_map<session_id, entry> streams;
  bool flush_scheduled = false;
  static inline const char* name = "undertone.encoder";

  void send_rows(caf::event_based_actor* self, session_id id, entry& e, bool last) {
    speech_rows r;
    r.id = id;
    enc->pop_tokens(*e.stream, r.rows);
    r.n_rows = int64_t(r.rows.size()) / enc->d_llm();
    if (r.n_rows == 0 && !last) return;
    r.last = last;
    r.encoder_version = opt.version;
    r.encode_ms = e.encode_ms;
    e.encode_ms = 0;
    self->send(e.session, std::move(r));
  }

  /// One chunk of every ready stream in one batched call.
  void run_batch(caf::event_based_actor* self) {
    std::vector<models::speech_stream*> ready;
    std::vector<session_id> ids;
    for (auto& [id, e] : streams)
      if (enc->is_ready(*e.stream)) ready.push_back(e.stream.get()), ids.push_back(id);
    if (ready.empty()) return;
    const auto t0 = clk::now();
    enc->decode_streams(ready);
    const double ms = std::chrono::duration<double, std::milli>(clk::now() - t0).count();
    bool more = false;
    for (auto id : ids) {
      auto& e = streams[id];
      e.encode_ms += ms / double(ids.size());
      send_rows(self, id, e, false);
      more = more || enc->is_ready(*e.stream);
    }
    // A backlog: go round the mailbox first so new audio and finishes interleave.
    if (more && !flush_scheduled) {
      flush_scheduled = true;
      self->send(self, flush_atom::value);
    }
  }

  void maybe_run(caf::event_based_actor* self) {
    int64_t n = 0;
    for (auto& kv : streams) n += enc->is_ready(*kv.second.stream) ? 1 : 0;
    if (n == 0) return;
    if (n >= opt.max_batch || opt.max_wait_ms <= 0) {
      run_batch(self);
    } else if (!flush_scheduled) {
      flush_scheduled = true;
      self->delayed_send(self, std::chrono::milliseconds(opt.max_wait_ms), flush_atom::value);
    }
  }

  void finish(caf::event_based_actor* self, session_id id, entry& e) {
    enc->input_finished(*e.stream);
    const auto t0 = clk::now();
    while (enc->is_ready(*e.stream)) enc->decode_streams({e.stream.get()});
    e.encode_ms += std::chrono::duration<double, std::milli>(clk::now() - t0).count();
    send_rows(self, id, e, true);
    e.stream = enc->create_stream();
  }
};

caf::behavior encoder_behavior(caf::stateful_actor<encoder_state>* self, encoder_actor_options opt) {
  auto& st = self->state;
  st.enc = opt.encoder ? opt.encoder : opt.factory();
  opt.encoder.reset();  // the state holds it; the options are kept for the version/batching
  st.opt = std::move(opt);
  return {
      [=](encode_open& m) {
        auto& e = self->state.streams[m.id];
        e.stream = self->state.enc->create_stream();
        e.session = caf::actor_cast<caf::actor>(self->current_sender());
        e.encode_ms = 0;
      },
      [=](encode_audio& m) {
        auto& s = self->state;
        auto it = s.streams.find(m.id);
        if (it == s.streams.end()) return;
        s.enc->accept_waveform(*it->second.stream, m.samples_16k);
        if (s.enc->is_ready(*it->second.stream)) s.maybe_run(self);
      },
      [=](encode_finish& m) {
        auto& s = self->state;
        auto it = s.streams.find(m.id);
        if (it == s.streams.end()) return;
        s.finish(self, m.id, it->second);
      },
      [=](encode_close& m) { self->state.streams.erase(m.id); },
      [=](flush_atom) {
        self->state.flush_scheduled = false;
        self->state.run_batch(self);
      },
  };
}

}  // namespace

caf::actor spawn_encoder_actor(caf::actor_system& sys, encoder_actor_options opt) {
  return sys.spawn<caf::detached>(encoder_behavior, std::move(opt));
}

}  // namespace undertone::actors
