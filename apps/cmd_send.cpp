// `undertone send FILE...`: a load and latency client for `undertone serve`.
// Streams audio files to the server over the wire protocol (transport/client.hpp)
// from N parallel sessions, prints the answers as they stream and per-turn and
// summary latencies.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <iostream>
#include <mutex>
#include <thread>

#include <zmq.hpp>

#include "apps/common.hpp"
#include "models/audio.hpp"
#include "transport/auth.hpp"
#include "transport/client.hpp"

namespace undertone::apps {

namespace {

using clk = std::chrono::steady_clock;
using ms_d = std::chrono::duration<double, std::milli>;

struct send_flags {
  std::vector<std::string> files;
  std::string server;          // "" = from server.bind
  int64_t sessions = 1;
  double speed = 1.0;          // 1 = real time, 0 = as fast as possible
  int64_t chunk_ms = 20;
  std::string end_turn = "client";
  std::string text;
  std::string system;
  double connect_timeout_s = 10;
  double answer_timeout_s = 120;
  double trailing_silence_s = 1.5;  // --end-turn server: silence after each file so the endpoint fires
  double stagger_ms = 0;       // session i starts i * stagger_ms after the first
  std::string token;           // --token; resolved with the env / config in the callback
};

/// One finished turn as the client saw it.
struct turn_stats {
  double first_token_ms = -1;  ///< end of turn -> first delta (client clock, or the server's for VAD turns)
  double tokens_per_s = 0;
  int64_t tokens = 0;
  double last_voice_ms = -1;  ///< server VAD turns: last voiced sample -> first token (server clock)
  double flush_ms = -1;       ///< server: end of turn -> last speech rows out of the encoder
  double prefill_ms = -1;     ///< server: answer requested -> first token sampled
};

/// Shared by all session threads.
struct run_state {
  std::mutex mu;               // guards the output and the vectors below
  std::vector<turn_stats> turns;
  int errors = 0;
  int failed_sessions = 0;
  bool inline_output = true;   // one session: deltas are printed as they come
};

/// One session: connect, stream every file (then the text turn), bye.
class session_runner {
 public:
  session_runner(int index, const send_flags& fl, const std::vector<models::audio>& audio, zmq::context_t& ctx,
                 run_state& rs)
      : index_(index), fl_(fl), audio_(audio), c_(&ctx), rs_(rs), tag_("[s" + std::to_string(index) + "] ") {}

  void run() {
    // Staggered starts: real users do not all stop talking in the same 20 ms.
    if (fl_.stagger_ms > 0) std::this_thread::sleep_for(ms_d(fl_.stagger_ms * double(index_ - 1)));
    try {
      const auto w = c_.connect(fl_.server, "undertone-send/" + std::to_string(index_),
                                std::chrono::milliseconds(int64_t(fl_.connect_timeout_s * 1000)), fl_.token);
      say(tag_ + "session " + std::to_string(w.session) + (w.models.empty() ? "" : " (" + w.models + ")") + "\n");
      transport::config_msg cm;
      cm.vad = fl_.end_turn == "server";
      if (!fl_.system.empty()) cm.system_prompt = fl_.system;
      c_.send_config(cm);
      for (size_t f = 0; f < audio_.size(); ++f) stream_file(fl_.files[f], audio_[f]);
      if (!fl_.text.empty()) {
        c_.send_text(fl_.text);
        eot_ = clk::now();
        wait_answer(/*server_endpoint=*/false);
      }
      c_.bye();
    } catch (const std::exception& e) {
      std::lock_guard<std::mutex> lock(rs_.mu);
      std::cerr << tag_ << "error: " << e.what() << "\n";
      rs_.failed_sessions++;
    }
  }

 private:
  void say(const std::string& s) {
    std::lock_guard<std::mutex> lock(rs_.mu);
    std::cout << s << std::flush;
  }

  void stream_file(const std::string& name, const models::audio& a) {
    const size_t piece = size_t(a.sample_rate * fl_.chunk_ms / 1000);
    say(tag_ + name + ": " + std::to_string(a.seconds()).substr(0, 5) + " s\n");
    turn_ends_ = 0;
    const auto t0 = clk::now();
    const auto chunk_dur = ms_d(double(fl_.chunk_ms) / std::max(fl_.speed, 1e-9));
    size_t i = 0;
    auto pace = [&](size_t k) {
      // Real time (or speed x): chunk k leaves at t0 + k * chunk; handle answers meanwhile.
      if (fl_.speed > 0) {
        const auto due = t0 + std::chrono::duration_cast<clk::duration>(chunk_dur * double(k));
        pump_until(due);
      } else {
        pump_until(clk::now());
      }
    };
    for (size_t off = 0; off < a.samples.size(); off += piece, ++i) {
      pace(i);
      c_.send_audio(a.samples.data() + off, std::min(piece, a.samples.size() - off), a.sample_rate, 1);
    }
    if (fl_.end_turn == "client") {
      pace(i);
      c_.end_turn();
      eot_ = clk::now();
      wait_answer(false);
    } else {
      const std::vector<float> silence(piece, 0.0f);
      const size_t n = size_t(fl_.trailing_silence_s * 1000 / double(fl_.chunk_ms));
      for (size_t k = 0; k < n; ++k, ++i) {
        pace(i);
        c_.send_audio(silence.data(), silence.size(), a.sample_rate, 1);
      }
      eot_ = {};
      wait_answer(true);
    }
  }

  /// Handles frames until `until` (returns at once if it has passed).
  void pump_until(clk::time_point until) {
    for (;;) {
      const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(until - clk::now());
      auto m = c_.receive(std::max(left, std::chrono::milliseconds(0)));
      if (!m) return;
      handle(*m);
    }
  }

  /// Waits for the answer of the turn just ended (client) or for the server's
  /// endpoint turns to finish (server VAD: at least one turn_end and no answer running).
  void wait_answer(bool server_endpoint) {
    const auto deadline = clk::now() + std::chrono::milliseconds(int64_t(fl_.answer_timeout_s * 1000));
    const int before = turn_ends_;
    while (clk::now() < deadline) {
      if (!server_endpoint && turn_ends_ > before) return;
      if (server_endpoint && turn_ends_ > 0 && !answering_) {
        // Give a late endpoint a moment to start another answer.
        pump_until(clk::now() + std::chrono::milliseconds(500));
        if (!answering_) return;
      }
      if (auto m = c_.receive(std::chrono::milliseconds(100))) handle(*m);
    }
    throw std::runtime_error("no complete answer within " + std::to_string(int(fl_.answer_timeout_s)) +
                             " s (--answer-timeout-s)");
  }

  void handle(const transport::server_message& m) {
    if (auto* d = std::get_if<transport::delta_msg>(&m)) {
      if (!answering_) {
        answering_ = true;
        first_ = clk::now();
        deltas_ = 0;
        line_.clear();
        if (rs_.inline_output) say(tag_);
      }
      ++deltas_;
      if (rs_.inline_output) {
        say(d->text);
      } else {
        line_ += d->text;
        for (auto p = line_.find('\n'); p != std::string::npos; p = line_.find('\n')) {
          say(tag_ + line_.substr(0, p) + "\n");
          line_.erase(0, p + 1);
        }
      }
    } else if (auto* t = std::get_if<transport::turn_end_msg>(&m)) {
      finish_turn(*t);
    } else if (auto* e = std::get_if<transport::error_msg>(&m)) {
      {
        std::lock_guard<std::mutex> lock(rs_.mu);
        std::cerr << tag_ << "server " << (e->fatal ? "error" : "warning") << ": " << transport::error_name(e->code)
                  << ": " << e->message << "\n";
        rs_.errors++;
      }
      if (e->fatal) throw std::runtime_error("the server closed the session");
    } else if (auto* ev = std::get_if<transport::event_msg>(&m)) {
      if (ev->name == "emotion")
        say(tag_ + "(emotion: " + ev->label + " " + std::to_string(ev->value).substr(0, 4) + ")\n");
    }
  }

  void finish_turn(const transport::turn_end_msg& t) {
    const auto now = clk::now();
    turn_stats s;
    s.tokens = t.timings.answer_tokens > 0 ? t.timings.answer_tokens : deltas_;
    if (answering_ && eot_ != clk::time_point{}) {
      s.first_token_ms = ms_d(first_ - eot_).count();
    } else {
      s.first_token_ms = t.timings.end_of_turn_to_first_token_ms;
    }
    s.last_voice_ms = t.timings.last_voice_to_first_token_ms;
    s.flush_ms = t.timings.flush_ms;
    s.prefill_ms = t.stop_reason == "cancelled" ? -1 : t.timings.prefill_ms;
    // The server's decode time when it reports one: deltas that queued up while
    // this client was busy would make the client-side rate meaningless.
    const double gen_s = answering_ ? std::chrono::duration<double>(now - first_).count() : 0.0;
    if (t.timings.decode_ms > 0) s.tokens_per_s = double(s.tokens) / (t.timings.decode_ms / 1000);
    else if (deltas_ > 1 && gen_s > 0) s.tokens_per_s = double(deltas_ - 1) / gen_s;  // ~one token per delta
    std::string out;
    if (!rs_.inline_output && !line_.empty()) out += tag_ + line_ + "\n";
    if (rs_.inline_output && answering_) out += "\n";
    if (!answering_ && !t.text.empty()) out += tag_ + t.text + "\n";
    char buf[256];
    std::snprintf(buf, sizeof buf,
                  "turn %lld: first token %.0f ms after end of turn (server: encoder flush %.0f ms, prefill %.0f ms), "
                  "%lld tokens, %.1f tokens/s (%s)\n",
                  (long long)t.turn, s.first_token_ms, s.flush_ms, s.prefill_ms, (long long)s.tokens, s.tokens_per_s,
                  t.stop_reason.c_str());
    out += tag_ + buf;
    {
      std::lock_guard<std::mutex> lock(rs_.mu);
      std::cout << out << std::flush;
      rs_.turns.push_back(s);
    }
    answering_ = false;
    line_.clear();
    eot_ = {};
    ++turn_ends_;
  }

  int index_;
  const send_flags& fl_;
  const std::vector<models::audio>& audio_;
  transport::client c_;
  run_state& rs_;
  std::string tag_;
  clk::time_point eot_{}, first_{};
  bool answering_ = false;
  int64_t deltas_ = 0;
  int turn_ends_ = 0;
  std::string line_;
};

}  // namespace

void add_send_command(CLI::App& app, global_options& g) {
  static send_flags fl;
  auto* cmd = app.add_subcommand(
      "send",
      "Stream audio files to a running `undertone serve` (wire protocol: docs/protocol.md) and print the\n"
      "answers as they stream, then per turn: end of turn -> first token latency and tokens/s, and at the\n"
      "end p50/p95 over all turns. Files: anything libsndfile reads (resampled to 16 kHz mono here).\n"
      "--end-turn client: one turn per file, ended by an end_turn frame (server VAD off); server: the\n"
      "server's VAD ends turns (trailing silence is appended to each file).\n"
      "Example: undertone send a.wav b.flac --sessions 4 --speed 0");
  cmd->add_option("FILE", fl.files, "audio files, streamed in order, one turn each");
  cmd->add_option("--server", fl.server, "server endpoint (default: server.bind of the config)");
  cmd->add_option("--sessions", fl.sessions, "parallel sessions, each streams all files")
      ->capture_default_str()
      ->check(CLI::Range(int64_t(1), int64_t(1024)));
  cmd->add_option("--speed", fl.speed, "1 = real time, 2 = twice as fast, 0 = as fast as possible")
      ->capture_default_str()
      ->check(CLI::Range(0.0, 1000.0));
  cmd->add_option("--chunk-ms", fl.chunk_ms, "audio per frame, ms")
      ->capture_default_str()
      ->check(CLI::Range(int64_t(10), int64_t(1000)));
  cmd->add_option("--end-turn", fl.end_turn, "who ends a turn: client or server")
      ->capture_default_str()
      ->check(CLI::IsMember({"client", "server"}));
  cmd->add_option("--stagger-ms", fl.stagger_ms,
                  "start session i this many ms after session i-1 (0 = all at once: every turn ends in the same "
                  "instant, the worst case)")
      ->capture_default_str()
      ->check(CLI::Range(0.0, 60000.0));
  cmd->add_option("--text", fl.text, "a text turn after the files (or instead of them)");
  cmd->add_option("--system", fl.system, "system prompt for the sessions");
  cmd->add_option("--timeout-s", fl.connect_timeout_s, "wait this long for the server's welcome")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  cmd->add_option("--answer-timeout-s", fl.answer_timeout_s, "wait this long for an answer")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  add_token_option(cmd, fl.token);
  cmd->callback([&g] {
    const auto cfg = effective_config(g);
    fl.token = transport::client_auth_token(fl.token, cfg.server);
    if (fl.files.empty() && fl.text.empty()) {
      std::cerr << "error: give audio FILEs and/or --text\n";
      exit_code() = 2;
      return;
    }
    if (fl.server.empty()) fl.server = connectable_endpoint(cfg.server.bind);
    std::vector<models::audio> audio;
    for (const auto& f : fl.files) {
      try {
        audio.push_back(models::load_audio(f));
      } catch (const std::exception& e) {
        std::cerr << "error: " << e.what() << "\n";
        exit_code() = 1;
        return;
      }
    }
    zmq::context_t ctx(1);
    run_state rs;
    rs.inline_output = fl.sessions == 1;
    std::vector<std::unique_ptr<session_runner>> runners;
    for (int64_t i = 0; i < fl.sessions; ++i)
      runners.push_back(std::make_unique<session_runner>(int(i + 1), fl, audio, ctx, rs));
    std::vector<std::thread> threads;
    for (auto& r : runners) threads.emplace_back([&r] { r->run(); });
    for (auto& t : threads) t.join();
    runners.clear();

    std::vector<double> lat, tps, voice, flush, prefill;
    for (const auto& t : rs.turns) {
      if (t.flush_ms >= 0) flush.push_back(t.flush_ms);
      if (t.prefill_ms >= 0) prefill.push_back(t.prefill_ms);
      if (t.first_token_ms >= 0) lat.push_back(t.first_token_ms);
      if (t.last_voice_ms >= 0) voice.push_back(t.last_voice_ms);
      if (t.tokens_per_s > 0) tps.push_back(t.tokens_per_s);
    }
    char buf[512];
    std::snprintf(buf, sizeof buf,
                  "summary: %lld session(s), %zu turn(s), %d failed session(s), %d server error(s); "
                  "first token p50 %.0f ms, p95 %.0f ms; tokens/s p50 %.1f, p95 %.1f\n",
                  (long long)fl.sessions, rs.turns.size(), rs.failed_sessions, rs.errors, percentile(lat, 50),
                  percentile(lat, 95), percentile(tps, 50), percentile(tps, 95));
    std::cout << buf;
    if (!flush.empty() || !prefill.empty()) {
      std::snprintf(buf, sizeof buf,
                    "summary: server side: encoder flush p50 %.0f ms, p95 %.0f ms; prefill (answer requested -> "
                    "first token) p50 %.0f ms, p95 %.0f ms\n",
                    percentile(flush, 50), percentile(flush, 95), percentile(prefill, 50), percentile(prefill, 95));
      std::cout << buf;
    }
    if (!voice.empty()) {
      std::snprintf(buf, sizeof buf, "summary: last voiced sample -> first token p50 %.0f ms, p95 %.0f ms (%zu turns)\n",
                    percentile(voice, 50), percentile(voice, 95), voice.size());
      std::cout << buf;
    }
    if (rs.failed_sessions > 0) exit_code() = 1;
  });
}

}  // namespace undertone::apps
