// The session's pure logic (actors/session_logic.hpp) on synthetic audio:
// tones stand for speech, zeros and white noise for silence and background.
#include <boost/test/unit_test.hpp>

#include <cmath>
#include <random>

#include "actors/session_logic.hpp"

using namespace undertone;
using namespace undertone::actors;

namespace {

constexpr int k_sr = 16000;
size_t ms(double m) { return size_t(m * k_sr / 1000.0); }

std::vector<float> tone(double millis, double amp = 0.3, double hz = 220.0) {
  std::vector<float> v(ms(millis));
  for (size_t i = 0; i < v.size(); ++i) v[i] = float(amp * std::sin(2 * M_PI * hz * double(i) / k_sr));
  return v;
}
std::vector<float> silence(double millis) { return std::vector<float>(ms(millis), 0.0f); }
std::vector<float> noise(double millis, double amp, uint32_t seed = 1) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> d(-float(amp), float(amp));
  std::vector<float> v(ms(millis));
  for (auto& x : v) x = d(rng);
  return v;
}

/// Feeds `x` in pieces of `piece_ms` and collects what happened.
struct feed_result {
  bool turn_start = false, speech_start = false, barge_in = false;
  turn_end_reason end = turn_end_reason::none;
  int64_t start_at = -1, end_at = -1;  // samples_seen() when it happened
  std::vector<float> to_encoder;
};
feed_result feed(turn_logic& t, const std::vector<float>& x, double piece_ms = 20) {
  feed_result r;
  const size_t p = ms(piece_ms);
  for (size_t off = 0; off < x.size(); off += p) {
    auto s = t.accept_audio(x.data() + off, std::min(p, x.size() - off));
    r.to_encoder.insert(r.to_encoder.end(), s.to_encoder.begin(), s.to_encoder.end());
    if (s.turn_start && !r.turn_start) r.turn_start = true, r.start_at = t.samples_seen();
    r.speech_start |= s.speech_start;
    r.barge_in |= s.barge_in;
    if (s.end != turn_end_reason::none && r.end == turn_end_reason::none) r.end = s.end, r.end_at = t.samples_seen();
  }
  return r;
}

}  // namespace

BOOST_AUTO_TEST_CASE(speech_starts_after_min_speech_ms) {
  turn_logic t;  // min_speech_ms 100, frame 20 ms
  BOOST_TEST(!feed(t, silence(500)).turn_start);
  BOOST_CHECK(t.state() == turn_state::idle);
  auto r = feed(t, tone(300));
  BOOST_TEST(r.turn_start);
  BOOST_TEST(r.speech_start);
  BOOST_TEST(r.start_at == int64_t(ms(600)));  // 500 ms silence + 100 ms voiced
  BOOST_CHECK(t.state() == turn_state::listening);
}

BOOST_AUTO_TEST_CASE(a_click_shorter_than_min_speech_does_not_start) {
  turn_logic t;
  feed(t, silence(300));
  auto r = feed(t, tone(80));
  r = feed(t, silence(1000));
  BOOST_TEST(!r.turn_start);
  BOOST_CHECK(t.state() == turn_state::idle);
}

BOOST_AUTO_TEST_CASE(endpoint_after_trailing_silence) {
  vad_settings v;
  v.trailing_silence_ms = 600;
  turn_logic t(v);
  feed(t, silence(200));
  auto r = feed(t, tone(500));
  BOOST_TEST(r.turn_start);
  r = feed(t, silence(1000), 10);
  BOOST_CHECK(r.end == turn_end_reason::endpoint);
  BOOST_TEST(r.end_at == int64_t(ms(200 + 500 + 600)));
  BOOST_CHECK(t.state() == turn_state::thinking);
  // What went to the encoder: pre-roll (200 ms) + tone + 600 ms of trailing silence.
  BOOST_TEST(t.turn_samples() == int64_t(ms(200 + 500 + 600)));
}

BOOST_AUTO_TEST_CASE(short_pauses_do_not_end_the_turn) {
  turn_logic t;
  feed(t, silence(200));
  feed(t, tone(300));
  auto r = feed(t, silence(400));
  r = feed(t, tone(300));
  BOOST_CHECK(r.end == turn_end_reason::none);
  BOOST_CHECK(t.state() == turn_state::listening);
}

BOOST_AUTO_TEST_CASE(no_false_start_on_noise_below_threshold) {
  turn_logic t;  // threshold -50 dBFS
  // uniform noise amplitude a has power a^2/3: 0.0015 -> about -61 dBFS
  auto r = feed(t, noise(3000, 0.0015));
  BOOST_TEST(!r.turn_start);
  BOOST_TEST(t.noise_floor_db() < -55.0);
}

BOOST_AUTO_TEST_CASE(no_false_start_on_steady_noise_above_threshold_but_within_snr) {
  turn_logic t;
  // about -25 dBFS: above the threshold, but it is the floor
  auto r = feed(t, noise(3000, 0.1));
  BOOST_TEST(!r.turn_start);
  BOOST_TEST(std::abs(t.noise_floor_db() - (-25.0)) < 2.0);
  // noise that gets 6 dB louder is still below the 12 dB SNR
  r = feed(t, noise(1000, 0.2, 2));
  BOOST_TEST(!r.turn_start);
  BOOST_TEST(!feed(t, noise(1000, 0.1, 4)).turn_start);  // back to the old level (the floor follows down at once)
  // a voice about 17 dB above the noise starts a turn
  auto voice = tone(400, 1.0);
  auto bg = noise(400, 0.1, 3);
  for (size_t i = 0; i < voice.size(); ++i) voice[i] = 0.6f * voice[i] + bg[i];
  r = feed(t, voice);
  BOOST_TEST(r.turn_start);
}

BOOST_AUTO_TEST_CASE(max_turn_cuts_the_turn) {
  vad_settings v;
  v.max_turn_ms = 1000;
  turn_logic t(v);
  feed(t, silence(200));  // the first frame is taken as background (see energy_vad)
  auto r = feed(t, tone(3000));
  BOOST_TEST(r.turn_start);
  BOOST_CHECK(r.end == turn_end_reason::max_turn);
  BOOST_TEST(t.turn_samples() == int64_t(ms(1000)));
  BOOST_CHECK(t.state() == turn_state::thinking);
}

BOOST_AUTO_TEST_CASE(barge_in_while_answering_but_not_while_thinking) {
  turn_logic t;
  feed(t, silence(200));
  feed(t, tone(300));
  auto r = feed(t, silence(700));
  BOOST_CHECK(r.end == turn_end_reason::endpoint);
  // speech while the answer is still being prepared: no new turn
  r = feed(t, tone(300));
  BOOST_TEST(!r.turn_start);
  feed(t, silence(300));
  t.answer_started();
  BOOST_CHECK(t.state() == turn_state::answering);
  r = feed(t, silence(300));
  BOOST_TEST(!r.barge_in);
  r = feed(t, tone(200));
  BOOST_TEST(r.barge_in);
  BOOST_TEST(r.turn_start);
  BOOST_CHECK(t.state() == turn_state::listening);
  // the answer's end arriving late does not leave the new turn
  t.answer_finished();
  BOOST_CHECK(t.state() == turn_state::listening);
}

BOOST_AUTO_TEST_CASE(vad_disabled_only_end_turn_ends) {
  vad_settings v;
  v.enabled = false;
  turn_logic t(v);
  auto r = feed(t, silence(100));
  BOOST_TEST(r.turn_start);
  BOOST_TEST(!r.speech_start);
  BOOST_TEST(r.start_at == int64_t(ms(20)));
  r = feed(t, tone(300));
  r = feed(t, silence(5000));
  BOOST_CHECK(r.end == turn_end_reason::none);
  BOOST_CHECK(t.state() == turn_state::listening);
  // 10 ms that do not fill a VAD frame come back as the tail
  t.accept_audio(silence(10));
  std::vector<float> tail;
  BOOST_TEST(t.end_turn(tail));
  BOOST_TEST(tail.size() == ms(10));
  BOOST_CHECK(t.state() == turn_state::thinking);
  BOOST_TEST(t.turn_samples() == int64_t(ms(100 + 300 + 5000 + 10)));
  BOOST_TEST(!t.end_turn(tail));
}

BOOST_AUTO_TEST_CASE(pre_roll_is_the_200_ms_before_the_first_voiced_frame) {
  turn_logic t;
  // "silence" whose samples encode their index (energy far below the threshold)
  std::vector<float> quiet(ms(1000));
  for (size_t i = 0; i < quiet.size(); ++i) quiet[i] = 1e-7f * float(i % 997);
  feed(t, quiet);
  auto voice = tone(300);
  auto r = feed(t, voice);
  BOOST_TEST(r.turn_start);
  BOOST_TEST(t.turn_first_sample() == int64_t(ms(800)));
  BOOST_REQUIRE(r.to_encoder.size() == ms(200 + 300));
  BOOST_TEST(r.to_encoder[0] == quiet[ms(800)]);
  BOOST_TEST(r.to_encoder[ms(200) - 1] == quiet.back());
  for (size_t i = 0; i < voice.size(); ++i) BOOST_REQUIRE(r.to_encoder[ms(200) + i] == voice[i]);
}

BOOST_AUTO_TEST_CASE(text_turn_and_cancel_transitions) {
  turn_logic t;
  BOOST_TEST(!t.cancel());
  BOOST_TEST(t.text_turn());
  BOOST_TEST(!t.text_turn());  // busy
  t.answer_started();
  BOOST_CHECK(t.state() == turn_state::answering);
  BOOST_TEST(t.cancel());
  BOOST_CHECK(t.state() == turn_state::idle);
  feed(t, silence(100));
  feed(t, tone(200));
  BOOST_CHECK(t.state() == turn_state::listening);
  BOOST_TEST(!t.text_turn());
  BOOST_TEST(t.cancel());  // drops the turn being listened to
  BOOST_CHECK(t.state() == turn_state::idle);
}

BOOST_AUTO_TEST_CASE(piece_size_does_not_matter) {
  std::vector<float> x = silence(300);
  auto v = tone(500);
  x.insert(x.end(), v.begin(), v.end());
  auto s = silence(900);
  x.insert(x.end(), s.begin(), s.end());
  turn_logic a, b;
  auto ra = feed(a, x, 7);
  auto rb = feed(b, x, 100);
  BOOST_TEST(ra.start_at > 0);
  BOOST_CHECK(ra.end == turn_end_reason::endpoint);
  BOOST_CHECK(rb.end == turn_end_reason::endpoint);
  BOOST_TEST(a.turn_first_sample() == b.turn_first_sample());
  BOOST_TEST(a.turn_samples() == b.turn_samples());
  BOOST_TEST(ra.to_encoder == rb.to_encoder);
}

// ---------------------------------------------------------------- prompt pieces

namespace {
void check_pieces(const models::chat_template& t, const std::string& system) {
  const auto p = make_prompt_pieces(t, system);
  std::vector<models::chat_message> conv;
  if (!system.empty()) conv.push_back({"system", system});
  conv.push_back({"user", "hello"});
  BOOST_TEST(p.open + p.first_user_head + "hello" + p.user_tail == t.apply(conv, true));
  conv.push_back({"assistant", "hi there"});
  conv.push_back({"user", "how are you"});
  BOOST_TEST(p.open + p.first_user_head + "hello" + p.user_tail + "hi there" + p.assistant_tail + p.user_head +
                 "how are you" + p.user_tail ==
             t.apply(conv, true));
  conv.pop_back();
  conv.push_back({"system", "be brief"});
  conv.push_back({"user", "how are you"});
  BOOST_TEST(p.open + p.first_user_head + "hello" + p.user_tail + "hi there" + p.assistant_tail + p.system_head +
                 "be brief" + p.system_tail + p.user_head + "how are you" + p.user_tail ==
             t.apply(conv, true));
}
}  // namespace

BOOST_AUTO_TEST_CASE(prompt_pieces_equal_the_rendered_template) {
  auto chatml = models::chat_template::named("chatml");
  check_pieces(chatml, "");
  check_pieces(chatml, "You are terse.");
  auto llama = models::chat_template::named("llama3");
  check_pieces(llama, "");
  check_pieces(llama, "You are terse.");
}

BOOST_AUTO_TEST_CASE(first_turn_is_the_training_student_prompt) {
  // docs/training.md step 3: the default system prompt, speech in place of the user text.
  auto t = models::chat_template::named("chatml");
  t.set_default_system("You are a helpful AI assistant named SmolLM, trained by Hugging Face");
  const auto p = make_prompt_pieces(t, "");
  BOOST_TEST(p.system == t.default_system());
  BOOST_TEST(p.open == "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
                       "Face<|im_end|>\n");
  BOOST_TEST(p.first_user_head == "<|im_start|>user\n");
  BOOST_TEST(p.user_tail == "<|im_end|>\n<|im_start|>assistant\n");
  BOOST_TEST(p.assistant_tail == "<|im_end|>\n");
  BOOST_TEST(p.user_head == "<|im_start|>user\n");
  BOOST_TEST(p.open + p.first_user_head + "X" + p.user_tail == t.apply({{"user", "X"}}, true));
}

BOOST_AUTO_TEST_CASE(context_policy_keeps_the_most_recent_turns_that_fit) {
  std::vector<int64_t> rows = {100, 50, 80, 40};
  BOOST_TEST(first_turn_to_keep(rows, 100, 1000) == 0u);   // all fit
  BOOST_TEST(first_turn_to_keep(rows, 100, 300) == 1u);    // 40 + 80 + 50 = 170 <= 200, + 100 > 200
  BOOST_TEST(first_turn_to_keep(rows, 100, 250) == 2u);    // 40 + 80 = 120 <= 150, + 50 > 150
  BOOST_TEST(first_turn_to_keep(rows, 100, 139) == 4u);    // 40 > 39: none
  BOOST_TEST(first_turn_to_keep({}, 100, 50) == 0u);
}
