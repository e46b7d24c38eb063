// End to end: `undertone serve`'s engine (actors/engine.hpp) behind the real
// ZeroMQ gateway on loopback, driven by the client library
// (transport/client.hpp), with the real models (SmolLM2-135M, Whisper tiny.en,
// an untrained projector unless a trained one is in the cache: answers to
// speech are then nonsense, but streamed, complete and consistent).
#include <boost/test/unit_test.hpp>

#include <atomic>
#include <filesystem>
#include <fstream>
#include <thread>

#include "actors/engine.hpp"
#include "models/audio.hpp"
#include "models/session_store.hpp"
#include "client_support.hpp"
#include "support.hpp"
#include "transport/client.hpp"
#include "transport/gateway.hpp"

using namespace undertone;
namespace fs = std::filesystem;
using namespace std::chrono_literals;
using testing::answer;
using testing::read_answer;

namespace {

std::vector<std::string> speech_clips(size_t n) {
  std::vector<std::string> out;
  const std::string dir = testing::ravdess_dir();
  if (fs::is_directory(dir)) {
    std::vector<std::string> all;
    for (auto& e : fs::directory_iterator(dir))
      if (e.path().extension() == ".flac" || e.path().extension() == ".wav") all.push_back(e.path().string());
    std::sort(all.begin(), all.end());
    for (size_t i = 0; i < all.size() && out.size() < n; i += 7) out.push_back(all[i]);
  }
  const std::string ps = "/usr/share/pocketsphinx/test/data/goforward.raw";
  while (out.size() < n && fs::exists(ps)) out.push_back(ps);
  return out;
}

models::audio load_clip(const std::string& path) {
  if (path.size() > 4 && path.substr(path.size() - 4) == ".raw")
    return models::load_raw_pcm(path, models::raw_pcm_format{});
  return models::load_audio(path);
}

struct server {
  config::undertone_config cfg;
  testing::temp_dir store;
  std::string endpoint;
  std::unique_ptr<actors::engine> eng;

  server() {
    cfg = testing::small_engine_config();
    cfg.llm.kv_cells = 8192;
    cfg.sampling.max_tokens = 20;
    cfg.server.max_sessions = 8;
    cfg.server.idle_timeout_s = 15;
    // The clients stream files faster than real time (20 ms frames back to back);
    // the per-client rate limit is tested in test_gateway.
    cfg.server.max_frames_per_second = 100000;
    cfg.store.dir = store.str();
    auto gw = transport::gateway_options::from(cfg.server);
    gw.default_settings = actors::session_settings_from(cfg);
    eng = std::make_unique<actors::engine>(
        cfg, [&, gw](caf::actor_system& sys, caf::actor sup) {
          return transport::spawn_gateway(sys, gw, sup, &endpoint);
        });
  }
  ~server() { eng->shutdown(); }

  int64_t sessions() {
    caf::scoped_actor self{eng->system()};
    int64_t n = -1;
    self->request(eng->supervisor(), 5s, actors::stats_atom::value)
        .receive([&](int64_t v) { n = v; }, [&](caf::error&) {});
    return n;
  }
};

void stream(transport::client& c, const std::vector<float>& x, size_t from = 0, size_t to = SIZE_MAX) {
  const size_t piece = 320;  // 20 ms
  to = std::min(to, x.size());
  for (size_t off = from; off < to; off += piece) c.send_audio(x.data() + off, std::min(piece, to - off), 16000, 1);
}

}  // namespace

BOOST_AUTO_TEST_CASE(serve_end_to_end) {
  auto clips = speech_clips(4);
  BOOST_REQUIRE_MESSAGE(clips.size() == 4, "no speech clips (RAVDESS or pocketsphinx test data)");
  server srv;
  BOOST_TEST_MESSAGE("models: " << srv.eng->models() << "  endpoint " << srv.endpoint);

  // ---- 4 concurrent clients streaming real speech
  {
    std::vector<answer> answers(4);
    std::vector<std::thread> th;
    std::atomic<int> failures{0};
    for (size_t i = 0; i < 4; ++i) {
      th.emplace_back([&, i] {
        try {
          transport::client c;
          c.connect(srv.endpoint, "speaker-" + std::to_string(i), 30s);
          auto x = load_clip(clips[i]).samples;
          auto sil = std::vector<float>(16000, 0.0f);
          x.insert(x.begin(), sil.begin(), sil.begin() + 8000);  // 0.5 s lead-in: the VAD's noise floor
          stream(c, x);
          stream(c, sil);  // 1 s of silence: the endpoint ends the turn
          c.end_turn();    // (ignored if the endpoint already ended it)
          answers[i] = read_answer(c);
          c.bye();
        } catch (const std::exception& e) {
          BOOST_TEST_MESSAGE("client " << i << ": " << e.what());
          ++failures;
        }
      });
    }
    for (auto& t : th) t.join();
    BOOST_TEST(failures.load() == 0);
    for (size_t i = 0; i < 4; ++i) {
      BOOST_TEST_CONTEXT("client " << i << " " << clips[i]) {
        for (const auto& er : answers[i].errors)
          BOOST_TEST_MESSAGE("client " << i << " error " << int(er.code) << ": " << er.message);
        for (const auto& ev : answers[i].notes) BOOST_TEST_MESSAGE("client " << i << " " << ev);
        BOOST_TEST(answers[i].ended);
        BOOST_TEST(!answers[i].end.text.empty());
        BOOST_TEST(answers[i].deltas == answers[i].end.text);
        BOOST_TEST(answers[i].end.timings.speech_tokens > 0);
        BOOST_TEST(answers[i].end.timings.end_of_turn_to_first_token_ms >= 0);
        BOOST_TEST_MESSAGE("client " << i << ": \"" << answers[i].end.text << "\" ("
                                     << answers[i].end.stop_reason << ", " << answers[i].end.timings.speech_tokens
                                     << " speech tokens, end of turn -> first token "
                                     << answers[i].end.timings.end_of_turn_to_first_token_ms << " ms)");
      }
    }
  }

  // ---- a text turn, then barge-in (cancel mid-answer), then another turn works
  {
    transport::client c;
    c.connect(srv.endpoint, "texter", 30s);
    c.send_text("What is the capital of France?");
    auto a = read_answer(c);
    BOOST_TEST(a.ended);
    BOOST_TEST(!a.end.text.empty());
    BOOST_TEST(a.deltas == a.end.text);
    BOOST_TEST_MESSAGE("text turn: \"" << a.end.text << "\"");

    c.send_text("Tell me a long story about a dragon.");
    bool got_delta = false;
    while (auto m = c.receive(60s))
      if (std::holds_alternative<transport::delta_msg>(*m)) {
        got_delta = true;
        break;
      }
    BOOST_TEST(got_delta);
    c.cancel();
    auto cancelled = read_answer(c);
    BOOST_TEST(cancelled.ended);
    if (cancelled.end.stop_reason != "cancelled") BOOST_TEST_MESSAGE("answer finished before the cancel arrived");
    c.send_text("Say hello.");
    a = read_answer(c);
    BOOST_TEST(a.ended);
    BOOST_TEST(a.end.stop_reason != "cancelled");
    BOOST_TEST(!a.end.text.empty());
    BOOST_TEST(a.deltas == a.end.text);
    c.bye();
  }

  // ---- garbage frames: an error frame, the session stays usable
  {
    transport::client c;
    c.connect(srv.endpoint, "garbage", 30s);
    c.send_raw({"\xff\x00 not msgpack"});
    c.send_raw({"", "", ""});
    auto a = read_answer(c, 5s, true);
    BOOST_TEST(!a.errors.empty());
    if (!a.errors.empty()) BOOST_TEST(!a.errors[0].fatal);
    c.send_text("Hi!");
    a = read_answer(c);
    BOOST_TEST(a.ended);
    BOOST_TEST(a.deltas == a.end.text);
    c.bye();
  }

  // ---- a client that vanishes mid-turn: others are served, its session is reclaimed
  {
    // Earlier clients said bye; their sessions close asynchronously.
    int64_t before = srv.sessions();
    for (int i = 0; i < 40 && before != 0; ++i) {
      std::this_thread::sleep_for(250ms);
      before = srv.sessions();
    }
    BOOST_TEST(before == 0);
    {
      transport::client gone;
      gone.connect(srv.endpoint, "vanisher", 30s);
      auto x = load_clip(clips[0]).samples;
      stream(gone, std::vector<float>(8000, 0.0f));
      stream(gone, x, 0, x.size() / 2);
      gone.abandon();  // no bye: ZeroMQ does not tell the server
    }
    BOOST_TEST(srv.sessions() == before + 1);
    transport::client c;
    c.connect(srv.endpoint, "survivor", 30s);
    c.send_text("Name a color.");
    auto a = read_answer(c);
    BOOST_TEST(a.ended);
    BOOST_TEST(!a.end.text.empty());
    c.bye();
    // idle_timeout_s = 15: the vanished client's session closes within ~20 s
    int64_t n = -1;
    for (int i = 0; i < 90; ++i) {
      n = srv.sessions();
      if (n == before) break;
      std::this_thread::sleep_for(500ms);
    }
    BOOST_TEST(n == before);
  }

  // ---- the logger stored the turns (session store: SQLite index + FLAC)
  {
    models::session_store st(srv.store.str());
    auto turns = st.turns();
    int with_audio = 0;
    for (auto& t : turns)
      if (!t.audio.empty() && fs::exists(t.audio)) ++with_audio;
    BOOST_TEST(turns.size() >= 7u);
    BOOST_TEST(with_audio >= 4);
    BOOST_TEST(st.integrity_check() == "ok");
  }
}
