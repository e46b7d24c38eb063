// `undertone replay STORE|MANIFEST...`: re-streams recorded sessions (a
// session store, docs/store.md) or a corpus (a JSONL manifest, docs/data.md)
// through a running server over the wire protocol, compares the answers and
// latencies with the recorded ones and writes a report (docs/replay.md).
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <mutex>
#include <thread>

#include <nlohmann/json.hpp>
#include <zmq.hpp>

#include "apps/common.hpp"
#include "models/audio.hpp"
#include "models/evaluation.hpp"
#include "models/manifest.hpp"
#include "models/session_store.hpp"
#include "models/train_metrics.hpp"
#include "transport/auth.hpp"
#include "transport/client.hpp"

namespace undertone::apps {

namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

struct replay_flags {
  std::vector<std::string> sources;
  std::string server;
  std::string token;  // --token
  std::string out;
  double speed = 0.0;
  int64_t parallel = 1;
  int64_t turns_per_session = 1;
  std::string split;
  int64_t limit = 0;
  bool annotate = false;
  std::string run;
  double answer_timeout_s = 120;
  double max_mismatch = -1;
  double max_latency_ratio = -1;
};

/// One turn to replay, with what was recorded for it (store sources).
struct replay_turn {
  std::string ref;              ///< where it came from: "RUN/SESSION/TURN" or "FILE:LINE"
  std::string audio;            ///< audio file ("" = text turn)
  std::string text;
  std::string transcript, emotion;  ///< labels (annotation or manifest)
  bool recorded = false;        ///< a recorded answer exists (store)
  std::string recorded_answer, recorded_stop, recorded_encoder, recorded_llm;
  double recorded_first_ms = -1;
};
struct replay_session {
  std::string name;
  std::vector<replay_turn> turns;
};

/// The replayed turn.
struct turn_row {
  const replay_turn* src = nullptr;
  std::string session;
  transport::turn_outcome got;
  double rouge = -1;
  bool exact = false;
};

bool is_store(const std::string& p) { return fs::is_directory(p) && fs::exists(fs::path(p) / "index.sqlite"); }

/// A store: one replay session per recorded session, turns in order.
std::vector<replay_session> load_store(const std::string& dir, const replay_flags& f) {
  models::session_store st(dir);
  models::turn_filter flt;
  flt.run = f.run;
  std::map<std::pair<std::string, uint64_t>, replay_session> by;
  for (const auto& t : st.turns(flt)) {
    auto& s = by[{t.run, t.session}];
    if (s.name.empty()) s.name = t.run + "/" + std::to_string(t.session);
    replay_turn r;
    r.ref = t.run + "/" + std::to_string(t.session) + "/" + std::to_string(t.turn);
    r.audio = t.audio;
    r.text = t.audio.empty() ? t.user_text : "";
    if (r.audio.empty() && r.text.empty()) continue;  // nothing the user said was kept
    r.transcript = t.transcript;
    r.emotion = t.emotion;
    r.recorded = true;
    r.recorded_answer = t.answer;
    r.recorded_stop = t.stop_reason;
    r.recorded_encoder = t.encoder_version;
    r.recorded_llm = t.llm_version;
    if (t.timings.is_object() && t.timings.contains("end_of_turn_to_first_token_ms"))
      r.recorded_first_ms = t.timings["end_of_turn_to_first_token_ms"].get<double>();
    s.turns.push_back(std::move(r));
  }
  std::vector<replay_session> out;
  for (auto& kv : by)
    if (!kv.second.turns.empty()) out.push_back(std::move(kv.second));
  return out;
}

/// A manifest: utterances grouped by speaker into sessions of K turns.
std::vector<replay_session> load_manifest(const std::string& path, const replay_flags& f) {
  const auto utts = models::read_manifest(path);
  std::map<std::string, std::vector<replay_turn>> by_speaker;
  std::vector<std::string> order;
  int64_t line = 0;
  for (const auto& u : utts) {
    ++line;
    if (!f.split.empty() && models::to_string(u.split) != f.split) continue;
    replay_turn r;
    r.ref = fs::path(path).filename().string() + ":" + std::to_string(line);
    r.audio = u.audio;
    r.transcript = u.transcript;
    if (u.emotion != models::emotion_label::unlabeled) r.emotion = models::to_string(u.emotion);
    if (!by_speaker.count(u.speaker)) order.push_back(u.speaker);
    by_speaker[u.speaker].push_back(std::move(r));
  }
  std::vector<replay_session> out;
  for (const auto& spk : order) {
    auto& turns = by_speaker[spk];
    for (size_t i = 0; i < turns.size(); i += size_t(f.turns_per_session)) {
      replay_session s;
      s.name = spk + "#" + std::to_string(i / size_t(f.turns_per_session));
      for (size_t j = i; j < std::min(turns.size(), i + size_t(f.turns_per_session)); ++j) s.turns.push_back(turns[j]);
      out.push_back(std::move(s));
    }
  }
  return out;
}

std::string fmt(double v, int prec = 0) {
  if (v < 0) return "-";
  char b[64];
  std::snprintf(b, sizeof b, "%.*f", prec, v);
  return b;
}

/// Recorded vs replayed first-token latency per turn (a scatter with the
/// diagonal), for a person to see at a glance whether the server got slower.
std::string plot_latency(const std::vector<turn_row>& rows, const fs::path& dir) {
  const fs::path data = dir / "latency.dat", script = dir / "latency.gp", png = dir / "latency.png";
  std::ofstream d(data);
  double mx = 1;
  size_t n = 0;
  for (const auto& r : rows) {
    const double a = r.src->recorded_first_ms, b = r.got.timings.end_of_turn_to_first_token_ms;
    if (a < 0 || b < 0) continue;
    d << a << " " << b << "\n";
    mx = std::max({mx, a, b});
    ++n;
  }
  d.close();
  if (n == 0) return "no turn has both a recorded and a replayed latency";
  std::ofstream g(script);
  g << "set terminal pngcairo size 640,560\nset output " << models::gnuplot_quote(png.string()) << "\n"
    << "set title 'end of turn -> first token (server clock), one point per turn'\n"
    << "set xlabel 'recorded, ms'\nset ylabel 'replayed, ms'\nset grid\nset key top left\n"
    << "set xrange [0:" << mx * 1.05 << "]\nset yrange [0:" << mx * 1.05 << "]\n"
    << "plot " << models::gnuplot_quote(data.string()) << " using 1:2 with points pt 7 ps 0.8 title 'turn', "
    << "x with lines dt 2 title 'same latency'\n";
  g.close();
  return models::run_gnuplot(script.string(), png.string());
}

int run_replay(const replay_flags& f, const config::undertone_config& cfg) {
  // ---- load the sessions to replay
  std::vector<replay_session> sessions;
  for (const auto& src : f.sources) {
    std::vector<replay_session> got;
    if (is_store(src)) got = load_store(src, f);
    else if (fs::is_regular_file(src)) got = load_manifest(src, f);
    else
      throw std::runtime_error(src + " is neither a session store (a directory with index.sqlite) nor a manifest file");
    std::cout << src << ": " << got.size() << " session(s)\n";
    for (auto& s : got) sessions.push_back(std::move(s));
  }
  if (f.limit > 0 && int64_t(sessions.size()) > f.limit) sessions.resize(size_t(f.limit));
  size_t n_turns = 0;
  for (const auto& s : sessions) n_turns += s.turns.size();
  if (n_turns == 0) throw std::runtime_error("nothing to replay (no turns with audio or text)");
  const std::string server = f.server.empty() ? connectable_endpoint(cfg.server.bind) : f.server;
  const std::string token = transport::client_auth_token(f.token, cfg.server);
  const fs::path out = f.out.empty() ? fs::path("replay-" + std::to_string(int64_t(std::time(nullptr)))) : fs::path(f.out);
  fs::create_directories(out);
  std::cout << "replaying " << sessions.size() << " session(s), " << n_turns << " turn(s) to " << server << " ("
            << (f.speed > 0 ? fmt(f.speed, 1) + "x real time" : std::string("as fast as possible")) << ", "
            << f.parallel << " at once)\n";

  // ---- replay: `parallel` threads take sessions from a shared cursor
  zmq::context_t ctx(1);
  std::vector<std::vector<turn_row>> results(sessions.size());
  std::atomic<size_t> next{0}, done{0};
  std::mutex mu;
  std::vector<std::string> failures;
  models::progress_bar bar("replay");
  auto worker = [&] {
    for (size_t i = next++; i < sessions.size(); i = next++) {
      const auto& s = sessions[i];
      try {
        transport::client c(&ctx);
        c.connect(server, "undertone-replay/" + s.name, std::chrono::seconds(30), token);
        transport::config_msg cm;
        cm.vad = false;  // the recorded segmentation: each turn ends where its audio does
        c.send_config(cm);
        for (const auto& t : s.turns) {
          transport::turn_input in;
          if (!t.audio.empty()) {
            auto a = models::load_audio(t.audio);
            in.samples = std::move(a.samples);
            in.sample_rate = a.sample_rate;
          } else {
            in.text = t.text;
          }
          in.speed = f.speed;
          in.answer_timeout = std::chrono::milliseconds(int64_t(f.answer_timeout_s * 1000));
          if (f.annotate) {
            in.transcript = t.transcript;
            in.emotion = t.emotion;
          }
          turn_row r;
          r.src = &t;
          r.session = s.name;
          r.got = transport::run_turn(c, in);
          if (r.got.completed && t.recorded) {
            r.exact = r.got.answer == t.recorded_answer;
            r.rouge = models::rouge_l_f1(models::word_tokens(r.got.answer), models::word_tokens(t.recorded_answer));
          }
          const bool ok = r.got.completed;
          results[i].push_back(std::move(r));
          std::lock_guard<std::mutex> lk(mu);
          if (!ok) failures.push_back(t.ref + ": " + results[i].back().got.failure);
          bar.update(int64_t(++done), int64_t(n_turns), 0, failures.empty() ? "" : std::to_string(failures.size()) + " failed");
        }
        c.bye();
      } catch (const std::exception& e) {
        std::lock_guard<std::mutex> lk(mu);
        failures.push_back(s.name + ": " + e.what());
      }
    }
  };
  std::vector<std::thread> th;
  for (int64_t k = 0; k < f.parallel; ++k) th.emplace_back(worker);
  for (auto& t : th) t.join();
  bar.finish();

  // ---- compare and report
  std::vector<turn_row> rows;
  for (auto& v : results)
    for (auto& r : v) rows.push_back(std::move(r));
  std::vector<double> rec_ms, rep_ms, rouge, client_ms;
  size_t completed = 0, compared = 0, exact = 0, version_changed = 0;
  std::ofstream tj(out / "turns.jsonl");
  for (const auto& r : rows) {
    const auto& t = *r.src;
    if (r.got.completed) ++completed;
    if (t.recorded_first_ms >= 0) rec_ms.push_back(t.recorded_first_ms);
    if (r.got.timings.end_of_turn_to_first_token_ms >= 0) rep_ms.push_back(r.got.timings.end_of_turn_to_first_token_ms);
    if (r.got.first_token_ms >= 0) client_ms.push_back(r.got.first_token_ms);
    if (r.rouge >= 0) {
      ++compared;
      exact += r.exact;
      rouge.push_back(r.rouge);
      if (t.recorded_encoder != r.got.encoder_version || t.recorded_llm != r.got.llm_version) ++version_changed;
    }
    json j{{"ref", t.ref},
           {"session", r.session},
           {"audio", t.audio},
           {"text", t.text},
           {"completed", r.got.completed},
           {"answer", r.got.answer},
           {"stop_reason", r.got.stop_reason},
           {"first_token_ms_server", r.got.timings.end_of_turn_to_first_token_ms},
           {"first_token_ms_client", r.got.first_token_ms},
           {"encoder_version", r.got.encoder_version},
           {"llm_version", r.got.llm_version}};
    if (!r.got.failure.empty()) j["failure"] = r.got.failure;
    if (t.recorded) {
      j["recorded"] = {{"answer", t.recorded_answer},
                       {"stop_reason", t.recorded_stop},
                       {"first_token_ms_server", t.recorded_first_ms},
                       {"encoder_version", t.recorded_encoder},
                       {"llm_version", t.recorded_llm}};
      j["exact_match"] = r.exact;
      j["rouge_l"] = r.rouge;
    }
    if (!t.emotion.empty()) j["emotion"] = t.emotion;
    tj << j.dump() << "\n";
  }
  tj.close();
  double mean_rouge = 0;
  for (double x : rouge) mean_rouge += x / double(rouge.size());
  const double rec50 = percentile(rec_ms, 50), rep50 = percentile(rep_ms, 50);
  const double ratio = rec50 > 0 && rep50 >= 0 ? rep50 / rec50 : -1;
  const double mismatch = compared ? 1.0 - double(exact) / double(compared) : -1;

  json rep{{"server", server},
           {"sources", f.sources},
           {"sessions", sessions.size()},
           {"turns", n_turns},
           {"completed", completed},
           {"failures", failures},
           {"speed", f.speed},
           {"parallel", f.parallel},
           {"compared", compared},
           {"exact_match", compared ? double(exact) / double(compared) : -1},
           {"mean_rouge_l", compared ? mean_rouge : -1},
           {"version_changed", version_changed},
           {"first_token_ms_server", {{"recorded_p50", rec50}, {"recorded_p95", percentile(rec_ms, 95)},
                                      {"replayed_p50", rep50}, {"replayed_p95", percentile(rep_ms, 95)},
                                      {"ratio_p50", ratio}}},
           {"first_token_ms_client", {{"p50", percentile(client_ms, 50)}, {"p95", percentile(client_ms, 95)}}}};
  std::ofstream(out / "report.json") << rep.dump(2) << "\n";
  const std::string plot_err = plot_latency(rows, out);

  std::string md = "# undertone replay\n\n";
  md += "- server: `" + server + "`; sources: ";
  for (const auto& s : f.sources) md += "`" + s + "` ";
  md += "\n- " + std::to_string(sessions.size()) + " session(s), " + std::to_string(n_turns) + " turn(s), " +
        std::to_string(completed) + " completed, " + std::to_string(failures.size()) + " failure(s); " +
        (f.speed > 0 ? fmt(f.speed, 1) + "x real time" : std::string("as fast as possible")) + ", " +
        std::to_string(f.parallel) + " session(s) at once\n\n";
  md += "| | recorded | replayed |\n|---|---|---|\n";
  md += "| end of turn -> first token p50 (server, ms) | " + fmt(rec50) + " | " + fmt(rep50) + " |\n";
  md += "| end of turn -> first token p95 (server, ms) | " + fmt(percentile(rec_ms, 95)) + " | " +
        fmt(percentile(rep_ms, 95)) + " |\n";
  md += "| end of turn -> first token p50 (client, ms) | - | " + fmt(percentile(client_ms, 50)) + " |\n\n";
  if (compared) {
    md += "Answers compared with the recorded ones: " + std::to_string(compared) + "; identical " +
          fmt(100.0 * double(exact) / double(compared), 1) + " %; mean ROUGE-L F1 " + fmt(mean_rouge, 3) +
          "; turns served by other model versions than recorded: " + std::to_string(version_changed) + ".\n";
    md += "(Greedy decoding is deterministic per sequence, but a different batch composition can flip a "
          "near-tie, so identical answers are expected, not guaranteed.)\n\n";
  }
  md += plot_err.empty() ? "![latency](latency.png)\n" : "(no latency plot: " + plot_err + ")\n";
  if (!failures.empty()) {
    md += "\n## Failures\n";
    for (const auto& x : failures) md += "- " + x + "\n";
  }
  std::ofstream(out / "report.md") << md;

  std::cout << "completed " << completed << "/" << n_turns << " turns; first token (server) p50 " << fmt(rep50)
            << " ms, p95 " << fmt(percentile(rep_ms, 95)) << " ms";
  if (ratio > 0) std::cout << " (recorded p50 " << fmt(rec50) << " ms, ratio " << fmt(ratio, 2) << ")";
  std::cout << "\n";
  if (compared)
    std::cout << "answers identical to the recorded: " << exact << "/" << compared << ", mean ROUGE-L "
              << fmt(mean_rouge, 3) << "\n";
  std::cout << "report: " << (out / "report.md").string() << "\n";

  int rc = failures.empty() ? 0 : 1;
  if (f.max_mismatch >= 0 && mismatch > f.max_mismatch) {
    std::cerr << "regression: " << fmt(100 * mismatch, 1) << " % of answers differ (--max-mismatch "
              << f.max_mismatch << ")\n";
    rc = 1;
  }
  if (f.max_latency_ratio > 0 && ratio > f.max_latency_ratio) {
    std::cerr << "regression: replayed p50 latency is " << fmt(ratio, 2) << "x the recorded (--max-latency-ratio "
              << f.max_latency_ratio << ")\n";
    rc = 1;
  }
  return rc;
}

}  // namespace

void add_replay_command(CLI::App& app, global_options& g) {
  static replay_flags f;
  auto* cmd = app.add_subcommand(
      "replay",
      "Re-stream recorded sessions through a running server (`undertone serve`) and compare.\n"
      "SOURCE is a session store directory (docs/store.md; its sessions are replayed turn by turn, and the\n"
      "answers and latencies are compared with the recorded ones) or a JSONL manifest (docs/data.md; a\n"
      "corpus such as the RAVDESS manifest becomes sessions of --turns-per-session utterances of one\n"
      "speaker; with --annotate their labels are sent too, so the server stores labelled sessions for\n"
      "fine-tuning). Turns end where the recorded audio ends (client end_turn, server VAD off).\n"
      "Writes DIR/report.md, report.json, turns.jsonl, latency.png. Exit 1 if a turn failed or a\n"
      "--max-* regression limit is exceeded.\n"
      "Example: undertone replay ~/.cache/undertone/sessions --speed 1 --parallel 4 --out replay-check");
  cmd->add_option("SOURCE", f.sources, "session store directories and/or manifest files")->required();
  cmd->add_option("--server", f.server, "server endpoint (default: server.bind of the config)");
  add_token_option(cmd, f.token);
  cmd->add_option("--out", f.out, "report directory (default: replay-<unix time>)");
  cmd->add_option("--speed", f.speed, "1 = stream at real time, 2 = twice as fast, 0 = as fast as possible")
      ->capture_default_str()
      ->check(CLI::Range(0.0, 1000.0));
  cmd->add_option("--parallel", f.parallel, "sessions replayed at once")
      ->capture_default_str()
      ->check(CLI::Range(int64_t(1), int64_t(256)));
  cmd->add_option("--turns-per-session", f.turns_per_session, "manifests: utterances of one speaker per session")
      ->capture_default_str()
      ->check(CLI::Range(int64_t(1), int64_t(1000)));
  cmd->add_option("--split", f.split, "manifests: only this split (train, val, test)")
      ->check(CLI::IsMember({"train", "val", "test"}));
  cmd->add_option("--run", f.run, "stores: only this run (see `undertone sessions list`)");
  cmd->add_option("--limit", f.limit, "at most N sessions (0 = all)")->capture_default_str();
  cmd->add_flag("--annotate", f.annotate, "send each turn's labels (transcript, emotion) with it");
  cmd->add_option("--answer-timeout-s", f.answer_timeout_s, "give up on a turn after this long")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  cmd->add_option("--max-mismatch", f.max_mismatch,
                  "regression check: fail if more than this fraction of answers differ from the recorded (0..1)")
      ->check(CLI::Range(0.0, 1.0));
  cmd->add_option("--max-latency-ratio", f.max_latency_ratio,
                  "regression check: fail if replayed p50 first-token latency > this x recorded p50")
      ->check(CLI::PositiveNumber);
  cmd->callback([&g] {
    try {
      exit_code() = run_replay(f, effective_config(g));
    } catch (const config::config_error&) {
      throw;
    } catch (const std::exception& e) {
      std::cerr << "error: " << e.what() << "\n";
      exit_code() = 1;
    }
  });
}

}  // namespace undertone::apps
