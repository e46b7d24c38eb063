// The session actor with fake encoder and LLM worker actors (no models): the
// prompt it builds, streaming to the gateway, barge-in, text turns, cancel,
// busy errors; and the keyword spotter example.
#include <boost/test/unit_test.hpp>

#include <cmath>
#include <thread>

#include "actors/keyword_spotter.hpp"
#include "actors/session.hpp"

using namespace undertone;
using namespace undertone::actors;

namespace {

std::vector<float> tone(double ms, double amp = 0.3) {
  std::vector<float> v(size_t(ms * 16));
  for (size_t i = 0; i < v.size(); ++i) v[i] = float(amp * std::sin(2 * M_PI * 220.0 * double(i) / 16000));
  return v;
}
std::vector<float> silence(double ms) { return std::vector<float>(size_t(ms * 16), 0.0f); }

// Fake encoder: one speech row (d = 4) per 160 ms of audio, one more at finish.
struct fake_encoder_state {
  caf::actor session;
  size_t pending = 0;
};
caf::behavior fake_encoder(caf::stateful_actor<fake_encoder_state>* self) {
  return {
      [=](encode_open&) { self->state.session = caf::actor_cast<caf::actor>(self->current_sender()); },
      [=](encode_audio& m) {
        auto& st = self->state;
        st.pending += m.samples_16k.size();
        const int64_t n = int64_t(st.pending / 2560);
        st.pending %= 2560;
        if (n > 0) self->send(st.session, speech_rows{m.id, std::vector<float>(size_t(n * 4), 0.5f), n, false, "fake-enc", 1.0});
      },
      [=](encode_finish& m) {
        self->state.pending = 0;
        self->send(self->state.session, speech_rows{m.id, std::vector<float>(4, 0.25f), 1, true, "fake-enc", 1.0});
      },
      [=](encode_close&) {},
  };
}

// Fake LLM worker: logs every call; answers a generate with two deltas at once
// and llm_done when it gets a tick.
struct fake_llm_state {
  caf::actor session;
  std::string log;
  int64_t turn = 0;
  bool generating = false;
  bool finish_next = false;  // a tick came before the generate
};
caf::behavior fake_llm(caf::stateful_actor<fake_llm_state>* self) {
  auto note = [=](const std::string& s) { self->state.log += s + "|"; };
  return {
      [=](llm_open& m) {
        self->state.session = m.session;
        note("open");
      },
      [=](llm_append& m) { note(m.n_rows > 0 ? "R" + std::to_string(m.n_rows) : "T:" + m.text); },
      [=](llm_generate& m) {
        note("gen" + std::to_string(m.turn));
        self->state.turn = m.turn;
        self->state.generating = true;
        self->send(self->state.session, llm_delta{m.id, m.turn, "Hel"});
        self->send(self->state.session, llm_delta{m.id, m.turn, "lo"});
        if (self->state.finish_next) {
          self->state.finish_next = false;
          self->send(self, tick_atom::value);
        }
      },
      [=](llm_mark& m) { note("mark" + std::to_string(m.mark)); },
      [=](llm_rewind& m) {
        self->state.generating = false;
        note("rewind" + std::to_string(m.mark));
      },
      [=](llm_cancel&) { note("cancel"); },
      [=](llm_close&) { note("close"); },
      [=](tick_atom) {
        auto& st = self->state;
        if (!st.generating) {
          st.finish_next = true;
          return;
        }
        st.generating = false;
        llm_done d;
        d.id = 1;
        d.turn = st.turn;
        d.text = "Hello";
        d.stop_reason = "stop_token";
        d.tokens = 2;
        d.context_rows = 40;
        self->send(st.session, d);
      },
      [=](stats_atom) { return self->state.log; },
  };
}

struct fixture {
  caf::actor_system_config cfg;
  std::unique_ptr<caf::actor_system> sys;
  std::unique_ptr<caf::scoped_actor> gw;
  caf::actor enc, llm, session;

  fixture() {
    register_message_types(cfg);
    sys = std::make_unique<caf::actor_system>(cfg);
    gw = std::make_unique<caf::scoped_actor>(*sys);
    enc = sys->spawn(fake_encoder);
    llm = sys->spawn(fake_llm);
    auto env = std::make_shared<session_env>();
    env->templ = models::chat_template::named("chatml");
    env->templ.set_default_system("SYS");
    env->store = false;
    session_options o;
    o.id = 1;
    o.client_identity = "cid";
    o.env = env;
    o.gateway = caf::actor(*gw);
    o.encoder = enc;
    o.llm = llm;
    session = spawn_session(*sys, o);
  }
  ~fixture() {
    caf::anon_send_exit(session, caf::exit_reason::user_shutdown);
    caf::anon_send_exit(enc, caf::exit_reason::user_shutdown);
    caf::anon_send_exit(llm, caf::exit_reason::user_shutdown);
  }

  /// The fake LLM's call log once it contains `want` (or after 2 s): messages
  /// to the LLM may still be in flight when the gateway got the turn end.
  std::string llm_log_with(const std::string& want) {
    std::string log;
    for (int i = 0; i < 200; ++i) {
      log = llm_log();
      if (log.find(want) != std::string::npos) break;
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    return log;
  }
  std::string llm_log() {
    std::string log;
    (*gw)->request(llm, std::chrono::seconds(5), stats_atom::value).receive([&](std::string& s) { log = s; },
                                                                            [&](caf::error&) {});
    return log;
  }

  /// What the gateway received, as "kind:detail" lines, until a turn_end/error/closed or 5 s.
  struct got {
    std::vector<std::string> lines;
    std::string deltas;
    to_client_turn_end end;
    bool have_end = false;
  };
  got until_turn_end() {
    got g;
    bool done = false;
    while (!done) {
      (*gw)->receive(
          [&](to_client_event& e) { g.lines.push_back("event:" + e.name + ":" + e.label); },
          [&](to_client_delta& d) { g.deltas += d.text; },
          [&](to_client_turn_end& t) {
            g.end = t;
            g.have_end = true;
            g.lines.push_back("turn_end:" + t.stop_reason);
            done = true;
          },
          [&](to_client_error& e) {
            g.lines.push_back(std::string("error:") + to_string(e.code));
            done = true;
          },
          [&](session_closed&) {
            g.lines.push_back("closed");
            done = true;
          },
          caf::after(std::chrono::seconds(5)) >> [&] {
            g.lines.push_back("timeout");
            done = true;
          });
    }
    return g;
  }
  void audio(const std::vector<float>& x, int rate = 16000, int channels = 1) {
    static uint64_t seq = 0;
    const size_t piece = size_t(rate / 50 * channels);  // 20 ms
    for (size_t off = 0; off < x.size(); off += piece) {
      client_audio a;
      a.seq = seq++;
      a.sample_rate = rate;
      a.channels = channels;
      a.samples.assign(x.begin() + ptrdiff_t(off), x.begin() + ptrdiff_t(std::min(x.size(), off + piece)));
      (*gw)->send(session, std::move(a));
    }
  }
};

bool contains(const std::vector<std::string>& v, const std::string& s) {
  return std::find(v.begin(), v.end(), s) != v.end();
}

}  // namespace

BOOST_FIXTURE_TEST_CASE(text_turn_builds_the_chat_prompt_and_streams_the_answer, fixture) {
  (*gw)->send(session, client_text_turn{"hi"});
  (*gw)->send(llm, tick_atom::value);
  auto g = until_turn_end();
  BOOST_REQUIRE(g.have_end);
  BOOST_TEST(g.end.text == "Hello");
  BOOST_TEST(g.deltas == "Hello");
  BOOST_TEST(g.end.turn == 1);
  BOOST_TEST(g.end.stop_reason == "stop_token");
  BOOST_TEST(contains(g.lines, "event:turn_start:text"));
  BOOST_TEST(llm_log_with("gen1|T:<|im_end|>\n|") ==
             "open|T:<|im_start|>system\nSYS<|im_end|>\n|T:<|im_start|>user\n|mark0|T:hi|mark1|"
             "T:<|im_end|>\n<|im_start|>assistant\n|gen1|T:<|im_end|>\n|");
  // a second text turn: the next user header, then the same pattern
  (*gw)->send(session, client_text_turn{"again"});
  (*gw)->send(llm, tick_atom::value);
  g = until_turn_end();
  BOOST_TEST(g.end.turn == 2);
  BOOST_TEST(llm_log_with("gen2").find("|T:<|im_start|>user\n|mark0|T:again|mark1|") != std::string::npos);
}

BOOST_FIXTURE_TEST_CASE(text_turn_while_answering_is_busy_and_cancel_stops, fixture) {
  (*gw)->send(session, client_text_turn{"one"});
  (*gw)->send(session, client_text_turn{"two"});
  auto g = until_turn_end();
  BOOST_TEST(contains(g.lines, "error:busy"));
  (*gw)->send(session, client_cancel{});
  g = until_turn_end();
  BOOST_REQUIRE(g.have_end);
  BOOST_TEST(g.end.stop_reason == "cancelled");
  BOOST_TEST(llm_log_with("rewind1").find("rewind1") != std::string::npos);
}

BOOST_FIXTURE_TEST_CASE(speech_turn_endpoint_answer_and_barge_in, fixture) {
  audio(silence(300));
  audio(tone(600));
  audio(silence(800));  // endpoint after 600 ms -> rows last -> generate
  auto g = until_turn_end();  // no turn end yet: the fake holds llm_done; we wait on a timeout
  BOOST_TEST(contains(g.lines, "event:turn_start:speech"));
  BOOST_TEST(contains(g.lines, "event:speech_start:"));
  BOOST_TEST(contains(g.lines, "event:endpoint:endpoint"));
  BOOST_TEST(g.deltas == "Hello");
  auto log = llm_log_with("gen1");
  BOOST_TEST(log.find("gen1") != std::string::npos);
  BOOST_TEST(log.find("|R") != std::string::npos);
  // barge-in: speak while the answer runs
  audio(tone(300));
  g = until_turn_end();
  BOOST_REQUIRE(g.have_end);
  BOOST_TEST(g.end.stop_reason == "cancelled");
  BOOST_TEST(g.end.turn == 1);
  audio(silence(800));
  g = until_turn_end();  // turn 2 answers (held by the fake): timeout after its deltas
  BOOST_TEST(contains(g.lines, "event:barge_in:"));
  BOOST_TEST(g.deltas == "Hello");
  log = llm_log_with("gen2");
  BOOST_TEST(log.find("rewind1") != std::string::npos);
  BOOST_TEST(log.find("gen2") != std::string::npos);
  // after the rewind, turn 2 continues the open user message: no second user header
  const auto after = log.substr(log.find("rewind1"));
  BOOST_TEST(after.find("<|im_start|>user") == std::string::npos);
  (*gw)->send(llm, tick_atom::value);
  g = until_turn_end();
  BOOST_REQUIRE(g.have_end);
  BOOST_TEST(g.end.turn == 2);
  BOOST_TEST(g.end.text == "Hello");
  BOOST_TEST(g.end.timings.end_of_turn_to_first_token_ms >= 0);
  BOOST_TEST(g.end.timings.speech_tokens > 0);
}

BOOST_FIXTURE_TEST_CASE(resamples_48k_stereo, fixture) {
  auto mono = tone(600);
  std::vector<float> st;
  // 48 kHz stereo: each 16 kHz sample becomes 3 frames of 2 channels (a crude upsample)
  for (size_t i = 0; i < mono.size(); ++i)
    for (int k = 0; k < 3; ++k) st.push_back(mono[i]), st.push_back(mono[i]);
  std::vector<float> sil(size_t(48 * 2 * 300), 0.0f);
  audio(sil, 48000, 2);
  audio(st, 48000, 2);
  std::vector<float> tail(size_t(48 * 2 * 800), 0.0f);
  audio(tail, 48000, 2);
  auto g = until_turn_end();
  BOOST_TEST(contains(g.lines, "event:turn_start:speech"));
  BOOST_TEST(g.deltas == "Hello");
}

BOOST_FIXTURE_TEST_CASE(client_gone_closes_the_session, fixture) {
  (*gw)->send(session, client_gone{});
  auto g = until_turn_end();
  BOOST_TEST(contains(g.lines, "closed"));
  BOOST_TEST(llm_log_with("close").find("close") != std::string::npos);
}

BOOST_AUTO_TEST_CASE(keyword_spotter_injects_on_a_match) {
  BOOST_TEST((find_keywords("I feel HAPPY today!", {"happy", "sad"}) == std::vector<std::string>{"happy"}));
  BOOST_TEST(find_keywords("unhappy", {"happy"}).empty());
  caf::actor_system_config cfg;
  register_message_types(cfg);
  caf::actor_system sys{cfg};
  caf::scoped_actor sup{sys};
  auto ks = spawn_keyword_spotter(sys, {{"happy", "sad"}, caf::actor(sup), false, "keyword: "});
  sup->send(ks, session_event{7, 2, "answer_delta", "happy", 0});  // deltas are ignored
  sup->send(ks, session_event{7, 2, "answer", "So sad to hear.", 0});
  bool got = false;
  sup->receive([&](inject_message& m) {
    got = true;
    BOOST_TEST(m.id == 7u);
    BOOST_TEST(m.text == "keyword: sad");
    BOOST_TEST(!m.as_system);
  }, caf::after(std::chrono::seconds(5)) >> [] {});
  BOOST_TEST(got);
  caf::anon_send_exit(ks, caf::exit_reason::user_shutdown);
}
