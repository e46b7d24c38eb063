// Session actor: one client's turns, prompt and history (actors/session.hpp,
// docs/engine.md). The decisions live in session_logic; this file turns them
// into messages.
#include "actors/session.hpp"

#include <chrono>
#include <cstdio>
#include <deque>
#include <functional>
#include <iostream>
#include <set>

#include "actors/session_logic.hpp"
#include "models/audio.hpp"

namespace undertone::actors {

namespace {

using clk = std::chrono::steady_clock;
double ms_between(clk::time_point a, clk::time_point b) {
  return std::chrono::duration<double, std::milli>(b - a).count();
}

enum mark_id : int32_t { mark_turn = 0, mark_before_tail = 1 };

/// A piece of a user message: text, or speech rows [n_rows, d_model].
struct content_part {
  std::string text;
  std::vector<float> rows;
  int64_t n_rows = 0;
  int64_t cost() const { return n_rows + int64_t(text.size()); }  // bytes bound tokens from above
};

struct past_turn {
  std::vector<content_part> user;
  std::string answer;
  int64_t answer_tokens = 0;
};

struct current_turn {
  int64_t n = 0;
  bool active = false, speech = false, rows_done = false, generating = false;
  bool have_end = false, have_voice = false, have_first = false;
  clk::time_point start, end_time, last_voice, first_token;
  double started_unix = 0;
  std::vector<float> audio;
  std::string user_text, answer, encoder_version;
  std::vector<std::string> events;
  turn_timings timings;
  std::string transcript, emotion;
};

struct session_state {
  session_options o;
  prompt_pieces pieces;
  turn_logic logic;
  std::unique_ptr<models::stream_resampler> rs;
  int rs_rate = 0, rs_channels = 0;

  current_turn cur;
  int64_t turn_no = 0;
  int discard_rows = 0;        // encoder turns whose rows are to be dropped (cancelled while encoding)
  bool user_open = false;      // a user header is in the slot and its message is not closed yet
  bool any_user = false;       // a user message was started since the system block
  size_t turn_part_index = 0;  // first part of open_user that belongs to the current turn
  std::vector<content_part> open_user;  // content of the open (or failed/cancelled) user message
  std::vector<past_turn> history;
  std::vector<std::string> pending_system;
  int64_t rows_est = 0;        // upper bound of the slot's rows
  bool need_rebuild = false;
  bool closed = false;
  bool closing = false;        // closed, quits once the outbox is empty

  // Messages to the gateway wait behind a turn's store commit (docs/store.md,
  // "Durability"): an entry with barrier != 0 holds everything after it until
  // the logger confirms that commit (or it times out).
  struct outgoing {
    uint64_t barrier = 0;
    std::function<void()> send;
  };
  std::deque<outgoing> outbox;
  std::set<uint64_t> pending_commits;
  uint64_t commits = 0;
  clk::time_point last_touch = clk::now();
  static inline const char* name = "undertone.session";

  caf::event_based_actor* self = nullptr;

  // ---- helpers
  void touch() { last_touch = clk::now(); }

  /// Every message to the gateway goes through here (keeps the order behind commits).
  template <class T>
  void to_gateway(T msg) {
    if (outbox.empty()) {
      self->send(o.gateway, std::move(msg));
      return;
    }
    outbox.push_back({0, [this, m = std::move(msg)]() mutable { self->send(o.gateway, std::move(m)); }});
  }
  /// Sends what is no longer held by an unconfirmed commit.
  void flush_outbox(bool all = false) {
    while (!outbox.empty()) {
      auto& f = outbox.front();
      if (!all && f.barrier != 0 && pending_commits.count(f.barrier)) break;
      if (f.send) f.send();
      outbox.pop_front();
    }
    if (closing && outbox.empty()) self->quit();
  }
  /// A commit resolved; `note` (if any) is sent in the barrier's place.
  void resolve_commit(uint64_t id, std::function<void()> note = {}) {
    pending_commits.erase(id);
    for (auto& f : outbox)
      if (f.barrier == id) f.send = std::move(note);
    flush_outbox();
  }
  bool storing() const { return o.env->store && o.settings.log && o.logger; }

  void event_line(const std::string& what, const std::string& label = {}, double value = 0) {
    char buf[64];
    std::snprintf(buf, sizeof buf, "%.0f ", cur.active ? ms_between(cur.start, clk::now()) : 0.0);
    char v[32];
    std::snprintf(v, sizeof v, " %g", value);
    cur.events.push_back(buf + what + " " + (label.empty() ? "-" : label) + v);
  }
  void to_client_event_(const std::string& name, const std::string& label = {}, double value = 0) {
    to_gateway(to_client_event{o.client_identity, cur.n, name, label, value});
    event_line(name, label, value);
  }
  void to_client_error_(error_code c, const std::string& msg, bool fatal = false) {
    to_gateway(to_client_error{o.client_identity, c, msg, fatal});
    publish("error", std::string(to_string(c)) + ": " + msg, 0);
  }
  void publish(const std::string& kind, const std::string& text, double value) {
    for (auto& s : o.subscribers) self->send(s, session_event{o.id, cur.n, kind, text, value});
  }

  void append_text(const std::string& s) {
    if (s.empty()) return;
    self->send(o.llm, llm_append{o.id, s, {}, 0});
    rows_est += int64_t(s.size());
  }
  void append_part(const content_part& p) {
    if (p.n_rows > 0)
      self->send(o.llm, llm_append{o.id, {}, p.rows, p.n_rows});
    else
      append_text(p.text);
    rows_est += p.n_rows;
  }
  void open_user_message() {
    if (user_open) return;
    if (any_user) {
      for (auto& line : pending_system) append_text(pieces.system_head + line + pieces.system_tail);
      pending_system.clear();
    }
    append_text(any_user ? pieces.user_head : pieces.first_user_head);
    user_open = any_user = true;
  }
  int64_t answer_cap() const { return std::max<int64_t>(1, o.settings.sampling.max_tokens); }

  // ---- context policy (docs/engine.md): drop the oldest turns, re-append the rest
  void rebuild() {
    need_rebuild = false;
    self->send(o.llm, llm_close{o.id});
    self->send(o.llm, llm_open{o.id, caf::actor_cast<caf::actor>(self)});
    rows_est = 0;
    user_open = any_user = false;
    const int64_t per_turn = int64_t(pieces.user_head.size() + pieces.user_tail.size() + pieces.assistant_tail.size());
    int64_t current = 0;
    for (auto& p : open_user) current += p.cost();
    int64_t fixed = int64_t(pieces.open.size() + pieces.first_user_head.size()) + per_turn + current + answer_cap();
    const int64_t budget = o.env->context_tokens;
    if (fixed > budget) {
      // The open message alone does not fit: keep its last rows.
      int64_t over = fixed - budget;
      while (over > 0 && !open_user.empty()) {
        auto& p = open_user.front();
        if (p.n_rows > over) {
          const int64_t d = int64_t(p.rows.size()) / p.n_rows;
          p.rows.erase(p.rows.begin(), p.rows.begin() + over * d);
          p.n_rows -= over;
          fixed -= over;
          over = 0;
        } else {
          fixed -= p.cost();
          over -= p.cost();
          open_user.erase(open_user.begin());
          turn_part_index = turn_part_index > 0 ? turn_part_index - 1 : 0;
        }
      }
      to_client_event_("context_full", "current turn cut to its last rows");
    }
    std::vector<int64_t> costs;
    for (auto& t : history) {
      int64_t c = per_turn + int64_t(t.answer.size());
      for (auto& p : t.user) c += p.cost();
      costs.push_back(c);
    }
    const size_t keep = first_turn_to_keep(costs, fixed, budget);
    if (keep > 0) {
      history.erase(history.begin(), history.begin() + ptrdiff_t(keep));
      to_client_event_("context_trimmed", "oldest turns dropped", double(keep));
    }
    append_text(pieces.open);
    for (auto& t : history) {
      open_user_message();
      for (auto& p : t.user) append_part(p);
      append_text(pieces.user_tail + t.answer + pieces.assistant_tail);
      user_open = false;
    }
    if (!open_user.empty() || (cur.active && cur.speech && !cur.generating)) {
      open_user_message();
      for (auto& p : open_user) append_part(p);
    }
  }

  // ---- turns
  void begin_turn(bool speech, bool speech_start) {
    cur = current_turn{};
    cur.n = ++turn_no;
    cur.active = true;
    cur.speech = speech;
    cur.start = clk::now();
    cur.started_unix = std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
    if (need_rebuild) rebuild();
    open_user_message();
    turn_part_index = open_user.size();
    self->send(o.llm, llm_mark{o.id, mark_turn});
    to_client_event_("turn_start", speech ? "speech" : "text");
    if (speech_start) to_client_event_("speech_start");
    publish("turn_start", speech ? "speech" : "text", 0);
  }

  void end_speech(turn_end_reason r) {
    cur.end_time = clk::now();
    cur.have_end = true;
    self->send(o.encoder, encode_finish{o.id});
    to_client_event_("endpoint", to_string(r));
    publish("speech_end", to_string(r), double(logic.turn_samples()) / 16.0);
    if (r == turn_end_reason::max_turn)
      to_client_error_(error_code::turn_too_long, "max turn length reached; the turn was ended");
  }

  void finish_user_message() {
    const int64_t tail = int64_t(pieces.user_tail.size());
    if (need_rebuild || rows_est + tail + answer_cap() > o.env->context_tokens) rebuild();
    self->send(o.llm, llm_mark{o.id, mark_before_tail});
    append_text(pieces.user_tail);
    user_open = false;
    self->send(o.llm, llm_generate{o.id, cur.n, o.settings.sampling, {}});
    cur.generating = true;
    logic.answer_started();
  }

  void fill_timings() {
    auto& t = cur.timings;
    if (cur.have_first && cur.have_end) t.end_of_turn_to_first_token_ms = ms_between(cur.end_time, cur.first_token);
    if (cur.have_first && cur.have_voice) t.last_voice_to_first_token_ms = ms_between(cur.last_voice, cur.first_token);
    if (cur.speech) t.audio_ms = double(logic.turn_samples()) / 16.0;
  }

  /// Sends the turn to the logger (request/response) and holds the turn_end
  /// (and everything after it) until the store confirms the commit, or
  /// store_commit_timeout_s passes: then the client gets a store_failed event
  /// before the turn_end, and the server logs a warning.
  void commit_turn(const std::string& stop_reason, const std::string& llm_version) {
    turn_record r;
    r.id = o.id;
    r.client_name = o.client_name;
    r.turn = cur.n;
    r.started_unix_s = cur.started_unix;
    r.audio_16k = std::move(cur.audio);
    r.user_text = cur.user_text;
    r.answer = cur.answer;
    r.stop_reason = stop_reason;
    r.timings = cur.timings;
    r.llm_version = llm_version;
    r.encoder_version = cur.encoder_version.empty() ? o.env->encoder_version : cur.encoder_version;
    r.events = cur.events;
    r.transcript = cur.transcript;
    r.emotion = cur.emotion;
    const uint64_t id = ++commits;
    pending_commits.insert(id);
    outbox.push_back({id, {}});
    const auto timeout = std::chrono::milliseconds(int64_t(o.env->store_commit_timeout_s * 1000));
    const int64_t turn = cur.n;
    self->request(o.logger, timeout, std::move(r))
        .then([this, id](int64_t) { resolve_commit(id); },
              [this, id, turn](caf::error& e) {
                const std::string why = self->system().render(e);
                std::cerr << "undertone session " << o.id << ": turn " << turn
                          << " not confirmed by the session store (" << why << "); turn_end sent anyway\n";
                resolve_commit(id, [this, turn, why]() {
                  self->send(o.gateway, to_client_event{o.client_identity, turn, "store_failed", why, 0});
                });
              });
  }

  /// The turn's end: stored (unless the store is off or the session opted
  /// out), then turn_end to the client.
  void send_turn_end(const std::string& text, const std::string& stop_reason, const std::string& llm_version) {
    fill_timings();
    const std::string ver = llm_version.empty() ? o.env->llm_version : llm_version;
    if (storing()) commit_turn(stop_reason, ver);
    to_gateway(to_client_turn_end{o.client_identity, cur.n, text, stop_reason, cur.timings, ver, cur.encoder_version});
  }

  /// Stops the running answer (barge-in or client cancel). The user's words
  /// stay in the slot (rewound to before the user tail), so the next turn
  /// continues that message.
  void cancel_answer(const char* why) {
    if (!cur.active) return;
    if (cur.generating) {
      self->send(o.llm, llm_rewind{o.id, mark_before_tail});
      user_open = true;
    } else if (cur.speech && !cur.rows_done) {
      ++discard_rows;  // the encoder is still flushing this turn: drop its last rows
    }
    to_client_event_("cancelled", why);
    send_turn_end(cur.answer, "cancelled", {});
    publish("answer", cur.answer, -1);
    cur.active = false;
  }

  /// Client cancel while the user is still speaking: the turn is dropped.
  void drop_listening_turn() {
    self->send(o.encoder, encode_finish{o.id});
    ++discard_rows;
    self->send(o.llm, llm_rewind{o.id, mark_turn});
    open_user.resize(std::min(open_user.size(), turn_part_index));
    to_client_event_("turn_dropped");
    cur.active = false;
  }

  void handle_step(audio_step& st, bool was_listening) {
    if (st.barge_in) cancel_answer("barge_in");
    if (st.turn_start) {
      begin_turn(true, st.speech_start);
      if (st.barge_in) to_client_event_("barge_in");
    }
    if (!cur.active || !cur.speech) return;
    if (st.voiced && (was_listening || st.turn_start)) {
      cur.last_voice = clk::now();
      cur.have_voice = true;
    }
    if (!st.to_encoder.empty()) {
      cur.audio.insert(cur.audio.end(), st.to_encoder.begin(), st.to_encoder.end());
      self->send(o.encoder, encode_audio{o.id, std::move(st.to_encoder)});
    }
    if (st.end != turn_end_reason::none) end_speech(st.end);
  }

  void close(bool notify_gateway = true) {
    if (closed) return;
    closed = true;
    self->send(o.llm, llm_close{o.id});
    self->send(o.encoder, encode_close{o.id});
    if (notify_gateway) to_gateway(session_closed{o.client_identity, o.id});
    publish("closed", "", 0);
    if (outbox.empty()) {
      self->quit();
      return;
    }
    // A turn_end still waits for its commit: quit once it is sent; ignore the client meanwhile.
    closing = true;
    self->set_default_handler(caf::drop);
    self->become([](client_gone&) {});
  }
};

caf::behavior session_behavior(caf::stateful_actor<session_state>* self, session_options opt) {
  auto& s = self->state;
  s.self = self;
  s.o = std::move(opt);
  s.pieces = make_prompt_pieces(s.o.env->templ, s.o.settings.system_prompt);
  s.logic.set_settings(s.o.settings.vad);
  self->set_exception_handler([self](caf::scheduled_actor*, std::exception_ptr& ep) -> caf::error {
    std::string what = "unknown exception";
    try {
      std::rethrow_exception(ep);
    } catch (const std::exception& e) {
      what = e.what();
    } catch (...) {
    }
    auto& st = self->state;
    st.to_gateway(to_client_error{st.o.client_identity, error_code::internal, "session: " + what, true});
    st.close();
    st.flush_outbox(true);
    return caf::exit_reason::unhandled_exception;
  });
  self->send(s.o.encoder, encode_open{s.o.id});
  self->send(s.o.llm, llm_open{s.o.id, caf::actor_cast<caf::actor>(self)});
  s.append_text(s.pieces.open);  // prefilled before anyone speaks
  if (s.o.env->idle_timeout_s > 0)
    self->delayed_send(self, std::chrono::seconds(5), idle_check_atom::value);

  return {
      // ---------------------------------------------------------- client
      [=](client_audio& m) {
        auto& st = self->state;
        st.touch();
        if (m.sample_rate <= 0 || m.channels <= 0 || m.samples.size() % size_t(m.channels) != 0) {
          st.to_client_error_(error_code::bad_frame, "audio: bad sample rate, channel count or sample count");
          return;
        }
        if (!st.rs || st.rs_rate != m.sample_rate || st.rs_channels != m.channels) {
          st.rs = std::make_unique<models::stream_resampler>(m.sample_rate, m.channels, models::k_speech_sample_rate,
                                                             models::nonfinite_policy::replace_with_zero);
          st.rs_rate = m.sample_rate;
          st.rs_channels = m.channels;
        }
        std::vector<float> x;
        st.rs->accept(m.samples.data(), m.samples.size() / size_t(m.channels), x);
        const bool was_listening = st.logic.state() == turn_state::listening;
        auto step = st.logic.accept_audio(x);
        st.handle_step(step, was_listening);
      },
      [=](client_end_turn&) {
        auto& st = self->state;
        st.touch();
        std::vector<float> tail;
        if (!st.logic.end_turn(tail) || !st.cur.active) {
          // The client ended a turn in which the VAD heard no speech (or that
          // it already ended): answer so the client is never left waiting.
          if (st.logic.state() == turn_state::idle && !st.cur.active) {
            st.to_client_event_("no_speech", "end_turn but no speech was detected (see vad.threshold_db)");
            st.to_gateway(to_client_turn_end{st.o.client_identity, st.cur.n, "", "no_speech", {},
                                             st.o.env->llm_version, {}});
          }
          return;
        }
        if (!tail.empty()) {
          st.cur.audio.insert(st.cur.audio.end(), tail.begin(), tail.end());
          self->send(st.o.encoder, encode_audio{st.o.id, std::move(tail)});
        }
        st.end_speech(turn_end_reason::client);
      },
      [=](client_text_turn& m) {
        auto& st = self->state;
        st.touch();
        if (m.text.empty()) {
          st.to_client_error_(error_code::bad_frame, "text turn: empty text");
          return;
        }
        if (!st.logic.text_turn()) {
          st.to_client_error_(error_code::busy, std::string("text turn while ") + to_string(st.logic.state()) +
                                                    "; send cancel first");
          return;
        }
        st.begin_turn(false, false);
        st.publish("turn_text", m.text, 0);
        st.cur.user_text = m.text;
        st.cur.end_time = clk::now();
        st.cur.have_end = true;
        content_part p;
        p.text = m.text;
        st.append_part(p);
        st.open_user.push_back(std::move(p));
        st.finish_user_message();
      },
      [=](client_cancel&) {
        auto& st = self->state;
        st.touch();
        switch (st.logic.state()) {
          case turn_state::idle: return;
          case turn_state::listening: st.drop_listening_turn(); break;
          case turn_state::thinking:
          case turn_state::answering: st.cancel_answer("client"); break;
        }
        st.logic.cancel();
      },
      [=](client_config& m) {
        auto& st = self->state;
        st.touch();
        const bool new_system = m.settings.system_prompt != st.o.settings.system_prompt;
        st.o.settings = m.settings;
        st.logic.set_settings(m.settings.vad);
        if (new_system) {
          st.pieces = make_prompt_pieces(st.o.env->templ, st.o.settings.system_prompt);
          st.need_rebuild = true;  // applied at the next turn
        }
      },
      [=](client_annotation& m) {
        auto& st = self->state;
        st.touch();
        if (st.cur.active && (m.turn < 0 || m.turn == st.cur.n)) {
          st.cur.transcript = m.transcript;
          st.cur.emotion = m.emotion;
          return;
        }
        if (!st.storing()) return;
        turn_record r;  // a late label for a stored turn (logger.hpp)
        r.id = st.o.id;
        r.client_name = st.o.client_name;
        r.turn = m.turn < 0 ? st.cur.n : m.turn;
        r.stop_reason = "annotation";
        r.transcript = m.transcript;
        r.emotion = m.emotion;
        // Failures (unknown turn) are logged by the logger; nothing to tell the client.
        self->request(st.o.logger, std::chrono::seconds(30), std::move(r)).then([](int64_t) {}, [](caf::error&) {});
      },
      [=](client_gone&) { self->state.close(); },
      // ---------------------------------------------------------- encoder
      [=](speech_rows& r) {
        auto& st = self->state;
        if (st.discard_rows > 0) {
          if (r.last) --st.discard_rows;
          return;
        }
        auto& c = st.cur;
        if (!c.active || !c.speech || c.rows_done) return;
        c.encoder_version = r.encoder_version;
        c.timings.encode_ms += r.encode_ms;
        if (r.n_rows > 0) {
          content_part p;
          p.rows = std::move(r.rows);
          p.n_rows = r.n_rows;
          st.append_part(p);
          c.timings.speech_tokens += r.n_rows;
          st.publish("speech_tokens", "", double(r.n_rows));
          // one part per turn: merge consecutive row pieces
          if (st.open_user.size() > st.turn_part_index && st.open_user.back().n_rows > 0) {
            auto& b = st.open_user.back();
            b.rows.insert(b.rows.end(), p.rows.begin(), p.rows.end());
            b.n_rows += p.n_rows;
          } else {
            st.open_user.push_back(std::move(p));
          }
        }
        if (r.last) {
          c.rows_done = true;
          if (c.have_end) c.timings.flush_ms = ms_between(c.end_time, clk::now());
          if (st.logic.state() == turn_state::thinking) st.finish_user_message();
        }
      },
      // ---------------------------------------------------------- llm worker
      [=](llm_delta& d) {
        auto& st = self->state;
        auto& c = st.cur;
        if (!c.active || !c.generating || d.turn != c.n) return;
        if (!c.have_first) {
          c.have_first = true;
          c.first_token = clk::now();
          st.event_line("first_token");
        }
        c.answer += d.text;
        st.to_gateway(to_client_delta{st.o.client_identity, c.n, d.text});
        st.publish("answer_delta", d.text, 0);
      },
      [=](llm_done& d) {
        auto& st = self->state;
        auto& c = st.cur;
        if (!c.active || !c.generating || d.turn != c.n) return;
        if (!c.have_first) {
          c.have_first = true;
          c.first_token = clk::now();
        }
        c.answer = d.text;
        c.timings.prefill_ms = d.prefill_ms;
        c.timings.decode_ms = d.decode_ms;
        c.timings.answer_tokens = d.tokens;
        st.send_turn_end(d.text, d.stop_reason, d.llm_version);
        st.publish("answer", d.text, double(d.tokens));
        st.append_text(st.pieces.assistant_tail);
        st.rows_est = d.context_rows + int64_t(st.pieces.assistant_tail.size());
        st.history.push_back(past_turn{std::move(st.open_user), d.text, d.tokens});
        st.open_user.clear();
        st.turn_part_index = 0;
        c.active = false;
        st.logic.answer_finished();
      },
      [=](llm_failed& f) {
        auto& st = self->state;
        auto& c = st.cur;
        if (f.turn < 0) {
          if (f.code == error_code::server_full) {
            st.to_client_error_(error_code::server_full, "no LLM slot: " + f.message, true);
            st.close();
          } else if (f.code == error_code::context_full) {
            st.need_rebuild = true;  // the append was refused: re-append within the budget
          } else {
            st.to_client_error_(f.code, f.message);
          }
          return;
        }
        if (!c.active || f.turn != c.n) return;
        st.to_client_error_(f.code, "answer failed: " + f.message);
        st.send_turn_end(c.answer, "error", {});
        // The user's words stay for the next turn; the slot is rebuilt from the history.
        st.user_open = true;
        st.need_rebuild = true;
        c.active = false;
        st.logic.answer_finished();
      },
      // ---------------------------------------------------------- supervisor
      [=](inject_message& m) {
        auto& st = self->state;
        if (m.as_system)
          st.pending_system.push_back(m.text);
        else
          st.to_client_event_("inject", m.text);
      },
      [=](subscribe_events& m) {
        auto& subs = self->state.o.subscribers;
        if (std::find(subs.begin(), subs.end(), m.subscriber) == subs.end()) subs.push_back(m.subscriber);
      },
      [=](unsubscribe_events& m) {
        auto& subs = self->state.o.subscribers;
        subs.erase(std::remove(subs.begin(), subs.end(), m.subscriber), subs.end());
      },
      [=](component_restarted& m) {
        auto& st = self->state;
        auto& c = st.cur;
        if (m.which == "encoder") {
          st.o.encoder = m.actor;
          st.discard_rows = 0;
          self->send(st.o.encoder, encode_open{st.o.id});
          if (c.active && c.speech && !c.rows_done) {
            st.to_client_error_(error_code::internal, "the speech encoder restarted; this turn was dropped");
            self->send(st.o.llm, llm_rewind{st.o.id, mark_turn});
            st.open_user.resize(std::min(st.open_user.size(), st.turn_part_index));
            c.active = false;
            st.logic.cancel();
          }
        } else if (m.which == "llm") {
          st.o.llm = m.actor;
          if (c.active && c.generating) {
            st.to_client_error_(error_code::worker_lost, "the LLM worker restarted; the answer is lost");
            st.send_turn_end(c.answer, "error", {});
            st.user_open = true;
            c.active = false;
            st.logic.answer_finished();
          }
          st.rebuild();
        } else if (m.which == "logger") {
          st.o.logger = m.actor;
        }
      },
      [=](idle_check_atom) {
        auto& st = self->state;
        const double idle = std::chrono::duration<double>(clk::now() - st.last_touch).count();
        // A turn in progress (the client waits for its answer) is not idleness.
        if (idle >= st.o.env->idle_timeout_s && !st.cur.active) {
          st.close();
          return;
        }
        self->delayed_send(self, std::chrono::seconds(5), idle_check_atom::value);
      },
  };
}

}  // namespace

caf::actor spawn_session(caf::actor_system& sys, session_options opt) {
  return sys.spawn(session_behavior, std::move(opt));
}

}  // namespace undertone::actors
