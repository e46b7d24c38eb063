// `undertone sessions list|show|export|prune|check` and `undertone annotate`:
// the session store (models/session_store.hpp, docs/store.md).
#include <ctime>
#include <iomanip>
#include <iostream>
#include <sstream>

#include "apps/common.hpp"
#include "models/manifest.hpp"
#include "models/session_store.hpp"

namespace undertone::apps {

namespace {

namespace fs = std::filesystem;

struct sessions_flags {
  std::string store, run, out, corpus = "sessions";
  int64_t session = -1, id = -1, limit = 0;
  bool annotated = false, json = false, allow_empty_transcript = false;
  double val_fraction = 0;
  double retention_days = -1;
  int64_t max_megabytes = -1;
  // annotate
  std::vector<std::string> address;
  std::string transcript, emotion;
};

/// --store, else store.dir, else <model_home>/sessions.
std::string store_dir(const global_options& g, const std::string& flag) {
  if (!flag.empty()) return flag;
  const auto cfg = effective_config(g);
  if (!cfg.store.dir.empty()) return cfg.store.dir;
  return (fs::path(config::resolve_model_home(cfg)) / "sessions").string();
}

models::session_store open_store(const global_options& g, const std::string& flag, bool recover,
                                 models::store_options o = {}) {
  o.create = false;
  o.recover = recover;
  return models::session_store(store_dir(g, flag), o);
}

std::string local_time(double unix_s) {
  const std::time_t t = std::time_t(unix_s);
  std::tm tm{};
  localtime_r(&t, &tm);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%d %H:%M:%S", &tm);
  return buf;
}

std::string clip(std::string s, size_t n) {
  for (auto& c : s)
    if (c == '\n' || c == '\t') c = ' ';
  if (s.size() > n) s = s.substr(0, n - 3) + "...";
  return s;
}

/// RUN as given, or the newest run for "latest".
std::string resolve_run(const models::session_store& st, const std::string& run) {
  if (run != "latest") return run;
  const auto runs = st.runs();
  if (runs.empty()) throw models::store_error("the session store " + st.dir() + " is empty (no runs)");
  return runs.back();
}

nlohmann::json to_json(const models::stored_turn& t, const std::vector<models::stored_annotation>& hist) {
  nlohmann::json j = {{"id", t.id},
                      {"run", t.run},
                      {"session", t.session},
                      {"client", t.client},
                      {"turn", t.turn},
                      {"started_unix_s", t.started_unix_s},
                      {"audio", t.audio},
                      {"audio_samples", t.audio_samples},
                      {"user_text", t.user_text},
                      {"answer", t.answer},
                      {"stop_reason", t.stop_reason},
                      {"llm_version", t.llm_version},
                      {"encoder_version", t.encoder_version},
                      {"transcript", t.transcript},
                      {"emotion", t.emotion},
                      {"timings", t.timings},
                      {"events", t.events}};
  auto& a = j["annotations"] = nlohmann::json::array();
  for (auto& h : hist)
    a.push_back({{"transcript", h.transcript}, {"emotion", h.emotion}, {"source", h.source}, {"unix_s", h.unix_s}});
  return j;
}

void print_turn_line(const models::stored_turn& t) {
  std::ostringstream what;
  if (!t.audio.empty())
    what << "[speech " << std::fixed << std::setprecision(1) << double(t.audio_samples) / 16000.0 << " s]";
  else
    what << '"' << clip(t.user_text, 40) << '"';
  std::cout << std::setw(6) << t.id << "  " << t.run << "/" << t.session << "/" << std::left << std::setw(3) << t.turn
            << std::right << " " << local_time(t.started_unix_s) << "  " << std::left << std::setw(24) << what.str()
            << std::right << " -> " << clip(t.answer, 50) << "  (" << t.stop_reason << ")";
  if (!t.transcript.empty() || !t.emotion.empty())
    std::cout << "  label: " << (t.emotion.empty() ? "-" : t.emotion) << " \"" << clip(t.transcript, 40) << '"';
  std::cout << "\n";
}

}  // namespace

void add_sessions_command(CLI::App& app, global_options& g) {
  static sessions_flags f;
  auto* cmd = app.add_subcommand(
      "sessions",
      "Inspect and maintain the session store that `undertone serve` writes (docs/store.md): every turn's audio\n"
      "(FLAC), text, answer, timings, events, model versions and labels, indexed in STORE/index.sqlite.\n"
      "The store is --store DIR, else store.dir, else <model_home>/sessions.");
  cmd->require_subcommand(1);
  auto add_store = [](CLI::App* c) {
    c->add_option("--store", f.store, "session store directory (default: store.dir, else <model_home>/sessions)");
  };

  auto* list = cmd->add_subcommand("list", "One line per stored session: run, session id, client, turns, size.");
  add_store(list);
  list->add_option("--run", f.run, "only this run (\"latest\" = the newest)");
  list->callback([&g] {
    auto st = open_store(g, f.store, false);
    const std::string run = f.run.empty() ? "" : resolve_run(st, f.run);
    auto all = st.sessions();
    size_t n = 0;
    int64_t turns = 0, bytes = 0;
    std::cout << "run                          session  client           started              turns  audio  "
                 "labeled      MiB\n";
    for (auto& s : all) {
      if (!run.empty() && s.run != run) continue;
      ++n;
      turns += s.turns;
      bytes += s.audio_bytes;
      std::cout << std::left << std::setw(28) << s.run << " " << std::right << std::setw(7) << s.session << "  "
                << std::left << std::setw(16) << clip(s.client.empty() ? "-" : s.client, 16) << " "
                << local_time(s.first_unix_s) << std::right << std::setw(7) << s.turns << std::setw(7)
                << s.audio_turns << std::setw(9) << s.annotated_turns << std::setw(9) << std::fixed
                << std::setprecision(2) << s.audio_bytes / 1048576.0 << "\n";
    }
    std::cout << n << " sessions, " << turns << " turns, " << std::fixed << std::setprecision(2)
              << bytes / 1048576.0 << " MiB of audio in " << st.dir() << "\n";
  });

  auto* show = cmd->add_subcommand(
      "show",
      "The stored turns (id, run/session/turn, time, speech length or text, answer, stop reason, latest label),\n"
      "optionally of one run/session; --id N prints one turn in full with its label history.");
  add_store(show);
  show->add_option("run", f.run, "run name (\"latest\" = the newest run)");
  show->add_option("session", f.session, "session id within the run");
  show->add_option("--id", f.id, "one turn by its store id (all fields, label history)");
  show->add_flag("--annotated", f.annotated, "only turns that carry a label");
  show->add_option("--limit", f.limit, "at most this many turns");
  show->add_flag("--json", f.json, "one JSON object per turn (all fields, label history)");
  show->callback([&g] {
    auto st = open_store(g, f.store, false);
    if (f.id >= 0) {
      auto t = st.turn_by_id(f.id);
      if (!t) throw models::store_error("no turn with id " + std::to_string(f.id) + " in " + st.dir());
      std::cout << to_json(*t, st.annotations(t->id)).dump(2) << "\n";
      return;
    }
    models::turn_filter tf;
    if (!f.run.empty()) tf.run = resolve_run(st, f.run);
    tf.session = f.session;
    tf.annotated_only = f.annotated;
    tf.limit = f.limit;
    auto turns = st.turns(tf);
    if (turns.empty() && !f.run.empty()) {
      bool known = false;
      for (auto& s : st.sessions()) known |= s.run == tf.run && (f.session < 0 || int64_t(s.session) == f.session);
      if (!known)
        throw models::store_error("no session " + tf.run + (f.session >= 0 ? "/" + std::to_string(f.session) : "") +
                                  " in " + st.dir() + " (see `undertone sessions list`)");
    }
    for (auto& t : turns) {
      if (f.json)
        std::cout << to_json(t, st.annotations(t.id)).dump() << "\n";
      else
        print_turn_line(t);
    }
  });

  auto* exp = cmd->add_subcommand(
      "export",
      "Writes the labelled speech turns as a training manifest (docs/data.md format, corpus \"sessions\"):\n"
      "transcript and emotion from the latest label, speaker \"session:<client>\", split by speaker hash\n"
      "(--val-fraction; default all train). Turns with a label outside the vocabulary are skipped and counted.");
  add_store(exp);
  exp->add_option("-o,--out", f.out, "manifest to write (JSONL)")->required();
  exp->add_option("--run", f.run, "only this run (\"latest\" = the newest)");
  exp->add_option("--session", f.session, "only this session id (with --run)");
  exp->add_option("--val-fraction", f.val_fraction, "share of speakers (by hash) put in split val")
      ->check(CLI::Range(0.0, 1.0));
  exp->add_option("--corpus", f.corpus, "corpus name written in each row");
  exp->add_flag("--allow-empty-transcript", f.allow_empty_transcript,
                "also export turns labelled with an emotion only (empty transcript)");
  exp->callback([&g] {
    auto st = open_store(g, f.store, false);
    models::export_options o;
    if (!f.run.empty()) o.run = resolve_run(st, f.run);
    o.session = f.session;
    o.val_fraction = f.val_fraction;
    o.corpus = f.corpus;
    o.require_transcript = !f.allow_empty_transcript;
    auto r = st.export_manifest_detailed(f.out, o);
    std::cout << "wrote " << r.written << " utterances to " << f.out;
    if (r.skipped_label) {
      std::cout << "; skipped " << r.skipped_label << " with an unknown emotion label (";
      bool first = true;
      for (auto& [k, v] : r.unknown_labels) {
        std::cout << (first ? "" : ", ") << '"' << k << "\" x" << v;
        first = false;
      }
      std::cout << ")";
    }
    if (r.skipped_no_transcript)
      std::cout << "; skipped " << r.skipped_no_transcript << " without a transcript (--allow-empty-transcript)";
    std::cout << "\n";
  });

  auto* prune = cmd->add_subcommand(
      "prune",
      "Applies the retention limits now (the server also does at start and hourly): deletes sessions whose last\n"
      "turn is older than store.retention_days, then the oldest sessions until the store fits store.max_megabytes.");
  add_store(prune);
  prune->add_option("--retention-days", f.retention_days, "override store.retention_days (0 = keep forever)")
      ->check(CLI::NonNegativeNumber);
  prune->add_option("--max-megabytes", f.max_megabytes, "override store.max_megabytes (MiB; 0 = unlimited)")
      ->check(CLI::NonNegativeNumber);
  prune->callback([&g] {
    const auto cfg = effective_config(g);
    models::store_options o;
    o.retention_days = f.retention_days >= 0 ? f.retention_days : double(cfg.store.retention_days);
    o.max_bytes = (f.max_megabytes >= 0 ? f.max_megabytes : cfg.store.max_megabytes) * 1048576;
    auto st = open_store(g, f.store, true, o);
    auto r = st.prune();
    std::cout << "pruned " << r.sessions << " sessions (" << r.turns << " turns, " << std::fixed
              << std::setprecision(2) << r.bytes / 1048576.0 << " MiB of audio); " << st.size_bytes() / 1048576.0
              << " MiB left in " << st.dir() << "\n";
  });

  auto* check = cmd->add_subcommand(
      "check",
      "Checks the store: SQLite integrity_check of the index, every row's audio file present, and removes audio\n"
      "files that no row names (left by a crash between writing the audio and committing its row).");
  add_store(check);
  check->callback([&g] {
    auto st = open_store(g, f.store, true);
    const auto& rep = st.opened();
    if (!rep.recovered)
      std::cout << "a server is writing this store: orphaned audio was not looked for\n";
    else
      std::cout << "removed " << rep.orphans_removed << " orphaned audio files\n";
    const std::string ic = st.integrity_check();
    size_t missing = 0, turns = 0;
    for (auto& t : st.turns()) {
      ++turns;
      if (!t.audio.empty() && !fs::exists(t.audio)) {
        std::cout << "missing audio: " << t.audio << " (turn id " << t.id << ")\n";
        ++missing;
      }
    }
    std::cout << "index integrity: " << ic << "\n" << turns << " turns, " << missing << " with missing audio\n";
    if (ic != "ok" || missing > 0) exit_code() = 1;
  });
}

void add_annotate_command(CLI::App& app, global_options& g) {
  static sessions_flags f;
  auto* cmd = app.add_subcommand(
      "annotate",
      "Labels a stored turn (docs/store.md): `undertone annotate RUN SESSION TURN --transcript ... --emotion ...`\n"
      "(RUN may be \"latest\"), or `undertone annotate --id N ...` with the id from `undertone sessions show`.\n"
      "Labels are kept as a history (source cli); the newest non-empty transcript and emotion count.\n"
      "Emotion labels: neutral happy sad angry calm fearful disgust surprised whisper unlabeled.");
  cmd->add_option("--store", f.store, "session store directory (default: store.dir, else <model_home>/sessions)");
  cmd->add_option("address", f.address, "RUN SESSION TURN (RUN may be \"latest\")")->expected(0, 3)->type_name("RUN SESSION TURN");
  cmd->add_option("--id", f.id, "the turn's store id instead of RUN SESSION TURN");
  cmd->add_option("--transcript", f.transcript, "what was said");
  cmd->add_option("--emotion", f.emotion, "emotion / speaking style label");
  cmd->callback([&g] {
    if (f.transcript.empty() && f.emotion.empty())
      throw models::store_error("annotate: give --transcript and/or --emotion");
    if (!f.emotion.empty()) models::parse_emotion(f.emotion);  // throws, listing the vocabulary
    if ((f.id >= 0) == (f.address.size() == 3))
      throw models::store_error("annotate: address the turn with RUN SESSION TURN or with --id N (one of them)");
    auto st = open_store(g, f.store, false);
    int64_t id = f.id;
    if (id < 0) {
      const std::string run = resolve_run(st, f.address[0]);
      int64_t session = 0, turn = 0;
      try {
        session = std::stoll(f.address[1]);
        turn = std::stoll(f.address[2]);
      } catch (const std::exception&) {
        throw models::store_error("annotate: SESSION and TURN must be numbers, got '" + f.address[1] + "' '" +
                                  f.address[2] + "'");
      }
      auto found = st.find_turn(run, uint64_t(session), turn);
      if (!found)
        throw models::store_error("no turn " + run + "/" + std::to_string(session) + "/" + std::to_string(turn) +
                                  " in " + st.dir() + " (see `undertone sessions show " + run + "`)");
      id = *found;
    }
    st.annotate(id, f.transcript, f.emotion, "cli");
    auto t = st.turn_by_id(id);
    std::cout << "turn " << id << " (" << t->run << "/" << t->session << "/" << t->turn << "): emotion "
              << (t->emotion.empty() ? "-" : t->emotion) << ", transcript \"" << t->transcript << "\"\n";
  });
}

}  // namespace undertone::apps
