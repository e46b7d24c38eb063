// Remote LLM workers (transport/worker_link.hpp) end to end: the engine with
// server.remote_workers = 2 (no LLM weights in the server) behind the real
// gateway, and `undertone worker` child processes (the real binary, real
// SmolLM2-135M) connected over loopback TCP. Checks: sessions spread over both
// workers and answered; garbage on the worker socket does not hurt the hub;
// `kill -9` of the worker holding an answer gives the client worker_lost +
// turn_end and its next turn is answered by the survivor; with no worker at all
// a turn fails with a clear error after the bounded wait (no hang), and a
// worker started later takes over.
#include <boost/test/unit_test.hpp>

#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <fstream>
#include <sstream>
#include <thread>
#include <unordered_map>

#include <msgpack.hpp>
#include <zmq.hpp>
#include <zmq_addon.hpp>

#include "actors/engine.hpp"
#include "client_support.hpp"
#include "support.hpp"
#include "transport/client.hpp"
#include "transport/gateway.hpp"
#include "transport/worker_link.hpp"

extern char** environ;

using namespace undertone;
using namespace std::chrono_literals;
using testing::answer;
using testing::has_error;
using testing::read_answer;

namespace {

/// An `undertone worker` child process; SIGTERM + wait on destruction.
struct worker_process {
  pid_t pid = -1;
  std::string name, log_path;

  worker_process(const std::string& endpoint, const std::string& name_, const std::string& log_dir)
      : name(name_), log_path(log_dir + "/" + name_ + ".log") {
    std::vector<std::string> args = {UT_UNDERTONE_BIN,
                                     "--set", "general.model_home=" + testing::model_home(),
                                     "--set", "general.threads=1",
                                     "--set", "llm.model=" + testing::llm_gguf_path(),
                                     "--set", "llm.context_tokens=1024",
                                     "--set", "llm.kv_cells=8192",
                                     "--set", "llm.max_slots=8",
                                     "--set", "server.worker_timeout_s=5",
                                     "worker", "--connect", endpoint, "--name", name};
    std::vector<char*> argv;
    for (auto& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_addopen(&fa, 1, log_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    posix_spawn_file_actions_adddup2(&fa, 1, 2);
    const int rc = posix_spawn(&pid, argv[0], &fa, nullptr, argv.data(), environ);
    posix_spawn_file_actions_destroy(&fa);
    if (rc != 0) throw std::runtime_error("cannot start " + std::string(UT_UNDERTONE_BIN));
  }
  ~worker_process() { stop(SIGTERM); }

  /// Sends `sig` and waits (bounded) for the exit; returns the wait status or -1.
  int stop(int sig) {
    if (pid <= 0) return -1;
    ::kill(pid, sig);
    int status = -1;
    for (int i = 0; i < 200; ++i) {
      if (::waitpid(pid, &status, WNOHANG) == pid) {
        pid = -1;
        return status;
      }
      std::this_thread::sleep_for(50ms);
    }
    ::kill(pid, SIGKILL);
    ::waitpid(pid, &status, 0);
    pid = -1;
    return -1;
  }
  std::string log() const {
    std::ifstream in(log_path);
    std::stringstream ss;
    ss << in.rdbuf();
    return ss.str();
  }
};

struct server {
  config::undertone_config cfg;
  testing::temp_dir dir;
  std::string endpoint, worker_endpoint;
  caf::actor hub;
  std::unique_ptr<actors::engine> eng;

  server() {
    cfg = testing::small_engine_config();
    cfg.sampling.max_tokens = 24;
    cfg.server.worker_bind = "tcp://127.0.0.1:*";
    cfg.server.remote_workers = 2;
    cfg.server.worker_wait_s = 0;  // serve at once: the workers start after the hub is bound
    cfg.server.max_frames_per_second = 100000;
    cfg.store.enabled = false;
    auto gw = transport::gateway_options::from(cfg.server);
    gw.default_settings = actors::session_settings_from(cfg);
    eng = std::make_unique<actors::engine>(
        cfg, [&, gw](caf::actor_system& sys, caf::actor sup) { return transport::spawn_gateway(sys, gw, sup, &endpoint); },
        [](const std::string& line) { BOOST_TEST_MESSAGE("server: " << line); },
        [&](caf::actor_system& sys, const actors::llm_identity& id) {
          auto o = transport::worker_hub_options::from(cfg.server);
          o.llm_version = id.version;
          o.chat_template = id.templ.name();
          o.d_model = id.d_model;
          o.open_wait = 3s;  // a session without any worker fails its turn after this
          o.log = [](const std::string& line) { BOOST_TEST_MESSAGE("hub: " << line); };
          hub = transport::spawn_worker_hub(sys, o, &worker_endpoint);
          return hub;
        });
  }
  ~server() { eng->shutdown(); }

  transport::worker_hub_stats stats() {
    caf::scoped_actor self{eng->system()};
    transport::worker_hub_stats s;
    s.queued = -1;
    self->request(hub, 5s, transport::hub_stats_atom::value)
        .receive([&](transport::worker_hub_stats& v) { s = std::move(v); }, [&](caf::error&) {});
    return s;
  }
  /// Waits (bounded) until `pred(stats())` holds.
  template <class Pred>
  bool wait_for(Pred pred, std::chrono::seconds limit) {
    const auto end = std::chrono::steady_clock::now() + limit;
    while (std::chrono::steady_clock::now() < end) {
      if (pred(stats())) return true;
      std::this_thread::sleep_for(100ms);
    }
    return pred(stats());
  }
};


bool contains(const std::vector<std::string>& v, const std::string& x) {
  return std::find(v.begin(), v.end(), x) != v.end();
}

/// A raw DEALER on the worker endpoint, for the garbage checks.
struct raw_peer {
  zmq::context_t ctx{1};
  zmq::socket_t s{ctx, zmq::socket_type::dealer};
  explicit raw_peer(const std::string& ep) {
    s.set(zmq::sockopt::linger, 0);
    s.connect(ep);
  }
  void send(const std::vector<std::string>& parts) {
    for (size_t i = 0; i < parts.size(); ++i)
      s.send(zmq::buffer(parts[i]), i + 1 < parts.size() ? zmq::send_flags::sndmore : zmq::send_flags::none);
  }
  /// True once a frame of type `type` arrived (within `t`).
  bool wait_for_type(const std::string& type, std::chrono::milliseconds t) {
    const auto end = std::chrono::steady_clock::now() + t;
    while (std::chrono::steady_clock::now() < end)
      if (contains(receive_types(100ms), type)) return true;
    return false;
  }
  /// Frame types received within `t`.
  std::vector<std::string> receive_types(std::chrono::milliseconds t) {
    std::vector<std::string> out;
    const auto end = std::chrono::steady_clock::now() + t;
    while (std::chrono::steady_clock::now() < end) {
      zmq::pollitem_t it{s.handle(), 0, ZMQ_POLLIN, 0};
      zmq::poll(&it, 1, 100ms);
      if (!(it.revents & ZMQ_POLLIN)) continue;
      std::vector<zmq::message_t> msgs;
      if (!zmq::recv_multipart(s, std::back_inserter(msgs))) continue;
      std::vector<std::string_view> v;
      for (auto& m : msgs) v.emplace_back(static_cast<const char*>(m.data()), m.size());
      try {
        out.push_back(transport::worker_type_name(transport::decode_worker(v)));
      } catch (const std::exception& e) {
        out.push_back(std::string("undecodable: ") + e.what());
      }
    }
    return out;
  }
};

}  // namespace

BOOST_AUTO_TEST_CASE(worker_frames_round_trip_and_reject_garbage) {
  actors::llm_append a{7, {}, {1.5f, -2.0f, 0.25f, 4.0f, 5.0f, 6.0f}, 2};
  auto parts = transport::encode_worker(a);
  BOOST_TEST(parts.size() == 2u);
  BOOST_TEST(parts[1].size() == 6 * sizeof(float));
  std::vector<std::string_view> v(parts.begin(), parts.end());
  auto back = std::get<actors::llm_append>(transport::decode_worker(v));
  BOOST_TEST(back.id == 7u);
  BOOST_TEST(back.n_rows == 2);
  BOOST_TEST(back.rows == a.rows);

  actors::llm_generate g;
  g.id = 3;
  g.turn = 5;
  g.sampling.temperature = 0.7;
  g.sampling.top_k = 11;
  g.sampling.seed = 1234567890123ull;
  g.sampling.max_tokens = 99;
  g.stop_strings = {"\nUser:", "###"};
  parts = transport::encode_worker(g);
  v.assign(parts.begin(), parts.end());
  auto g2 = std::get<actors::llm_generate>(transport::decode_worker(v));
  BOOST_TEST(g2.turn == 5);
  BOOST_TEST(g2.sampling.temperature == 0.7);
  BOOST_TEST(g2.sampling.top_k == 11);
  BOOST_TEST(g2.sampling.seed == 1234567890123ull);
  BOOST_TEST(g2.sampling.max_tokens == 99);
  BOOST_TEST(g2.stop_strings == g.stop_strings, boost::test_tools::per_element());

  actors::llm_done d{9, 2, "Paris.", "stop_token", 3, 120, 12.5, 40.0, "m|1"};
  parts = transport::encode_worker(d);
  v.assign(parts.begin(), parts.end());
  auto d2 = std::get<actors::llm_done>(transport::decode_worker(v));
  BOOST_TEST(d2.text == "Paris.");
  BOOST_TEST(d2.context_rows == 120);
  BOOST_TEST(d2.llm_version == "m|1");

  transport::worker_hello h{transport::worker_protocol_version, "w", "m|1", "chatml", 576, 8, ""};
  parts = transport::encode_worker(h);
  v.assign(parts.begin(), parts.end());
  auto h2 = std::get<transport::worker_hello>(transport::decode_worker(v));
  BOOST_TEST(h2.max_slots == 8);
  BOOST_TEST(h2.d_model == 576);
  BOOST_TEST(h2.token.empty());  // optional key, absent
  h.token = "w0rker-secret";
  parts = transport::encode_worker(h);
  v.assign(parts.begin(), parts.end());
  BOOST_TEST(std::get<transport::worker_hello>(transport::decode_worker(v)).token == "w0rker-secret");

  using transport::protocol_error;
  auto rejects = [](std::vector<std::string> p, transport::error_code want) {
    std::vector<std::string_view> pv(p.begin(), p.end());
    try {
      transport::decode_worker(pv);
    } catch (const protocol_error& e) {
      BOOST_TEST_MESSAGE("rejected: " << e.what());
      return e.code == want;
    }
    return false;
  };
  BOOST_TEST(rejects({"\xff\x00garbage"}, transport::error_code::bad_frame));
  BOOST_TEST(rejects({""}, transport::error_code::bad_frame));
  BOOST_TEST(rejects({}, transport::error_code::bad_frame));
  // Rows that are not n_rows x whole floats, rows without a part, a part too many.
  auto bad_rows = transport::encode_worker(a);
  bad_rows[1].pop_back();
  BOOST_TEST(rejects(bad_rows, transport::error_code::bad_frame));
  BOOST_TEST(rejects({transport::encode_worker(a)[0]}, transport::error_code::bad_frame));
  auto extra = transport::encode_worker(d);
  extra.push_back("x");
  BOOST_TEST(rejects(extra, transport::error_code::bad_frame));
  // Version and type.
  msgpack::sbuffer b;
  msgpack::packer<msgpack::sbuffer> pk(b);
  pk.pack_map(2);
  pk.pack("v");
  pk.pack(99);
  pk.pack("t");
  pk.pack("heartbeat");
  BOOST_TEST(rejects({std::string(b.data(), b.size())}, transport::error_code::unsupported_version));
  b.clear();
  pk.pack_map(2);
  pk.pack("v");
  pk.pack(transport::worker_protocol_version);
  pk.pack("t");
  pk.pack("launch_missiles");
  BOOST_TEST(rejects({std::string(b.data(), b.size())}, transport::error_code::unknown_type));
  // A known type with a mistyped key.
  b.clear();
  pk.pack_map(4);
  pk.pack("v");
  pk.pack(transport::worker_protocol_version);
  pk.pack("t");
  pk.pack("llm_delta");
  pk.pack("id");
  pk.pack("seven");
  pk.pack("turn");
  pk.pack(1);
  BOOST_TEST(rejects({std::string(b.data(), b.size())}, transport::error_code::bad_frame));
}

namespace {

struct sys_config : caf::actor_system_config {
  sys_config() { actors::register_message_types(*this); }
};

/// Stands in for actors/llm_worker (orchestration only): answers a generate
/// with one delta and "echo:<appended text>" as the whole answer, context_rows
/// = the speech rows appended.
struct fake_llm_state {
  std::unordered_map<actors::session_id, caf::actor> sessions;
  std::unordered_map<actors::session_id, std::string> text;
  std::unordered_map<actors::session_id, int64_t> rows;
};
caf::behavior fake_llm(caf::stateful_actor<fake_llm_state>* self) {
  return {
      [=](actors::llm_open& m) {
        self->state.sessions[m.id] = m.session;
        self->state.text[m.id].clear();
        self->state.rows[m.id] = 0;
      },
      [=](actors::llm_append& m) {
        self->state.text[m.id] += m.text;
        self->state.rows[m.id] += m.n_rows;
      },
      [=](actors::llm_generate& m) {
        auto& st = self->state;
        auto s = st.sessions[m.id];
        self->send(s, actors::llm_delta{m.id, m.turn, "echo:"});
        self->send(s, actors::llm_done{m.id, m.turn, "echo:" + st.text[m.id], "stop_token", 1, st.rows[m.id], 0, 0,
                                       "fake|1"});
      },
      [=](actors::llm_close& m) { self->state.sessions.erase(m.id); },
      [=](actors::llm_cancel&) {}, [=](actors::llm_truncate&) {}, [=](actors::llm_mark&) {},
      [=](actors::llm_rewind&) {},
  };
}

transport::worker_hub_options fake_hub_options(const std::string& bind) {
  transport::worker_hub_options o;
  o.bind = bind;
  o.llm_version = "fake|1";
  o.chat_template = "chatml";
  o.d_model = 4;
  o.heartbeat = 100ms;
  o.timeout = 1000ms;
  o.open_wait = 2s;
  o.log = [](const std::string& line) { BOOST_TEST_MESSAGE("hub: " << line); };
  return o;
}

transport::worker_link_options fake_link_options(const std::string& endpoint, const std::string& name) {
  transport::worker_link_options o;
  o.connect = endpoint;
  o.hello = {transport::worker_protocol_version, name, "fake|1", "chatml", 4, 2, ""};
  o.heartbeat = 100ms;
  o.timeout = 1000ms;
  o.backoff_min = 50ms;
  o.backoff_max = 400ms;
  o.log = [name](const std::string& line) { BOOST_TEST_MESSAGE(name << ": " << line); };
  return o;
}

transport::worker_hub_stats hub_stats(caf::actor_system& sys, const caf::actor& hub) {
  caf::scoped_actor self{sys};
  transport::worker_hub_stats s;
  s.queued = -1;
  self->request(hub, 5s, transport::hub_stats_atom::value)
      .receive([&](transport::worker_hub_stats& v) { s = std::move(v); }, [&](caf::error&) {});
  return s;
}

template <class Pred>
bool eventually(Pred pred, std::chrono::milliseconds limit) {
  const auto end = std::chrono::steady_clock::now() + limit;
  while (std::chrono::steady_clock::now() < end) {
    if (pred()) return true;
    std::this_thread::sleep_for(20ms);
  }
  return pred();
}

/// One turn through the hub as a session would: open, append text and rows, generate.
actors::llm_done one_turn(caf::scoped_actor& self, const caf::actor& hub, actors::session_id id, int64_t turn) {
  self->send(hub, actors::llm_open{id, caf::actor_cast<caf::actor>(self)});
  self->send(hub, actors::llm_append{id, "hi", {}, 0});
  self->send(hub, actors::llm_append{id, {}, std::vector<float>(8, 0.5f), 2});
  self->send(hub, actors::llm_generate{id, turn, {}, {}});
  actors::llm_done done;
  done.turn = -99;
  bool more = true;
  while (more)
    self->receive([&](actors::llm_delta&) {}, [&](actors::llm_done& d) { done = d, more = false; },
                  [&](actors::llm_failed& f) {
                    BOOST_TEST_MESSAGE("llm_failed: " << f.message);
                    more = false;
                  },
                  caf::after(5s) >> [&] { more = false; });
  return done;
}

}  // namespace

BOOST_AUTO_TEST_CASE(worker_link_round_trip_reconnect_queue_and_timeouts) {
  sys_config cfg;
  caf::actor_system sys{cfg};
  auto fake = sys.spawn(fake_llm);
  std::string ep;
  auto hub = transport::spawn_worker_hub(sys, fake_hub_options("tcp://127.0.0.1:*"), &ep);
  caf::scoped_actor self{sys};
  {
    auto link = std::make_unique<transport::worker_link>(sys, fake, fake_link_options(ep, "link-a"));
    BOOST_REQUIRE(eventually([&] { return link->welcomed() && hub_stats(sys, hub).workers.size() == 1; }, 10s));

    // ---- messages cross the wire both ways (speech rows included)
    auto d = one_turn(self, hub, 1, 3);
    BOOST_TEST(d.turn == 3);
    BOOST_TEST(d.text == "echo:hi");
    BOOST_TEST(d.context_rows == 2);
    BOOST_TEST(link->sessions() == 1);

    // ---- the server restarts on the same endpoint: the link says hello to the new one
    caf::anon_send_exit(hub, caf::exit_reason::user_shutdown);
    hub = nullptr;
    BOOST_TEST(eventually([&] { return !link->welcomed(); }, 5s));  // it said bye
    for (int i = 0; i < 100 && !hub; ++i) {
      try {
        hub = transport::spawn_worker_hub(sys, fake_hub_options(ep), nullptr);
      } catch (const std::exception&) {
        std::this_thread::sleep_for(100ms);  // the old socket is still closing
      }
    }
    BOOST_REQUIRE(hub);
    BOOST_TEST(eventually([&] { return link->welcomed() && hub_stats(sys, hub).workers.size() == 1; }, 10s));
    BOOST_TEST(link->sessions() == 0);  // the old server's sessions were dropped
    d = one_turn(self, hub, 1, 4);
    BOOST_TEST(d.text == "echo:hi");
    link->stop();  // bye: the hub notices at once
    BOOST_TEST(eventually([&] { return hub_stats(sys, hub).workers.empty(); }, 5s));
    // The session on it was told to re-open.
    bool restarted = false;
    self->receive([&](actors::component_restarted& m) { restarted = m.which == "llm" && m.actor == hub; },
                  caf::after(5s) >> [] {});
    BOOST_TEST(restarted);
  }

  // ---- no worker: an open waits (bounded), then fails; a generate of that session fails at once
  {
    self->send(hub, actors::llm_open{2, caf::actor_cast<caf::actor>(self)});
    self->send(hub, actors::llm_generate{2, 7, {}, {}});
    std::vector<int64_t> failed_turns;
    for (int i = 0; i < 2; ++i)
      self->receive([&](actors::llm_failed& f) {
                      BOOST_TEST((f.code == actors::error_code::worker_lost));
                      failed_turns.push_back(f.turn);
                    },
                    caf::after(10s) >> [] {});
    BOOST_TEST(failed_turns == (std::vector<int64_t>{-1, 7}), boost::test_tools::per_element());
    self->send(hub, actors::llm_generate{2, 8, {}, {}});
    bool failed_now = false;
    self->receive([&](actors::llm_failed& f) { failed_now = f.turn == 8; }, caf::after(5s) >> [] {});
    BOOST_TEST(failed_now);
  }

  // ---- an open queued while no worker is there is served when one connects
  {
    self->send(hub, actors::llm_open{3, caf::actor_cast<caf::actor>(self)});
    self->send(hub, actors::llm_append{3, "queued", {}, 0});
    self->send(hub, actors::llm_generate{3, 1, {}, {}});
    BOOST_TEST(hub_stats(sys, hub).queued == 1);
    transport::worker_link link(sys, fake, fake_link_options(ep, "link-b"));
    actors::llm_done d;
    self->receive([&](actors::llm_delta&) {}, caf::after(10s) >> [] {});
    self->receive([&](actors::llm_done& m) { d = m; }, caf::after(10s) >> [] {});
    BOOST_TEST(d.text == "echo:queued");
    self->send(hub, actors::llm_close{3});
    link.stop();
    BOOST_TEST(eventually([&] { return hub_stats(sys, hub).workers.empty(); }, 5s));
  }

  // ---- a welcomed worker that sends garbage stays; one that falls silent is dropped
  {
    auto ho = fake_hub_options("tcp://127.0.0.1:*");
    ho.timeout = 3s;  // room for a loaded machine between the checks below
    std::string ep2;
    auto hub2 = transport::spawn_worker_hub(sys, ho, &ep2);
    raw_peer p(ep2);
    p.send(transport::encode_worker(transport::worker_hello{transport::worker_protocol_version, "raw", "fake|1",
                                                              "chatml", 4, 1, ""}));
    BOOST_TEST(p.wait_for_type("welcome", 5s));
    const auto before = hub_stats(sys, hub2);
    BOOST_TEST(before.workers.size() == 1u);
    p.send({"\x93garbage"});
    p.send(transport::encode_worker(actors::llm_open{5, {}}));  // a server-to-worker frame
    p.send(transport::encode_worker(actors::llm_done{424242, 0, "for nobody", "stop_token", 1, 1, 0, 0, "x"}));
    BOOST_TEST(eventually([&] { return hub_stats(sys, hub2).bad_frames >= before.bad_frames + 2; }, 5s));
    BOOST_TEST(hub_stats(sys, hub2).workers.size() == 1u);
    // No heartbeats from it: dead after the timeout although still connected.
    BOOST_TEST(eventually([&] { return hub_stats(sys, hub2).workers.empty(); }, 10s));
    BOOST_TEST(hub_stats(sys, hub2).lost == before.lost + 1);
    caf::anon_send_exit(hub2, caf::exit_reason::user_shutdown);
  }

  // ---- the worker side: a server that falls silent is left, and hello goes to the next connection
  {
    zmq::context_t ctx{1};
    zmq::socket_t router{ctx, zmq::socket_type::router};
    router.set(zmq::sockopt::linger, 0);
    router.bind("tcp://127.0.0.1:*");
    const std::string rep = router.get(zmq::sockopt::last_endpoint);
    transport::worker_link link(sys, fake, fake_link_options(rep, "link-c"));
    std::vector<std::string> hello_ids;
    const auto end = std::chrono::steady_clock::now() + 10s;
    while (hello_ids.size() < 2 && std::chrono::steady_clock::now() < end) {
      zmq::pollitem_t it{router.handle(), 0, ZMQ_POLLIN, 0};
      zmq::poll(&it, 1, 100ms);
      if (!(it.revents & ZMQ_POLLIN)) continue;
      std::vector<zmq::message_t> msgs;
      if (!zmq::recv_multipart(router, std::back_inserter(msgs)) || msgs.size() < 2) continue;
      std::vector<std::string_view> v;
      for (size_t k = 1; k < msgs.size(); ++k) v.emplace_back(static_cast<const char*>(msgs[k].data()), msgs[k].size());
      if (!std::holds_alternative<transport::worker_hello>(transport::decode_worker(v))) continue;
      hello_ids.push_back(msgs[0].to_string());
      if (hello_ids.size() == 1) {  // welcome it once, then say nothing more
        auto w = transport::encode_worker(transport::worker_welcome{"raw"});
        router.send(zmq::buffer(hello_ids[0]), zmq::send_flags::sndmore);
        router.send(zmq::buffer(w[0]));
      }
    }
    BOOST_REQUIRE(hello_ids.size() == 2u);
    BOOST_TEST(hello_ids[0] != hello_ids[1]);  // a fresh connection
    BOOST_TEST(link.failure().empty());
  }

  // ---- a refused worker gives up with the server's reason
  {
    auto o = fake_link_options(ep, "link-d");
    o.hello.llm_version = "other|2";
    transport::worker_link link(sys, fake, o);
    BOOST_TEST(eventually([&] { return !link.failure().empty(); }, 10s));
    BOOST_TEST(link.failure().find("other|2") != std::string::npos);
  }
  caf::anon_send_exit(hub, caf::exit_reason::user_shutdown);
  caf::anon_send_exit(fake, caf::exit_reason::user_shutdown);
}

BOOST_AUTO_TEST_CASE(worker_auth_token_admits_only_the_right_one) {
  sys_config cfg;
  caf::actor_system sys{cfg};
  auto fake = sys.spawn(fake_llm);
  auto ho = fake_hub_options("tcp://127.0.0.1:*");
  ho.auth_token = "w0rker-secret";
  ho.open_wait = 60s;  // the queued open below must outlast a loaded machine
  std::string ep;
  auto hub = transport::spawn_worker_hub(sys, ho, &ep);
  caf::scoped_actor self{sys};
  int n = 0;
  for (const std::string token : {"", "w0rker-secreT", "w0rker-secret-and-more"}) {
    auto o = fake_link_options(ep, "intruder-" + std::to_string(++n));
    o.hello.token = token;
    transport::worker_link link(sys, fake, o);
    BOOST_TEST(eventually([&] { return !link.failure().empty(); }, 10s));
    BOOST_TEST(link.failure().find("unauthorized") != std::string::npos, link.failure());
    // Refused before the LLM is compared: the refusal does not name the server's model.
    BOOST_TEST(link.failure().find("fake|1") == std::string::npos, link.failure());
    BOOST_TEST(!link.welcomed());
  }
  auto st = hub_stats(sys, hub);
  BOOST_TEST(st.workers.empty());
  BOOST_TEST(st.joined == 0);
  BOOST_TEST(st.refused == 3);
  // A session opened now waits for a worker (none was admitted) ...
  self->send(hub, actors::llm_open{1, caf::actor_cast<caf::actor>(self)});
  BOOST_TEST(hub_stats(sys, hub).queued == 1);
  // ... and the worker with the right token takes it.
  auto o = fake_link_options(ep, "friend");
  o.hello.token = "w0rker-secret";
  transport::worker_link link(sys, fake, o);
  BOOST_REQUIRE(eventually([&] { return link.welcomed() && hub_stats(sys, hub).workers.size() == 1; }, 10s));
  auto d = one_turn(self, hub, 1, 0);
  BOOST_TEST(d.text == "echo:hi");
  BOOST_TEST(link.failure().empty());
  link.stop();
  caf::anon_send_exit(hub, caf::exit_reason::user_shutdown);
  caf::anon_send_exit(fake, caf::exit_reason::user_shutdown);
}

BOOST_AUTO_TEST_CASE(remote_workers_balance_survive_garbage_and_a_killed_worker) {
  server srv;
  BOOST_TEST_MESSAGE("clients " << srv.endpoint << ", workers " << srv.worker_endpoint << "; " << srv.eng->models());
  auto w_a = std::make_unique<worker_process>(srv.worker_endpoint, "worker-a", srv.dir.str());
  auto w_b = std::make_unique<worker_process>(srv.worker_endpoint, "worker-b", srv.dir.str());
  const bool both = srv.wait_for([](const auto& s) { return s.workers.size() == 2; }, 120s);
  BOOST_REQUIRE_MESSAGE(both, "two workers did not connect; worker-a log:\n" << w_a->log() << "\nworker-b log:\n"
                                                                          << w_b->log());

  // ---- 4 clients, text turns at once: all answered, spread over both workers
  {
    const char* questions[] = {"What is the capital of France?", "Name a fruit.", "What color is the sky?",
                               "Say hello."};
    std::vector<answer> answers(4);
    std::vector<std::thread> th;
    std::atomic<int> failures{0};
    std::vector<std::unique_ptr<transport::client>> clients;
    for (int i = 0; i < 4; ++i) clients.push_back(std::make_unique<transport::client>());
    for (int i = 0; i < 4; ++i) {
      th.emplace_back([&, i] {
        try {
          clients[size_t(i)]->connect(srv.endpoint, "client-" + std::to_string(i), 30s);
          clients[size_t(i)]->send_text(questions[i]);
          answers[size_t(i)] = read_answer(*clients[size_t(i)]);
        } catch (const std::exception& e) {
          BOOST_TEST_MESSAGE("client " << i << ": " << e.what());
          ++failures;
        }
      });
    }
    for (auto& t : th) t.join();
    BOOST_TEST(failures.load() == 0);
    for (size_t i = 0; i < 4; ++i) {
      BOOST_TEST_CONTEXT("client " << i) {
        for (auto& e : answers[i].errors) BOOST_TEST_MESSAGE("client " << i << " error: " << e.message);
        BOOST_TEST(answers[i].ended);
        BOOST_TEST(answers[i].end.stop_reason != "error");
        BOOST_TEST(!answers[i].end.text.empty());
        BOOST_TEST(answers[i].deltas == answers[i].end.text);
        BOOST_TEST(answers[i].end.llm_version.find("SmolLM2") != std::string::npos);
        BOOST_TEST_MESSAGE("client " << i << ": \"" << answers[i].end.text << "\"");
      }
    }
    const auto s = srv.stats();
    BOOST_REQUIRE(s.workers.size() == 2u);
    int64_t sessions = 0;
    for (auto& w : s.workers) {
      BOOST_TEST_MESSAGE(w.name << ": " << w.sessions << " sessions now, " << w.opened << " opened");
      BOOST_TEST(w.opened >= 1);  // both workers got sessions
      sessions += w.sessions;
    }
    BOOST_TEST(sessions == 4);
    BOOST_TEST(s.workers[0].sessions == 2);  // the least loaded worker gets the next session
    for (auto& c : clients) c->bye();
    BOOST_TEST(srv.wait_for(
        [](const auto& st) { return st.workers.size() == 2 && st.workers[0].sessions + st.workers[1].sessions == 0; },
        30s));
  }

  // ---- garbage on the worker socket: logged and dropped; strangers are told off
  {
    raw_peer p(srv.worker_endpoint);
    p.send({"\xff\x00 not msgpack"});
    p.send({"", ""});
    p.send({transport::encode_worker(actors::llm_delta{1, 0, "stray"})[0], "extra part"});
    p.send(transport::encode_worker(actors::llm_delta{12345, 0, "from nowhere"}));  // -> reset
    transport::worker_hello wrong{transport::worker_protocol_version, "impostor", "another-model.gguf|1", "chatml",
                                  576, 4, ""};
    p.send(transport::encode_worker(wrong));  // -> refused
    const auto got = p.receive_types(3s);
    for (auto& t : got) BOOST_TEST_MESSAGE("stranger got: " << t);
    BOOST_TEST(contains(got, "reset"));
    BOOST_TEST(contains(got, "refused"));
    const auto s = srv.stats();
    BOOST_TEST(s.workers.size() == 2u);  // the hub lives, the impostor was not admitted
    BOOST_TEST(s.refused == 1);
    BOOST_TEST(s.bad_frames >= 2);
    transport::client c;
    c.connect(srv.endpoint, "after-garbage", 30s);
    c.send_text("Name a color.");
    auto a = read_answer(c);
    BOOST_TEST(a.ended);
    BOOST_TEST(!a.end.text.empty());
    c.bye();
  }

  // ---- kill -9 the worker that is answering: worker_lost + turn_end, then the survivor answers
  {
    BOOST_TEST(srv.wait_for(
        [](const auto& st) { return st.workers.size() == 2 && st.workers[0].sessions + st.workers[1].sessions == 0; },
        30s));
    transport::client c;
    c.connect(srv.endpoint, "storyteller", 30s);
    transport::config_msg cm;
    cm.max_tokens = 400;
    c.send_config(cm);
    c.send_text("Tell me a long story about a dragon who lives in a mountain.");
    bool got_delta = false;
    while (auto m = c.receive(60s))
      if (std::holds_alternative<transport::delta_msg>(*m)) {
        got_delta = true;
        break;
      }
    BOOST_REQUIRE(got_delta);
    const auto s = srv.stats();
    BOOST_REQUIRE(s.workers.size() == 2u);
    const bool on_a = s.workers[0].name == "worker-a" ? s.workers[0].sessions == 1 : s.workers[1].sessions == 1;
    auto& victim = on_a ? w_a : w_b;
    BOOST_TEST_MESSAGE("killing " << victim->name << " (pid " << victim->pid << ") mid-answer");
    victim->stop(SIGKILL);
    auto lost = read_answer(c, 30s);
    BOOST_TEST(lost.ended);  // promptly: not the 120 s answer timeout
    BOOST_TEST(has_error(lost, transport::error_code::worker_lost));
    if (lost.ended) BOOST_TEST(lost.end.stop_reason == "error");
    BOOST_TEST(srv.wait_for([](const auto& st) { return st.workers.size() == 1 && st.lost == 1; }, 15s));
    c.send_text("Say hello.");
    auto a = read_answer(c);
    BOOST_TEST(a.ended);
    BOOST_TEST(a.end.stop_reason != "error");
    BOOST_TEST(!a.end.text.empty());
    BOOST_TEST(a.deltas == a.end.text);
    BOOST_TEST_MESSAGE("after the kill: \"" << a.end.text << "\"");
    const auto after = srv.stats();
    BOOST_REQUIRE(after.workers.size() == 1u);
    BOOST_TEST(after.workers[0].name != victim->name);
    BOOST_TEST(after.workers[0].sessions == 1);

    // ---- no worker at all: the turn fails after the bounded wait (no hang); a new worker takes over
    auto& survivor = on_a ? w_b : w_a;
    const int st = survivor->stop(SIGTERM);  // says bye: noticed at once
    BOOST_TEST((st != -1 && WIFEXITED(st) && WEXITSTATUS(st) == 0));
    BOOST_TEST(srv.wait_for([](const auto& s2) { return s2.workers.empty(); }, 10s));
    c.send_text("Are you there?");
    auto none = read_answer(c, 60s);
    BOOST_TEST(none.ended);
    BOOST_TEST(has_error(none, transport::error_code::worker_lost));
    for (auto& e : none.errors) BOOST_TEST_MESSAGE("without workers: " << e.message);
    auto w_c = std::make_unique<worker_process>(srv.worker_endpoint, "worker-c", srv.dir.str());
    BOOST_TEST(srv.wait_for([](const auto& s2) { return s2.workers.size() == 1; }, 120s));
    c.send_text("Say hello again.");
    a = read_answer(c);
    BOOST_TEST(a.ended);
    BOOST_TEST(a.end.stop_reason != "error");
    BOOST_TEST(!a.end.text.empty());
    BOOST_TEST_MESSAGE("on worker-c: \"" << a.end.text << "\"");
    c.bye();
  }
}
