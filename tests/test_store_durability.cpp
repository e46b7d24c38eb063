// "Durable at every turn end" (issue 7, docs/store.md): the real `undertone
// serve` binary in a child process, a client does complete text and speech
// turns (one session opted out), then the server is killed with SIGKILL in the
// middle of an answer. Every turn the client saw a turn_end for must be in the
// store with its audio, the index must pass integrity_check, and at most the
// turn in progress may be missing; nothing of the opted-out session is stored.
#include <boost/test/unit_test.hpp>

#include <poll.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdio>

#include "models/audio.hpp"
#include "models/manifest.hpp"
#include "models/session_store.hpp"
#include "client_support.hpp"
#include "support.hpp"
#include "transport/client.hpp"

using namespace undertone;
using namespace std::chrono_literals;
using testing::answer;
using testing::read_answer;
namespace fs = std::filesystem;

namespace {

/// `undertone serve` as a child; stdout read until it says where it listens.
struct server_process {
  pid_t pid = -1;
  int out = -1;
  std::string endpoint, output;

  explicit server_process(const std::vector<std::string>& args) {
    int p[2];
    BOOST_REQUIRE(::pipe(p) == 0);
    pid = ::fork();
    BOOST_REQUIRE(pid >= 0);
    if (pid == 0) {
      ::dup2(p[1], 1);
      ::close(p[0]);
      ::close(p[1]);
      std::vector<char*> argv;
      static std::string bin = UT_UNDERTONE_BIN;
      argv.push_back(bin.data());
      for (auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
      argv.push_back(nullptr);
      ::execv(bin.c_str(), argv.data());
      ::_exit(127);
    }
    ::close(p[1]);
    out = p[0];
  }
  ~server_process() {
    kill9();
    if (out >= 0) ::close(out);
  }

  /// Waits for "ready on ENDPOINT" (model loading takes a while on a busy machine).
  bool wait_ready(std::chrono::seconds timeout) {
    const auto until = std::chrono::steady_clock::now() + timeout;
    while (std::chrono::steady_clock::now() < until) {
      pollfd pf{out, POLLIN, 0};
      if (::poll(&pf, 1, 500) <= 0) continue;
      char buf[4096];
      const ssize_t n = ::read(out, buf, sizeof buf);
      if (n <= 0) return false;  // the server exited
      output.append(buf, size_t(n));
      const std::string key = "ready on ";
      const auto at = output.find(key);
      const auto eol = at == std::string::npos ? at : output.find('\n', at);
      if (eol != std::string::npos) {
        endpoint = output.substr(at + key.size(), eol - at - key.size());
        return true;
      }
    }
    return false;
  }

  /// SIGKILL and reap; returns the wait status.
  int kill9() {
    if (pid <= 0) return 0;
    ::kill(pid, SIGKILL);
    int st = 0;
    ::waitpid(pid, &st, 0);
    pid = -1;
    return st;
  }
};

struct cli_result {
  int code;
  std::string out;
};
/// Runs the undertone binary with `args` (a shell line), stdout + stderr.
cli_result cli(const std::string& args) {
  const std::string cmd = std::string(UT_UNDERTONE_BIN) + " " + args + " 2>&1";
  FILE* p = ::popen(cmd.c_str(), "r");
  std::string out;
  char buf[4096];
  while (size_t n = std::fread(buf, 1, sizeof buf, p)) out.append(buf, n);
  const int st = ::pclose(p);
  return {WIFEXITED(st) ? WEXITSTATUS(st) : -1, out};
}
bool has(const std::string& s, const std::string& what) { return s.find(what) != std::string::npos; }

/// A turn the client saw end.
struct seen_turn {
  uint64_t session = 0;
  int64_t turn = 0;
  std::vector<float> audio;  // what was sent, 16 kHz ("" for text turns)
  std::string encoder_version;  // as the turn_end reported it
};

}  // namespace

BOOST_AUTO_TEST_CASE(kill_9_mid_answer_loses_at_most_the_turn_in_progress) {
  auto clips = models::load_ravdess(testing::ravdess_dir(), {{}, {}, false});
  BOOST_REQUIRE_MESSAGE(!clips.empty(), "no RAVDESS clips in " << testing::ravdess_dir());
  testing::temp_dir store;
  server_process srv({"serve",
                      "--set", "general.model_home=" + testing::model_home(),
                      "--set", "llm.model=" + testing::llm_gguf_path(),
                      "--set", "encoder.model=" + testing::whisper_ct2_dir(),
                      "--set", "llm.context_tokens=1024",
                      "--set", "sampling.max_tokens=12",
                      "--set", "server.max_frames_per_second=100000",
                      "--set", "store.dir=" + store.str(),
                      "--bind", "tcp://127.0.0.1:*",
                      "--control-bind", ""});  // not used here; a fixed port could be taken
  BOOST_REQUIRE_MESSAGE(srv.wait_ready(300s), "undertone serve did not start; its stdout: " << srv.output);
  BOOST_TEST_MESSAGE("server on " << srv.endpoint);

  std::vector<seen_turn> seen;
  transport::client c;
  c.connect(srv.endpoint, "durability", 30s);
  const uint64_t sid = c.session();
  auto text_turn = [&](transport::client& cl, const std::string& text) {
    cl.send_text(text);
    auto a = read_answer(cl);
    for (auto& n : a.notes) BOOST_TEST_MESSAGE(n);
    BOOST_REQUIRE_MESSAGE(a.ended, "no turn_end for \"" << text << "\"");
    return a;
  };

  // complete turns: text, speech (a RAVDESS clip, VAD off so every sample is the turn), text
  auto a = text_turn(c, "Say hello.");
  seen.push_back({sid, a.end.turn, {}, {}});
  transport::config_msg cm;
  cm.vad = false;
  c.send_config(cm);
  const auto& clip = clips[clips.size() / 2];
  const auto x = models::load_audio(clip.audio).samples;  // 16 kHz: the server's resampler passes it through
  for (size_t off = 0; off < x.size(); off += 320) c.send_audio(x.data() + off, std::min<size_t>(320, x.size() - off), 16000, 1);
  c.end_turn();
  a = read_answer(c);
  for (auto& n : a.notes) BOOST_TEST_MESSAGE(n);
  BOOST_REQUIRE(a.ended);
  BOOST_TEST(a.end.timings.speech_tokens > 0);
  BOOST_TEST_MESSAGE("speech turn " << a.end.turn << " (" << clip.audio << "): \"" << a.end.text << "\"");
  seen.push_back({sid, a.end.turn, x, a.end.encoder_version});
  const int64_t speech_turn = a.end.turn;
  // the client labels it afterwards (protocol annotate)
  c.annotate(clip.transcript, models::to_string(clip.emotion), speech_turn);
  a = text_turn(c, "Name a color.");
  seen.push_back({sid, a.end.turn, {}, {}});

  // an opted-out session
  uint64_t private_sid = 0;
  {
    transport::client p;
    p.connect(srv.endpoint, "private", 30s);
    private_sid = p.session();
    transport::config_msg off;
    off.log = false;
    p.send_config(off);
    text_turn(p, "This is secret.");
    p.bye();
  }

  // the turn in progress: a long answer, killed after its first words
  transport::config_msg longer;
  longer.max_tokens = 400;
  c.send_config(longer);
  c.send_text("Count from one to three hundred, separated by commas.");
  bool got_delta = false, finished = false;
  while (auto m = c.receive(120s)) {
    if (std::holds_alternative<transport::delta_msg>(*m)) {
      got_delta = true;
      break;
    }
    if (std::holds_alternative<transport::turn_end_msg>(*m)) {
      finished = true;  // it ended before we could kill: then it is a seen turn
      seen.push_back({sid, std::get<transport::turn_end_msg>(*m).turn, {}, {}});
      break;
    }
  }
  BOOST_TEST((got_delta || finished));
  const int st = srv.kill9();
  BOOST_TEST(WIFSIGNALED(st));
  BOOST_TEST_MESSAGE("killed the server " << (finished ? "after" : "during") << " the last answer");
  c.abandon();

  // ---- the store after the crash
  models::session_store s(store.str());
  BOOST_TEST_MESSAGE("orphaned audio files removed at open: " << s.opened().orphans_removed);
  BOOST_TEST(s.integrity_check() == "ok");
  const auto runs = s.runs();
  BOOST_REQUIRE_EQUAL(runs.size(), 1u);
  size_t audio_turns = 0;
  for (auto& t : seen) {
    BOOST_TEST_CONTEXT("session " << t.session << " turn " << t.turn) {
      auto id = s.find_turn(runs[0], t.session, t.turn);
      BOOST_REQUIRE(id);
      auto row = s.turn_by_id(*id);
      BOOST_REQUIRE(row);
      BOOST_TEST(row->client == "durability");
      BOOST_TEST(!row->answer.empty());
      BOOST_TEST(!row->llm_version.empty());
      if (t.audio.empty()) {
        BOOST_TEST(row->audio.empty());
        continue;
      }
      ++audio_turns;
      BOOST_TEST(row->audio_samples == int64_t(t.audio.size()));
      models::audio_options ao;
      ao.max_seconds = 0;
      auto back = models::load_audio(row->audio, ao);
      BOOST_REQUIRE_EQUAL(back.samples.size(), t.audio.size());
      float worst = 0;
      for (size_t i = 0; i < back.samples.size(); ++i) worst = std::max(worst, std::abs(back.samples[i] - t.audio[i]));
      BOOST_TEST(worst <= 2.0f / 32768);  // s16 on the wire, 16-bit FLAC on disk
      // The version that encoded this turn, as the client was told.
      BOOST_TEST(!row->encoder_version.empty());
      BOOST_TEST(row->encoder_version == t.encoder_version);
    }
  }
  BOOST_TEST(audio_turns == 1u);
  models::turn_filter mine;
  mine.run = runs[0];
  mine.session = int64_t(sid);
  const size_t stored = s.turns(mine).size();
  BOOST_TEST(stored >= seen.size());
  BOOST_TEST(stored <= seen.size() + 1);  // + the turn in progress, if it was committed just before the kill
  // the label the client sent after the speech turn
  auto sp = s.turn_by_id(*s.find_turn(runs[0], sid, speech_turn));
  BOOST_TEST(sp->transcript == clip.transcript);
  BOOST_TEST(sp->emotion == models::to_string(clip.emotion));
  BOOST_TEST(s.annotations(sp->id).at(0).source == "client");
  // nothing of the opted-out session
  for (auto& ss : s.sessions()) BOOST_TEST(ss.session != private_sid);
  for (auto& t : s.turns()) BOOST_TEST(t.user_text != "This is secret.");
  size_t files = 0;
  for (auto& e : fs::recursive_directory_iterator(store.path / "audio")) files += e.is_regular_file();
  BOOST_TEST(files == audio_turns);
  // and the store exports what was labelled
  BOOST_TEST(s.export_manifest((store.path / "labelled.jsonl").string(), {}) == 1u);
  BOOST_TEST(models::read_manifest((store.path / "labelled.jsonl").string()).at(0).speaker == "session:durability");

  // ---- the CLI on this store
  const std::string at = " --store " + store.str();
  auto r = cli("sessions list" + at);
  BOOST_TEST_MESSAGE(r.out);
  BOOST_TEST(r.code == 0);
  BOOST_TEST(has(r.out, runs[0]));
  BOOST_TEST(has(r.out, "durability"));
  BOOST_TEST(has(r.out, "1 sessions"));
  r = cli("sessions show latest " + std::to_string(sid) + at);
  BOOST_TEST_MESSAGE(r.out);
  BOOST_TEST(r.code == 0);
  BOOST_TEST(has(r.out, "[speech "));
  BOOST_TEST(has(r.out, "Say hello."));
  r = cli("annotate latest " + std::to_string(sid) + " 1 --emotion happy --transcript 'say hello'" + at);
  BOOST_TEST(r.code == 0);
  BOOST_TEST(has(r.out, "emotion happy"));
  r = cli("sessions show --json --id " + std::to_string(*s.find_turn(runs[0], sid, 1)) + at);
  BOOST_TEST(r.code == 0);
  BOOST_TEST(has(r.out, "\"source\": \"cli\""));
  r = cli("annotate latest " + std::to_string(sid) + " 1 --emotion jolly" + at);
  BOOST_TEST(r.code != 0);
  BOOST_TEST(has(r.out, "jolly"));
  r = cli("annotate latest " + std::to_string(sid) + " 99 --emotion sad" + at);
  BOOST_TEST(r.code != 0);
  BOOST_TEST(has(r.out, "no turn"));
  r = cli("sessions list --store " + (store.path / "nowhere").string());
  BOOST_TEST(r.code != 0);
  BOOST_TEST(has(r.out, "no session store"));
  const std::string manifest = (store.path / "cli.jsonl").string();
  r = cli("sessions export -o " + manifest + at);
  BOOST_TEST(r.code == 0);
  BOOST_TEST(has(r.out, "wrote 1 utterances"));  // the text turn's label does not count: no audio
  r = cli("sessions check" + at);
  BOOST_TEST(r.code == 0);
  BOOST_TEST(has(r.out, "index integrity: ok"));
  r = cli("sessions prune --max-megabytes 0 --retention-days 0" + at);
  BOOST_TEST(r.code == 0);
  BOOST_TEST(has(r.out, "pruned 0 sessions"));
}
