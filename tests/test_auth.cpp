// Shared-secret token authentication (transport/auth.hpp): where the token
// comes from (env, config key, token file), the comparison, the loopback
// check behind serve's warning, and the control endpoint (transport/control.hpp)
// behind real ZeroMQ sockets with a fake supervisor that counts what reached it.
// The client gateway and the worker hub are tested in test_gateway and
// test_remote_worker.
#include <boost/test/unit_test.hpp>

#include <atomic>
#include <cstdlib>
#include <fstream>

#include <caf/all.hpp>

#include "actors/messages.hpp"
#include "support.hpp"
#include "transport/auth.hpp"
#include "transport/control.hpp"

using namespace undertone;
using namespace std::chrono_literals;

namespace {

/// Sets UNDERTONE_AUTH_TOKEN for a scope (unset = nullptr) and restores it.
struct env_token {
  std::string saved;
  bool had = false;
  explicit env_token(const char* value) {
    if (const char* e = std::getenv(transport::auth_token_env)) had = true, saved = e;
    if (value)
      ::setenv(transport::auth_token_env, value, 1);
    else
      ::unsetenv(transport::auth_token_env);
  }
  ~env_token() {
    if (had)
      ::setenv(transport::auth_token_env, saved.c_str(), 1);
    else
      ::unsetenv(transport::auth_token_env);
  }
};

struct sys_config : caf::actor_system_config {
  sys_config() { actors::register_message_types(*this); }
};

/// Answers status and swaps like the engine's supervisor, counting requests.
caf::behavior fake_supervisor(caf::event_based_actor*, std::shared_ptr<std::atomic<int>> requests) {
  return {
      [=](actors::status_request) {
        ++*requests;
        actors::engine_status s;
        s.models = "llm=fake; encoder=fake";
        s.llm_version = "fake|1";
        s.encoder.version = "v0001";
        s.sessions = 2;
        return s;
      },
      [=](actors::swap_encoder& m) {
        ++*requests;
        return actors::swap_result{true, m.version, "v0001", "swapped"};
      },
  };
}

}  // namespace

BOOST_AUTO_TEST_CASE(token_comparison) {
  BOOST_TEST(transport::token_matches("s3cret", "s3cret"));
  BOOST_TEST(!transport::token_matches("s3cret", "s3creT"));
  BOOST_TEST(!transport::token_matches("s3cret", "s3cre"));
  BOOST_TEST(!transport::token_matches("s3cret", "s3crets"));
  BOOST_TEST(!transport::token_matches("s3cret", ""));
  BOOST_TEST(!transport::token_matches("", "x"));
  BOOST_TEST(transport::token_matches("", ""));
  // Same bytes repeated must not pass through the index wrap-around.
  BOOST_TEST(!transport::token_matches("ab", "abab"));
  BOOST_TEST(!transport::token_matches(std::string_view("a\0b", 3), std::string_view("a\0c", 3)));
}

BOOST_AUTO_TEST_CASE(loopback_endpoints) {
  for (const char* ep : {"tcp://127.0.0.1:5555", "tcp://127.1.2.3:1", "tcp://localhost:5555", "tcp://[::1]:5555",
                         "ipc:///tmp/undertone.sock", "inproc://x"})
    BOOST_TEST(transport::is_loopback_endpoint(ep), ep);
  for (const char* ep : {"tcp://0.0.0.0:5555", "tcp://*:5555", "tcp://10.0.0.5:5556", "tcp://eth0:5555",
                         "tcp://[::]:5555", "tcp://example.com:5557"})
    BOOST_TEST(!transport::is_loopback_endpoint(ep), ep);
}

BOOST_AUTO_TEST_CASE(token_sources_and_precedence) {
  testing::temp_dir dir;
  const std::string file = dir.str() + "/token";
  std::ofstream(file) << "  from-file \r\nsecond line is ignored\n";
  config::server_config c;
  {
    env_token none(nullptr);
    BOOST_TEST(transport::server_auth_token(c).empty());  // nothing set: no authentication
    c.auth_token_file = file;
    BOOST_TEST(transport::server_auth_token(c) == "from-file");  // first line, blanks trimmed
    c.auth_token_file.clear();
    c.auth_token = "from-key";
    BOOST_TEST(transport::server_auth_token(c) == "from-key");
    BOOST_TEST(transport::client_auth_token("", c) == "from-key");
    BOOST_TEST(transport::client_auth_token("from-flag", c) == "from-flag");
    c.auth_token_file = file;  // both keys: ambiguous
    BOOST_CHECK_THROW(transport::server_auth_token(c), std::runtime_error);
    c.auth_token.clear();
    c.auth_token_file = dir.str() + "/missing";
    try {
      transport::server_auth_token(c);
      BOOST_FAIL("a missing token file was accepted");
    } catch (const std::runtime_error& e) {
      BOOST_TEST(std::string(e.what()).find("server.auth_token_file") != std::string::npos);
      BOOST_TEST(std::string(e.what()).find("/missing") != std::string::npos);
    }
    std::ofstream(dir.str() + "/empty") << "\n";
    c.auth_token_file = dir.str() + "/empty";  // an empty token must not mean "open"
    BOOST_CHECK_THROW(transport::server_auth_token(c), std::runtime_error);
  }
  {
    env_token env("from-env");
    c.auth_token = "from-key";
    c.auth_token_file.clear();
    BOOST_TEST(transport::server_auth_token(c) == "from-env");
    BOOST_TEST(transport::client_auth_token("", c) == "from-env");
    BOOST_TEST(transport::client_auth_token("from-flag", c) == "from-flag");
  }
  {
    env_token empty("");  // set but empty = unset
    BOOST_TEST(transport::server_auth_token(c) == "from-key");
  }
}

BOOST_AUTO_TEST_CASE(control_endpoint_requires_the_token) {
  sys_config cfg;
  caf::actor_system sys{cfg};
  auto requests = std::make_shared<std::atomic<int>>(0);
  auto sup = sys.spawn(fake_supervisor, requests);
  {
    transport::control_server control(sys, sup, "tcp://127.0.0.1:*", "s3cret");
    const auto ep = control.endpoint();
    // Right token: served.
    auto r = transport::control_call(ep, {{"t", "status"}, {"id", 1}}, 5s, "s3cret");
    BOOST_TEST(r["ok"].get<bool>(), r.dump());
    BOOST_TEST(r["sessions"].get<int>() == 2);
    BOOST_TEST(!r.contains("token"));
    BOOST_TEST(requests->load() == 1);
    // Missing, wrong and mistyped tokens: refused before the engine is asked.
    for (const auto& req : {nlohmann::json{{"t", "encoder_swap"}, {"version", "v0002"}},
                            nlohmann::json{{"t", "encoder_swap"}, {"version", "v0002"}, {"token", "s3creT"}},
                            nlohmann::json{{"t", "encoder_swap"}, {"version", "v0002"}, {"token", 42}},
                            nlohmann::json{{"t", "status"}, {"token", ""}}}) {
      r = transport::control_call(ep, req, 5s);
      BOOST_TEST(r["t"].get<std::string>() == "error", r.dump());
      BOOST_TEST(r["code"].get<std::string>() == "unauthorized", r.dump());
      BOOST_TEST(!r["ok"].get<bool>());
    }
    r = transport::control_call(ep, {{"t", "encoder_swap"}, {"version", "v0002"}}, 5s, "wrong");
    BOOST_TEST(r["code"].get<std::string>() == "unauthorized");
    BOOST_TEST(requests->load() == 1);
    r = transport::control_call(ep, {{"t", "encoder_swap"}, {"version", "v0002"}}, 5s, "s3cret");
    BOOST_TEST(r["ok"].get<bool>(), r.dump());
    BOOST_TEST(r["version"].get<std::string>() == "v0002");
    BOOST_TEST(requests->load() == 2);
  }
  {
    // No token configured: open as before, a token sent anyway is ignored.
    transport::control_server control(sys, sup, "tcp://127.0.0.1:*");
    auto r = transport::control_call(control.endpoint(), {{"t", "status"}}, 5s);
    BOOST_TEST(r["ok"].get<bool>(), r.dump());
    r = transport::control_call(control.endpoint(), {{"t", "status"}}, 5s, "anything");
    BOOST_TEST(r["ok"].get<bool>(), r.dump());
  }
  caf::anon_send_exit(sup, caf::exit_reason::user_shutdown);
}
