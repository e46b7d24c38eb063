// The session store (models/session_store.hpp): append and read back (audio
// included), the label history, export as a manifest, retention by age and by
// size, recovery of orphaned audio, a corrupted index; and the logger actor
// behind a real session: turn_end only after the commit, late labels, the
// per-session opt-out, the commit timeout fallback.
#include <boost/test/unit_test.hpp>

#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>

#include <cmath>
#include <map>
#include <thread>

#include "actors/logger.hpp"
#include "actors/session.hpp"
#include "models/audio.hpp"
#include "models/manifest.hpp"
#include "models/session_store.hpp"
#include "support.hpp"

using namespace undertone;
namespace fs = std::filesystem;

namespace {

std::vector<float> tone(double seconds, double hz = 220.0, double amp = 0.3) {
  std::vector<float> v(size_t(seconds * 16000));
  for (size_t i = 0; i < v.size(); ++i) v[i] = float(amp * std::sin(2 * M_PI * hz * double(i) / 16000));
  return v;
}

// White-ish noise: FLAC cannot compress it much (the size limit test needs real bytes).
std::vector<float> noise(double seconds, uint32_t seed = 1) {
  std::vector<float> v(size_t(seconds * 16000));
  for (auto& x : v) {
    seed = seed * 1664525u + 1013904223u;
    x = float(int32_t(seed >> 8) % 20000) / 40000.0f;
  }
  return v;
}

double now_unix() {
  return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
}

models::stored_turn make_turn(const std::string& run, uint64_t session, int64_t turn, const std::string& client = "tester",
                              double started = 0) {
  models::stored_turn t;
  t.run = run;
  t.session = session;
  t.client = client;
  t.turn = turn;
  t.started_unix_s = started > 0 ? started : now_unix();
  t.answer = "answer " + std::to_string(turn);
  t.stop_reason = "stop_token";
  t.llm_version = "llm-v1";
  t.encoder_version = "enc-v1";
  t.timings = {{"prefill_ms", 12.5}, {"answer_tokens", 7}};
  t.events = {"0 turn_start speech 0", "812 endpoint client 0"};
  return t;
}

size_t count_files(const fs::path& root) {
  if (!fs::exists(root)) return 0;
  size_t n = 0;
  for (auto& e : fs::recursive_directory_iterator(root))
    if (e.is_regular_file()) ++n;
  return n;
}

bool has(const std::string& s, const std::string& what) { return s.find(what) != std::string::npos; }

}  // namespace

BOOST_AUTO_TEST_CASE(append_and_read_back_with_audio) {
  testing::temp_dir d;
  const auto audio = tone(1.3);
  int64_t id_text = 0, id_speech = 0;
  {
    models::session_store st(d.str());
    auto t1 = make_turn("run-1", 3, 1);
    t1.user_text = "hello there";
    id_text = st.append(t1, {});
    id_speech = st.append(make_turn("run-1", 3, 2), audio);
    BOOST_TEST(id_speech > id_text);
    // the same turn twice is refused, and the stored audio is untouched
    BOOST_CHECK_EXCEPTION(st.append(make_turn("run-1", 3, 2), tone(0.2)), models::store_error,
                          [](const models::store_error& e) { return has(e.what(), "already stored"); });
    BOOST_CHECK_THROW(st.append(make_turn("../evil", 1, 1), audio), models::store_error);
  }
  models::session_store st(d.str());  // reopened: everything is on disk
  auto turns = st.turns();
  BOOST_REQUIRE_EQUAL(turns.size(), 2u);
  const auto& a = turns[0];
  BOOST_TEST(a.id == id_text);
  BOOST_TEST(a.run == "run-1");
  BOOST_TEST(a.session == 3u);
  BOOST_TEST(a.client == "tester");
  BOOST_TEST(a.turn == 1);
  BOOST_TEST(a.user_text == "hello there");
  BOOST_TEST(a.audio.empty());
  BOOST_TEST(a.answer == "answer 1");
  BOOST_TEST(a.timings["prefill_ms"].get<double>() == 12.5);
  BOOST_TEST(a.events.size() == 2u);
  BOOST_TEST(a.llm_version == "llm-v1");
  BOOST_TEST(a.encoder_version == "enc-v1");
  const auto& b = turns[1];
  BOOST_TEST(b.audio_samples == int64_t(audio.size()));
  BOOST_TEST(b.audio == (fs::path(st.dir()) / "audio/run-1/session-3/turn-2.flac").string());
  models::audio_options ao;
  ao.max_seconds = 0;
  auto back = models::load_audio(b.audio, ao);
  BOOST_REQUIRE_EQUAL(back.samples.size(), audio.size());
  float worst = 0;
  for (size_t i = 0; i < audio.size(); ++i) worst = std::max(worst, std::abs(back.samples[i] - audio[i]));
  BOOST_TEST(worst <= 1.0f / 32768 + 1e-6f);  // 16-bit FLAC
  BOOST_TEST(back.info.source_rate == 16000);
  BOOST_TEST(back.info.source_channels == 1);
  // filters
  models::turn_filter f;
  f.with_audio_only = true;
  BOOST_TEST(st.turns(f).size() == 1u);
  f = {};
  f.run = "run-2";
  BOOST_TEST(st.turns(f).empty());
  f = {};
  f.session = 3;
  f.limit = 1;
  BOOST_TEST(st.turns(f).size() == 1u);
  BOOST_TEST(st.find_turn("run-1", 3, 2).value() == id_speech);
  BOOST_TEST(!st.find_turn("run-1", 3, 9));
  auto sess = st.sessions();
  BOOST_REQUIRE_EQUAL(sess.size(), 1u);
  BOOST_TEST(sess[0].turns == 2);
  BOOST_TEST(sess[0].audio_turns == 1);
  BOOST_TEST(sess[0].audio_bytes == int64_t(fs::file_size(b.audio)));
  BOOST_TEST(st.integrity_check() == "ok");
  BOOST_TEST(!fs::exists(fs::path(st.dir()) / "audio/run-1/session-3/turn-2.partial.flac"));
}

BOOST_AUTO_TEST_CASE(annotation_history_and_latest_label) {
  testing::temp_dir d;
  models::session_store st(d.str());
  auto t = make_turn("run-1", 1, 1);
  t.transcript = "kids are talking by the door";  // given by the client during the turn
  const int64_t id = st.append(t, tone(0.5));
  BOOST_TEST(st.turn_by_id(id)->transcript == "kids are talking by the door");
  BOOST_TEST(st.turn_by_id(id)->emotion.empty());
  st.annotate("run-1", 1, 1, "", "happy", "cli");  // emotion only: the transcript stays
  auto now = st.turn_by_id(id);
  BOOST_TEST(now->transcript == "kids are talking by the door");
  BOOST_TEST(now->emotion == "happy");
  st.annotate(id, "dogs are sitting by the door", "sad", "client");
  now = st.turn_by_id(id);
  BOOST_TEST(now->transcript == "dogs are sitting by the door");
  BOOST_TEST(now->emotion == "sad");
  auto h = st.annotations(id);
  BOOST_REQUIRE_EQUAL(h.size(), 3u);
  BOOST_TEST(h[0].source == "client");
  BOOST_TEST(h[1].source == "cli");
  BOOST_TEST(h[1].transcript.empty());
  BOOST_TEST(h[2].emotion == "sad");
  BOOST_TEST(h[0].unix_s <= h[2].unix_s);
  models::turn_filter f;
  f.annotated_only = true;
  BOOST_TEST(st.turns(f).size() == 1u);
  BOOST_CHECK_EXCEPTION(st.annotate("run-1", 1, 7, "x", "", "cli"), models::store_error,
                        [](const models::store_error& e) { return has(e.what(), "no turn run-1/session-1/turn-7"); });
  BOOST_CHECK_THROW(st.annotate(id + 100, "x", "", "cli"), models::store_error);
  BOOST_CHECK_THROW(st.annotate(id, "x", "", "someone"), models::store_error);
  BOOST_CHECK_THROW(st.annotate(id, "", "", "cli"), models::store_error);
  BOOST_TEST(st.annotations(id).size() == 3u);  // the failures added nothing
}

BOOST_AUTO_TEST_CASE(export_is_a_readable_manifest) {
  testing::temp_dir d;
  models::session_store st(d.str());
  const std::vector<std::string> clients = {"alice", "bob", "carol", "dave", "erin", "frank"};
  int64_t turn = 0;
  for (size_t c = 0; c < clients.size(); ++c) {
    auto t = make_turn("run-1", c + 1, ++turn, clients[c]);
    t.transcript = "statement " + std::to_string(c);
    t.emotion = c % 2 ? "Angry" : "neutral";  // labels are case-insensitive on export
    st.append(t, tone(0.4 + 0.1 * double(c)));
  }
  auto odd = make_turn("run-1", 1, 100, "alice");
  odd.transcript = "who knows";
  odd.emotion = "bored";  // not in the vocabulary: skipped and counted
  st.append(odd, tone(0.3));
  auto no_text = make_turn("run-1", 1, 101, "alice");
  no_text.emotion = "sad";  // emotion only: skipped unless allowed
  st.append(no_text, tone(0.3));
  auto text_turn = make_turn("run-1", 1, 102, "alice");
  text_turn.user_text = "typed";
  text_turn.transcript = "typed";
  st.append(text_turn, {});  // no audio: never exported
  st.append(make_turn("run-1", 2, 103, "bob"), tone(0.3));  // no label: not exported

  const std::string out = (d.path / "export" / "sessions.jsonl").string();
  models::export_options o;
  o.val_fraction = 0.5;
  auto r = st.export_manifest_detailed(out, o);
  BOOST_TEST(r.written == clients.size());
  BOOST_TEST(r.skipped_label == 1u);
  BOOST_TEST(r.unknown_labels["bored"] == 1u);
  BOOST_TEST(r.skipped_no_transcript == 1u);
  auto rows = models::read_manifest(out);
  BOOST_REQUIRE_EQUAL(rows.size(), clients.size());
  size_t val = 0;
  for (size_t c = 0; c < rows.size(); ++c) {
    const auto& u = rows[c];
    BOOST_TEST(u.speaker == "session:" + clients[c]);
    BOOST_TEST(u.corpus == "sessions");
    BOOST_TEST(u.transcript == "statement " + std::to_string(c));
    BOOST_TEST((u.emotion == (c % 2 ? models::emotion_label::angry : models::emotion_label::neutral)));
    BOOST_TEST(models::to_string(u.split) == models::export_split(u.speaker, 0.5));
    BOOST_TEST(fs::exists(u.audio));
    BOOST_TEST(std::abs(*u.duration_s - (0.4 + 0.1 * double(c))) < 1e-3);
    BOOST_TEST(u.source["run"] == "run-1");
    val += u.split == models::split_kind::val;
  }
  BOOST_TEST(val > 0u);
  BOOST_TEST(val < rows.size());
  models::check_speaker_disjoint(rows);
  // defaults: all train; emotion-only turns when allowed
  o = {};
  o.require_transcript = false;
  BOOST_TEST(st.export_manifest(out, o) == clients.size() + 1);
  for (auto& u : models::read_manifest(out)) BOOST_TEST((u.split == models::split_kind::train));
  // one session only
  o = {};
  o.run = "run-1";
  o.session = 2;
  BOOST_TEST(st.export_manifest(out, o) == 1u);
}

BOOST_AUTO_TEST_CASE(prune_by_age_then_by_size) {
  testing::temp_dir d;
  const double day = 86400;
  {
    models::session_store st(d.str());
    st.append(make_turn("run-old", 1, 1, "a", now_unix() - 40 * day), noise(0.5, 1));
    st.append(make_turn("run-old", 1, 2, "a", now_unix() - 39 * day), noise(0.5, 2));
    st.append(make_turn("run-new", 1, 1, "b", now_unix() - 2 * day), noise(0.5, 3));
    st.append(make_turn("run-new", 2, 1, "c", now_unix() - 1 * day), noise(0.5, 4));
    st.append(make_turn("run-new", 3, 1, "d"), noise(0.5, 5));
    BOOST_TEST(st.prune().sessions == 0u);  // no limits: nothing to do
  }
  models::store_options o;
  o.retention_days = 30;
  models::session_store st(d.str(), o);
  auto r = st.prune();
  BOOST_TEST(r.sessions == 1u);
  BOOST_TEST(r.turns == 2u);
  BOOST_TEST(r.bytes > 0);
  BOOST_TEST(!fs::exists(fs::path(st.dir()) / "audio/run-old"));  // files and empty folders gone
  BOOST_TEST(st.sessions().size() == 3u);
  BOOST_TEST(count_files(fs::path(st.dir()) / "audio") == 3u);

  // size: keep only what fits, newest sessions kept
  int64_t newest = 0;
  for (auto& t : st.turns()) {
    if (t.session == 3) newest = int64_t(fs::file_size(t.audio)) + 4096;  // + its text, generously
  }
  BOOST_TEST(newest > 3 * 4096);  // one session's audio is much more than the slack
  models::store_options small;
  small.max_bytes = newest;
  models::session_store st2(d.str(), small);
  r = st2.prune();
  BOOST_TEST(r.sessions == 2u);
  auto left = st2.sessions();
  BOOST_REQUIRE_EQUAL(left.size(), 1u);
  BOOST_TEST(left[0].session == 3u);
  BOOST_TEST(count_files(fs::path(st.dir()) / "audio") == 1u);
  BOOST_TEST(st2.integrity_check() == "ok");
}

BOOST_AUTO_TEST_CASE(orphaned_audio_is_removed_at_open) {
  testing::temp_dir d;
  std::string kept;
  {
    models::session_store st(d.str());
    BOOST_TEST(st.opened().recovered);
    BOOST_TEST(st.opened().orphans_removed == 0u);
    st.append(make_turn("run-1", 1, 1), tone(0.5));
    kept = st.turns()[0].audio;
  }
  // a crash after the FLAC but before the commit, and one during the FLAC write
  const fs::path s9 = d.path / "audio/run-1/session-9";
  fs::create_directories(s9);
  models::save_audio((s9 / "turn-1.flac").string(), tone(0.2).data(), 3200, 16000, 1);
  std::ofstream(d.path / "audio/run-1/session-1/turn-2.partial.flac") << "half a flac";

  // while another process holds the writer lock, recovery does not run
  {
    const int fd = ::open((d.path / "writer.lock").c_str(), O_RDWR);
    BOOST_REQUIRE(fd >= 0);
    BOOST_REQUIRE(::flock(fd, LOCK_EX) == 0);
    models::session_store st(d.str());
    BOOST_TEST(!st.opened().recovered);
    BOOST_TEST(fs::exists(s9 / "turn-1.flac"));
    ::close(fd);
  }
  models::session_store st(d.str());
  BOOST_TEST(st.opened().recovered);
  BOOST_TEST(st.opened().orphans_removed == 2u);
  BOOST_TEST(!fs::exists(s9));  // emptied folder removed too
  BOOST_TEST(fs::exists(kept));
  BOOST_TEST(count_files(d.path / "audio") == 1u);
  BOOST_TEST(st.turns().size() == 1u);
}

BOOST_AUTO_TEST_CASE(bad_or_missing_index_is_a_clear_error) {
  testing::temp_dir d;
  // missing, with create = false (the CLI)
  models::store_options no_create;
  no_create.create = false;
  BOOST_CHECK_EXCEPTION(models::session_store((d.path / "none").string(), no_create), models::store_error,
                        [](const models::store_error& e) { return has(e.what(), "index.sqlite does not exist"); });
  BOOST_TEST(!fs::exists(d.path / "none"));
  // not SQLite at all
  fs::create_directories(d.path / "junk");
  std::ofstream(d.path / "junk/index.sqlite") << std::string(5000, 'x');
  BOOST_CHECK_EXCEPTION(models::session_store((d.path / "junk").string()), models::store_error,
                        [&](const models::store_error& e) {
                          return has(e.what(), (d.path / "junk/index.sqlite").string()) &&
                                 has(e.what(), "not an SQLite database");
                        });
  // a real index with a damaged header (page size bytes): SQLite's own error, named
  const std::string good = (d.path / "good").string();
  {
    models::session_store st(good);
    st.append(make_turn("run-1", 1, 1), {});
  }
  const std::string ix = good + "/index.sqlite";
  fs::remove(good + "/index.sqlite-wal");
  fs::remove(good + "/index.sqlite-shm");
  testing::corrupt_byte(ix, 16);
  testing::corrupt_byte(ix, 17);
  BOOST_CHECK_EXCEPTION(models::session_store{good}, models::store_error, [&](const models::store_error& e) {
    BOOST_TEST_MESSAGE("corrupt index: " << e.what());
    return has(e.what(), ix);
  });
}

// ----------------------------------------------------------- with the actors

namespace {

using namespace undertone::actors;

// Fake encoder: one row at finish. Fake LLM: answers every generate at once.
caf::behavior sink_encoder(caf::event_based_actor* self) {
  return {
      [=](encode_open&) {},
      [=](encode_audio&) {},
      [=](encode_finish& m) {
        self->send(caf::actor_cast<caf::actor>(self->current_sender()),
                   speech_rows{m.id, std::vector<float>(4, 0.25f), 1, true, "fake-enc", 1.0});
      },
      [=](encode_close&) {},
  };
}
struct fake_llm_state {
  std::map<session_id, caf::actor> sessions;
};
caf::behavior instant_llm(caf::stateful_actor<fake_llm_state>* self) {
  return {
      [=](llm_open& m) { self->state.sessions[m.id] = m.session; },
      [=](llm_append&) {},
      [=](llm_generate& m) {
        auto to = self->state.sessions[m.id];
        self->send(to, llm_delta{m.id, m.turn, "Hi"});
        llm_done d;
        d.id = m.id;
        d.turn = m.turn;
        d.text = "Hi";
        d.stop_reason = "stop_token";
        d.tokens = 1;
        d.context_rows = 10;
        d.llm_version = "fake-llm";
        self->send(to, d);
      },
      [=](llm_mark&) {},
      [=](llm_rewind&) {},
      [=](llm_cancel&) {},
      [=](llm_close&) {},
  };
}
// A logger that never answers (a hung disk).
caf::behavior mute_logger(caf::event_based_actor*) {
  return {[=](turn_record&) -> caf::result<int64_t> { return caf::delegated<int64_t>(); }};
}

struct actor_fixture {
  caf::actor_system_config cfg;
  std::unique_ptr<caf::actor_system> sys;
  std::unique_ptr<caf::scoped_actor> gw;
  caf::actor enc, llm;
  std::vector<caf::actor> spawned;

  actor_fixture() {
    register_message_types(cfg);
    sys = std::make_unique<caf::actor_system>(cfg);
    gw = std::make_unique<caf::scoped_actor>(*sys);
    enc = sys->spawn(sink_encoder);
    llm = sys->spawn(instant_llm);
    spawned = {enc, llm};
  }
  ~actor_fixture() {
    for (auto& a : spawned) caf::anon_send_exit(a, caf::exit_reason::user_shutdown);
  }
  caf::actor session(uint64_t id, caf::actor logger, bool log, double timeout_s = 5) {
    auto env = std::make_shared<session_env>();
    env->templ = models::chat_template::named("chatml");
    env->llm_version = "fake-llm";
    env->store = true;
    env->store_commit_timeout_s = timeout_s;
    session_options o;
    o.id = id;
    o.client_identity = "cid" + std::to_string(id);
    o.client_name = "client" + std::to_string(id);
    o.settings.log = log;
    o.env = env;
    o.gateway = caf::actor(*gw);
    o.encoder = enc;
    o.llm = llm;
    o.logger = logger;
    auto s = spawn_session(*sys, o);
    spawned.push_back(s);
    return s;
  }
  /// Gateway messages until a turn_end: "event:NAME:LABEL", "turn_end:REASON".
  std::vector<std::string> until_turn_end(to_client_turn_end* end = nullptr) {
    std::vector<std::string> lines;
    bool done = false;
    while (!done) {
      (*gw)->receive([&](to_client_event& e) { lines.push_back("event:" + e.name + ":" + e.label); },
                     [&](to_client_delta&) { lines.push_back("delta"); },
                     [&](to_client_turn_end& t) {
                       lines.push_back("turn_end:" + t.stop_reason);
                       if (end) *end = t;
                       done = true;
                     },
                     [&](to_client_error& e) { lines.push_back(std::string("error:") + to_string(e.code)); },
                     [&](session_closed&) { lines.push_back("closed"); },
                     caf::after(std::chrono::seconds(20)) >> [&] {
                       lines.push_back("timeout");
                       done = true;
                     });
    }
    return lines;
  }
};

}  // namespace

BOOST_FIXTURE_TEST_CASE(logger_stores_before_turn_end_and_honours_opt_out, actor_fixture) {
  testing::temp_dir d;
  logger_options lo;
  lo.dir = d.str();
  auto logger = spawn_logger(*sys, lo);
  spawned.push_back(logger);
  models::session_store reader(d.str());

  // a logged session: the turn is in the store when the client sees turn_end
  auto s1 = session(1, logger, true);
  (*gw)->send(s1, client_text_turn{"hello"});
  auto lines = until_turn_end();
  BOOST_REQUIRE(lines.back() == "turn_end:stop_token");
  auto turns = reader.turns();
  BOOST_REQUIRE_EQUAL(turns.size(), 1u);
  BOOST_TEST(turns[0].user_text == "hello");
  BOOST_TEST(turns[0].answer == "Hi");
  BOOST_TEST(turns[0].client == "client1");
  BOOST_TEST(turns[0].llm_version == "fake-llm");
  BOOST_TEST(turns[0].run.rfind("run-", 0) == 0u);

  // a speech turn: its audio too (VAD off: every sample of the turn is kept)
  const auto speech = tone(0.8);
  session_settings vad_off;
  vad_off.vad.enabled = false;
  (*gw)->send(s1, client_config{vad_off});
  for (size_t off = 0; off < speech.size(); off += 320) {
    client_audio a;
    a.seq = off / 320;
    a.samples.assign(speech.begin() + ptrdiff_t(off), speech.begin() + ptrdiff_t(std::min(speech.size(), off + 320)));
    (*gw)->send(s1, std::move(a));
  }
  (*gw)->send(s1, client_end_turn{});
  to_client_turn_end end;
  lines = until_turn_end(&end);
  BOOST_REQUIRE(lines.back() == "turn_end:stop_token");
  models::turn_filter f;
  f.with_audio_only = true;
  turns = reader.turns(f);
  BOOST_REQUIRE_EQUAL(turns.size(), 1u);
  BOOST_TEST(turns[0].turn == 2);
  BOOST_TEST(turns[0].audio_samples == int64_t(speech.size()));
  BOOST_TEST(turns[0].audio_samples == int64_t(std::lround(end.timings.audio_ms * 16)));
  BOOST_TEST(fs::exists(turns[0].audio));

  // a late label for turn 1 (protocol annotate): in the store, source client,
  // before the next turn's turn_end (the logger works in order)
  (*gw)->send(s1, client_annotation{1, "hello", "happy"});
  (*gw)->send(s1, client_text_turn{"again"});
  lines = until_turn_end();
  BOOST_REQUIRE(lines.back() == "turn_end:stop_token");
  auto id1 = reader.find_turn(turns[0].run, 1, 1);
  BOOST_REQUIRE(id1);
  auto h = reader.annotations(*id1);
  BOOST_REQUIRE_EQUAL(h.size(), 1u);
  BOOST_TEST(h[0].source == "client");
  BOOST_TEST(reader.turn_by_id(*id1)->emotion == "happy");

  // an opted-out session (log = false) leaves nothing at all
  const size_t files_before = count_files(d.path / "audio");
  session_settings off = vad_off;
  off.log = false;
  auto s2 = session(2, logger, false);
  (*gw)->send(s2, client_text_turn{"secret"});
  BOOST_REQUIRE(until_turn_end().back() == "turn_end:stop_token");
  (*gw)->send(s2, client_config{off});
  for (size_t off = 0; off < speech.size(); off += 320) {
    client_audio a;
    a.seq = off / 320;
    a.samples.assign(speech.begin() + ptrdiff_t(off), speech.begin() + ptrdiff_t(std::min(speech.size(), off + 320)));
    (*gw)->send(s2, std::move(a));
  }
  (*gw)->send(s2, client_end_turn{});
  lines = until_turn_end();
  for (auto& l : lines) BOOST_TEST_MESSAGE(l);
  BOOST_REQUIRE(lines.back() == "turn_end:stop_token");
  (*gw)->send(s2, client_annotation{1, "secret", "sad"});
  // ... and a session that opts out midway stops being stored from then on
  (*gw)->send(s1, client_config{off});
  (*gw)->send(s1, client_text_turn{"private now"});
  lines = until_turn_end();
  for (auto& l : lines) BOOST_TEST_MESSAGE(l);
  BOOST_REQUIRE(lines.back() == "turn_end:stop_token");
  // the logger has processed everything sent before this point once it answers
  caf::scoped_actor q{*sys};
  int64_t written = -1;
  q->request(logger, std::chrono::seconds(5), stats_atom::value).receive([&](int64_t n) { written = n; },
                                                                         [](caf::error&) {});
  BOOST_TEST(written == 3);
  for (auto& t : reader.turns()) {
    BOOST_TEST(t.session == 1u);
    BOOST_TEST(t.user_text != "secret");
    BOOST_TEST(t.user_text != "private now");
  }
  BOOST_TEST(reader.turns().size() == 3u);
  for (auto& s : reader.sessions()) BOOST_TEST(s.session == 1u);
  BOOST_TEST(count_files(d.path / "audio") == files_before);
}

BOOST_FIXTURE_TEST_CASE(turn_end_still_comes_when_the_store_does_not_answer, actor_fixture) {
  auto logger = sys->spawn(mute_logger);
  spawned.push_back(logger);
  auto s = session(1, logger, true, 0.3);
  (*gw)->send(s, client_text_turn{"hello"});
  auto lines = until_turn_end();
  // the answer streamed at once; the turn_end waited for the commit, then came with a warning event
  BOOST_REQUIRE(lines.size() >= 3u);
  BOOST_TEST(lines[lines.size() - 1] == "turn_end:stop_token");
  BOOST_TEST(has(lines[lines.size() - 2], "event:store_failed:"));
  BOOST_TEST(std::count(lines.begin(), lines.end(), "delta") == 1);
}

BOOST_AUTO_TEST_CASE(a_corrupt_store_stops_the_logger_from_starting) {
  testing::temp_dir d;
  std::ofstream(d.path / "index.sqlite") << std::string(4096, 'z');
  caf::actor_system_config cfg;
  register_message_types(cfg);
  caf::actor_system sys{cfg};
  logger_options lo;
  lo.dir = d.str();
  BOOST_CHECK_EXCEPTION(spawn_logger(sys, lo), models::store_error,
                        [](const models::store_error& e) { return has(e.what(), "index.sqlite"); });
}
