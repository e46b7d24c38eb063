// Whisper log-mel front end (models/mel.hpp): golden features from HF
// WhisperFeatureExtractor / openai-whisper (tests/golden/make_mel_golden.py),
// streaming == whole, causal vs offline normalization, resampled input.
//
// Tolerances (why):
//  - filterbank vs librosa's (whisper/assets/mel_filters.npz): 1e-7 abs; both are
//    float32 roundings of the same double formula.
//  - normalized log-mel vs HF: 2e-4 abs. HF runs the FFT in float64, we in float32
//    (FFTW); the float32 error of a 400-point FFT is ~1e-7 of the frame's energy, so a
//    bin 60 dB under its frame's loudest bin has a relative error ~1e-4, i.e. 4e-5
//    log10 units, 1e-5 normalized. The reference itself differs from openai-whisper
//    (float32 torch) by up to 1.4e-5 (recorded in the json).
//  - raw log10 mel: 2e-3 abs on values above -7 (bins far below that are noise-level
//    and clamped away by the normalization anyway); mean abs < 1e-5.
//  - streaming vs whole: exact (same code per frame).
#include <boost/test/unit_test.hpp>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <random>

#include "models/audio.hpp"
#include "models/mel.hpp"
#include "tests/support.hpp"

namespace um = undertone::models;
namespace ut = undertone::testing;
namespace fs = std::filesystem;

namespace {

std::string ravdess_dir() { return undertone::testing::ravdess_dir(); }
bool have_ravdess() { return fs::is_directory(ravdess_dir()); }
bool have_sox() { return std::system("sox --version > /dev/null 2>&1") == 0; }
boost::test_tools::assertion_result ravdess_ok(boost::unit_test::test_unit_id) {
  boost::test_tools::assertion_result r(have_ravdess());
  r.message() << "RAVDESS clips not found in " << ravdess_dir() << " (set UT_RAVDESS_DIR)";
  return r;
}
boost::test_tools::assertion_result ravdess_and_sox_ok(boost::unit_test::test_unit_id id) {
  if (!have_sox()) {
    boost::test_tools::assertion_result r(false);
    r.message() << "sox not installed";
    return r;
  }
  return ravdess_ok(id);
}

struct golden {
  nlohmann::json meta;
  std::vector<char> blob;
  golden() {
    const std::string dir = ut::source_dir() + "/tests/golden/";
    std::ifstream j(dir + "mel_golden.json");
    BOOST_REQUIRE_MESSAGE(j, "missing tests/golden/mel_golden.json; run tests/golden/make_mel_golden.py");
    meta = nlohmann::json::parse(j);
    std::ifstream b(dir + "mel_golden.f32", std::ios::binary);
    blob.assign(std::istreambuf_iterator<char>(b), std::istreambuf_iterator<char>());
  }
  /// Returns the array and its shape.
  std::vector<float> array(const std::string& name, std::vector<int64_t>* shape = nullptr) const {
    const auto& a = meta.at("arrays").at(name);
    int64_t n = 1;
    for (auto d : a.at("shape")) n *= d.get<int64_t>();
    if (shape) *shape = a.at("shape").get<std::vector<int64_t>>();
    const size_t off = a.at("offset").get<size_t>();
    BOOST_REQUIRE(off + size_t(n) * 4 <= blob.size());
    std::vector<float> v(static_cast<size_t>(n));
    std::memcpy(v.data(), blob.data() + off, size_t(n) * 4);
    return v;
  }
};

const golden& gold() {
  static golden g;
  return g;
}

struct diff_stats {
  double max_abs = 0, mean_abs = 0;
};
diff_stats compare(const std::vector<float>& a, const std::vector<float>& b) {
  BOOST_REQUIRE_EQUAL(a.size(), b.size());
  diff_stats d;
  for (size_t i = 0; i < a.size(); ++i) {
    double e = std::fabs(double(a[i]) - double(b[i]));
    d.max_abs = std::max(d.max_abs, e);
    d.mean_abs += e;
  }
  if (!a.empty()) d.mean_abs /= double(a.size());
  return d;
}

um::mel_config cfg_of(um::mel_normalization n, int n_mels = 80) {
  um::mel_config c;
  c.normalization = n;
  c.n_mels = n_mels;
  return c;
}

// Feeds `x` in pieces of the sizes `next()` returns and collects the frames,
// popping at random times.
template <class Next>
std::vector<float> stream_in_pieces(const std::vector<float>& x, const um::mel_config& cfg, Next next) {
  um::mel_stream s(cfg);
  std::vector<float> out;
  std::mt19937 rng(7);
  size_t i = 0;
  while (i < x.size()) {
    size_t k = std::min(next(), x.size() - i);
    s.accept_waveform(x.data() + i, k);
    i += k;
    if (rng() % 3 == 0) s.pop_frames(out, rng() % 4);
  }
  s.finish();
  s.pop_frames(out);
  BOOST_CHECK_EQUAL(s.frames_ready(), 0u);
  return out;
}

um::audio load_clip(const std::string& name) {
  return um::load_audio(ravdess_dir() + "/" + name);
}

}  // namespace

BOOST_AUTO_TEST_CASE(filterbank_matches_librosa) {
  if (!gold().meta.at("arrays").contains("whisper_filters_80")) {
    BOOST_TEST_MESSAGE("golden has no openai-whisper filterbank; skipped");
    return;
  }
  auto ref = gold().array("whisper_filters_80");
  auto fb = um::mel_filterbank(80);
  auto d = compare(fb, ref);
  BOOST_TEST_MESSAGE("filterbank max abs diff vs librosa: " << d.max_abs);
  BOOST_TEST(d.max_abs < 1e-7);
  BOOST_CHECK_THROW(um::mel_filterbank(0), std::invalid_argument);
}

BOOST_AUTO_TEST_CASE(real_speech_matches_hf_whisper_extractor,
                     *boost::unit_test::precondition(ravdess_ok)) {
  const auto& clips = gold().meta.at("clips");
  for (size_t i = 0; i < clips.size(); ++i) {
    const auto& c = clips[i];
    auto a = load_clip(c.at("file").get<std::string>());
    BOOST_REQUIRE_EQUAL(int64_t(a.samples.size()), c.at("n_samples").get<int64_t>());
    double sum = 0;
    for (float x : a.samples) sum += x;
    BOOST_REQUIRE_CLOSE(sum + 1.0, c.at("sum").get<double>() + 1.0, 1e-9);  // same decoded PCM

    auto ref = gold().array("clip" + std::to_string(i) + "_norm80");
    auto ours = um::log_mel_spectrogram(a.samples, cfg_of(um::mel_normalization::offline));
    BOOST_REQUIRE_EQUAL(ours.size() / 80, c.at("frames").get<size_t>());
    auto d = compare(ours, ref);
    BOOST_TEST_MESSAGE(c.at("file") << ": normalized 80-mel vs HF: max " << d.max_abs << " mean "
                                    << d.mean_abs);
    BOOST_TEST(d.max_abs < 5e-5);
    BOOST_TEST(d.mean_abs < 1e-6);

    if (gold().meta.at("arrays").contains("clip" + std::to_string(i) + "_raw80")) {
      auto raw_ref = gold().array("clip" + std::to_string(i) + "_raw80");
      auto raw = um::log_mel_spectrogram(a.samples, cfg_of(um::mel_normalization::none));
      BOOST_REQUIRE_EQUAL(raw.size(), raw_ref.size());
      double mx = 0, mx_all = 0, mean = 0;
      for (size_t k = 0; k < raw.size(); ++k) {
        double e = std::fabs(double(raw[k]) - raw_ref[k]);
        mean += e;
        mx_all = std::max(mx_all, e);
        if (raw_ref[k] > -7.0f) mx = std::max(mx, e);
      }
      mean /= double(raw.size());
      BOOST_TEST_MESSAGE("  raw log10 mel vs HF: max (values > -7) " << mx << ", max (all) " << mx_all
                                                                     << ", mean " << mean);
      BOOST_TEST(mx < 2e-3);
      BOOST_TEST(mean < 1e-5);
    }
    if (gold().meta.at("arrays").contains("clip" + std::to_string(i) + "_norm128")) {
      auto ref128 = gold().array("clip" + std::to_string(i) + "_norm128");
      auto o128 = um::log_mel_spectrogram(a.samples, cfg_of(um::mel_normalization::offline, 128));
      auto d128 = compare(o128, ref128);
      BOOST_TEST_MESSAGE("  normalized 128-mel vs HF: max " << d128.max_abs);
      BOOST_TEST(d128.max_abs < 5e-5);
    }
  }
}

BOOST_AUTO_TEST_CASE(short_inputs_framing_matches_hf) {
  // Lengths around the 200-sample reflection and the n mod 160 < 40 end case.
  for (const auto& s : gold().meta.at("synthetic")) {
    auto x = gold().array(s.at("samples").get<std::string>());
    std::vector<int64_t> shape;
    auto ref = gold().array(s.at("raw80").get<std::string>(), &shape);
    auto ours = um::log_mel_spectrogram(x, cfg_of(um::mel_normalization::none));
    BOOST_TEST_CONTEXT("n = " << x.size()) {
      BOOST_REQUIRE_EQUAL(int64_t(ours.size() / 80), shape[0]);
      BOOST_REQUIRE_EQUAL(int64_t(x.size() / 160), shape[0]);
      auto d = compare(ours, ref);
      BOOST_TEST(d.max_abs < 1e-4);
      // The streaming path must agree for these too.
      auto st = stream_in_pieces(x, cfg_of(um::mel_normalization::none), [] { return size_t(1); });
      BOOST_TEST(st == ours);
    }
  }
  // Fewer than 160 samples: no frame; 0 samples: no frame, no error.
  std::vector<float> few(159, 0.1f);
  BOOST_TEST(um::log_mel_spectrogram(few).empty());
  BOOST_TEST(um::log_mel_spectrogram(std::vector<float>{}).empty());
}

BOOST_AUTO_TEST_CASE(streaming_equals_whole_for_any_pieces,
                     *boost::unit_test::precondition(ravdess_ok)) {
  auto a = load_clip(gold().meta.at("clips")[0].at("file").get<std::string>());
  // Odd total length so the end is not hop-aligned.
  a.samples.resize(a.samples.size() - 77);
  for (auto norm : {um::mel_normalization::causal, um::mel_normalization::offline,
                    um::mel_normalization::none}) {
    const auto cfg = cfg_of(norm);
    const auto whole = um::log_mel_spectrogram(a.samples, cfg);
    BOOST_REQUIRE_EQUAL(whole.size(), a.samples.size() / 160 * 80);
    std::mt19937 rng(42);
    for (size_t piece : {size_t(1), size_t(160), size_t(5328), size_t(7), size_t(401)}) {
      auto st = stream_in_pieces(a.samples, cfg, [piece] { return piece; });
      BOOST_TEST_CONTEXT(um::to_string(norm) << ", pieces of " << piece) { BOOST_TEST(st == whole); }
    }
    auto rnd = stream_in_pieces(a.samples, cfg, [&rng] { return size_t(rng() % 3000); });
    BOOST_TEST_CONTEXT(um::to_string(norm) << ", random pieces") { BOOST_TEST(rnd == whole); }
  }
}

BOOST_AUTO_TEST_CASE(frames_become_ready_as_soon_as_complete) {
  std::mt19937 rng(3);
  std::normal_distribution<float> g(0.0f, 0.1f);
  std::vector<float> x(4000);
  for (auto& v : x) v = g(rng);
  um::mel_stream causal(cfg_of(um::mel_normalization::causal));
  um::mel_stream offline(cfg_of(um::mel_normalization::offline));
  std::vector<float> sink;
  for (size_t n = 1; n <= x.size(); ++n) {
    causal.accept_waveform(&x[n - 1], 1);
    offline.accept_waveform(&x[n - 1], 1);
    // Frame t needs samples up to 160 t + 199 (and x[1..200] for the start reflection).
    const int64_t expect = n >= 201 ? int64_t((n - 200) / 160 + 1) : 0;
    BOOST_REQUIRE_EQUAL(causal.frames_computed(), expect);
    BOOST_REQUIRE_EQUAL(offline.frames_ready(), 0u);
  }
  // 4000 = 25 * 160: the last frame (t = 24) needs the end reflection, only at finish().
  BOOST_TEST(causal.frames_ready() == 24u);
  causal.finish();
  offline.finish();
  BOOST_TEST(causal.frames_ready() == 25u);
  BOOST_TEST(offline.frames_ready() == 25u);
  BOOST_CHECK_THROW(causal.accept_waveform(x.data(), 1), std::logic_error);
  causal.reset();
  BOOST_TEST(causal.frames_ready() == 0u);
  BOOST_TEST(causal.samples_accepted() == 0);
}

BOOST_AUTO_TEST_CASE(nonfinite_samples_are_rejected_without_changing_state) {
  std::vector<float> x(1000, 0.01f);
  um::mel_stream s;
  s.accept_waveform(x.data(), 500);
  std::vector<float> bad(10, 0.0f);
  bad[3] = std::nanf("");
  try {
    s.accept_waveform(bad);
    BOOST_FAIL("expected an exception");
  } catch (const std::invalid_argument& e) {
    BOOST_TEST(std::string(e.what()).find("index 503") != std::string::npos, e.what());
  }
  BOOST_TEST(s.samples_accepted() == 500);
  s.accept_waveform(x.data() + 500, 500);
  s.finish();
  std::vector<float> a;
  s.pop_frames(a);
  BOOST_TEST(a == um::log_mel_spectrogram(x));
}

BOOST_AUTO_TEST_CASE(silence_and_config) {
  std::vector<float> zeros(16000, 0.0f);
  auto raw = um::log_mel_spectrogram(zeros, cfg_of(um::mel_normalization::none));
  BOOST_REQUIRE_EQUAL(raw.size(), 100u * 80u);
  BOOST_TEST(std::all_of(raw.begin(), raw.end(), [](float v) { return v == -10.0f; }));
  auto off = um::log_mel_spectrogram(zeros, cfg_of(um::mel_normalization::offline));
  BOOST_TEST(std::all_of(off.begin(), off.end(), [](float v) { return v == -1.5f; }));
  // Causal, pure running max: floor -18 never binds -> (-10 + 4) / 4.
  auto cau = um::log_mel_spectrogram(zeros, cfg_of(um::mel_normalization::causal));
  BOOST_TEST(std::all_of(cau.begin(), cau.end(), [](float v) { return v == -1.5f; }));
  // With a prior of -0.5: floor -8.5 -> (-8.5 + 4) / 4.
  auto pc = cfg_of(um::mel_normalization::causal);
  pc.causal_initial_max = -0.5f;
  auto cau2 = um::log_mel_spectrogram(zeros, pc);
  BOOST_TEST(std::all_of(cau2.begin(), cau2.end(), [](float v) { return v == -1.125f; }));

  BOOST_CHECK(um::parse_mel_normalization("causal") == um::mel_normalization::causal);
  BOOST_CHECK(um::parse_mel_normalization("offline") == um::mel_normalization::offline);
  BOOST_CHECK_THROW(um::parse_mel_normalization("global"), std::invalid_argument);
  um::mel_config bad;
  bad.n_mels = 0;
  BOOST_CHECK_THROW(um::mel_stream{bad}, std::invalid_argument);
  BOOST_TEST(um::mel_config{}.to_string().find("n_mels=80") != std::string::npos);
}

// Measures the causal normalization against Whisper's offline one on real speech
// (numbers printed with --log_level=message) and checks its defining property.
BOOST_AUTO_TEST_CASE(causal_normalization_effect_on_ravdess,
                     *boost::unit_test::precondition(ravdess_ok)) {
  std::vector<fs::path> files;
  for (const auto& e : fs::directory_iterator(ravdess_dir()))
    if (e.path().extension() == ".flac") files.push_back(e.path());
  std::sort(files.begin(), files.end());
  BOOST_REQUIRE(!files.empty());
  for (float init : {-std::numeric_limits<float>::infinity(), -1.0f}) {
    double max_abs = 0, mean_abs = 0, differing = 0;
    int n = 0;
    for (size_t i = 0; i < files.size(); i += 24, ++n) {
      auto a = um::load_audio(files[i].string());
      auto raw = um::log_mel_spectrogram(a.samples, cfg_of(um::mel_normalization::none));
      auto d = um::compare_normalizations(raw, 80, init);
      max_abs = std::max(max_abs, d.max_abs);
      mean_abs += d.mean_abs;
      differing += d.frames_differing;

      // Property: from the frame holding the utterance max on, causal == offline
      // (when the initial reference is below that max); and the stream's causal
      // output equals normalize_causal of the raw frames.
      auto off = raw, cau = raw;
      um::normalize_offline(off, 80);
      um::normalize_causal(cau, 80, init);
      const auto top = std::max_element(raw.begin(), raw.end());
      const size_t argmax = size_t(top - raw.begin()) / 80;
      if (*top >= init)
        BOOST_REQUIRE(std::equal(cau.begin() + std::ptrdiff_t(argmax * 80), cau.end(),
                                 off.begin() + std::ptrdiff_t(argmax * 80)));
      um::mel_config c = cfg_of(um::mel_normalization::causal);
      c.causal_initial_max = init;
      BOOST_REQUIRE(um::log_mel_spectrogram(a.samples, c) == cau);
    }
    BOOST_TEST_MESSAGE("causal (initial max " << init << ") vs offline on " << n
                       << " RAVDESS clips: max abs " << max_abs << ", mean abs " << mean_abs / n
                       << ", frames differing " << 100.0 * differing / n << "%");
    BOOST_TEST(mean_abs / n < 0.1);
  }
}

BOOST_AUTO_TEST_CASE(resampled_44k_stereo_and_8k_match_16k_features,
                     *boost::unit_test::precondition(ravdess_and_sox_ok)) {
  const std::string name = gold().meta.at("clips")[0].at("file").get<std::string>();
  const std::string src = ravdess_dir() + "/" + name;
  ut::temp_dir tmp;
  const std::string st44 = tmp.str() + "/st44.wav", m8 = tmp.str() + "/m8.flac";
  BOOST_REQUIRE(std::system(("sox '" + src + "' -r 44100 -c 2 -b 16 '" + st44 + "'").c_str()) == 0);
  BOOST_REQUIRE(std::system(("sox '" + src + "' -r 8000 '" + m8 + "'").c_str()) == 0);

  const auto cfg = cfg_of(um::mel_normalization::offline);
  auto base = um::log_mel_spectrogram(load_clip(name).samples, cfg);
  const auto fb = um::mel_filterbank(80);
  // Highest FFT bin touched by each mel filter, to select the bands a resampler keeps.
  auto top_hz = [&](int m) {
    int hi = 0;
    for (int k = 0; k < um::k_mel_bins; ++k)
      if (fb[size_t(m) * um::k_mel_bins + size_t(k)] > 0) hi = k;
    return hi * 40.0;
  };
  struct variant {
    std::string path;
    double band_hz, tol_max, tol_mean;
  };
  // Round trips through sox and libsamplerate: both filters are flat to ~0.1 dB up
  // to ~90% of Nyquist; above that the bands are attenuated, so only bands below
  // 7 kHz (44.1 k) or 3.6 kHz (8 k) are compared.
  for (const auto& v : {variant{st44, 7000, 0.05, 0.005}, variant{m8, 3600, 0.05, 0.005}}) {
    auto a = um::load_audio(v.path);
    BOOST_TEST(a.sample_rate == 16000);
    auto f = um::log_mel_spectrogram(a.samples, cfg);
    BOOST_TEST_CONTEXT(v.path) {
      const size_t frames = std::min(f.size(), base.size()) / 80;
      BOOST_TEST(std::labs(long(f.size() / 80) - long(base.size() / 80)) <= 1);
      double mx = 0, mean = 0;
      size_t cnt = 0;
      for (size_t t = 0; t < frames; ++t)
        for (int m = 0; m < 80; ++m) {
          if (top_hz(m) > v.band_hz) continue;
          double e = std::fabs(double(f[t * 80 + size_t(m)]) - base[t * 80 + size_t(m)]);
          mx = std::max(mx, e);
          mean += e;
          ++cnt;
        }
      mean /= double(cnt);
      BOOST_TEST_MESSAGE(v.path << ": bands < " << v.band_hz << " Hz: max abs " << mx << ", mean abs "
                                << mean);
      BOOST_TEST(mx < v.tol_max);
      BOOST_TEST(mean < v.tol_mean);
    }
  }
}
