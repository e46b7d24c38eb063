// speech_encoder facade (models/speech_encoder.hpp): streaming vs offline
// whole-file encoding, batching across streams, token rate, edge cases, and the
// effect of causal vs offline log-mel normalization on the encoder's output.
//
// References are built independently of the facade from the lower-level pieces:
// log_mel_spectrogram(whole clip) -> whisper_encoder::forward_block_causal ->
// projector::forward(pad_last = true), with a projector made from the same seed.
//
// Tolerances (fp32): streaming and batching do the same arithmetic with other
// matrix shapes and summation orders; the encoder's own test observes up to
// 1.6e-5 * max|y| at the encoder output and asserts 3e-5. On the speech tokens
// (untrained projector 3072 -> 1024 -> 576 after the encoder) we observe at most
// 7.3e-6 * max|ref| (streaming, any pieces, eager or lazy; batched vs alone) and
// assert max|diff| <= 1e-4 * max(1, max|ref|). bf16 vs fp32: relative L2 0.044.
//
// Causal vs offline log-mel normalization (models/mel.hpp), measured on the 6
// RAVDESS clips of k_clips (3.3-4.1 s each, 6 emotions, 5 actors), chunk 320 ms,
// fp32, relative L2 = ||causal - offline|| / ||offline|| over the whole clip:
//   Whisper tiny.en encoder output: mean 0.137, max 0.207 (per clip 0.029 .. 0.207)
//     first second of each clip: up to 0.40; after it: up to 0.088
//   speech tokens (untrained projector, seed 3): mean 0.185, max 0.285
// So the running-max clamp is NOT negligible for the pretrained encoder: the
// ~1 s of leading near-silence in RAVDESS clips (before the loudest bin sets the
// clamp floor) gets other features than offline Whisper gives it, and the
// encoder's attention carries some of that into later frames. A projector
// trained on causal features (issue 5) learns to live with it; what matters is
// training and serving with the same normalization (encoder.normalization).
// The assertions (max < 0.42 / 0.57, mean < 0.28 / 0.37: about 2x the
// measurement) only guard against regressions.
#include <boost/test/unit_test.hpp>

#include <ATen/ATen.h>
#include <torch/csrc/autograd/generated/variable_factories.h>

#include <cmath>
#include <filesystem>
#include <random>

#include "models/audio.hpp"
#include "models/mel.hpp"
#include "models/nn/projector.hpp"
#include "models/nn/whisper_encoder.hpp"
#include "models/speech_encoder.hpp"
#include "tests/support.hpp"

namespace ut = undertone::testing;
namespace fs = std::filesystem;
using namespace undertone::models;

namespace {

std::string ravdess_dir() { return undertone::testing::ravdess_dir(); }
std::string clip(const std::string& name) { return ravdess_dir() + "/" + name + ".flac"; }
const std::vector<std::string> k_clips = {"03-01-05-02-01-01-01", "03-01-01-01-01-01-01", "03-01-03-02-02-01-04",
                                          "03-01-04-01-01-02-07", "03-01-06-02-02-02-12", "03-01-08-01-02-01-16"};

boost::test_tools::assertion_result have_data(boost::unit_test::test_unit_id) {
  bool ok = fs::exists(ut::whisper_ct2_dir() + "/model.bin");
  for (const auto& c : k_clips) ok = ok && fs::exists(clip(c));
  boost::test_tools::assertion_result r(ok);
  r.message() << "needs " << ut::whisper_ct2_dir() << " and RAVDESS clips in " << ravdess_dir()
              << " (set UNDERTONE_HOME / UT_RAVDESS_DIR)";
  return r;
}
boost::test_tools::assertion_result have_model(boost::unit_test::test_unit_id) {
  boost::test_tools::assertion_result r(fs::exists(ut::whisper_ct2_dir() + "/model.bin"));
  r.message() << "needs " << ut::whisper_ct2_dir() << " (set UNDERTONE_HOME)";
  return r;
}

std::vector<float> load(const std::string& name) { return load_audio(clip(name)).samples; }

speech_encoder_options opts(int64_t chunk_ms = 320, const std::string& norm = "causal", uint64_t seed = 3) {
  speech_encoder_options o;
  o.model = ut::whisper_ct2_dir();
  o.chunk_ms = chunk_ms;
  o.normalization = norm;
  o.projector_seed = seed;
  return o;
}

torch::Tensor rows(const std::vector<float>& v, int64_t d) {
  return torch::from_blob(const_cast<float*>(v.data()), {int64_t(v.size()) / d, d}, at::kFloat).clone();
}

// Feeds `samples` in pieces (sizes cycle through `pieces`; 0 = random 1..8000),
// decoding eagerly whenever the stream is ready; then input_finished and the tail.
std::vector<float> run_stream(const speech_encoder& enc, const std::vector<float>& samples,
                              std::vector<size_t> pieces = {160, 5333, 1, 4800}, bool eager = true) {
  auto s = enc.create_stream();
  std::vector<float> out;
  std::mt19937 rng(11);
  size_t off = 0, k = 0;
  while (off < samples.size()) {
    size_t n = pieces[k++ % pieces.size()];
    if (n == 0) n = 1 + rng() % 8000;
    n = std::min(n, samples.size() - off);
    enc.accept_waveform(*s, samples.data() + off, n);
    off += n;
    while (eager && enc.is_ready(*s)) enc.decode_streams({s.get()});
    enc.pop_tokens(*s, out);
  }
  enc.input_finished(*s);
  while (enc.is_ready(*s)) enc.decode_streams({s.get()});
  enc.pop_tokens(*s, out);
  BOOST_TEST(s->is_finished());
  BOOST_TEST(!enc.is_ready(*s));
  return out;
}

// The offline whole-file pipeline, built without the facade.
torch::Tensor offline_encoder_frames(const std::vector<float>& samples, int64_t chunk_ms, mel_normalization norm) {
  whisper_encoder_options eo;
  eo.chunk_ms = chunk_ms;
  auto enc = whisper_encoder::from_ct2(ut::whisper_ct2_dir(), eo);
  mel_config mc;
  mc.normalization = norm;
  auto mel = log_mel_spectrogram(samples, mc);
  auto feats = torch::from_blob(mel.data(), {1, int64_t(mel.size()) / 80, 80}, at::kFloat);
  return enc->forward_block_causal(feats)[0];
}
torch::Tensor offline_tokens(const std::vector<float>& samples, int64_t chunk_ms, uint64_t seed = 3,
                             mel_normalization norm = mel_normalization::causal) {
  auto frames = offline_encoder_frames(samples, chunk_ms, norm);
  projector proj(projector_config{}, torch::kCPU, torch::kFloat32, seed);
  torch::NoGradGuard ng;
  return proj.forward(frames.unsqueeze(0), true)[0];
}

double max_abs(const torch::Tensor& a) { return a.numel() ? a.abs().max().item<double>() : 0.0; }
double rel_l2(const torch::Tensor& a, const torch::Tensor& b) {
  return (a - b).norm().item<double>() / b.norm().item<double>();
}
void check_close(const torch::Tensor& a, const torch::Tensor& b, double tol, const std::string& what) {
  BOOST_REQUIRE_MESSAGE(a.sizes() == b.sizes(), what << ": shapes " << a.sizes() << " vs " << b.sizes());
  const double d = max_abs(a - b), scale = std::max(1.0, max_abs(b));
  BOOST_TEST_MESSAGE(what << ": max|diff| = " << d << " (max|ref| = " << scale << ")");
  BOOST_CHECK_MESSAGE(d <= tol * scale, what << ": max|diff| " << d << " > " << tol << " * " << scale);
}

int64_t expected_tokens(size_t samples, int64_t stack = 8) {
  const int64_t t = int64_t(samples) / 160, frames = (t + 1) / 2;
  return (frames + stack - 1) / stack;
}

}  // namespace

BOOST_AUTO_TEST_SUITE(speech_encoder_suite)

BOOST_AUTO_TEST_CASE(options_are_validated) {
  auto o = opts();
  o.chunk_ms = 330;
  BOOST_CHECK_THROW(o.validate(), std::invalid_argument);
  o = opts();
  o.dtype = "int8";
  BOOST_CHECK_THROW(o.validate(), std::invalid_argument);
  o = opts();
  o.normalization = "global";
  BOOST_CHECK_THROW(o.validate(), std::invalid_argument);
  o = opts();
  o.model.clear();
  BOOST_CHECK_THROW(o.validate(), std::invalid_argument);
  BOOST_CHECK_NO_THROW(opts().validate());
  BOOST_TEST(opts().to_string().find("chunk_ms=320") != std::string::npos);
}

BOOST_AUTO_TEST_CASE(streaming_equals_offline_whole_file, *boost::unit_test::precondition(have_data)) {
  auto samples = load(k_clips[0]);  // 3.3 s, "Kids are talking by the door", angry
  for (int64_t chunk_ms : {160, 320, 640}) {
    const int64_t f = chunk_ms / 10;
    speech_encoder enc(opts(chunk_ms));
    BOOST_TEST(enc.chunk_frames() == f);
    BOOST_TEST(enc.d_llm() == 576);
    // The clip, and cuts of it whose mel frame count T is a multiple of F (with
    // N mod 160 < 40 and >= 40: the last frame needs / does not need the end).
    const size_t whole = (samples.size() - 100) / size_t(160 * f);  // whole chunks that fit, with 100 to spare
    BOOST_REQUIRE(whole >= 2);
    for (size_t len : {samples.size(), 160 * f * whole + 37, 160 * f * whole + 100}) {
      BOOST_REQUIRE(len <= samples.size());
      std::vector<float> x(samples.begin(), samples.begin() + std::ptrdiff_t(len));
      auto ref = offline_tokens(x, chunk_ms);
      BOOST_TEST(ref.size(0) == expected_tokens(x.size()));
      for (auto pieces : std::vector<std::vector<size_t>>{{160}, {5333}, {0}, {x.size()}, {size_t(f * 160)}}) {
        for (bool eager : {true, false}) {
          auto got = rows(run_stream(enc, x, pieces, eager), 576);
          check_close(got, ref, 1e-4,
                      "chunk " + std::to_string(chunk_ms) + " ms, " + std::to_string(len) + " samples, pieces " +
                          std::to_string(pieces[0]) + (eager ? ", eager" : ", lazy"));
        }
      }
    }
  }
}

BOOST_AUTO_TEST_CASE(a_chunk_waits_for_one_more_frame, *boost::unit_test::precondition(have_data)) {
  speech_encoder enc(opts(320));
  auto x = load(k_clips[0]);
  auto s = enc.create_stream();
  // Chunk 0 = mel frames 0..31; frame 32 needs samples up to 160 * 32 + 200 = 5320.
  enc.accept_waveform(*s, x.data(), 5319);
  BOOST_TEST(s->mel_frames() == 32);
  BOOST_TEST(!enc.is_ready(*s));
  enc.accept_waveform(*s, x.data() + 5319, 1);
  BOOST_TEST(enc.is_ready(*s));
  BOOST_TEST(enc.decode_streams({s.get()}) == 1u);
  BOOST_TEST(!enc.is_ready(*s));
  BOOST_TEST(s->encoder_frames() == 15);  // B - 1 on the first chunk (conv stem)
  BOOST_TEST(s->tokens_ready() == 1);
}

BOOST_AUTO_TEST_CASE(batching_three_streams_equals_separate, *boost::unit_test::precondition(have_data)) {
  speech_encoder enc(opts(320));
  std::vector<std::vector<float>> audio{load(k_clips[1]), load(k_clips[2]), load(k_clips[3])};
  std::vector<std::unique_ptr<speech_stream>> ss;
  for (size_t i = 0; i < 3; ++i) ss.push_back(enc.create_stream());
  std::vector<std::vector<float>> got(3);
  std::vector<speech_stream*> ptrs{ss[0].get(), ss[1].get(), ss[2].get()};
  // Different piece sizes per stream, so the streams are at different positions.
  const size_t piece[3] = {1600, 2400, 4000};
  std::vector<size_t> off(3, 0);
  size_t max_batched = 0;
  for (bool more = true; more;) {
    more = false;
    for (size_t i = 0; i < 3; ++i) {
      if (ss[i]->input_is_finished()) continue;
      const size_t n = std::min(piece[i], audio[i].size() - off[i]);
      enc.accept_waveform(*ss[i], audio[i].data() + off[i], n);
      off[i] += n;
      if (off[i] < audio[i].size()) more = true;
      else enc.input_finished(*ss[i]);
    }
    size_t ready = 0;
    for (auto* s : ptrs) ready += enc.is_ready(*s);
    const size_t did = enc.decode_streams(ptrs);
    BOOST_TEST(did == ready);  // one chunk per ready stream, all in this call
    max_batched = std::max(max_batched, did);
    for (size_t i = 0; i < 3; ++i) enc.pop_tokens(*ss[i], got[i]);
  }
  while (enc.decode_streams(ptrs) > 0)
    for (size_t i = 0; i < 3; ++i) enc.pop_tokens(*ss[i], got[i]);
  for (size_t i = 0; i < 3; ++i) enc.pop_tokens(*ss[i], got[i]);
  BOOST_TEST(max_batched == 3u);
  for (size_t i = 0; i < 3; ++i) {
    BOOST_TEST(ss[i]->is_finished());
    auto alone = rows(run_stream(enc, audio[i], {piece[i]}), 576);
    check_close(rows(got[i], 576), alone, 1e-4, "batched stream " + std::to_string(i) + " vs alone");
    BOOST_TEST(alone.size(0) == expected_tokens(audio[i].size()));
  }
  // max_batch splits a batch but gives the same tokens.
  auto o = opts(320);
  o.max_batch = 2;
  speech_encoder small(o);
  std::vector<std::unique_ptr<speech_stream>> s2;
  for (size_t i = 0; i < 3; ++i) {
    s2.push_back(small.create_stream());
    small.accept_waveform(*s2.back(), audio[i]);
    small.input_finished(*s2.back());
  }
  std::vector<std::vector<float>> got2(3);
  while (small.decode_streams({s2[0].get(), s2[1].get(), s2[2].get()}) > 0) {
  }
  for (size_t i = 0; i < 3; ++i) {
    small.pop_tokens(*s2[i], got2[i]);
    check_close(rows(got2[i], 576), rows(got[i], 576), 1e-4, "max_batch 2, stream " + std::to_string(i));
  }
}

BOOST_AUTO_TEST_CASE(token_rate_is_frames_over_stack, *boost::unit_test::precondition(have_data)) {
  speech_encoder enc(opts(320));
  BOOST_TEST(enc.tokens_per_second() == 6.25);
  BOOST_TEST(enc.chunk_samples() == 5120);
  // ~20 s of speech: six clips back to back.
  std::vector<float> x;
  for (const auto& c : k_clips) {
    auto a = load(c);
    x.insert(x.end(), a.begin(), a.end());
  }
  auto s = enc.create_stream();
  std::vector<float> toks;
  for (size_t off = 0; off < x.size(); off += 5120) {
    enc.accept_waveform(*s, x.data() + off, std::min<size_t>(5120, x.size() - off));
    while (enc.is_ready(*s)) {
      enc.decode_streams({s.get()});
      // Tokens leave as soon as 8 encoder frames exist.
      BOOST_TEST(s->tokens_out() == s->encoder_frames() / 8);
    }
    enc.pop_tokens(*s, toks);
  }
  enc.input_finished(*s);
  while (enc.is_ready(*s)) enc.decode_streams({s.get()});
  enc.pop_tokens(*s, toks);
  const double seconds = double(x.size()) / 16000;
  const int64_t n = int64_t(toks.size()) / 576;
  BOOST_TEST(s->mel_frames() == int64_t(x.size()) / 160);
  BOOST_TEST(s->encoder_frames() == (s->mel_frames() + 1) / 2);
  BOOST_TEST(n == expected_tokens(x.size()));
  BOOST_TEST(std::abs(n / seconds - 6.25) < 0.1, "tokens/s " << n / seconds);
  BOOST_TEST_MESSAGE(seconds << " s -> " << n << " tokens = " << n / seconds << " tokens/s");
  // stack_frames 4 doubles the rate.
  auto o = opts(320);
  o.stack_frames = 4;
  speech_encoder enc4(o);
  BOOST_TEST(enc4.tokens_per_second() == 12.5);
  BOOST_TEST(int64_t(run_stream(enc4, x, {16000}).size()) / 576 == expected_tokens(x.size(), 4));
}

BOOST_AUTO_TEST_CASE(edge_cases, *boost::unit_test::precondition(have_model)) {
  speech_encoder enc(opts(320));
  // input_finished on a fresh stream (= empty input): finished at once, no tokens.
  auto a = enc.create_stream();
  BOOST_TEST(!enc.is_ready(*a));
  enc.input_finished(*a);
  enc.input_finished(*a);  // idempotent
  BOOST_TEST(a->is_finished());
  BOOST_TEST(!enc.is_ready(*a));
  BOOST_TEST(enc.decode_streams({a.get()}) == 0u);
  BOOST_TEST(enc.pop_tokens(*a).empty());
  // Fewer than 160 samples: 0 mel frames, the same.
  auto b = enc.create_stream();
  std::vector<float> tiny(100, 0.1f);
  enc.accept_waveform(*b, tiny);
  enc.accept_waveform(*b, nullptr, 0);
  enc.input_finished(*b);
  BOOST_TEST(b->is_finished());
  BOOST_TEST(b->tokens_out() == 0);
  // accept after input_finished: logic_error.
  BOOST_CHECK_THROW(enc.accept_waveform(*b, tiny), std::logic_error);
  // A very short utterance (2 mel frames) still yields one token.
  std::vector<float> short_x(320, 0.05f);
  BOOST_TEST(enc.pop_tokens(*enc.create_stream()).empty());
  BOOST_TEST(run_stream(enc, short_x, {320}).size() == 576u);
  // Silence: encoded like any audio, finite tokens at the normal rate.
  std::vector<float> silence(32000, 0.f);
  auto sil = rows(run_stream(enc, silence, {1234}), 576);
  BOOST_TEST(sil.size(0) == expected_tokens(silence.size()));
  BOOST_TEST(bool(at::isfinite(sil).all().item<bool>()));
  // NaN: invalid_argument naming the sample, the stream unchanged and usable.
  auto c = enc.create_stream();
  std::vector<float> good(8000, 0.01f), bad(100, 0.f);
  bad[42] = std::nanf("");
  enc.accept_waveform(*c, good);
  try {
    enc.accept_waveform(*c, bad);
    BOOST_FAIL("NaN accepted");
  } catch (const std::invalid_argument& e) {
    BOOST_TEST(std::string(e.what()).find("8042") != std::string::npos, e.what());
  }
  BOOST_TEST(c->samples_accepted() == 8000);
  // Bad decode_streams arguments.
  BOOST_CHECK_THROW(enc.decode_streams({c.get(), c.get()}), std::invalid_argument);
  BOOST_CHECK_THROW(enc.decode_streams({nullptr}), std::invalid_argument);
  speech_encoder other(opts(320));
  auto foreign = other.create_stream();
  BOOST_CHECK_THROW(enc.decode_streams({foreign.get()}), std::invalid_argument);
  BOOST_CHECK_THROW(enc.accept_waveform(*foreign, good), std::invalid_argument);
  // pop_tokens with a limit.
  enc.input_finished(*c);
  while (enc.is_ready(*c)) enc.decode_streams({c.get()});
  BOOST_TEST(c->tokens_ready() == expected_tokens(8000));
  std::vector<float> first;
  BOOST_TEST(enc.pop_tokens(*c, first, 1) == 1u);
  BOOST_TEST(c->tokens_ready() == expected_tokens(8000) - 1);
  // Unreadable model: a clear error naming the path.
  auto o = opts();
  o.model = "/nonexistent/whisper";
  BOOST_CHECK_THROW(speech_encoder{o}, std::exception);
}

BOOST_AUTO_TEST_CASE(trained_projector_checkpoint_is_used, *boost::unit_test::precondition(have_data)) {
  ut::temp_dir tmp;
  const std::string path = tmp.str() + "/proj.safetensors";
  projector(projector_config{}, torch::kCPU, torch::kFloat32, 99).save(path);
  auto o = opts(320, "causal", 0);
  o.projector = path;
  speech_encoder loaded(o);
  speech_encoder same_seed(opts(320, "causal", 99));
  auto x = load(k_clips[1]);
  check_close(rows(run_stream(loaded, x), 576), rows(run_stream(same_seed, x), 576), 1e-6, "loaded vs seed 99");
  BOOST_TEST(loaded.describe().find(path) != std::string::npos);
  // Shape mismatches are clear errors.
  o.stack_frames = 4;
  try {
    speech_encoder bad(o);
    BOOST_FAIL("stack mismatch accepted");
  } catch (const std::runtime_error& e) {
    BOOST_TEST(std::string(e.what()).find("stack_frames") != std::string::npos, e.what());
  }
  o.stack_frames = 8;
  o.d_llm = 960;
  BOOST_CHECK_THROW(speech_encoder{o}, std::runtime_error);
}

BOOST_AUTO_TEST_CASE(bf16_tracks_fp32, *boost::unit_test::precondition(have_data)) {
  auto x = load(k_clips[0]);
  speech_encoder f32(opts(320));
  auto o = opts(320);
  o.dtype = "bf16";
  speech_encoder b16(o);
  auto a = rows(run_stream(f32, x), 576), b = rows(run_stream(b16, x), 576);
  const double r = rel_l2(b, a);
  BOOST_TEST_MESSAGE("bf16 vs fp32 speech tokens: relative L2 " << r);
  BOOST_TEST(r < 0.1);  // bf16 keeps 8 bits of mantissa; 4 layers + projector
}

BOOST_AUTO_TEST_CASE(normalization_effect_is_bounded, *boost::unit_test::precondition(have_data)) {
  double enc_sum = 0, enc_max = 0, tok_sum = 0, tok_max = 0;
  speech_encoder causal(opts(320, "causal")), offline(opts(320, "offline"));
  for (const auto& c : k_clips) {
    auto x = load(c);
    // Encoder output (pretrained Whisper) under both normalizations, offline block-causal.
    auto ec = offline_encoder_frames(x, 320, mel_normalization::causal);
    auto eo = offline_encoder_frames(x, 320, mel_normalization::offline);
    const double de = rel_l2(ec, eo);
    // Speech tokens through the facade (streamed; offline normalization waits for the end).
    auto tc = rows(run_stream(causal, x), 576), to = rows(run_stream(offline, x), 576);
    // Offline normalization through the facade equals the whole-file pipeline exactly.
    check_close(to, offline_tokens(x, 320, 3, mel_normalization::offline), 1e-4, c + " offline-normalized");
    const double dt = rel_l2(tc, to);
    // Where: the first second (before/around the loudest onset) vs the rest.
    const int64_t nf = eo.size(0), head = std::min<int64_t>(50, nf);
    const double d_head = rel_l2(ec.narrow(0, 0, head), eo.narrow(0, 0, head));
    const double d_rest = nf > head ? rel_l2(ec.narrow(0, head, nf - head), eo.narrow(0, head, nf - head)) : 0.0;
    BOOST_TEST_MESSAGE(c << ": rel L2 causal vs offline: encoder output " << de << " (first 1 s " << d_head
                         << ", after " << d_rest << "), speech tokens " << dt);
    enc_sum += de;
    tok_sum += dt;
    enc_max = std::max(enc_max, de);
    tok_max = std::max(tok_max, dt);
  }
  const double n = double(k_clips.size());
  BOOST_TEST_MESSAGE("encoder output: mean " << enc_sum / n << " max " << enc_max << "; speech tokens: mean "
                                             << tok_sum / n << " max " << tok_max);
  BOOST_TEST(enc_max < 0.42);
  BOOST_TEST(enc_sum / n < 0.28);
  BOOST_TEST(tok_max < 0.57);
  BOOST_TEST(tok_sum / n < 0.37);
  BOOST_TEST(enc_max > 0.0);  // the causal rule does change something on real clips
}

BOOST_AUTO_TEST_SUITE_END()
