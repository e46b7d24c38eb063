// Online fine-tuning (models/finetune.hpp, actors/finetune_actor.hpp) with the
// real frozen SmolLM2-135M, Whisper tiny.en and the shipped projector on a few
// RAVDESS clips: a round trains, gates on held-out speakers and publishes only
// when the gate passes; a destructive round regresses and is not published;
// bad inputs fail before anything is published; the round runs at low priority
// on its own threads; the actor survives failing data sources and rounds (the
// actor cases inject a fake round function: they are about orchestration).
#include <boost/test/unit_test.hpp>

#include <ATen/Parallel.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <set>
#include <thread>

#include "actors/finetune_actor.hpp"
#include "models/finetune.hpp"
#include "models/manifest.hpp"
#include "models/nn/finetune.hpp"
#include "models/speech_encoder.hpp"
#include "tests/support.hpp"

namespace fs = std::filesystem;
using namespace undertone;
using namespace undertone::models;
using undertone::testing::temp_dir;

namespace {

std::string shipped_projector() { return testing::model_home() + "/models/undertone-projector/projector.safetensors"; }

/// Nice value of thread `tid` of this process (field 19 of /proc/self/task/TID/stat).
int thread_nice(const std::string& tid) {
  std::ifstream f("/proc/self/task/" + tid + "/stat");
  std::string s((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  auto p = s.rfind(')');
  if (p == std::string::npos) return -100;
  std::istringstream in(s.substr(p + 2));
  std::string tok;
  for (int field = 3; in >> tok; ++field)
    if (field == 19) return std::stoi(tok);
  return -100;
}
std::map<std::string, int> all_thread_nices() {
  std::map<std::string, int> m;
  for (const auto& e : fs::directory_iterator("/proc/self/task")) {
    const auto tid = e.path().filename().string();
    m[tid] = thread_nice(tid);
  }
  return m;
}

/// Tiny manifests from the RAVDESS clips: 8 "session" turns of actors 03/04,
/// 8 replay rows of actors 05/06 (split train), 12 held-out rows of actors 15/16.
struct world {
  temp_dir dir;
  std::string cache, sessions, replay, val;
  world() {
    ravdess_options ro;
    ro.with_duration = false;
    auto all = load_ravdess(testing::ravdess_dir(), ro);
    std::vector<utterance> s, r, v;
    auto take = [&](std::vector<utterance>& out, std::set<std::string> spk, size_t per_class) {
      for (auto lab : four_class_labels()) {
        size_t n = 0;
        for (const auto& u : all)
          if (u.emotion == lab && spk.count(u.speaker) && n < per_class) {
            out.push_back(u);
            ++n;
          }
      }
    };
    take(s, {"ravdess-03", "ravdess-04"}, 2);
    take(r, {"ravdess-05", "ravdess-06"}, 2);
    take(v, {"ravdess-15", "ravdess-16"}, 3);
    for (auto& u : s) u.corpus = "sessions";
    BOOST_REQUIRE_EQUAL(s.size(), 8u);
    BOOST_REQUIRE_EQUAL(r.size(), 8u);
    BOOST_REQUIRE_EQUAL(v.size(), 12u);
    for (const auto& u : v) BOOST_REQUIRE(u.split == split_kind::val);
    cache = (dir.path / "cache").string();
    sessions = (dir.path / "sessions.jsonl").string();
    replay = (dir.path / "replay.jsonl").string();
    val = (dir.path / "val.jsonl").string();
    write_manifest(sessions, s);
    write_manifest(replay, r);
    write_manifest(val, v);
  }
  finetune_options options(const std::string& out) const {
    finetune_options o;
    o.session_manifests = {sessions};
    o.replay_manifests = {replay};
    o.replay_ratio = 0.5;
    o.val_manifests = {val};
    o.projector = shipped_projector();
    o.llm_path = testing::llm_gguf_path();
    o.llm_dtype = "bf16";
    o.encoder_path = testing::whisper_ct2_dir();
    o.max_response_tokens = 16;
    o.teacher_dtype = "bf16";  // one LLM load in the test; production keeps fp32 (the cache key differs)
    o.steps = 3;
    o.batch = 4;
    o.lr = 1e-4;
    o.threads = 2;
    o.nice = 0;
    o.cache_dir = cache;
    o.out_dir = out;
    return o;
  }
};

world& w() {
  static world instance;
  return instance;
}

/// Asserts the documented rule for every metric row and for the decision.
void check_rule(const finetune_result& r, double margin) {
  BOOST_REQUIRE(!r.metrics.empty());
  bool all = true;
  for (const auto& g : r.metrics) {
    BOOST_TEST_INFO(g.metric << ": current " << g.current << " candidate " << g.candidate);
    BOOST_CHECK(std::isfinite(g.current) && std::isfinite(g.candidate));
    BOOST_CHECK_EQUAL(g.margin, margin);
    BOOST_CHECK_GT(g.n, 0);
    const bool rule = g.higher_is_better ? g.candidate >= g.current - margin : g.candidate <= g.current + margin;
    BOOST_CHECK_EQUAL(g.passed, rule);
    all = all && (!g.gating || rule);
  }
  BOOST_CHECK_EQUAL(r.passed, all);
}

}  // namespace

BOOST_AUTO_TEST_CASE(replay_ratio_is_exact_in_every_batch_the_trainer_draws) {
  std::vector<alignment_example> sess(5), rep(3);
  for (auto& e : sess) e.response = {0};
  for (auto& e : rep) e.response = {1};
  const int64_t steps = 7, batch = 4, k = 1;
  auto pool = mixed_pool(sess, rep, steps, batch, k, 42);
  BOOST_REQUIRE_EQUAL(pool.size(), size_t(steps * batch));
  data_sampler s;  // what alignment_trainer does with stage emotion and seed 42
  s.seed = 42;
  for (int64_t b = 0; b < steps; ++b) {
    int replayed = 0;
    for (size_t i : s.next(1, pool.size(), size_t(batch))) replayed += pool[i].response[0];
    BOOST_CHECK_EQUAL(replayed, k);
  }
  BOOST_CHECK_THROW(mixed_pool({}, rep, steps, batch, k, 1), std::invalid_argument);
  BOOST_CHECK_THROW(mixed_pool(sess, {}, steps, batch, k, 1), std::invalid_argument);
}

// (a) a normal round: metrics for current and candidate, the rule, publish iff
// the decision, a candidate the serving encoder loads, low priority on its own threads.
BOOST_AUTO_TEST_CASE(round_gates_on_held_out_speakers_and_publishes_iff_it_passes) {
  temp_dir out;
  auto o = w().options((out.path / "round").string());
  o.gate_metric = gate_metric_kind::both;
  o.gate_margin = 0.5;  // generous: this case exercises the publish path
  o.nice = 5;
  const pid_t caller = pid_t(::syscall(SYS_gettid));
  const int caller_nice = thread_nice(std::to_string(caller));
  const int threads_before = at::get_num_threads();
  int publish_calls = 0;
  std::string published_path;
  nlohmann::json published_meta;
  o.publish = [&](const std::string& path, const nlohmann::json& meta) {
    ++publish_calls;
    published_path = path;
    published_meta = meta;
    return std::string("v-test-1");
  };
  std::map<std::string, int> nices;
  std::string round_tid;
  std::set<std::string> phases;
  o.progress = [&](const std::string& phase, int64_t, int64_t, const std::string&) {
    phases.insert(phase);
    if (phase == "train" && nices.empty()) {
      nices = all_thread_nices();
      round_tid = std::to_string(::syscall(SYS_gettid));
    }
  };
  std::vector<std::string> lines;
  o.log = [&](const std::string& s) { lines.push_back(s); };
  const auto t0 = std::chrono::steady_clock::now();
  auto r = finetune_round(o);
  const double wall = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  BOOST_TEST_MESSAGE("round (a): " << wall << " s wall (train " << r.train_seconds << " s, gate " << r.gate_seconds
                                   << " s); " << r.priority << "\n" << gate_table(r));

  BOOST_CHECK_EQUAL(r.steps, 3);
  BOOST_CHECK_EQUAL(r.session_turns, 8);
  BOOST_CHECK_EQUAL(r.val_utterances, 12);
  BOOST_CHECK_EQUAL(r.session_examples, 16);  // emotion + auxiliary question per turn
  BOOST_REQUIRE_EQUAL(r.metrics.size(), 2u);
  BOOST_CHECK_EQUAL(r.metrics[0].metric, "val_loss");
  BOOST_CHECK_EQUAL(r.metrics[1].metric, "ranking");
  BOOST_CHECK(r.metrics[1].current >= 0 && r.metrics[1].current <= 1);
  check_rule(r, 0.5);
  BOOST_REQUIRE(r.passed);
  BOOST_CHECK(r.published);
  BOOST_CHECK_EQUAL(publish_calls, 1);
  BOOST_CHECK_EQUAL(r.published_version, "v-test-1");
  BOOST_CHECK_EQUAL(published_path, r.candidate);
  BOOST_CHECK_EQUAL(published_meta["metrics"].size(), 2u);
  BOOST_CHECK(phases.count("gate current") && phases.count("train") && phases.count("gate candidate"));

  // The candidate is a projector the serving pipeline loads, and it differs from the start.
  BOOST_REQUIRE(fs::exists(r.candidate));
  speech_encoder_options eo;
  eo.model = testing::whisper_ct2_dir();
  eo.projector = r.candidate;
  speech_encoder enc(eo);
  BOOST_CHECK_EQUAL(enc.d_llm(), 576);
  BOOST_CHECK(!fs::exists(fs::path(o.out_dir) / "checkpoints"));  // optimizer state removed after the round

  // Priority: the round's thread (not the caller's) runs at nice 5 (or at the
  // process's own nice when that is lower priority already: a round never
  // raises priority, e.g. under `nice -n 10 ctest`), and so does at least one
  // OpenMP worker it created; the caller's thread count is unchanged.
  const int round_nice = std::max(5, caller_nice);
  BOOST_REQUIRE(!nices.empty());
  BOOST_CHECK_NE(round_tid, std::to_string(caller));
  BOOST_CHECK_EQUAL(nices[round_tid], round_nice);
  BOOST_CHECK_EQUAL(nices[std::to_string(caller)], caller_nice);
  int workers_low = 0;
  for (const auto& [tid, n] : nices) workers_low += tid != round_tid && n == round_nice;
  BOOST_CHECK_GE(workers_low, 1);
  BOOST_CHECK_EQUAL(thread_nice(std::to_string(caller)), caller_nice);
  BOOST_CHECK_EQUAL(at::get_num_threads(), threads_before);
  int fresh_thread_threads = 0;
  std::thread([&] { fresh_thread_threads = at::get_num_threads(); }).join();
  BOOST_CHECK_EQUAL(fresh_thread_threads, threads_before);  // the process default was restored
}

// (b) an absurd learning rate wrecks the projector: the gate sees the
// regression and publish is never called.
BOOST_AUTO_TEST_CASE(destructive_round_regresses_and_is_not_published) {
  temp_dir out;
  auto o = w().options((out.path / "round").string());
  o.lr = 50;
  o.gate_margin = 0.01;
  o.gate_metric = gate_metric_kind::val_loss;
  int publish_calls = 0;
  o.publish = [&](const std::string&, const nlohmann::json&) {
    ++publish_calls;
    return std::string("must-not-happen");
  };
  auto r = finetune_round(o);
  BOOST_TEST_MESSAGE("round (b): " << r.seconds << " s\n" << gate_table(r));
  check_rule(r, 0.01);
  BOOST_REQUIRE_EQUAL(r.metrics.size(), 1u);
  BOOST_CHECK_GT(r.metrics[0].candidate, r.metrics[0].current + 0.01);  // the metric really regressed
  BOOST_CHECK(!r.passed);
  BOOST_CHECK(!r.published);
  BOOST_CHECK(r.published_version.empty());
  BOOST_CHECK_EQUAL(publish_calls, 0);
  BOOST_CHECK(r.reason.find("not published") != std::string::npos);
}

// (c) bad inputs: an error naming the problem, nothing published, no candidate.
BOOST_AUTO_TEST_CASE(bad_inputs_fail_without_publishing) {
  int publish_calls = 0;
  auto counting = [&](const std::string&, const nlohmann::json&) {
    ++publish_calls;
    return std::string("x");
  };
  auto expect_error = [&](finetune_options o, const std::string& needle) {
    o.publish = counting;
    try {
      finetune_round(o);
      BOOST_ERROR("no error; expected one mentioning " << needle);
    } catch (const std::exception& e) {
      BOOST_TEST_INFO(e.what());
      BOOST_CHECK(std::string(e.what()).find(needle) != std::string::npos);
    }
    BOOST_CHECK(!fs::exists(fs::path(o.out_dir) / "projector.safetensors"));
  };
  temp_dir d;
  // A session turn whose audio file is gone.
  auto rows = read_manifest(w().sessions);
  rows[3].audio = (d.path / "gone.flac").string();
  const std::string missing = (d.path / "missing_audio.jsonl").string();
  write_manifest(missing, rows);
  auto o = w().options((d.path / "r1").string());
  o.session_manifests = {missing};
  expect_error(o, "gone.flac");
  // A malformed manifest line.
  const std::string bad = (d.path / "bad.jsonl").string();
  std::ofstream(bad) << "{\"audio\": \"x.flac\", \"transcript\": \"hi\"\nnot json\n";
  o = w().options((d.path / "r2").string());
  o.session_manifests = {bad};
  expect_error(o, "bad.jsonl");
  // Held-out speakers that the round would train on.
  o = w().options((d.path / "r3").string());
  o.val_manifests = {w().sessions};
  auto vrows = read_manifest(w().sessions);
  for (auto& u : vrows) u.split = split_kind::val;
  const std::string leak = (d.path / "leak.jsonl").string();
  write_manifest(leak, vrows);
  o.val_manifests = {leak};
  expect_error(o, "held-out");
  BOOST_CHECK_EQUAL(publish_calls, 0);
}

// ---------------------------------------------------------------- the actor

namespace {

struct actor_world {
  caf::actor_system_config cfg;
  std::unique_ptr<caf::actor_system> sys;
  actor_world() {
    actors::register_message_types(cfg);
    sys = std::make_unique<caf::actor_system>(cfg);
  }
};

actors::finetune_status wait_idle(caf::scoped_actor& me, const caf::actor& ft) {
  actors::finetune_status st;
  for (int i = 0; i < 500; ++i) {
    me->request(ft, std::chrono::seconds(10), actors::finetune_status_atom::value)
        .receive([&](actors::finetune_status& s) { st = s; },
                 [&](caf::error& e) { BOOST_FAIL("status request failed: " << caf::to_string(e)); });
    if (!st.running) return st;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  BOOST_FAIL("the finetune actor never became idle");
  return st;
}

bool trigger(caf::scoped_actor& me, const caf::actor& ft, bool force) {
  bool started = false;
  me->request(ft, std::chrono::seconds(10), actors::finetune_now{force})
      .receive([&](bool b) { started = b; }, [&](caf::error& e) { BOOST_FAIL(caf::to_string(e)); });
  return started;
}

}  // namespace

// (d) a data source or round that throws is reported in the status and the
// actor keeps working; a later good round publishes and notifies the target.
// The round function is a fake (this is about orchestration; the real round is
// covered above).
BOOST_AUTO_TEST_CASE(actor_survives_failures_and_announces_published_encoders) {
  actor_world aw;
  caf::scoped_actor me{*aw.sys};
  temp_dir root;
  std::atomic<int> mode{0};  // 0: data source throws, 1: 3 turns, 2: 30 turns, 3: round throws, 4: slow round
  std::mutex mu;
  std::vector<finetune_options> seen;
  actors::finetune_actor_options ao;
  ao.out_root = root.str();
  ao.projector = "/start/projector.safetensors";
  ao.interval_s = 0;
  ao.min_new_turns = 10;
  ao.log = [](const std::string&) {};
  ao.data_source = [&]() -> actors::finetune_data {
    if (mode == 0) throw std::runtime_error("session store export failed: disk full");
    return {"/exports/sessions.jsonl", mode == 1 ? 3 : 30};
  };
  ao.publish = [](const std::string& path, const nlohmann::json&) { return "v-" + fs::path(path).parent_path().filename().string(); };
  ao.run_round = [&](const finetune_options& o) {
    {
      std::lock_guard<std::mutex> l(mu);
      seen.push_back(o);
    }
    if (mode == 3) throw std::runtime_error("audio file /x.flac does not exist");
    finetune_result r;
    r.passed = true;
    r.candidate = (fs::path(o.out_dir) / "projector.safetensors").string();
    r.published_version = o.publish(r.candidate, {});
    r.published = true;
    r.reason = "fake";
    return r;
  };
  ao.notify = caf::actor{me};
  auto ft = actors::spawn_finetune_actor(*aw.sys, ao);

  // The data source throws: error in the status, the actor still answers.
  BOOST_CHECK(trigger(me, ft, true));
  auto st = wait_idle(me, ft);
  BOOST_CHECK_EQUAL(st.last_outcome, "error");
  BOOST_CHECK_EQUAL(st.errors, 1);
  BOOST_CHECK(st.last_error.find("disk full") != std::string::npos);
  BOOST_CHECK_EQUAL(st.rounds, 0);

  // Too few new turns: skipped, no round.
  mode = 1;
  BOOST_CHECK(trigger(me, ft, false));
  st = wait_idle(me, ft);
  BOOST_CHECK_EQUAL(st.last_outcome, "skipped");
  BOOST_CHECK_EQUAL(st.skipped, 1);
  BOOST_CHECK(seen.empty());

  // Enough turns: a round runs from the serving projector, publishes, and the target hears of it.
  mode = 2;
  BOOST_CHECK(trigger(me, ft, false));
  actors::encoder_published ann;
  me->receive([&](actors::encoder_published& m) { ann = m; },
              caf::after(std::chrono::seconds(30)) >> [&] { BOOST_ERROR("no encoder_published"); });
  st = wait_idle(me, ft);
  BOOST_CHECK_EQUAL(st.last_outcome, "published");
  BOOST_CHECK_EQUAL(st.published, 1);
  BOOST_CHECK(st.last_error.empty());
  BOOST_CHECK_EQUAL(st.turns_at_last_round, 30);
  BOOST_REQUIRE_EQUAL(seen.size(), 1u);
  BOOST_CHECK_EQUAL(seen[0].projector, "/start/projector.safetensors");
  BOOST_CHECK_EQUAL(seen[0].session_manifests.at(0), "/exports/sessions.jsonl");
  BOOST_CHECK_EQUAL(fs::path(seen[0].out_dir).parent_path(), fs::path(root.str()));
  BOOST_CHECK_EQUAL(ann.projector_path, (fs::path(seen[0].out_dir) / "projector.safetensors").string());
  BOOST_CHECK_EQUAL(ann.version, "v-" + fs::path(seen[0].out_dir).filename().string());
  BOOST_CHECK_EQUAL(st.current_projector, ann.projector_path);

  // No new turns since that round: skipped unless forced; a throwing round is an error, not a crash.
  BOOST_CHECK(trigger(me, ft, false));
  st = wait_idle(me, ft);
  BOOST_CHECK_EQUAL(st.last_outcome, "skipped");
  mode = 3;
  BOOST_CHECK(trigger(me, ft, true));
  st = wait_idle(me, ft);
  BOOST_CHECK_EQUAL(st.last_outcome, "error");
  BOOST_CHECK_EQUAL(st.errors, 2);
  BOOST_CHECK(st.last_error.find("/x.flac") != std::string::npos);
  BOOST_REQUIRE_EQUAL(seen.size(), 2u);
  BOOST_CHECK_EQUAL(seen[1].projector, ann.projector_path);  // the next round starts from the published one

  // And it still works afterwards.
  mode = 2;
  BOOST_CHECK(trigger(me, ft, true));
  me->receive([&](actors::encoder_published&) {},
              caf::after(std::chrono::seconds(30)) >> [&] { BOOST_ERROR("no encoder_published after the errors"); });
  st = wait_idle(me, ft);
  BOOST_CHECK_EQUAL(st.published, 2);
  BOOST_CHECK_EQUAL(st.rounds, 2);

  // Shutting down while a round runs cancels it and waits for it.
  std::atomic<bool> started{false}, saw_cancel{false};
  mode = 4;
  ao.run_round = [&](const finetune_options& o) -> finetune_result {
    started = true;
    for (int i = 0; i < 3000 && !o.cancelled(); ++i) std::this_thread::sleep_for(std::chrono::milliseconds(10));
    saw_cancel = o.cancelled();
    throw finetune_cancelled("cancelled");
  };
  auto ft2 = actors::spawn_finetune_actor(*aw.sys, ao);
  BOOST_CHECK(trigger(me, ft2, true));
  for (int i = 0; i < 1000 && !started; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(10));
  BOOST_REQUIRE(started);
  me->send_exit(ft2, caf::exit_reason::user_shutdown);
  me->wait_for(ft2);
  BOOST_CHECK(saw_cancel);
  me->send_exit(ft, caf::exit_reason::user_shutdown);
}
