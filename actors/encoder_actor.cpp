// Encoder actor: speech_encoder + one stream per session, batched chunks
// (actors/encoder_actor.hpp).
#include "actors/encoder_actor.hpp"

#include <algorithm>
#include <chrono>
#include <iostream>
#include <unordered_map>

#include "models/encoder_registry.hpp"
#include "models/speech_encoder.hpp"

namespace undertone::actors {

namespace {

using clk = std::chrono::steady_clock;

struct encoder_state {
  struct entry {
    std::unique_ptr<models::speech_stream> stream;  // null between turns
    caf::actor session;
    double encode_ms = 0;  // compute time of chunks whose rows are not sent yet
  };
  std::shared_ptr<models::speech_encoder> enc;
  encoder_actor_options opt;
  std::unordered_map<session_id, entry> streams;
  bool flush_scheduled = false;
  /// Sessions whose turn ended (encode_finish) and whose final chunks are not
  /// encoded yet: flushed together by one finish_atom, so turns that end at the
  /// same moment share batched encoder calls instead of queueing one by one.
  std::vector<session_id> finishing;
  bool finish_scheduled = false;
  static inline const char* name = "undertone.encoder";

  void send_rows(caf::event_based_actor* self, session_id id, entry& e, bool last) {
    speech_rows r;
    r.id = id;
    enc->pop_tokens(*e.stream, r.rows);
    r.n_rows = int64_t(r.rows.size()) / enc->d_llm();
    if (r.n_rows == 0 && !last) return;
    r.last = last;
    r.encoder_version = e.stream->version();
    r.encode_ms = e.encode_ms;
    e.encode_ms = 0;
    self->send(e.session, std::move(r));
  }

  /// One chunk of every ready stream in one batched call.
  void run_batch(caf::event_based_actor* self) {
    std::vector<models::speech_stream*> ready;
    std::vector<session_id> ids;
    for (auto& [id, e] : streams)
      if (e.stream && enc->is_ready(*e.stream)) ready.push_back(e.stream.get()), ids.push_back(id);
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
    for (auto& kv : streams) n += kv.second.stream && enc->is_ready(*kv.second.stream) ? 1 : 0;
    if (n == 0) return;
    if (n >= opt.max_batch || opt.max_wait_ms <= 0) {
      run_batch(self);
    } else if (!flush_scheduled) {
      flush_scheduled = true;
      self->delayed_send(self, std::chrono::milliseconds(opt.max_wait_ms), flush_atom::value);
    }
  }

  // A turn's stream is made with its first audio, so a swap between turns
  // applies to the next turn even in a session that is already open.
  models::speech_stream& stream_of(entry& e) {
    if (!e.stream) e.stream = enc->create_stream();
    return *e.stream;
  }

  /// Ends the turn of `id`: its final chunk is encoded by the next finish_atom
  /// (sent now, so it runs after the messages already in the mailbox - other
  /// sessions' finishes arriving in the same instant join the batch).
  void finish(caf::event_based_actor* self, session_id id, entry& e) {
    if (is_finishing(id)) return;  // a repeated end of turn
    enc->input_finished(stream_of(e));
    finishing.push_back(id);
    if (!finish_scheduled) {
      finish_scheduled = true;
      self->send(self, finish_atom::value);
    }
  }

  /// Encodes the remaining chunks of every finishing stream in batched calls,
  /// sends their last rows, and frees the streams (the next turn starts on
  /// the then current weights).
  void flush_finishing(caf::event_based_actor* self) {
    finish_scheduled = false;
    std::vector<session_id> ids;
    std::vector<models::speech_stream*> all;
    for (auto id : finishing) {
      auto it = streams.find(id);
      if (it == streams.end() || !it->second.stream) continue;  // closed meanwhile
      ids.push_back(id);
      all.push_back(it->second.stream.get());
    }
    finishing.clear();
    if (ids.empty()) return;
    const auto t0 = clk::now();
    for (;;) {
      std::vector<models::speech_stream*> ready;
      for (auto* st : all)
        if (enc->is_ready(*st)) ready.push_back(st);
      if (ready.empty()) break;
      enc->decode_streams(ready);
    }
    const double ms = std::chrono::duration<double, std::milli>(clk::now() - t0).count();
    for (auto id : ids) {
      auto& e = streams[id];
      e.encode_ms += ms / double(ids.size());
      send_rows(self, id, e, true);
      e.stream.reset();
    }
  }

  bool is_finishing(session_id id) const {
    return std::find(finishing.begin(), finishing.end(), id) != finishing.end();
  }

  /// Verifies and loads a registry version (or explicit files) and makes it
  /// current; on failure the serving weights are unchanged.
  swap_result swap(const swap_encoder& m) {
    swap_result r;
    r.previous = enc->version();
    try {
      if (m.version.empty()) throw std::invalid_argument("swap_encoder: version is empty");
      std::string proj = m.projector_path, layers = m.encoder_layers_path;
      std::unique_ptr<models::encoder_registry> reg;
      if (proj.empty()) {
        if (opt.registry.empty())
          throw std::runtime_error("no encoder registry is configured (encoder.registry): cannot swap to version " +
                                   m.version + " by name");
        reg = std::make_unique<models::encoder_registry>(opt.registry);
        reg->verify(m.version);
        proj = reg->path_of(m.version);
        layers = reg->encoder_layers_of(m.version);
      }
      enc->replace_weights(proj, layers, m.version);
      r.ok = true;
      r.message = "encoding new turns with " + m.version + " (was " + r.previous + ")";
      if (reg && m.make_current) {
        try {
          reg->set_current(m.version, "swap");
        } catch (const std::exception& e) {
          r.message += "; but the registry's current could not be updated: " + std::string(e.what());
        }
      }
    } catch (const std::exception& e) {
      r.ok = false;
      r.message = "swap to " + m.version + " refused, still serving " + r.previous + ": " + e.what();
    }
    r.version = enc->version();
    return r;
  }

  swap_result rollback(const rollback_encoder& m) {
    swap_result r;
    r.previous = enc->version();
    r.version = r.previous;
    if (opt.registry.empty()) {
      r.message = "rollback refused: no encoder registry is configured (encoder.registry)";
      return r;
    }
    std::string target;
    try {
      models::encoder_registry reg(opt.registry);
      target = m.to;
      if (target.empty()) {
        // "Previous" means before the version being served, which is the
        // registry's current unless someone changed it without telling us.
        auto t = reg.rollback_target();
        if (!t) throw std::runtime_error("nothing to roll back to (no earlier current version in the history)");
        target = *t;
      }
      reg.verify(target);
    } catch (const std::exception& e) {
      r.message = std::string("rollback refused, still serving ") + r.previous + ": " + e.what();
      return r;
    }
    r = swap({target, "", "", false});
    if (r.ok) {
      try {
        models::encoder_registry(opt.registry).rollback(m.to.empty() ? "" : target);
      } catch (const std::exception& e) {
        r.message += "; but the registry's current could not be updated: " + std::string(e.what());
      }
    }
    return r;
  }

  encoder_status status() const {
    encoder_status s;
    s.version = enc->version();
    s.generation = enc->generation();
    s.streams = int64_t(streams.size());
    s.registry = opt.registry;
    if (!opt.registry.empty()) {
      try {
        s.registry_current = models::encoder_registry(opt.registry).current().value_or("");
      } catch (const std::exception&) {
      }
    }
    return s;
  }

  // At start: serve the registry's current version (see encoder_actor_options).
  void follow_registry() {
    if (opt.registry.empty()) return;
    try {
      auto cur = models::encoder_registry(opt.registry).current();
      if (!cur || *cur == enc->version()) return;
      auto r = swap({*cur, "", "", false});
      std::cerr << "undertone encoder: registry current " << *cur << ": " << r.message << "\n";
    } catch (const std::exception& e) {
      std::cerr << "undertone encoder: cannot read the encoder registry " << opt.registry << ": " << e.what() << "\n";
    }
  }
};

caf::behavior encoder_behavior(caf::stateful_actor<encoder_state>* self, encoder_actor_options opt) {
  auto& st = self->state;
  st.enc = opt.encoder ? opt.encoder : opt.factory();
  opt.encoder.reset();  // the state holds it; the options are kept for the registry/batching
  st.opt = std::move(opt);
  st.follow_registry();
  return {
      [=](encode_open& m) {
        auto& e = self->state.streams[m.id];
        e.stream.reset();
        e.session = caf::actor_cast<caf::actor>(self->current_sender());
        e.encode_ms = 0;
      },
      [=](encode_audio& m) {
        auto& s = self->state;
        auto it = s.streams.find(m.id);
        if (it == s.streams.end()) return;
        // The next turn's audio before the last one was flushed: flush it first.
        if (s.is_finishing(m.id)) s.flush_finishing(self);
        auto& stream = s.stream_of(it->second);
        s.enc->accept_waveform(stream, m.samples_16k);
        if (s.enc->is_ready(stream)) s.maybe_run(self);
      },
      [=](encode_finish& m) {
        auto& s = self->state;
        auto it = s.streams.find(m.id);
        if (it == s.streams.end()) return;
        s.finish(self, m.id, it->second);
      },
      [=](encode_close& m) { self->state.streams.erase(m.id); },
      [=](finish_atom) { self->state.flush_finishing(self); },
      [=](flush_atom) {
        self->state.flush_scheduled = false;
        self->state.run_batch(self);
      },
      [=](swap_encoder& m) { return self->state.swap(m); },
      [=](rollback_encoder& m) { return self->state.rollback(m); },
      [=](status_request) { return self->state.status(); },
  };
}

}  // namespace

caf::actor spawn_encoder_actor(caf::actor_system& sys, encoder_actor_options opt) {
  return sys.spawn<caf::detached>(encoder_behavior, std::move(opt));
}

}  // namespace undertone::actors
