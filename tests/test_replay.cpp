// `undertone replay` end to end: a manifest of labelled RAVDESS clips is
// replayed (with --annotate) into a real engine on loopback, which stores the
// sessions with their labels; then that store is replayed and its answers are
// compared with the recorded ones. Real models (untrained projector: the
// answers are nonsense but deterministic and streamed), real sockets, the real
// binary.
#include <boost/test/unit_test.hpp>

#include <cstdio>
#include <filesystem>
#include <fstream>

#include "actors/engine.hpp"
#include "models/manifest.hpp"
#include "models/session_store.hpp"
#include "client_support.hpp"
#include "support.hpp"
#include "transport/gateway.hpp"

using namespace undertone;
namespace fs = std::filesystem;

namespace {

struct server {
  config::undertone_config cfg;
  testing::temp_dir store;
  std::string endpoint;
  std::unique_ptr<actors::engine> eng;
  server() {
    cfg = testing::small_engine_config();
    cfg.llm.kv_cells = 4096;
    cfg.sampling.max_tokens = 12;
    cfg.server.max_frames_per_second = 100000;  // replay streams as fast as possible
    cfg.store.dir = store.str();
    auto gw = transport::gateway_options::from(cfg.server);
    gw.default_settings = actors::session_settings_from(cfg);
    eng = std::make_unique<actors::engine>(cfg, [&, gw](caf::actor_system& sys, caf::actor sup) {
      return transport::spawn_gateway(sys, gw, sup, &endpoint);
    });
  }
};

/// Runs the binary; returns the exit code, output in `out`.
int run(const std::string& args, std::string& out) {
  const std::string cmd = std::string(UT_UNDERTONE_BIN) + " " + args + " 2>&1";
  FILE* p = ::popen(cmd.c_str(), "r");
  BOOST_REQUIRE(p);
  char buf[4096];
  out.clear();
  while (size_t n = std::fread(buf, 1, sizeof buf, p)) out.append(buf, n);
  const int st = ::pclose(p);
  return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

nlohmann::json read_json(const fs::path& p) {
  std::ifstream in(p);
  BOOST_REQUIRE_MESSAGE(in, "missing " << p);
  return nlohmann::json::parse(in);
}

}  // namespace

BOOST_AUTO_TEST_CASE(manifest_into_store_then_store_replay_compares) {
  const fs::path rav = testing::ravdess_dir();
  // Actor 16, two emotions (docs/data.md: 03-01-EE-II-SS-RR-AA).
  const std::vector<std::pair<std::string, models::emotion_label>> clips = {
      {"03-01-03-02-01-01-16.flac", models::emotion_label::happy},
      {"03-01-05-02-01-01-16.flac", models::emotion_label::angry}};
  testing::temp_dir tmp;
  std::vector<models::utterance> utts;
  for (const auto& [file, emo] : clips) {
    BOOST_REQUIRE_MESSAGE(fs::exists(rav / file), "RAVDESS clip missing: " << rav / file);
    models::utterance u;
    u.audio = (rav / file).string();
    u.transcript = "Kids are talking by the door";
    u.emotion = emo;
    u.speaker = "ravdess-16";
    u.corpus = "ravdess";
    u.split = models::split_kind::val;
    utts.push_back(u);
  }
  const std::string manifest = (tmp.path / "clips.jsonl").string();
  models::write_manifest(manifest, utts);

  server s;
  std::string out;
  // 1. The corpus becomes one labelled two-turn session in the server's store.
  const fs::path r1 = tmp.path / "r1";
  int rc = run("replay " + manifest + " --server " + s.endpoint + " --annotate --speed 0 --turns-per-session 2 --out " +
                   r1.string(),
               out);
  BOOST_TEST_MESSAGE(out);
  BOOST_REQUIRE_EQUAL(rc, 0);
  auto rep = read_json(r1 / "report.json");
  BOOST_TEST(rep["turns"].get<int>() == 2);
  BOOST_TEST(rep["completed"].get<int>() == 2);
  BOOST_TEST(rep["compared"].get<int>() == 0);  // a manifest has no recorded answers
  BOOST_TEST(fs::exists(r1 / "report.md"));

  std::vector<models::stored_turn> stored;
  {
    models::session_store st(s.store.str());
    stored = st.turns();
  }
  BOOST_REQUIRE_EQUAL(stored.size(), 2u);
  BOOST_TEST(stored[0].session == stored[1].session);
  BOOST_TEST(stored[0].emotion == "happy");
  BOOST_TEST(stored[1].emotion == "angry");
  BOOST_TEST(stored[0].transcript == "Kids are talking by the door");
  BOOST_TEST(!stored[0].audio.empty());
  BOOST_TEST(!stored[0].answer.empty());

  // 2. Replaying the store compares every turn with what was recorded.
  const fs::path r2 = tmp.path / "r2";
  rc = run("replay " + s.store.str() + " --server " + s.endpoint + " --speed 0 --out " + r2.string(), out);
  BOOST_TEST_MESSAGE(out);
  BOOST_REQUIRE_EQUAL(rc, 0);
  rep = read_json(r2 / "report.json");
  BOOST_TEST(rep["completed"].get<int>() == 2);
  BOOST_TEST(rep["compared"].get<int>() == 2);
  std::ifstream tj(r2 / "turns.jsonl");
  std::string line;
  size_t n = 0;
  while (std::getline(tj, line)) {
    auto j = nlohmann::json::parse(line);
    // The recorded side is the store's (first run's) answer for that turn.
    BOOST_TEST(j["recorded"]["answer"].get<std::string>() == stored[n].answer);
    BOOST_TEST(j["rouge_l"].get<double>() >= 0.0);
    BOOST_TEST((j["exact_match"].get<bool>() == (j["answer"] == j["recorded"]["answer"])));
    ++n;
  }
  BOOST_TEST(n == 2u);

  // 3. A regression limit that the replay cannot meet fails the command.
  rc = run("replay " + s.store.str() + " --server " + s.endpoint + " --speed 0 --max-latency-ratio 0.000001 --out " +
               (tmp.path / "r3").string(),
           out);
  BOOST_TEST(rc == 1);
  BOOST_TEST(out.find("regression") != std::string::npos);
}

BOOST_AUTO_TEST_CASE(bad_source_is_a_clear_error) {
  std::string out;
  const int rc = run("replay /nonexistent/store --server tcp://127.0.0.1:1 --out /tmp/undertone-replay-none", out);
  BOOST_TEST(rc == 1);
  BOOST_TEST(out.find("neither a session store") != std::string::npos);
}
