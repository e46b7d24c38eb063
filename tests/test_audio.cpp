// Audio input (models/audio.hpp): decoding, raw PCM, downmix, offline and
// streaming resampling, and the documented edge cases.
#include <boost/test/unit_test.hpp>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <limits>
#include <random>

#include "models/audio.hpp"
#include "tests/support.hpp"

namespace um = undertone::models;
namespace ut = undertone::testing;
namespace fs = std::filesystem;

namespace {

std::string ravdess_clip() {
  return undertone::testing::ravdess_dir() + "/03-01-05-02-01-01-01.flac";
}
bool have_clip() { return fs::exists(ravdess_clip()); }
bool have_sox() { return std::system("sox --version > /dev/null 2>&1") == 0; }
boost::test_tools::assertion_result clip_and_sox_ok(boost::unit_test::test_unit_id) {
  boost::test_tools::assertion_result r(have_clip() && have_sox());
  r.message() << "needs sox and " << ravdess_clip() << " (set UT_RAVDESS_DIR)";
  return r;
}
void sox(const std::string& args) {
  BOOST_REQUIRE_MESSAGE(std::system(("sox " + args).c_str()) == 0, "sox " + args);
}

std::string read_bytes(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
}

std::vector<float> sine(int rate, double hz, double seconds, double amp = 0.5) {
  std::vector<float> x(size_t(rate * seconds));
  for (size_t i = 0; i < x.size(); ++i) x[i] = float(amp * std::sin(2 * 3.14159265358979323846 * hz * double(i) / rate));
  return x;
}

std::vector<float> noise(size_t n, unsigned seed, float sd = 0.2f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> g(0.0f, sd);
  std::vector<float> x(n);
  for (auto& v : x) v = g(rng);
  return x;
}

double max_abs_diff(const std::vector<float>& a, const std::vector<float>& b) {
  BOOST_REQUIRE_EQUAL(a.size(), b.size());
  double m = 0;
  for (size_t i = 0; i < a.size(); ++i) m = std::max(m, std::fabs(double(a[i]) - b[i]));
  return m;
}

template <class F>
void check_throws_with(F f, const std::string& needle) {
  try {
    f();
    BOOST_ERROR("expected audio_error containing '" << needle << "'");
  } catch (const um::audio_error& e) {
    BOOST_TEST(std::string(e.what()).find(needle) != std::string::npos, e.what());
  }
}

}  // namespace

BOOST_AUTO_TEST_CASE(flac_wav_ogg_and_memory,
                     *boost::unit_test::precondition(clip_and_sox_ok)) {
  auto flac = um::load_audio(ravdess_clip());
  BOOST_TEST(flac.sample_rate == 16000);
  BOOST_TEST(flac.info.source_rate == 16000);
  BOOST_TEST(flac.info.source_channels == 1);
  BOOST_TEST(flac.info.format.find("FLAC") != std::string::npos, flac.info.format);
  BOOST_REQUIRE_EQUAL(flac.samples.size(), 65666u);
  BOOST_TEST(flac.info.peak > 0.5f);

  ut::temp_dir tmp;
  const auto t = tmp.str();
  // sox decodes FLAC with libFLAC: an independent decoder for the same PCM.
  sox("'" + ravdess_clip() + "' -t raw -e signed -b 16 '" + t + "/x.s16'");
  sox("'" + ravdess_clip() + "' '" + t + "/x.wav'");
  sox("'" + ravdess_clip() + "' '" + t + "/x.ogg'");
  auto raw = um::load_raw_pcm(t + "/x.s16", {um::pcm_sample_type::s16le, 16000, 1});
  BOOST_TEST(raw.samples == flac.samples);
  BOOST_TEST(um::load_audio(t + "/x.wav").samples == flac.samples);
  auto bytes = read_bytes(ravdess_clip());
  BOOST_TEST(um::decode_audio(bytes.data(), bytes.size()).samples == flac.samples);
  auto rbytes = read_bytes(t + "/x.s16");
  BOOST_TEST(um::decode_raw_pcm(rbytes.data(), rbytes.size(), {}).samples == flac.samples);

  // Vorbis is lossy: same length (+- a few samples) and high correlation.
  auto ogg = um::load_audio(t + "/x.ogg");
  BOOST_TEST(std::labs(long(ogg.samples.size()) - long(flac.samples.size())) <= 16);
  double num = 0, den = 0;
  for (size_t i = 0; i < std::min(ogg.samples.size(), flac.samples.size()); ++i) {
    num += double(ogg.samples[i]) * flac.samples[i];
    den += double(flac.samples[i]) * flac.samples[i];
  }
  BOOST_TEST(num / den > 0.9);
}

BOOST_AUTO_TEST_CASE(raw_pcm_f32_stereo_44k_is_downmixed_and_resampled) {
  ut::temp_dir tmp;
  const auto l = sine(44100, 440.0, 1.0, 0.4), r = sine(44100, 440.0, 1.0, 0.2);
  std::vector<float> inter(l.size() * 2);
  for (size_t i = 0; i < l.size(); ++i) {
    inter[2 * i] = l[i];
    inter[2 * i + 1] = r[i];
  }
  const std::string p = tmp.str() + "/x.f32";
  {
    std::ofstream f(p, std::ios::binary);
    f.write(reinterpret_cast<const char*>(inter.data()), std::streamsize(inter.size() * 4));
  }
  auto a = um::load_raw_pcm(p, {um::pcm_sample_type::f32le, 44100, 2});
  BOOST_TEST(a.sample_rate == 16000);
  BOOST_TEST(a.info.source_channels == 2);
  BOOST_TEST(a.info.source_frames == 44100);
  BOOST_TEST(std::labs(long(a.samples.size()) - 16000) <= 1);
  // Mean of 0.4 and 0.2 amplitude: a 0.3 sine at 16 kHz (away from the edges,
  // where the sinc filter sees the zero padding).
  const auto ref = sine(16000, 440.0, 1.0, 0.3);
  double m = 0;
  for (size_t i = 800; i + 800 < std::min(a.samples.size(), ref.size()); ++i)
    m = std::max(m, std::fabs(double(a.samples[i]) - ref[i]));
  BOOST_TEST(m < 1e-4);
  // keep the source rate when asked
  um::audio_options keep;
  keep.target_rate = 0;
  auto k = um::load_raw_pcm(p, {um::pcm_sample_type::f32le, 44100, 2}, keep);
  BOOST_TEST(k.sample_rate == 44100);
  BOOST_TEST(k.samples == um::downmix(inter.data(), l.size(), 2));
}

BOOST_AUTO_TEST_CASE(downmix_is_the_channel_mean) {
  std::vector<float> x = {1.0f, 0.0f, -1.0f, 0.5f, 0.25f, 0.75f};  // 2 frames x 3 channels
  auto m = um::downmix(x.data(), 2, 3);
  BOOST_REQUIRE_EQUAL(m.size(), 2u);
  BOOST_TEST(m[0] == 0.0f);
  BOOST_TEST(std::fabs(m[1] - 0.5f) < 1e-7);
  BOOST_CHECK_THROW(um::downmix(x.data(), 2, 0), um::audio_error);
}

BOOST_AUTO_TEST_CASE(streaming_resampler_equals_offline) {
  for (int rate : {44100, 8000, 48000, 22050, 16000}) {
    for (int ch : {1, 2}) {
      const size_t frames = size_t(rate) * 3 / 2 + 37;
      auto x = noise(frames * size_t(ch), unsigned(rate + ch));
      const auto offline = um::resample(um::downmix(x.data(), frames, ch).data(), frames, rate, 16000);
      std::mt19937 rng(5);
      for (size_t piece : {size_t(1), size_t(441), size_t(4410), size_t(0)}) {  // 0 = random
        um::stream_resampler s(rate, ch);
        std::vector<float> out;
        size_t i = 0;
        while (i < frames) {
          size_t k = std::min(piece ? piece : size_t(rng() % 5000), frames - i);
          s.accept(x.data() + i * size_t(ch), k, out);
          i += k;
        }
        s.finish(out);
        BOOST_TEST_CONTEXT("rate " << rate << " ch " << ch << " piece " << piece) {
          BOOST_REQUIRE_EQUAL(out.size(), offline.size());
          const double d = max_abs_diff(out, offline);
          if (d > 0) BOOST_TEST_MESSAGE("rate " << rate << " piece " << piece << ": max diff " << d);
          BOOST_TEST(d < 1e-5);
          if (rate == 16000) BOOST_TEST(d == 0.0);
          BOOST_TEST(s.samples_out() == int64_t(out.size()));
        }
      }
    }
  }
}

BOOST_AUTO_TEST_CASE(streaming_resampler_s16_and_errors) {
  std::vector<int16_t> pcm(8000 * 2);
  std::mt19937 rng(9);
  for (auto& v : pcm) v = int16_t(int(rng() % 20000) - 10000);
  std::vector<float> f(pcm.size());
  for (size_t i = 0; i < pcm.size(); ++i) f[i] = pcm[i] / 32768.0f;
  um::stream_resampler a(8000, 2), b(8000, 2);
  std::vector<float> oa, ob;
  for (size_t i = 0; i < 8000; i += 100) a.accept_s16(pcm.data() + i * 2, 100, oa);
  a.finish(oa);
  b.accept(f.data(), 8000, ob);
  b.finish(ob);
  BOOST_REQUIRE_EQUAL(oa.size(), ob.size());
  BOOST_TEST(max_abs_diff(oa, ob) < 1e-5);
  BOOST_TEST(oa.size() == 16000u);

  // NaN: error with the absolute frame index; the state is unchanged.
  um::stream_resampler c(44100, 1);
  std::vector<float> out, x = noise(1000, 1);
  c.accept(x.data(), 500, out);
  x[700] = std::numeric_limits<float>::infinity();
  check_throws_with([&] { c.accept(x.data() + 500, 500, out); }, "frame 700");
  BOOST_TEST(c.frames_in() == 500);
  um::stream_resampler z(44100, 1, 16000, um::nonfinite_policy::replace_with_zero);
  z.accept(x.data(), 1000, out);
  BOOST_TEST(z.nonfinite_replaced() == 1);
  z.finish(out);
  check_throws_with([&] { z.accept(x.data(), 1, out); }, "after finish");
  check_throws_with([] { um::stream_resampler bad(0, 1); }, "positive");
  check_throws_with([] { um::stream_resampler bad(16000 * 300, 1); }, "ratio");
}

BOOST_AUTO_TEST_CASE(edge_cases) {
  ut::temp_dir tmp;
  const auto t = tmp.str();
  // Missing file, 0-byte file, garbage, truncated header: clear errors naming the file.
  check_throws_with([&] { um::load_audio(t + "/missing.wav"); }, "missing.wav");
  { std::ofstream(t + "/empty.wav"); }
  check_throws_with([&] { um::load_audio(t + "/empty.wav"); }, "empty.wav");
  {
    std::ofstream f(t + "/garbage.flac", std::ios::binary);
    auto g = noise(4096, 2);
    f.write(reinterpret_cast<const char*>(g.data()), std::streamsize(g.size() * 4));
  }
  check_throws_with([&] { um::load_audio(t + "/garbage.flac"); }, "cannot open or decode");
  { std::ofstream(t + "/text.wav") << "this is not audio at all, just some text\n"; }
  check_throws_with([&] { um::load_audio(t + "/text.wav"); }, "text.wav");
  check_throws_with([] { um::decode_audio("RIFF", 0); }, "0 bytes");
  check_throws_with([] { um::decode_audio("RIFF1234WAVEfmt ", 16); }, "cannot decode");

  // Zero-length data: an empty result, not an error.
  auto one = sine(16000, 100, 0.5);
  um::save_audio(t + "/zero.wav", one.data(), 0, 16000, 1);
  auto z = um::load_audio(t + "/zero.wav");
  BOOST_TEST(z.samples.empty());
  BOOST_TEST(z.seconds() == 0.0);
  { std::ofstream(t + "/zero.s16"); }
  BOOST_TEST(um::load_raw_pcm(t + "/zero.s16", {}).samples.empty());
  um::save_audio(t + "/truncated_src.wav", one.data(), one.size(), 16000, 1);
  ut::copy_prefix(t + "/truncated_src.wav", t + "/truncated.wav", 30);
  check_throws_with([&] { um::load_audio(t + "/truncated.wav"); }, "truncated.wav");

  // Raw PCM whose size is not a whole number of frames.
  {
    std::ofstream f(t + "/odd.s16", std::ios::binary);
    f.write("abcde", 5);
  }
  check_throws_with([&] { um::load_raw_pcm(t + "/odd.s16", {}); }, "whole number");
  check_throws_with([&] { um::load_raw_pcm(t + "/odd.s16", {um::pcm_sample_type::s16le, 0, 1}); },
                    "sample_rate");

  // Silence: zeros out, at any rate.
  std::vector<float> silent(44100 * 2, 0.0f);
  um::save_audio(t + "/silent.wav", silent.data(), 44100, 44100, 2);
  auto s = um::load_audio(t + "/silent.wav");
  BOOST_TEST(!s.samples.empty());
  BOOST_TEST(std::all_of(s.samples.begin(), s.samples.end(), [](float v) { return v == 0.0f; }));

  // Clipped / over full scale: passed through unchanged and counted.
  std::vector<float> loud = {0.5f, 1.5f, -1.0f, 0.99999f, -2.0f, 0.1f};
  um::save_audio(t + "/loud.wav", loud.data(), loud.size(), 16000, 1);
  auto l = um::load_audio(t + "/loud.wav");
  BOOST_TEST(l.samples == loud);
  BOOST_TEST(l.info.clipped_samples == 4);
  BOOST_TEST(l.info.peak == 2.0f);

  // NaN/Inf: error naming frame and channel by default; zeros + count on request.
  std::vector<float> nan_st = {0.1f, 0.2f, 0.3f, std::nanf(""), 0.5f, -std::numeric_limits<float>::infinity()};
  um::save_audio(t + "/nan.wav", nan_st.data(), 3, 16000, 2);
  check_throws_with([&] { um::load_audio(t + "/nan.wav"); }, "frame 1, channel 1");
  um::audio_options rep;
  rep.nonfinite = um::nonfinite_policy::replace_with_zero;
  auto r = um::load_audio(t + "/nan.wav", rep);
  BOOST_TEST(r.info.nonfinite_replaced == 2);
  BOOST_REQUIRE_EQUAL(r.samples.size(), 3u);
  BOOST_TEST(std::fabs(r.samples[1] - 0.15f) < 1e-7);  // (0.3 + 0) / 2
  BOOST_TEST(std::fabs(r.samples[2] - 0.25f) < 1e-7);  // (0.5 + 0) / 2

  // Too long: refused from the header, before decoding.
  um::audio_options shortlim;
  shortlim.max_seconds = 0.25;
  check_throws_with([&] { um::load_audio(t + "/truncated_src.wav", shortlim); }, "max_seconds");
  shortlim.max_seconds = 0.0;  // no limit
  BOOST_TEST(um::load_audio(t + "/truncated_src.wav", shortlim).samples.size() == one.size());
  {
    std::ofstream f(t + "/long.s16", std::ios::binary);
    std::vector<char> zeros(16000 * 2 * 3, 0);
    f.write(zeros.data(), std::streamsize(zeros.size()));
  }
  um::audio_options two;
  two.max_seconds = 2;
  check_throws_with([&] { um::load_raw_pcm(t + "/long.s16", {}, two); }, "3 s long");

  // Unsupported output format / impossible rate.
  check_throws_with([&] { um::save_audio(t + "/x.mp4", one.data(), 10, 16000, 1); }, "unsupported");
  um::audio_options crazy;
  crazy.target_rate = 16000 * 1000;
  check_throws_with([&] { um::load_audio(t + "/truncated_src.wav", crazy); }, "cannot resample");
}
