// Hot swap of the speech encoder (issue 7, docs/hot-swap.md) with the real
// Whisper tiny.en encoder and two projectors: the shipped trained one ("A")
// and a randomly initialized one saved to a temp file ("B").
//
// References: each clip encoded alone by a separate speech_encoder per
// projector. Streaming + batching do the same arithmetic in other shapes, so
// tokens are compared with max|diff| <= 1e-4 * max(1, max|ref|) (as in
// test_speech_encoder); A and B differ by O(1) on every clip, so a turn that
// mixed versions, or was encoded by the wrong one, fails the comparison.
//
//  (a) replace_weights: a stream created before the swap yields exactly the old
//      weights' tokens, one created after the new weights'; bad checkpoints are
//      refused and the current generation stays.
//  (b) under load: the encoder actor with 4 concurrent fake sessions (CAF test
//      actors speaking encode_open/audio/finish) streaming real speech, 3 turns
//      each, while the test swaps v0001 <-> v0002 through the registry as fast
//      as the actor answers: every turn's speech_rows carry ONE version and
//      equal that version's reference; every session gets all its turns.
//  (c) a corrupt checkpoint swap is refused; serving continues on the current
//      version with the right output. A respawned encoder follows the
//      registry's current. The control endpoint does status / swap / rollback.
#include <boost/test/unit_test.hpp>

#include <ATen/ATen.h>

#include <atomic>
#include <filesystem>
#include <map>
#include <mutex>
#include <set>
#include <thread>

#include <caf/all.hpp>

#include "actors/encoder_actor.hpp"
#include "actors/messages.hpp"
#include "actors/session.hpp"
#include "actors/supervisor.hpp"
#include "models/audio.hpp"
#include "models/encoder_registry.hpp"
#include "models/nn/projector.hpp"
#include "models/speech_encoder.hpp"
#include "tests/support.hpp"
#include "transport/control.hpp"

namespace ut = undertone::testing;
namespace fs = std::filesystem;
using namespace undertone;
using namespace undertone::models;
using namespace undertone::actors;

namespace {

const std::vector<std::string> k_clips = {"03-01-05-02-01-01-01", "03-01-01-01-01-01-01", "03-01-03-02-02-01-04"};
std::string clip_path(const std::string& c) { return ut::ravdess_dir() + "/" + c + ".flac"; }
std::string shipped_projector() { return ut::model_home() + "/models/undertone-projector/projector.safetensors"; }

boost::test_tools::assertion_result have_data(boost::unit_test::test_unit_id) {
  bool ok = fs::exists(ut::whisper_ct2_dir() + "/model.bin") && fs::exists(shipped_projector());
  for (const auto& c : k_clips) ok = ok && fs::exists(clip_path(c));
  boost::test_tools::assertion_result r(ok);
  r.message() << "needs " << ut::whisper_ct2_dir() << ", " << shipped_projector() << " and RAVDESS clips in "
              << ut::ravdess_dir();
  return r;
}

speech_encoder_options opts(const std::string& projector, const std::string& version) {
  speech_encoder_options o;
  o.model = ut::whisper_ct2_dir();
  o.projector = projector;
  o.version = version;
  return o;
}

// Whole clip through one stream, pieces of 20 ms.
std::vector<float> encode_alone(const speech_encoder& enc, const std::vector<float>& x) {
  auto s = enc.create_stream();
  std::vector<float> out;
  for (size_t off = 0; off < x.size(); off += 320) {
    enc.accept_waveform(*s, x.data() + off, std::min<size_t>(320, x.size() - off));
    while (enc.is_ready(*s)) enc.decode_streams({s.get()});
    enc.pop_tokens(*s, out);
  }
  enc.input_finished(*s);
  while (enc.is_ready(*s)) enc.decode_streams({s.get()});
  enc.pop_tokens(*s, out);
  return out;
}

double max_abs(const std::vector<float>& v) {
  double m = 0;
  for (float x : v) m = std::max(m, double(std::fabs(x)));
  return m;
}
// max|a - b| / max(1, max|b|); +inf when the sizes differ.
double rel_diff(const std::vector<float>& a, const std::vector<float>& b) {
  if (a.size() != b.size()) return std::numeric_limits<double>::infinity();
  double m = 0;
  for (size_t i = 0; i < a.size(); ++i) m = std::max(m, double(std::fabs(a[i] - b[i])));
  return m / std::max(1.0, max_abs(b));
}
constexpr double k_tol = 1e-4;

// Shared by the test cases: the two projectors, the clips and the references.
struct world {
  ut::temp_dir tmp;
  std::string proj_a, proj_b;
  std::vector<std::vector<float>> clips;
  std::map<std::string, std::vector<std::vector<float>>> ref;  // version name -> per clip tokens
  std::map<std::string, std::string> file_of;                  // version name -> projector file
  std::shared_ptr<speech_encoder> enc_a, enc_b;

  world() {
    proj_a = shipped_projector();
    proj_b = (tmp.path / "random.safetensors").string();
    projector(projector_config{8, 384, 256, 576}, torch::kCPU, torch::kFloat32, 7).save(proj_b);
    enc_a = std::make_shared<speech_encoder>(opts(proj_a, "A"));
    enc_b = std::make_shared<speech_encoder>(opts(proj_b, "B"));
    for (const auto& c : k_clips) clips.push_back(load_audio(clip_path(c)).samples);
    for (const auto& x : clips) {
      ref["A"].push_back(encode_alone(*enc_a, x));
      ref["B"].push_back(encode_alone(*enc_b, x));
    }
    file_of["A"] = proj_a;
    file_of["B"] = proj_b;
  }
  static world& get() {
    static world w;
    return w;
  }
};

// ------------------------------------------------------------ fake sessions

struct turn_result {
  int session = 0, turn = 0, clip = 0;
  std::set<std::string> versions;  // of every speech_rows of the turn
  std::vector<float> rows;
  int64_t messages = 0;
  std::chrono::steady_clock::time_point started, ended;  // first audio sent, last rows received
};
struct results {
  std::mutex mu;
  std::vector<turn_result> turns;
  std::atomic<int> done{0};
};

struct fake_session_state {
  int turn = 0;
  size_t piece = 0;
  turn_result cur;
  static inline const char* name = "test.fake_session";
};

// Streams `turns` turns of real speech (clip (index + turn) mod 3) to the
// encoder in 320 ms pieces, one piece every `pace`, waits for each turn's last
// rows, and records them.
caf::behavior fake_session(caf::stateful_actor<fake_session_state>* self, caf::actor enc, int index, int turns,
                           std::shared_ptr<results> res, std::chrono::milliseconds pace) {
  const session_id id = session_id(index + 1);
  auto& w = world::get();
  self->send(enc, encode_open{id});
  self->send(self, tick_atom::value);
  auto clip_of = [index](int turn) { return (index + turn) % int(k_clips.size()); };
  return {
      [=, &w](tick_atom) {
        auto& st = self->state;
        const auto& x = w.clips[size_t(clip_of(st.turn))];
        const size_t n = 5120;
        if (st.piece * n >= x.size()) {
          self->send(enc, encode_finish{id});
          return;
        }
        const size_t off = st.piece * n;
        if (st.piece == 0) st.cur.started = std::chrono::steady_clock::now();
        std::vector<float> p(x.begin() + std::ptrdiff_t(off), x.begin() + std::ptrdiff_t(std::min(x.size(), off + n)));
        self->send(enc, encode_audio{id, std::move(p)});
        st.piece += 1;
        self->delayed_send(self, pace, tick_atom::value);
      },
      [=](speech_rows& r) {
        auto& st = self->state;
        st.cur.versions.insert(r.encoder_version);
        st.cur.rows.insert(st.cur.rows.end(), r.rows.begin(), r.rows.end());
        st.cur.messages += 1;
        if (!r.last) return;
        st.cur.ended = std::chrono::steady_clock::now();
        st.cur.session = index;
        st.cur.turn = st.turn;
        st.cur.clip = clip_of(st.turn);
        {
          std::lock_guard<std::mutex> lk(res->mu);
          res->turns.push_back(std::move(st.cur));
        }
        st.cur = turn_result{};
        st.turn += 1;
        st.piece = 0;
        if (st.turn < turns) {
          self->send(self, tick_atom::value);
        } else {
          self->send(enc, encode_close{id});
          res->done += 1;
          self->quit();
        }
      },
  };
}

struct actor_world {
  caf::actor_system_config cfg;
  std::unique_ptr<caf::actor_system> sys;
  actor_world() {
    register_message_types(cfg);
    sys = std::make_unique<caf::actor_system>(cfg);
  }
  ~actor_world() {
    sys->await_all_actors_done();
  }
  swap_result ask(const caf::actor& a, caf::message m) {
    caf::scoped_actor self{*sys};
    swap_result out;
    self->request(a, std::chrono::seconds(120), std::move(m))
        .receive([&](swap_result& r) { out = std::move(r); },
                 [&](caf::error& e) { out.message = "error: " + caf::to_string(e); });
    return out;
  }
  encoder_status status(const caf::actor& a) {
    caf::scoped_actor self{*sys};
    encoder_status out;
    self->request(a, std::chrono::seconds(60), status_request{})
        .receive([&](encoder_status& s) { out = std::move(s); }, [&](caf::error&) {});
    return out;
  }
};

// Checks one turn against the reference of the version it claims.
void check_turn(const turn_result& t) {
  BOOST_TEST_CONTEXT("session " << t.session << " turn " << t.turn << " clip " << t.clip) {
    BOOST_TEST(t.versions.size() == 1u);  // no mixing inside a turn (hence inside a chunk)
    if (t.versions.size() != 1) return;
    auto& w = world::get();
    std::string v = *t.versions.begin();
    // Registry versions v0001 / v0002 hold A / B.
    const std::string key = v == "v0001" ? "A" : v == "v0002" ? "B" : v;
    BOOST_REQUIRE(w.ref.count(key));
    const double d = rel_diff(t.rows, w.ref[key][size_t(t.clip)]);
    BOOST_TEST(d <= k_tol, "version " << v << ": rel diff " << d);
  }
}

}  // namespace

BOOST_AUTO_TEST_SUITE(hot_swap, *boost::unit_test::precondition(have_data))

BOOST_AUTO_TEST_CASE(references_differ) {
  auto& w = world::get();
  for (size_t c = 0; c < w.clips.size(); ++c) {
    BOOST_TEST(!w.ref["A"][c].empty());
    BOOST_TEST(rel_diff(w.ref["A"][c], w.ref["B"][c]) > 0.05);  // measured: O(1)
  }
}

BOOST_AUTO_TEST_CASE(replace_weights_keeps_streams_on_their_generation) {
  auto& w = world::get();
  speech_encoder enc(opts(w.proj_a, "A"));
  BOOST_TEST(enc.version() == "A");
  BOOST_TEST(enc.generation() == 1);
  const auto& x = w.clips[0];
  auto s1 = enc.create_stream();
  const size_t half = x.size() / 2;
  std::vector<float> out1, out2;
  enc.accept_waveform(*s1, x.data(), half);
  while (enc.is_ready(*s1)) enc.decode_streams({s1.get()});
  enc.pop_tokens(*s1, out1);
  BOOST_TEST(!out1.empty());  // mid-turn

  enc.replace_weights(w.proj_b, "B");
  BOOST_TEST(enc.version() == "B");
  BOOST_TEST(enc.generation() == 2);
  auto s2 = enc.create_stream();
  BOOST_TEST(s1->version() == "A");
  BOOST_TEST(s2->version() == "B");
  // Both streams in the same decode_streams calls: batched per generation.
  size_t off1 = half, off2 = 0;
  while (off1 < x.size() || off2 < x.size()) {
    if (off1 < x.size()) {
      const size_t n = std::min<size_t>(1000, x.size() - off1);
      enc.accept_waveform(*s1, x.data() + off1, n);
      off1 += n;
    }
    if (off2 < x.size()) {
      const size_t n = std::min<size_t>(700, x.size() - off2);
      enc.accept_waveform(*s2, x.data() + off2, n);
      off2 += n;
    }
    while (enc.is_ready(*s1) || enc.is_ready(*s2)) enc.decode_streams({s1.get(), s2.get()});
  }
  enc.input_finished(*s1);
  enc.input_finished(*s2);
  while (enc.is_ready(*s1) || enc.is_ready(*s2)) enc.decode_streams({s1.get(), s2.get()});
  enc.pop_tokens(*s1, out1);
  enc.pop_tokens(*s2, out2);
  BOOST_TEST(rel_diff(out1, w.ref["A"][0]) <= k_tol);
  BOOST_TEST(rel_diff(out2, w.ref["B"][0]) <= k_tol);

  // Refused: truncated file, wrong shape, missing file. Nothing changes.
  const std::string trunc = (w.tmp.path / "trunc.safetensors").string();
  ut::copy_prefix(w.proj_b, trunc, size_t(fs::file_size(w.proj_b)) / 2);
  const std::string wrong = (w.tmp.path / "wrong.safetensors").string();
  projector(projector_config{8, 384, 64, 512}, torch::kCPU, torch::kFloat32, 1).save(wrong);
  for (const auto& bad : {trunc, wrong, (w.tmp.path / "missing.safetensors").string()}) {
    try {
      enc.replace_weights(bad, "C");
      BOOST_FAIL("accepted " << bad);
    } catch (const std::exception& e) {
      BOOST_TEST(std::string(e.what()).find(fs::path(bad).filename().string()) != std::string::npos, e.what());
    }
    BOOST_TEST(enc.version() == "B");
    BOOST_TEST(enc.generation() == 2);
  }
  BOOST_TEST(rel_diff(encode_alone(enc, w.clips[1]), w.ref["B"][1]) <= k_tol);
  // Back to A: a third generation with A's weights.
  enc.replace_weights(w.proj_a, "A2");
  auto s3 = enc.create_stream();
  BOOST_TEST(s3->version() == "A2");
  BOOST_TEST(rel_diff(encode_alone(enc, w.clips[2]), w.ref["A"][2]) <= k_tol);
}

BOOST_AUTO_TEST_CASE(swaps_under_load_lose_nothing_and_never_mix) {
  auto& w = world::get();
  ut::temp_dir reg_dir;
  encoder_registry reg(reg_dir.str());
  BOOST_TEST(reg.publish(w.proj_a, {{"source", "shipped"}}) == "v0001");
  BOOST_TEST(reg.publish(w.proj_b, {{"source", "random"}}, false) == "v0002");
  w.ref["v0001"] = w.ref["A"];
  w.ref["v0002"] = w.ref["B"];

  actor_world aw;
  auto enc = std::make_shared<speech_encoder>(opts(w.proj_a, "v0001"));
  encoder_actor_options eo;
  eo.encoder = enc;
  eo.registry = reg_dir.str();
  eo.max_batch = 32;
  eo.max_wait_ms = 10;
  auto encoder = spawn_encoder_actor(*aw.sys, eo);

  const int n_sessions = 4, n_turns = 3;
  auto res = std::make_shared<results>();
  for (int i = 0; i < n_sessions; ++i)
    aw.sys->spawn(fake_session, encoder, i, n_turns, res, std::chrono::milliseconds(15 + 5 * i));

  // Swap back and forth as fast as the encoder answers until every session is done.
  int swaps_ok = 0, swaps = 0;
  std::vector<std::chrono::steady_clock::time_point> swapped_at;
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::minutes(4);
  while (res->done.load() < n_sessions && std::chrono::steady_clock::now() < deadline) {
    const std::string v = swaps % 2 == 0 ? "v0002" : "v0001";
    auto r = aw.ask(encoder, caf::make_message(swap_encoder{v, "", "", true}));
    ++swaps;
    BOOST_TEST(r.ok, r.message);
    if (r.ok) {
      ++swaps_ok;
      swapped_at.push_back(std::chrono::steady_clock::now());
      BOOST_TEST(r.version == v);
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  BOOST_REQUIRE_EQUAL(res->done.load(), n_sessions);
  BOOST_TEST(swaps_ok >= 2);

  std::lock_guard<std::mutex> lk(res->mu);
  BOOST_TEST(res->turns.size() == size_t(n_sessions * n_turns));  // no session lost a turn
  std::map<int, std::set<int>> turns_of;
  std::map<std::string, int> per_version;
  for (const auto& t : res->turns) {
    check_turn(t);
    turns_of[t.session].insert(t.turn);
    if (t.versions.size() == 1) per_version[*t.versions.begin()] += 1;
  }
  for (int i = 0; i < n_sessions; ++i) BOOST_TEST(turns_of[i].size() == size_t(n_turns));
  // Coverage, not speed: swaps did land while turns were being encoded.
  int overlapped = 0;
  for (const auto& t : res->turns)
    for (const auto& at : swapped_at)
      if (at > t.started && at < t.ended) {
        ++overlapped;
        break;
      }
  BOOST_TEST_MESSAGE("turns with a swap during them: " << overlapped);
  BOOST_TEST(overlapped > 0);
  BOOST_TEST_MESSAGE("swaps " << swaps_ok << "; turns on v0001 " << per_version["v0001"] << ", on v0002 "
                              << per_version["v0002"]);
  BOOST_TEST(per_version["v0001"] + per_version["v0002"] == n_sessions * n_turns);

  // The registry follows the swaps; the encoder reports the same.
  auto st = aw.status(encoder);
  BOOST_TEST(st.version == reg.current().value());
  BOOST_TEST(st.registry_current == st.version);
  BOOST_TEST(st.generation == 1 + swaps_ok);
  caf::anon_send_exit(encoder, caf::exit_reason::user_shutdown);
}

BOOST_AUTO_TEST_CASE(corrupt_checkpoint_is_refused_and_serving_continues) {
  auto& w = world::get();
  ut::temp_dir reg_dir;
  encoder_registry reg(reg_dir.str());
  reg.publish(w.proj_a, {});         // v0001, current
  reg.publish(w.proj_b, {}, false);  // v0002
  w.ref["v0001"] = w.ref["A"];
  w.ref["v0002"] = w.ref["B"];
  // v0002 gets a flipped byte in its weights after publishing.
  const auto p2 = reg.path_of("v0002");
  ut::corrupt_byte(p2, size_t(fs::file_size(p2)) - 1000);

  actor_world aw;
  auto enc = std::make_shared<speech_encoder>(opts(w.proj_a, "v0001"));
  encoder_actor_options eo;
  eo.encoder = enc;
  eo.registry = reg_dir.str();
  auto encoder = spawn_encoder_actor(*aw.sys, eo);

  auto r = aw.ask(encoder, caf::make_message(swap_encoder{"v0002", "", "", true}));
  BOOST_TEST(!r.ok);
  BOOST_TEST(r.version == "v0001");
  BOOST_TEST(r.message.find("sha256") != std::string::npos, r.message);
  // An explicit file of the wrong shape, a truncated one, an unknown version.
  const std::string wrong = (w.tmp.path / "wrong2.safetensors").string();
  projector(projector_config{8, 384, 64, 512}, torch::kCPU, torch::kFloat32, 1).save(wrong);
  r = aw.ask(encoder, caf::make_message(swap_encoder{"x", wrong, "", true}));
  BOOST_TEST(!r.ok);
  BOOST_TEST(r.message.find("d_out") != std::string::npos, r.message);
  const std::string trunc = (w.tmp.path / "trunc2.safetensors").string();
  ut::copy_prefix(w.proj_b, trunc, 5000);
  r = aw.ask(encoder, caf::make_message(swap_encoder{"y", trunc, "", true}));
  BOOST_TEST(!r.ok);
  r = aw.ask(encoder, caf::make_message(swap_encoder{"v0042", "", "", true}));
  BOOST_TEST(!r.ok);
  BOOST_TEST(reg.current().value() == "v0001");
  BOOST_TEST(enc->version() == "v0001");
  BOOST_TEST(enc->generation() == 1);

  // Serving continues on v0001 with v0001's output.
  auto res = std::make_shared<results>();
  aw.sys->spawn(fake_session, encoder, 0, 1, res, std::chrono::milliseconds(1));
  for (int i = 0; i < 2400 && res->done.load() < 1; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(50));
  BOOST_REQUIRE_EQUAL(res->done.load(), 1);
  BOOST_REQUIRE_EQUAL(res->turns.size(), 1u);
  BOOST_TEST(*res->turns[0].versions.begin() == "v0001");
  check_turn(res->turns[0]);

  // Rollback through the actor: v0003 (good B) current, then back to v0001.
  BOOST_TEST(reg.publish(w.proj_b, {}, false) == "v0003");
  w.ref["v0003"] = w.ref["B"];
  r = aw.ask(encoder, caf::make_message(swap_encoder{"v0003", "", "", true}));
  BOOST_TEST(r.ok, r.message);
  BOOST_TEST(reg.current().value() == "v0003");
  r = aw.ask(encoder, caf::make_message(rollback_encoder{""}));
  BOOST_TEST(r.ok, r.message);
  BOOST_TEST(r.version == "v0001");
  BOOST_TEST(r.previous == "v0003");
  BOOST_TEST(reg.current().value() == "v0001");

  // A respawned encoder actor (same weights object, as the supervisor's
  // factory gives it) starts on the registry's current version.
  reg.set_current("v0003");
  caf::anon_send_exit(encoder, caf::exit_reason::kill);
  auto respawned = spawn_encoder_actor(*aw.sys, eo);
  auto st = aw.status(respawned);
  BOOST_TEST(st.version == "v0003");
  BOOST_TEST(enc->version() == "v0003");
  // ... unless the current one is corrupt: it keeps the loaded weights.
  reg.set_current("v0001");
  ut::corrupt_byte(reg.path_of("v0001"), 4000);
  auto respawned2 = spawn_encoder_actor(*aw.sys, eo);
  BOOST_TEST(aw.status(respawned2).version == "v0003");
  caf::anon_send_exit(respawned, caf::exit_reason::user_shutdown);
  caf::anon_send_exit(respawned2, caf::exit_reason::user_shutdown);
}

BOOST_AUTO_TEST_CASE(control_endpoint_status_swap_rollback) {
  auto& w = world::get();
  ut::temp_dir reg_dir;
  encoder_registry reg(reg_dir.str());
  reg.publish(w.proj_a, {});         // v0001
  reg.publish(w.proj_b, {}, false);  // v0002

  actor_world aw;
  auto enc = std::make_shared<speech_encoder>(opts(w.proj_a, "v0001"));
  encoder_actor_options eo;
  eo.encoder = enc;
  eo.registry = reg_dir.str();
  auto env = std::make_shared<session_env>();
  env->models = "llm=test; encoder=test";
  env->llm_version = "llm-test";
  supervisor_options so;
  so.env = env;
  so.encoder = spawn_encoder_actor(*aw.sys, eo);
  auto sup = spawn_supervisor(*aw.sys, so);
  {
    transport::control_server control(*aw.sys, sup, "tcp://127.0.0.1:*");
    const auto ep = control.endpoint();
    auto s = transport::control_call(ep, {{"t", "status"}, {"id", 7}});
    BOOST_TEST(s["ok"].get<bool>());
    BOOST_TEST(s["id"].get<int>() == 7);
    BOOST_TEST(s["encoder"]["version"].get<std::string>() == "v0001");
    BOOST_TEST(s["encoder"]["registry_current"].get<std::string>() == "v0001");
    BOOST_TEST(s["sessions"].get<int>() == 0);
    BOOST_TEST(s["llm"].get<std::string>() == "llm-test");

    auto r = transport::control_call(ep, {{"t", "encoder_swap"}, {"version", "v0002"}});
    BOOST_TEST(r["ok"].get<bool>(), r.dump());
    BOOST_TEST(r["version"].get<std::string>() == "v0002");
    BOOST_TEST(r["previous"].get<std::string>() == "v0001");
    BOOST_TEST(enc->version() == "v0002");
    BOOST_TEST(reg.current().value() == "v0002");

    r = transport::control_call(ep, {{"t", "encoder_swap"}, {"version", "nope"}});
    BOOST_TEST(!r["ok"].get<bool>());
    BOOST_TEST(enc->version() == "v0002");

    r = transport::control_call(ep, {{"t", "encoder_rollback"}});
    BOOST_TEST(r["ok"].get<bool>(), r.dump());
    BOOST_TEST(r["version"].get<std::string>() == "v0001");
    BOOST_TEST(reg.current().value() == "v0001");

    r = transport::control_call(ep, {{"t", "encoder_swap"}});
    BOOST_TEST(r["t"].get<std::string>() == "error");
    BOOST_TEST(r["code"].get<std::string>() == "bad_frame");
    r = transport::control_call(ep, {{"t", "reboot"}});
    BOOST_TEST(r["code"].get<std::string>() == "unknown_type");
    BOOST_CHECK_THROW(transport::control_call("tcp://127.0.0.1:1", {{"t", "status"}}, std::chrono::milliseconds(300)),
                      std::runtime_error);
  }
  caf::anon_send_exit(sup, caf::exit_reason::user_shutdown);
}

BOOST_AUTO_TEST_SUITE_END()
