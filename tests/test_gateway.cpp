// The gateway (transport/gateway.hpp) between real ZeroMQ sockets and CAF,
// driven by the real client library (transport/client.hpp) against a fake
// supervisor and fake sessions written here: each session answers an end_turn
// with a delta + turn_end saying how many audio chunks it got, and a text
// turn with a delta echoing the text.
#include <boost/test/unit_test.hpp>

#include <atomic>
#include <thread>

#include <caf/all.hpp>
#include <zmq.hpp>
#include <zmq_addon.hpp>

#include "actors/messages.hpp"
#include "transport/client.hpp"
#include "transport/gateway.hpp"

using namespace undertone;
using namespace std::chrono_literals;
using transport::client;
using transport::server_message;
using actors::error_code;

namespace {

/// What the fake sessions saw (written by actor threads, read by the test).
struct probe {
  std::atomic<int> opened{0};
  std::atomic<int> gone{0};
  std::atomic<int> audio_chunks{0};
  std::atomic<int> configs{0};
};

caf::behavior fake_session(caf::event_based_actor* self, caf::actor gw, std::string identity, actors::session_id id,
                           std::shared_ptr<probe> pr) {
  auto chunks = std::make_shared<int>(0);
  auto turn = std::make_shared<int64_t>(0);
  auto answer = [=](const std::string& text) {
    self->send(gw, actors::to_client_delta{identity, *turn, text});
    actors::to_client_turn_end e;
    e.client_identity = identity;
    e.turn = *turn;
    e.text = text;
    e.stop_reason = "stop_token";
    e.timings.answer_tokens = 3;
    e.llm_version = "fake-llm";
    self->send(gw, e);
    ++*turn;
  };
  return {
      [=](actors::client_audio& a) {
        ++*chunks;
        pr->audio_chunks++;
        (void)a;
      },
      [=](const actors::client_end_turn&) {
        answer("session " + std::to_string(id) + " heard " + std::to_string(*chunks) + " chunks");
        *chunks = 0;
      },
      [=](actors::client_text_turn& t) { answer("session " + std::to_string(id) + ": " + t.text); },
      [=](actors::client_config& c) {
        pr->configs++;
        self->send(gw, actors::to_client_event{identity, *turn, "config", c.settings.system_prompt,
                                               c.settings.sampling.temperature});
      },
      [=](const actors::client_cancel&) {},
      [=](actors::client_annotation&) {},
      [=](const actors::client_gone&) {
        pr->gone++;
        self->send(gw, actors::session_closed{identity, id});
        self->quit();
      },
  };
}

/// Opens sessions up to `limit`, then answers server_full like the real supervisor.
caf::behavior fake_supervisor(caf::event_based_actor* self, int limit, std::shared_ptr<probe> pr) {
  auto next_id = std::make_shared<actors::session_id>(1);
  return {
      [=](actors::open_session& o) {
        auto gw = caf::actor_cast<caf::actor>(self->current_sender());
        if (pr->opened.load() - pr->gone.load() >= limit) {
          self->send(gw, actors::to_client_error{o.client_identity, error_code::server_full, "fake engine is full", true});
          return;
        }
        pr->opened++;
        const auto id = (*next_id)++;
        auto s = self->spawn<caf::linked>(fake_session, gw, o.client_identity, id, pr);
        self->send(gw, actors::session_opened{o.client_identity, id, s, "llm=fake; encoder=fake"});
      },
  };
}

struct gateway_fixture {
  caf::actor_system_config cfg;
  std::unique_ptr<caf::actor_system> sys;
  std::shared_ptr<probe> pr = std::make_shared<probe>();
  caf::actor sup, gw;
  std::string endpoint;

  explicit gateway_fixture(transport::gateway_options o = {}, int supervisor_limit = 1000) {
    actors::register_message_types(cfg);
    cfg.set("scheduler.max-threads", 2);
    sys = std::make_unique<caf::actor_system>(cfg);
    sup = sys->spawn(fake_supervisor, supervisor_limit, pr);
    o.bind = "tcp://127.0.0.1:*";
    gw = transport::spawn_gateway(*sys, o, sup, &endpoint);
  }
  ~gateway_fixture() {
    caf::anon_send_exit(gw, caf::exit_reason::user_shutdown);
    caf::anon_send_exit(sup, caf::exit_reason::user_shutdown);
    gw = nullptr;
    sup = nullptr;
    sys.reset();
  }
};

template <class Pred>
bool wait_for(Pred p, std::chrono::milliseconds timeout = 3000ms) {
  const auto end = std::chrono::steady_clock::now() + timeout;
  while (std::chrono::steady_clock::now() < end) {
    if (p()) return true;
    std::this_thread::sleep_for(5ms);
  }
  return p();
}

/// Frames until (and including) the next turn_end; fails the test on timeout.
std::vector<server_message> until_turn_end(client& c, std::chrono::milliseconds timeout = 3000ms) {
  std::vector<server_message> out;
  const auto end = std::chrono::steady_clock::now() + timeout;
  while (std::chrono::steady_clock::now() < end) {
    auto m = c.receive(50ms);
    if (!m) continue;
    out.push_back(*m);
    if (std::holds_alternative<transport::turn_end_msg>(*m)) return out;
  }
  BOOST_FAIL("no turn_end within the timeout");
  return out;
}

std::vector<error_code> errors_in(const std::vector<server_message>& ms) {
  std::vector<error_code> out;
  for (const auto& m : ms)
    if (auto* e = std::get_if<transport::error_msg>(&m)) out.push_back(e->code);
  return out;
}

std::string delta_text(const std::vector<server_message>& ms) {
  std::string s;
  for (const auto& m : ms)
    if (auto* d = std::get_if<transport::delta_msg>(&m)) s += d->text;
  return s;
}

/// Next error frame (skipping others) or none on timeout.
std::optional<transport::error_msg> next_error(client& c, std::chrono::milliseconds timeout = 2000ms) {
  const auto end = std::chrono::steady_clock::now() + timeout;
  while (std::chrono::steady_clock::now() < end) {
    auto m = c.receive(20ms);
    if (m)
      if (auto* e = std::get_if<transport::error_msg>(&*m)) return *e;
  }
  return std::nullopt;
}

const std::vector<int16_t> chunk(320, 100);  // 20 ms at 16 kHz

}  // namespace

BOOST_AUTO_TEST_CASE(hello_welcome_audio_and_answer) {
  gateway_fixture f;
  client c;
  auto w = c.connect(f.endpoint, "tester", 3000ms);
  BOOST_TEST(w.session == 1u);
  BOOST_TEST(w.models == "llm=fake; encoder=fake");
  for (int i = 0; i < 3; ++i) c.send_audio(chunk.data(), chunk.size(), 16000, 1);
  c.end_turn();
  auto ms = until_turn_end(c);
  BOOST_TEST(delta_text(ms) == "session 1 heard 3 chunks");
  BOOST_TEST(errors_in(ms).empty());
  const auto& te = std::get<transport::turn_end_msg>(ms.back());
  BOOST_TEST(te.stop_reason == "stop_token");
  BOOST_TEST(te.llm_version == "fake-llm");
  BOOST_TEST(te.timings.answer_tokens == 3);
  // A config patch reaches the session as full settings.
  transport::config_msg cm;
  cm.temperature = 0.25;
  cm.system_prompt = "be kind";
  c.send_config(cm);
  auto m = c.receive(2000ms);
  BOOST_REQUIRE(m);
  auto* ev = std::get_if<transport::event_msg>(&*m);
  BOOST_REQUIRE(ev);
  BOOST_TEST(ev->name == "config");
  BOOST_TEST(ev->label == "be kind");
  BOOST_TEST(ev->value == 0.25);
  // An out-of-range setting is refused and the session keeps its settings.
  transport::config_msg bad;
  bad.top_p = 2.0;
  c.send_config(bad);
  auto e = next_error(c);
  BOOST_REQUIRE(e);
  BOOST_TEST((e->code == error_code::bad_config));
  BOOST_TEST(f.pr->configs.load() == 1);
}

BOOST_AUTO_TEST_CASE(garbage_frame_gets_an_error_and_the_session_survives) {
  gateway_fixture f;
  client c;
  c.connect(f.endpoint, "tester", 3000ms);
  c.send_raw({"\xc1 this is not msgpack"});
  auto e = next_error(c);
  BOOST_REQUIRE(e);
  BOOST_TEST((e->code == error_code::bad_frame));
  BOOST_TEST(!e->fatal);
  c.send_raw({transport::encode(transport::client_message{transport::text_msg{"x"}})[0], "extra part"});
  e = next_error(c);
  BOOST_REQUIRE(e);
  BOOST_TEST((e->code == error_code::bad_frame));
  c.send_text("still there?");
  auto ms = until_turn_end(c);
  BOOST_TEST(delta_text(ms) == "session 1: still there?");
}

BOOST_AUTO_TEST_CASE(frames_before_hello_get_no_session) {
  gateway_fixture f;
  zmq::context_t ctx;
  zmq::socket_t s(ctx, zmq::socket_type::dealer);
  s.set(zmq::sockopt::linger, 0);
  s.connect(f.endpoint);
  for (const auto& p : transport::encode(transport::client_message{transport::text_msg{"hi"}}))
    s.send(zmq::buffer(p), zmq::send_flags::none);
  zmq::pollitem_t item{s.handle(), 0, ZMQ_POLLIN, 0};
  BOOST_REQUIRE(zmq::poll(&item, 1, 3000ms) == 1);
  std::vector<zmq::message_t> msgs;
  BOOST_REQUIRE(zmq::recv_multipart(s, std::back_inserter(msgs)));
  std::vector<std::string_view> parts;
  for (auto& m : msgs) parts.emplace_back(static_cast<const char*>(m.data()), m.size());
  auto reply = transport::decode_server(parts);
  auto* e = std::get_if<transport::error_msg>(&reply);
  BOOST_REQUIRE(e);
  BOOST_TEST((e->code == error_code::no_session));
  BOOST_TEST(f.pr->opened.load() == 0);
}

BOOST_AUTO_TEST_CASE(out_of_order_audio_is_dropped_and_the_session_survives) {
  gateway_fixture f;
  client c;
  c.connect(f.endpoint, "tester", 3000ms);
  c.send_audio(chunk.data(), chunk.size(), 16000, 1);  // seq 0
  // seq 0 again (a repeat), then seq 5 (a gap): both dropped.
  c.send_raw(transport::encode(transport::client_message{transport::make_audio(0, chunk.data(), chunk.size(), 16000, 1)}));
  auto e = next_error(c);
  BOOST_REQUIRE(e);
  BOOST_TEST((e->code == error_code::out_of_order));
  c.send_raw(transport::encode(transport::client_message{transport::make_audio(5, chunk.data(), chunk.size(), 16000, 1)}));
  e = next_error(c);
  BOOST_REQUIRE(e);
  BOOST_TEST((e->code == error_code::out_of_order));
  BOOST_TEST(!e->fatal);
  // The gateway resynchronised on 6; a chunk with seq 6 is accepted.
  c.send_raw(transport::encode(transport::client_message{transport::make_audio(6, chunk.data(), chunk.size(), 16000, 1)}));
  c.send_raw(transport::encode(transport::client_message{transport::end_turn_msg{7}}));
  auto ms = until_turn_end(c);
  BOOST_TEST(errors_in(ms).empty());
  BOOST_TEST(delta_text(ms) == "session 1 heard 2 chunks");
}

BOOST_AUTO_TEST_CASE(oversized_frame_is_refused) {
  transport::gateway_options o;
  o.max_frame_bytes = 16 << 10;
  gateway_fixture f(o);
  client c;
  c.connect(f.endpoint, "tester", 3000ms);
  const std::vector<int16_t> big(16000, 1);  // 32 KB
  c.send_audio(big.data(), big.size(), 16000, 1);   // seq 0: too large, dropped
  auto e = next_error(c);
  BOOST_REQUIRE(e);
  BOOST_TEST((e->code == error_code::frame_too_large));
  c.send_audio(chunk.data(), chunk.size(), 16000, 1);  // seq 1 follows without an out_of_order error
  c.end_turn();
  auto ms = until_turn_end(c);
  BOOST_TEST(errors_in(ms).empty());
  BOOST_TEST(delta_text(ms) == "session 1 heard 1 chunks");
}

BOOST_AUTO_TEST_CASE(rate_limit) {
  transport::gateway_options o;
  o.max_frames_per_second = 20;
  gateway_fixture f(o);
  client c;
  c.connect(f.endpoint, "tester", 3000ms);
  for (int i = 0; i < 100; ++i) c.cancel();
  auto e = next_error(c);
  BOOST_REQUIRE(e);
  BOOST_TEST((e->code == error_code::rate_limited));
  BOOST_TEST(!e->fatal);
  std::this_thread::sleep_for(1200ms);  // the bucket refills
  while (c.receive(0ms)) {
  }
  c.send_text("after the flood");
  auto ms = until_turn_end(c);
  BOOST_TEST(delta_text(ms) == "session 1: after the flood");
}

BOOST_AUTO_TEST_CASE(max_sessions_gives_server_full) {
  transport::gateway_options o;
  o.max_sessions = 2;
  gateway_fixture f(o);
  client a, b, c;
  a.connect(f.endpoint, "a", 3000ms);
  b.connect(f.endpoint, "b", 3000ms);
  try {
    c.connect(f.endpoint, "c", 3000ms);
    BOOST_FAIL("a third session was accepted");
  } catch (const transport::client_error& e) {
    BOOST_TEST((e.code == error_code::server_full));
  }
  // A slot frees when a client leaves.
  a.bye();
  BOOST_TEST(wait_for([&] { return f.pr->gone.load() == 1; }));
  BOOST_CHECK_NO_THROW(c.connect(f.endpoint, "c", 3000ms));
}

BOOST_AUTO_TEST_CASE(supervisor_refusal_reaches_the_client) {
  gateway_fixture f({}, /*supervisor_limit=*/1);
  client a, b;
  a.connect(f.endpoint, "a", 3000ms);
  try {
    b.connect(f.endpoint, "b", 3000ms);
    BOOST_FAIL("the supervisor's refusal was not delivered");
  } catch (const transport::client_error& e) {
    BOOST_TEST((e.code == error_code::server_full));
  }
  // The refused identity is not left half-open: it may say hello again later.
  a.bye();
  BOOST_TEST(wait_for([&] { return f.pr->gone.load() == 1; }));
  BOOST_CHECK_NO_THROW(b.connect(f.endpoint, "b", 3000ms));
}

BOOST_AUTO_TEST_CASE(idle_timeout_closes_the_session) {
  transport::gateway_options o;
  o.idle_timeout = 300ms;
  gateway_fixture f(o);
  client c;
  c.connect(f.endpoint, "sleepy", 3000ms);
  BOOST_TEST(wait_for([&] { return f.pr->gone.load() == 1; }, 3000ms));
  auto e = next_error(c);
  BOOST_REQUIRE(e);
  BOOST_TEST((e->code == error_code::no_session));
  BOOST_TEST(e->fatal);
  // Frames after the timeout: the connection has no session any more.
  c.send_raw(transport::encode(transport::client_message{transport::text_msg{"hello?"}}));
  e = next_error(c);
  BOOST_REQUIRE(e);
  BOOST_TEST((e->code == error_code::no_session));
}

BOOST_AUTO_TEST_CASE(bye_reaches_the_session) {
  gateway_fixture f;
  {
    client c;
    c.connect(f.endpoint, "brief", 3000ms);
    c.bye();
  }
  BOOST_TEST(wait_for([&] { return f.pr->gone.load() == 1; }));
}

BOOST_AUTO_TEST_CASE(two_clients_interleaved_get_only_their_own_frames) {
  gateway_fixture f;
  client a, b;
  const auto wa = a.connect(f.endpoint, "a", 3000ms);
  const auto wb = b.connect(f.endpoint, "b", 3000ms);
  BOOST_TEST(wa.session != wb.session);
  for (int i = 0; i < 5; ++i) {
    a.send_text("a" + std::to_string(i));
    b.send_text("b" + std::to_string(i));
    a.send_audio(chunk.data(), chunk.size(), 16000, 1);
  }
  a.end_turn();
  b.end_turn();
  const std::string pa = "session " + std::to_string(wa.session);
  const std::string pb = "session " + std::to_string(wb.session);
  for (int i = 0; i < 5; ++i) {
    BOOST_TEST(delta_text(until_turn_end(a)) == pa + ": a" + std::to_string(i));
    BOOST_TEST(delta_text(until_turn_end(b)) == pb + ": b" + std::to_string(i));
  }
  BOOST_TEST(delta_text(until_turn_end(a)) == pa + " heard 5 chunks");
  BOOST_TEST(delta_text(until_turn_end(b)) == pb + " heard 0 chunks");
  BOOST_TEST(!a.receive(100ms).has_value());
  BOOST_TEST(!b.receive(0ms).has_value());
}

BOOST_AUTO_TEST_CASE(bind_failure_names_the_endpoint) {
  gateway_fixture f;
  transport::gateway_options o;
  o.bind = f.endpoint;  // already bound
  try {
    transport::spawn_gateway(*f.sys, o, f.sup);
    BOOST_FAIL("a second bind on the same port succeeded");
  } catch (const std::runtime_error& e) {
    BOOST_TEST(std::string(e.what()).find(f.endpoint) != std::string::npos);
  }
}

BOOST_AUTO_TEST_CASE(client_connect_timeout_is_clear) {
  client c;
  try {
    c.connect("tcp://127.0.0.1:1", "nobody", 300ms);
    BOOST_FAIL("connect succeeded without a server");
  } catch (const transport::client_error& e) {
    BOOST_TEST((e.code == error_code::none));
    BOOST_TEST(std::string(e.what()).find("tcp://127.0.0.1:1") != std::string::npos);
  }
}

BOOST_AUTO_TEST_CASE(frames_sent_before_the_welcome_are_delivered) {
  gateway_fixture f;
  zmq::context_t ctx;
  zmq::socket_t s(ctx, zmq::socket_type::dealer);
  s.set(zmq::sockopt::linger, 0);
  s.connect(f.endpoint);
  auto send = [&](const transport::client_message& m) {
    const auto parts = transport::encode(m);
    for (size_t i = 0; i < parts.size(); ++i)
      s.send(zmq::buffer(parts[i]), i + 1 < parts.size() ? zmq::send_flags::sndmore : zmq::send_flags::none);
  };
  transport::hello_msg h;
  h.client = "eager";
  send(h);
  send(transport::make_audio(0, chunk.data(), chunk.size(), 16000, 1));
  send(transport::end_turn_msg{1});
  std::vector<std::string> types;
  std::string text;
  zmq::pollitem_t item{s.handle(), 0, ZMQ_POLLIN, 0};
  while (types.size() < 3 && zmq::poll(&item, 1, 3000ms) == 1) {
    std::vector<zmq::message_t> msgs;
    BOOST_REQUIRE(zmq::recv_multipart(s, std::back_inserter(msgs)));
    std::vector<std::string_view> parts;
    for (auto& m : msgs) parts.emplace_back(static_cast<const char*>(m.data()), m.size());
    const auto reply = transport::decode_server(parts);
    types.push_back(transport::type_name(reply));
    if (auto* d = std::get_if<transport::delta_msg>(&reply)) text = d->text;
  }
  BOOST_TEST(types == (std::vector<std::string>{"welcome", "delta", "turn_end"}), boost::test_tools::per_element());
  BOOST_TEST(text == "session 1 heard 1 chunks");
}

BOOST_AUTO_TEST_CASE(a_flood_is_survived) {
  gateway_fixture f;  // default limit: 200 frames/s
  client c;
  c.connect(f.endpoint, "flood", 3000ms);
  for (int i = 0; i < 20000; ++i) c.cancel();
  std::this_thread::sleep_for(1200ms);
  while (c.receive(100ms)) {
  }
  c.send_text("calm again");
  BOOST_TEST(delta_text(until_turn_end(c, 10000ms)) == "session 1: calm again");
}

BOOST_AUTO_TEST_CASE(wire_error_names_match_the_engine_names) {
  for (int c : {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 100}) {
    const auto code = error_code(c);
    BOOST_TEST(std::string(transport::error_name(code)) == std::string(actors::to_string(code)));
  }
}

namespace {

/// A raw DEALER that sends one frame and reads the reply (nullopt: none within `timeout`).
struct raw_client {
  zmq::context_t ctx;
  zmq::socket_t s{ctx, zmq::socket_type::dealer};
  explicit raw_client(const std::string& endpoint) {
    s.set(zmq::sockopt::linger, 0);
    s.connect(endpoint);
  }
  std::optional<server_message> ask(const transport::client_message& m, std::chrono::milliseconds timeout = 3000ms) {
    const auto parts = transport::encode(m);
    for (size_t i = 0; i < parts.size(); ++i)
      s.send(zmq::buffer(parts[i]), i + 1 < parts.size() ? zmq::send_flags::sndmore : zmq::send_flags::none);
    zmq::pollitem_t item{s.handle(), 0, ZMQ_POLLIN, 0};
    if (zmq::poll(&item, 1, timeout) != 1) return std::nullopt;
    std::vector<zmq::message_t> msgs;
    if (!zmq::recv_multipart(s, std::back_inserter(msgs))) return std::nullopt;
    std::vector<std::string_view> pv;
    for (auto& x : msgs) pv.emplace_back(static_cast<const char*>(x.data()), x.size());
    return transport::decode_server(pv);
  }
};

transport::hello_msg hello_with(const std::string& token) {
  transport::hello_msg h;
  h.client = "raw";
  h.token = token;
  return h;
}

}  // namespace

BOOST_AUTO_TEST_CASE(auth_token_wrong_or_missing_is_refused_without_a_session) {
  transport::gateway_options o;
  o.auth_token = "s3cret-token";
  o.max_sessions = 1;  // refused hellos must not take the one slot
  gateway_fixture f(o);
  for (const std::string token : {"", "wrong", "s3cret-toke", "s3cret-token!", "S3cret-token"}) {
    client c;
    try {
      c.connect(f.endpoint, "intruder", 3000ms, token);
      BOOST_FAIL("a hello with token '" << token << "' was accepted");
    } catch (const transport::client_error& e) {
      BOOST_TEST((e.code == error_code::unauthorized), e.what());
    }
  }
  BOOST_TEST(f.pr->opened.load() == 0);  // the supervisor never heard of them

  // The gateway keeps nothing for a refused connection: its next frame is
  // "before hello" (not queued for a session being opened), and a hello with
  // the right token on the same connection then opens a session.
  raw_client raw(f.endpoint);
  auto r = raw.ask(hello_with("nope"));
  BOOST_REQUIRE(r);
  auto* e = std::get_if<transport::error_msg>(&*r);
  BOOST_REQUIRE(e);
  BOOST_TEST((e->code == error_code::unauthorized));
  BOOST_TEST(e->fatal);
  r = raw.ask(transport::text_msg{"let me in"});
  BOOST_REQUIRE(r);
  e = std::get_if<transport::error_msg>(&*r);
  BOOST_REQUIRE(e);
  BOOST_TEST((e->code == error_code::no_session));
  r = raw.ask(hello_with("s3cret-token"));
  BOOST_REQUIRE(r);
  BOOST_TEST(std::holds_alternative<transport::welcome_msg>(*r));
  BOOST_TEST(f.pr->opened.load() == 1);
}

BOOST_AUTO_TEST_CASE(auth_token_right_one_opens_a_session) {
  transport::gateway_options o;
  o.auth_token = "s3cret-token";
  gateway_fixture f(o);
  client c;
  const auto w = c.connect(f.endpoint, "friend", 3000ms, "s3cret-token");
  BOOST_TEST(w.session == 1u);
  c.send_text("hi");
  BOOST_TEST(delta_text(until_turn_end(c)) == "session 1: hi");
}

BOOST_AUTO_TEST_CASE(no_auth_token_configured_is_open_as_before) {
  gateway_fixture f;  // auth_token ""
  client a, b;
  BOOST_CHECK_NO_THROW(a.connect(f.endpoint, "plain", 3000ms));
  BOOST_CHECK_NO_THROW(b.connect(f.endpoint, "with-token", 3000ms, "ignored"));
  BOOST_TEST(f.pr->opened.load() == 2);
}
