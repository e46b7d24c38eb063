// The wire codec (transport/protocol.hpp, docs/protocol.md): round trips of
// every frame type, each malformed case mapped to its error code, PCM
// conversion, and a fuzz run that must only ever raise protocol_error.
#include <boost/test/unit_test.hpp>

#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <random>

#include <msgpack.hpp>

#include "transport/protocol.hpp"

using namespace undertone::transport;
using undertone::actors::error_code;

namespace {

std::vector<std::string_view> views(const std::vector<std::string>& parts) {
  return std::vector<std::string_view>(parts.begin(), parts.end());
}

client_message client_round_trip(const client_message& m) { return decode_client(views(encode(m))); }
server_message server_round_trip(const server_message& m) { return decode_server(views(encode(m))); }

/// The error code decode_client raises for `parts` (none = it decoded).
error_code client_error_of(const std::vector<std::string>& parts, const frame_limits& lim = {}) {
  try {
    decode_client(views(parts), lim);
  } catch (const protocol_error& e) {
    return e.code;
  }
  return error_code::none;
}

/// A msgpack map header built by hand (to produce wrong types, missing keys...).
struct raw_header {
  msgpack::sbuffer buf;
  msgpack::packer<msgpack::sbuffer> p{buf};
  explicit raw_header(uint32_t n_keys) { p.pack_map(n_keys); }
  template <class T>
  raw_header& kv(const char* k, const T& v) {
    p.pack(k);
    p.pack(v);
    return *this;
  }
  raw_header& k_nil(const char* k) {
    p.pack(k);
    p.pack_nil();
    return *this;
  }
  std::string str() const { return std::string(buf.data(), buf.size()); }
};

}  // namespace

BOOST_AUTO_TEST_SUITE(round_trips)

BOOST_AUTO_TEST_CASE(hello_config_text_cancel_annotate_bye) {
  hello_msg h;
  h.client = "alice";
  h.token = "t0k";
  auto hh = std::get<hello_msg>(client_round_trip(h));
  BOOST_TEST(hh.client == "alice");
  BOOST_TEST(hh.token == "t0k");
  BOOST_TEST(hh.version == protocol_version);

  config_msg c;
  c.system_prompt = "be brief";
  c.temperature = 0.7;
  c.top_p = 0.9;
  c.repetition_penalty = 1.1;
  c.top_k = 20;
  c.max_tokens = 64;
  c.seed = uint64_t(1) << 40;
  c.vad = false;
  c.log = true;
  c.vad_threshold_db = -35.5;
  c.trailing_silence_ms = 500;
  c.min_speech_ms = 80;
  c.max_turn_ms = 20000;
  auto cc = std::get<config_msg>(client_round_trip(c));
  BOOST_TEST(*cc.system_prompt == "be brief");
  BOOST_TEST(*cc.temperature == 0.7);
  BOOST_TEST(*cc.top_p == 0.9);
  BOOST_TEST(*cc.repetition_penalty == 1.1);
  BOOST_TEST(*cc.top_k == 20);
  BOOST_TEST(*cc.max_tokens == 64);
  BOOST_TEST(*cc.seed == uint64_t(1) << 40);
  BOOST_TEST(*cc.vad == false);
  BOOST_TEST(*cc.log == true);
  BOOST_TEST(*cc.vad_threshold_db == -35.5);
  BOOST_TEST(*cc.trailing_silence_ms == 500);
  BOOST_TEST(*cc.min_speech_ms == 80);
  BOOST_TEST(*cc.max_turn_ms == 20000);

  // Only the fields present travel; the rest stay unset.
  config_msg partial;
  partial.temperature = 1.0;
  auto pc = std::get<config_msg>(client_round_trip(partial));
  BOOST_TEST(pc.temperature.has_value());
  BOOST_TEST(!pc.system_prompt.has_value());
  BOOST_TEST(!pc.vad.has_value());

  BOOST_TEST(std::get<text_msg>(client_round_trip(text_msg{"héllo wörld"})).text == "héllo wörld");
  BOOST_TEST(std::holds_alternative<cancel_msg>(client_round_trip(cancel_msg{})));
  BOOST_TEST(std::holds_alternative<bye_msg>(client_round_trip(bye_msg{})));
  auto a = std::get<annotate_msg>(client_round_trip(annotate_msg{3, "hi there", "happy"}));
  BOOST_TEST(a.turn == 3);
  BOOST_TEST(a.transcript == "hi there");
  BOOST_TEST(a.emotion == "happy");
  BOOST_TEST(std::get<end_turn_msg>(client_round_trip(end_turn_msg{17})).seq == 17u);
}

BOOST_AUTO_TEST_CASE(audio_s16_and_f32) {
  const std::vector<float> x = {0.0f, 0.5f, -0.5f, 1.0f, -1.0f, 0.25f};
  auto m = make_audio(5, x.data(), x.size(), 48000, 2);
  BOOST_TEST(encode(client_message{m}).size() == 2u);
  auto d = std::get<audio_msg>(client_round_trip(m));
  BOOST_TEST(d.seq == 5u);
  BOOST_TEST(d.sample_rate == 48000);
  BOOST_TEST(d.channels == 2);
  BOOST_TEST((d.format == pcm_format::s16le));
  const auto y = d.to_float();
  BOOST_REQUIRE_EQUAL(y.size(), x.size());
  for (size_t i = 0; i < x.size(); ++i) BOOST_TEST(std::abs(y[i] - x[i]) <= 1.0f / 32768.0f);
  BOOST_TEST(y[4] == -1.0f);  // -32768 exactly

  auto f = make_audio(6, x.data(), x.size(), 16000, 1, pcm_format::f32le);
  auto df = std::get<audio_msg>(client_round_trip(f));
  BOOST_TEST((df.format == pcm_format::f32le));
  BOOST_TEST(df.to_float() == x);

  const std::vector<int16_t> s = {0, 1, -1, 32767, -32768};
  auto ds = std::get<audio_msg>(client_round_trip(make_audio(0, s.data(), s.size(), 8000, 1)));
  const auto ys = ds.to_float();
  for (size_t i = 0; i < s.size(); ++i) BOOST_TEST(ys[i] == float(s[i]) / 32768.0f);
}

BOOST_AUTO_TEST_CASE(nan_and_partial_frames_are_rejected) {
  std::vector<float> x = {0.1f, std::numeric_limits<float>::quiet_NaN()};
  auto f = make_audio(0, x.data(), x.size(), 16000, 1, pcm_format::f32le);
  auto d = std::get<audio_msg>(client_round_trip(f));
  BOOST_CHECK_EXCEPTION(d.to_float(), protocol_error, [](const protocol_error& e) { return e.code == error_code::bad_frame; });
  x[1] = std::numeric_limits<float>::infinity();
  d = std::get<audio_msg>(client_round_trip(make_audio(0, x.data(), x.size(), 16000, 1, pcm_format::f32le)));
  BOOST_CHECK_THROW(d.to_float(), protocol_error);
  // NaN to s16 becomes silence rather than garbage.
  x[1] = std::numeric_limits<float>::quiet_NaN();
  auto s = std::get<audio_msg>(client_round_trip(make_audio(0, x.data(), x.size(), 16000, 1)));
  BOOST_TEST(s.to_float()[1] == 0.0f);
  // 3 bytes of s16 mono: not a whole number of samples.
  audio_msg odd;
  odd.pcm = "abc";
  BOOST_CHECK_THROW(odd.to_float(), protocol_error);
  auto parts = encode(client_message{odd});
  BOOST_TEST((client_error_of(parts) == error_code::bad_frame));
  // Stereo with an odd number of samples.
  const std::vector<int16_t> three = {1, 2, 3};
  BOOST_TEST((client_error_of(encode(client_message{make_audio(0, three.data(), 3, 16000, 2)})) ==
              error_code::bad_frame));
}

BOOST_AUTO_TEST_CASE(server_frames) {
  auto w = std::get<welcome_msg>(server_round_trip(welcome_msg{protocol_version, 42, "llm=x; encoder=y"}));
  BOOST_TEST(w.session == 42u);
  BOOST_TEST(w.models == "llm=x; encoder=y");
  auto d = std::get<delta_msg>(server_round_trip(delta_msg{2, " world"}));
  BOOST_TEST(d.turn == 2);
  BOOST_TEST(d.text == " world");

  turn_end_msg t;
  t.turn = 2;
  t.text = "hello world";
  t.stop_reason = "stop_token";
  t.timings.end_of_turn_to_first_token_ms = 123.5;
  t.timings.last_voice_to_first_token_ms = 700.25;
  t.timings.audio_ms = 2000;
  t.timings.encode_ms = 40;
  t.timings.prefill_ms = 30;
  t.timings.flush_ms = 25;
  t.timings.decode_ms = 250;
  t.timings.speech_tokens = 12;
  t.timings.answer_tokens = 9;
  t.llm_version = "smollm2";
  t.encoder_version = "enc-3";
  auto tt = std::get<turn_end_msg>(server_round_trip(t));
  BOOST_TEST(tt.turn == 2);
  BOOST_TEST(tt.text == t.text);
  BOOST_TEST(tt.stop_reason == t.stop_reason);
  BOOST_TEST(tt.timings.end_of_turn_to_first_token_ms == 123.5);
  BOOST_TEST(tt.timings.last_voice_to_first_token_ms == 700.25);
  BOOST_TEST(tt.timings.audio_ms == 2000);
  BOOST_TEST(tt.timings.encode_ms == 40);
  BOOST_TEST(tt.timings.prefill_ms == 30);
  BOOST_TEST(tt.timings.flush_ms == 25);
  BOOST_TEST(tt.timings.decode_ms == 250);
  BOOST_TEST(tt.timings.speech_tokens == 12);
  BOOST_TEST(tt.timings.answer_tokens == 9);
  BOOST_TEST(tt.llm_version == "smollm2");
  BOOST_TEST(tt.encoder_version == "enc-3");

  auto e = std::get<event_msg>(server_round_trip(event_msg{1, "emotion", "sad", 0.8}));
  BOOST_TEST(e.turn == 1);
  BOOST_TEST(e.name == "emotion");
  BOOST_TEST(e.label == "sad");
  BOOST_TEST(e.value == 0.8);
  auto r = std::get<error_msg>(server_round_trip(error_msg{error_code::server_full, "full", true}));
  BOOST_TEST((r.code == error_code::server_full));
  BOOST_TEST(r.message == "full");
  BOOST_TEST(r.fatal);
}

BOOST_AUTO_TEST_CASE(type_names_and_error_names) {
  BOOST_TEST(std::string(type_name(client_message{audio_msg{}})) == "audio");
  BOOST_TEST(std::string(type_name(client_message{bye_msg{}})) == "bye");
  BOOST_TEST(std::string(type_name(server_message{turn_end_msg{}})) == "turn_end");
  BOOST_TEST(std::string(error_name(error_code::out_of_order)) == "out_of_order");
  BOOST_TEST(std::string(error_name(error_code::internal)) == "internal");
  BOOST_TEST(std::string(error_name(error_code::unauthorized)) == "unauthorized");
  BOOST_TEST(int(error_code::unauthorized) == 14);  // docs/protocol.md
}

BOOST_AUTO_TEST_CASE(hello_token_is_an_optional_key) {
  // Without a token the hello is what a version-1 peer always sent: no "token" key.
  hello_msg h;
  h.client = "old";
  const auto parts = encode(client_message{h});
  BOOST_TEST(parts[0].find("token") == std::string::npos);
  BOOST_TEST(std::get<hello_msg>(client_round_trip(h)).token.empty());
  h.token = "s3cret";
  BOOST_TEST(encode(client_message{h})[0].find("token") != std::string::npos);
}

BOOST_AUTO_TEST_SUITE_END()

BOOST_AUTO_TEST_SUITE(malformed)

BOOST_AUTO_TEST_CASE(not_msgpack_or_not_a_map) {
  BOOST_TEST((client_error_of({}) == error_code::bad_frame));
  BOOST_TEST((client_error_of({""}) == error_code::bad_frame));
  BOOST_TEST((client_error_of({"\xc1"}) == error_code::bad_frame));        // never-used msgpack byte
  BOOST_TEST((client_error_of({"\x82\xa1v"}) == error_code::bad_frame));   // truncated map
  msgpack::sbuffer b;
  msgpack::pack(b, std::vector<int>{1, 2, 3});
  BOOST_TEST((client_error_of({std::string(b.data(), b.size())}) == error_code::bad_frame));  // array
  // Trailing garbage after a valid header.
  auto ok = encode(client_message{cancel_msg{}});
  BOOST_TEST((client_error_of({ok[0] + "x"}) == error_code::bad_frame));
  // A 5-byte header claiming a 4-billion-element array must not allocate it.
  BOOST_TEST((client_error_of({std::string("\xdd\xff\xff\xff\xff", 5)}) == error_code::bad_frame));
  BOOST_TEST((client_error_of({std::string("\xdf\xff\xff\xff\xff", 5)}) == error_code::bad_frame));
}

BOOST_AUTO_TEST_CASE(version_and_type) {
  BOOST_TEST((client_error_of({raw_header(1).kv("t", "hello").str()}) == error_code::bad_frame));  // no v
  BOOST_TEST((client_error_of({raw_header(2).kv("v", 99).kv("t", "hello").str()}) ==
              error_code::unsupported_version));
  BOOST_TEST((client_error_of({raw_header(2).kv("v", "1").kv("t", "hello").str()}) == error_code::bad_frame));
  BOOST_TEST((client_error_of({raw_header(2).kv("v", -1).kv("t", "hello").str()}) == error_code::bad_frame));
  BOOST_TEST((client_error_of({raw_header(1).kv("v", 1).str()}) == error_code::bad_frame));  // no t
  BOOST_TEST((client_error_of({raw_header(2).kv("v", 1).kv("t", 7).str()}) == error_code::bad_frame));
  BOOST_TEST((client_error_of({raw_header(2).kv("v", 1).kv("t", "dance").str()}) == error_code::unknown_type));
  // Server types are unknown to the client decoder and vice versa.
  BOOST_TEST((client_error_of(encode(server_message{delta_msg{}})) == error_code::unknown_type));
  BOOST_CHECK_EXCEPTION(decode_server(views(encode(client_message{bye_msg{}}))), protocol_error,
                        [](const protocol_error& e) { return e.code == error_code::unknown_type; });
  // Duplicate and non-string keys.
  BOOST_TEST((client_error_of({raw_header(3).kv("v", 1).kv("t", "bye").kv("t", "bye").str()}) ==
              error_code::bad_frame));
  raw_header h(3);
  h.kv("v", 1).kv("t", "bye");
  h.p.pack(5);
  h.p.pack(5);
  BOOST_TEST((client_error_of({h.str()}) == error_code::bad_frame));
}

BOOST_AUTO_TEST_CASE(missing_and_mistyped_keys) {
  auto hdr = [](std::initializer_list<std::function<void(raw_header&)>> fs, const char* type) {
    raw_header h(uint32_t(fs.size() + 2));
    h.kv("v", 1).kv("t", type);
    for (auto& f : fs) f(h);
    return h.str();
  };
  const std::string pcm(640, '\0');
  // audio: each required key missing or mistyped.
  BOOST_TEST((client_error_of({hdr({[](raw_header& h) { h.kv("fmt", "s16"); }, [](raw_header& h) { h.kv("sr", 16000); },
                                    [](raw_header& h) { h.kv("ch", 1); }},
                                   "audio"),
                               pcm}) == error_code::bad_frame));  // no seq
  auto audio = [&](auto seq, auto fmt, auto sr, auto ch) {
    raw_header h(6);
    h.kv("v", 1).kv("t", "audio").kv("seq", seq).kv("fmt", fmt).kv("sr", sr).kv("ch", ch);
    return h.str();
  };
  BOOST_TEST((client_error_of({audio(0, "s16", 16000, 1), pcm}) == error_code::none));
  BOOST_TEST((client_error_of({audio(-1, "s16", 16000, 1), pcm}) == error_code::bad_frame));
  BOOST_TEST((client_error_of({audio(0.5, "s16", 16000, 1), pcm}) == error_code::bad_frame));
  BOOST_TEST((client_error_of({audio(0, "u8", 16000, 1), pcm}) == error_code::bad_frame));
  BOOST_TEST((client_error_of({audio(0, 16, 16000, 1), pcm}) == error_code::bad_frame));
  BOOST_TEST((client_error_of({audio(0, "s16", "16k", 1), pcm}) == error_code::bad_frame));
  BOOST_TEST((client_error_of({audio(0, "s16", 0, 1), pcm}) == error_code::bad_frame));
  BOOST_TEST((client_error_of({audio(0, "s16", 16000, 0), pcm}) == error_code::bad_frame));
  BOOST_TEST((client_error_of({audio(0, "s16", 16000, 1000), pcm}) == error_code::bad_frame));
  BOOST_TEST((client_error_of({audio(0, "s16", int64_t(1) << 40, 1), pcm}) == error_code::bad_frame));
  // Audio needs exactly two parts; everything else exactly one.
  BOOST_TEST((client_error_of({audio(0, "s16", 16000, 1)}) == error_code::bad_frame));
  BOOST_TEST((client_error_of({audio(0, "s16", 16000, 1), pcm, pcm}) == error_code::bad_frame));
  BOOST_TEST((client_error_of({encode(client_message{bye_msg{}})[0], "extra"}) == error_code::bad_frame));
  // end_turn / text required keys.
  BOOST_TEST((client_error_of({raw_header(2).kv("v", 1).kv("t", "end_turn").str()}) == error_code::bad_frame));
  BOOST_TEST((client_error_of({raw_header(3).kv("v", 1).kv("t", "text").kv("text", 5).str()}) ==
              error_code::bad_frame));
  BOOST_TEST((client_error_of({raw_header(2).kv("v", 1).kv("t", "text").str()}) == error_code::bad_frame));
  // config: mistyped optional keys are errors, absent ones are fine.
  BOOST_TEST((client_error_of({raw_header(3).kv("v", 1).kv("t", "config").kv("vad", 1).str()}) ==
              error_code::bad_frame));
  BOOST_TEST((client_error_of({raw_header(3).kv("v", 1).kv("t", "config").kv("temperature", "hot").str()}) ==
              error_code::bad_frame));
  BOOST_TEST((client_error_of({raw_header(3).kv("v", 1).kv("t", "config").kv("top_k", 1.5).str()}) ==
              error_code::bad_frame));
  BOOST_TEST((client_error_of({raw_header(3).kv("v", 1).kv("t", "config").kv("trailing_silence_ms",
                                                                              int64_t(1) << 33).str()}) ==
              error_code::bad_frame));
  BOOST_TEST((client_error_of({raw_header(3).kv("v", 1).kv("t", "config").k_nil("system").str()}) ==
              error_code::bad_frame));
  BOOST_TEST((client_error_of({raw_header(3).kv("v", 1).kv("t", "config").kv("temperature", 1).str()}) ==
              error_code::none));  // an integer where a real is expected is fine
  BOOST_TEST((client_error_of({raw_header(2).kv("v", 1).kv("t", "config").str()}) == error_code::none));
  // hello: name must be a string if present.
  BOOST_TEST((client_error_of({raw_header(3).kv("v", 1).kv("t", "hello").kv("name", 3).str()}) ==
              error_code::bad_frame));
}

BOOST_AUTO_TEST_CASE(unknown_keys_are_ignored) {
  raw_header h(5);
  h.kv("v", 1).kv("t", "text").kv("text", "hi").kv("future", std::vector<int>{1, 2}).kv("x", 1.5);
  auto m = decode_client(views({h.str()}));
  BOOST_TEST(std::get<text_msg>(m).text == "hi");
}

BOOST_AUTO_TEST_CASE(size_limits) {
  const std::vector<int16_t> big(5000, 7);
  auto parts = encode(client_message{make_audio(0, big.data(), big.size(), 16000, 1)});
  BOOST_TEST((client_error_of(parts, frame_limits{1000, 64 << 10}) == error_code::frame_too_large));
  BOOST_TEST((client_error_of(parts, frame_limits{20000, 64 << 10}) == error_code::none));
  auto text = encode(client_message{text_msg{std::string(2000, 'a')}});
  BOOST_TEST((client_error_of(text, frame_limits{1 << 20, 100}) == error_code::frame_too_large));
}

BOOST_AUTO_TEST_SUITE_END()

BOOST_AUTO_TEST_CASE(fuzz_never_throws_anything_but_protocol_error) {
  std::mt19937_64 rng(1234);
  // Valid frames of every type, to mutate.
  std::vector<std::vector<std::string>> seeds;
  const std::vector<float> x(320, 0.1f);
  config_msg c;
  c.temperature = 0.5;
  c.system_prompt = "sys";
  for (const client_message& m :
       {client_message{hello_msg{protocol_version, "a", "b"}}, client_message{c},
        client_message{make_audio(3, x.data(), x.size(), 16000, 1)}, client_message{end_turn_msg{4}},
        client_message{text_msg{"hello"}}, client_message{cancel_msg{}}, client_message{annotate_msg{1, "t", "e"}},
        client_message{bye_msg{}}})
    seeds.push_back(encode(m));
  turn_end_msg t;
  t.text = "answer";
  for (const server_message& m : {server_message{welcome_msg{}}, server_message{delta_msg{1, "x"}}, server_message{t},
                                   server_message{event_msg{}}, server_message{error_msg{}}})
    seeds.push_back(encode(m));

  size_t decoded = 0, rejected = 0;
  auto try_both = [&](const std::vector<std::string>& parts) {
    const auto v = views(parts);
    for (int side = 0; side < 2; ++side) {
      try {
        if (side == 0) {
          auto m = decode_client(v, frame_limits{4096, 1024});
          if (auto* a = std::get_if<audio_msg>(&m)) {
            try {
              a->to_float();
            } catch (const protocol_error&) {
            }
          }
        } else {
          decode_server(v, frame_limits{4096, 1024});
        }
        ++decoded;
      } catch (const protocol_error&) {
        ++rejected;
      } catch (const std::exception& e) {
        BOOST_FAIL("decode threw a non-protocol exception: " << e.what());
      } catch (...) {
        BOOST_FAIL("decode threw a non-std exception");
      }
    }
  };
  for (int i = 0; i < 20000; ++i) {
    std::vector<std::string> parts;
    if (i % 2 == 0) {
      // Pure random bytes, 1-3 parts.
      const int n_parts = 1 + int(rng() % 3);
      for (int p = 0; p < n_parts; ++p) {
        std::string s(rng() % 64, '\0');
        for (auto& ch : s) ch = char(rng());
        parts.push_back(std::move(s));
      }
    } else {
      // A valid frame with a few bytes flipped, inserted or cut.
      parts = seeds[rng() % seeds.size()];
      auto& h = parts[0];
      const int edits = 1 + int(rng() % 4);
      for (int k = 0; k < edits && !h.empty(); ++k) {
        const size_t at = rng() % h.size();
        switch (rng() % 3) {
          case 0: h[at] = char(rng()); break;
          case 1: h.insert(h.begin() + long(at), char(rng())); break;
          default: h.resize(at); break;
        }
      }
    }
    try_both(parts);
  }
  BOOST_TEST_MESSAGE("fuzz: " << decoded << " decoded, " << rejected << " rejected");
  BOOST_TEST(rejected > 0u);
  BOOST_TEST(decoded > 0u);  // mutations keep some frames valid
}

BOOST_AUTO_TEST_CASE(structured_fuzz_of_known_keys) {
  // Well-formed msgpack maps with the real type names and keys but random
  // value types: exercises every type check; only protocol_error may escape.
  std::mt19937_64 rng(99);
  const std::vector<std::string> types = {"hello", "config", "audio", "end_turn", "text", "cancel", "annotate",
                                          "bye", "welcome", "delta", "turn_end", "event", "error", "nope"};
  const std::vector<std::string> keys = {"name", "token", "system", "temperature", "top_p", "top_k", "max_tokens",
                                         "seed", "vad", "log", "vad_threshold_db", "trailing_silence_ms",
                                         "min_speech_ms", "max_turn_ms", "seq", "fmt", "sr", "ch", "text", "turn",
                                         "transcript", "emotion", "session", "models", "stop", "timings", "llm",
                                         "encoder", "label", "value", "code", "msg", "fatal", "eot_ms", "v", "t"};
  auto pack_value = [&](msgpack::packer<msgpack::sbuffer>& p, int depth, auto& self) -> void {
    switch (rng() % (depth > 1 ? 9 : 10)) {
      case 0: p.pack(uint64_t(rng() % 100000)); break;
      case 1: p.pack(-int64_t(rng() % 100000) - 1); break;
      case 2: p.pack(double(int64_t(rng() % 2000) - 1000) / 7.0); break;
      case 3: p.pack(std::numeric_limits<double>::quiet_NaN()); break;
      case 4: p.pack(bool(rng() % 2)); break;
      case 5: p.pack(std::string(rng() % 2 ? "s16" : "f32")); break;
      case 6: p.pack_nil(); break;
      case 7: p.pack(uint64_t(rng())); break;
      case 8: p.pack_bin(3), p.pack_bin_body("abc", 3); break;
      default: {
        const uint32_t n = uint32_t(rng() % 4);
        p.pack_map(n);
        for (uint32_t i = 0; i < n; ++i) {
          p.pack(keys[rng() % keys.size()]);
          self(p, depth + 1, self);
        }
      }
    }
  };
  size_t decoded = 0;
  for (int i = 0; i < 20000; ++i) {
    msgpack::sbuffer buf;
    msgpack::packer<msgpack::sbuffer> p(buf);
    const uint32_t n = 2 + uint32_t(rng() % 6);
    p.pack_map(n);
    p.pack("v");
    p.pack(rng() % 8 == 0 ? uint32_t(2) : protocol_version);
    p.pack("t");
    p.pack(types[rng() % types.size()]);
    for (uint32_t k = 2; k < n; ++k) {
      p.pack(keys[rng() % keys.size()]);
      pack_value(p, 1, pack_value);
    }
    std::vector<std::string> parts = {std::string(buf.data(), buf.size())};
    if (rng() % 2) parts.push_back(std::string(size_t(rng() % 9), 'x'));
    for (int side = 0; side < 2; ++side) {
      try {
        if (side == 0) {
          auto m = decode_client(views(parts));
          if (auto* a = std::get_if<audio_msg>(&m)) a->to_float();
        } else {
          decode_server(views(parts));
        }
        ++decoded;
      } catch (const protocol_error&) {
      } catch (const std::exception& e) {
        BOOST_FAIL("non-protocol exception: " << e.what());
      }
    }
  }
  BOOST_TEST_MESSAGE("structured fuzz: " << decoded << " decoded");
  BOOST_TEST(decoded > 0u);
}
