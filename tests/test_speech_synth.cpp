// Synthetic expressive speech (models/speech_synth.hpp): sentence set, plan
// determinism and speaker-disjoint splits, real synthesis with every installed
// engine, acoustic differences between classes, missing-engine errors.
#include <boost/test/unit_test.hpp>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>

#include "models/audio.hpp"
#include "models/speech_synth.hpp"
#include "tests/support.hpp"

namespace um = undertone::models;
namespace ut = undertone::testing;
namespace fs = std::filesystem;

namespace {

std::string sentences_path() { return ut::source_dir() + "/data/sentences.txt"; }

bool installed(const char* program) {
  return std::system(("command -v " + std::string(program) + " > /dev/null 2>&1").c_str()) == 0;
}

std::string slurp(const std::string& p) {
  std::ifstream in(p, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

/// A few voices of one engine: two train, one val, one test (where the table has them).
std::vector<um::synth_voice> few_voices(const std::string& engine) {
  std::vector<um::synth_voice> out;
  std::map<um::split_kind, int> per;
  for (const auto& v : um::default_synth_voices({engine})) {
    if (v.whisper) continue;
    int want = v.split == um::split_kind::train ? 2 : 1;
    if (per[v.split] < want) out.push_back(v), per[v.split]++;
  }
  return out;
}

um::synth_options base_options(const std::string& out) {
  um::synth_options o;
  o.out_dir = out;
  o.sentences_file = sentences_path();
  o.workers = 2;
  return o;
}

}  // namespace

BOOST_AUTO_TEST_CASE(sentence_set) {
  auto s = um::read_sentences(sentences_path());
  BOOST_TEST(s.size() >= 5000u);
  std::set<std::string> texts;
  std::map<std::string, size_t> kinds;
  for (const auto& x : s) texts.insert(x.text), kinds[x.kind]++;
  BOOST_TEST(texts.size() == s.size(), "sentences are distinct");
  BOOST_TEST(kinds.size() == 4u);
  BOOST_TEST(kinds["neutral"] >= 2000u);
  for (const char* k : {"loaded:happy", "loaded:sad", "loaded:angry"}) BOOST_TEST(kinds[k] >= 500u, k);

  ut::temp_dir t;
  std::ofstream(t.path / "bad.txt") << "# c\nneutral\tfine\nloaded:joyful\tno\n";
  try {
    um::read_sentences((t.path / "bad.txt").string());
    BOOST_FAIL("expected synth_error");
  } catch (const um::synth_error& e) {
    BOOST_TEST(std::string(e.what()).find("bad.txt:3") != std::string::npos, e.what());
  }
}

BOOST_AUTO_TEST_CASE(class_prosody_mapping) {
  using E = um::emotion_label;
  auto n = um::class_prosody(E::neutral, um::intensity_level::normal);
  auto h = um::class_prosody(E::happy, um::intensity_level::normal);
  auto s = um::class_prosody(E::sad, um::intensity_level::normal);
  auto a = um::class_prosody(E::angry, um::intensity_level::normal);
  auto as = um::class_prosody(E::angry, um::intensity_level::strong);
  BOOST_TEST(n.rate == 1.0);
  BOOST_TEST(s.rate < n.rate);
  BOOST_TEST(s.pitch_st < 0);
  BOOST_TEST(s.range < 1);
  BOOST_TEST(s.gain_db < 0);
  BOOST_TEST(a.gain_db > h.gain_db);
  BOOST_TEST(h.pitch_st > a.pitch_st);
  BOOST_TEST(a.rate > 1);
  BOOST_TEST(as.gain_db > a.gain_db);
  BOOST_TEST(as.rate > a.rate);
  BOOST_CHECK_THROW(um::class_prosody(E::fearful, um::intensity_level::normal), um::synth_error);
}

BOOST_AUTO_TEST_CASE(voice_table_splits_by_group) {
  auto voices = um::default_synth_voices(um::synth_engine_names());
  std::map<std::string, um::split_kind> group_split;
  std::set<std::string> ids;
  std::map<um::split_kind, size_t> per_split;
  for (const auto& v : voices) {
    auto [it, fresh] = group_split.emplace(v.group, v.split);
    BOOST_TEST((it->second == v.split), "group " << v.group << " in two splits");
    BOOST_TEST(ids.insert(v.speaker_id()).second, "duplicate speaker " << v.speaker_id());
    per_split[v.split]++;
  }
  BOOST_TEST(per_split[um::split_kind::val] > 0u);
  BOOST_TEST(per_split[um::split_kind::test] > 0u);
  BOOST_TEST(per_split[um::split_kind::train] > per_split[um::split_kind::val]);
  BOOST_CHECK_THROW(um::default_synth_voices({"sam"}), um::synth_error);
}

BOOST_AUTO_TEST_CASE(plan_is_deterministic_balanced_and_speaker_disjoint) {
  auto voices = um::default_synth_voices(um::synth_engine_names());
  auto sentences = um::read_sentences(sentences_path());
  um::synth_options o;
  o.count = 400;
  o.seed = 42;
  auto p1 = um::plan_synthesis(o, voices, sentences);
  auto p2 = um::plan_synthesis(o, voices, sentences);
  o.count = 50;
  auto prefix = um::plan_synthesis(o, voices, sentences);
  o.count = 400;
  o.seed = 43;
  auto other = um::plan_synthesis(o, voices, sentences);
  BOOST_REQUIRE_EQUAL(p1.size(), 400u);
  size_t diff = 0;
  std::map<um::emotion_label, size_t> per_class;
  std::map<um::split_kind, size_t> per_split;
  std::map<std::string, um::split_kind> spk_split;
  std::set<std::string> engines;
  size_t neutral_text = 0;
  for (size_t i = 0; i < p1.size(); ++i) {
    BOOST_TEST(p1[i].voice.speaker_id() == p2[i].voice.speaker_id());
    BOOST_TEST(p1[i].text.text == p2[i].text.text);
    BOOST_TEST(p1[i].p.rate == p2[i].p.rate);
    if (i < prefix.size()) BOOST_TEST(prefix[i].text.text == p1[i].text.text);
    diff += other[i].text.text != p1[i].text.text;
    per_class[p1[i].emotion]++;
    per_split[p1[i].voice.split]++;
    auto [it, fresh] = spk_split.emplace(p1[i].voice.speaker_id(), p1[i].voice.split);
    BOOST_TEST((it->second == p1[i].voice.split));
    engines.insert(p1[i].voice.engine);
    neutral_text += p1[i].text.kind == "neutral";
    BOOST_TEST((p1[i].intensity == um::intensity_level::normal || p1[i].emotion != um::emotion_label::neutral));
  }
  BOOST_TEST(diff > 300u, "another seed gives another plan");
  for (const auto& [e, n] : per_class) BOOST_TEST(n == 100u, um::to_string(e));
  BOOST_TEST(per_split[um::split_kind::val] > 15u);
  BOOST_TEST(per_split[um::split_kind::test] > 15u);
  BOOST_TEST(per_split[um::split_kind::train] > 280u);
  BOOST_TEST(engines.size() == 3u);
  BOOST_TEST(neutral_text > 150u);
  BOOST_TEST(neutral_text < 250u);
}

BOOST_AUTO_TEST_CASE(measure_prosody_on_known_signals) {
  const int sr = 16000;
  std::vector<float> x(sr * 2, 0.0f);
  for (size_t i = sr / 2; i < size_t(sr) * 3 / 2; ++i) {  // 1 s of 200 Hz harmonic tone in silence
    double t = double(i) / sr;
    x[i] = float(0.1 * std::sin(2 * M_PI * 200 * t) + 0.05 * std::sin(2 * M_PI * 400 * t));
  }
  auto st = um::measure_prosody(x, sr);
  BOOST_TEST(st.duration_s == 2.0);
  BOOST_TEST(std::abs(st.f0_median_hz - 200.0) < 3.0);
  BOOST_TEST(st.f0_sd_st < 0.2);
  BOOST_TEST(st.voiced_fraction > 0.9);
  BOOST_TEST(std::abs(st.active_rms_db - 20 * std::log10(std::sqrt(0.1 * 0.1 / 2 + 0.05 * 0.05 / 2))) < 0.5);
}

BOOST_AUTO_TEST_CASE(missing_engine_is_a_clear_error) {
  ut::temp_dir t;
  auto o = base_options((t.path / "out").string());
  o.count = 2;
  o.search_path = t.str();  // an empty folder: no engine there
  o.engines = {"flite"};
  try {
    um::synthesize(o);
    BOOST_FAIL("expected synth_error");
  } catch (const um::synth_error& e) {
    std::string m = e.what();
    BOOST_TEST(m.find("TTS engine 'flite' is not installed") != std::string::npos, m);
    BOOST_TEST(m.find("apt-get install flite") != std::string::npos, m);
  }
  if (!installed("text2wave")) return;
  // A festival voice that does not exist: the engine has no working voice.
  auto v = um::default_synth_voices({"festival"}).front();
  v.voice = "no_such_voice_diphone";
  o.search_path.clear();
  o.engines = {"festival"};
  o.voices = {v};
  try {
    um::synthesize(o);
    BOOST_FAIL("expected synth_error");
  } catch (const um::synth_error& e) {
    std::string m = e.what();
    BOOST_TEST(m.find("no working voice for TTS engine 'festival'") != std::string::npos, m);
    BOOST_TEST(m.find("no_such_voice_diphone") != std::string::npos, m);
  }
}

BOOST_AUTO_TEST_CASE(synthesize_with_each_installed_engine) {
  const std::map<std::string, const char*> programs = {
      {"espeak-ng", "espeak-ng"}, {"flite", "flite"}, {"festival", "text2wave"}};
  size_t tested = 0;
  for (const auto& engine : um::synth_engine_names()) {
    if (!installed(programs.at(engine))) {
      BOOST_TEST_MESSAGE(engine << " not installed: skipped");
      continue;
    }
    BOOST_TEST_CONTEXT("engine " << engine) {
      ut::temp_dir t;
      auto o = base_options((t.path / "a").string());
      o.engines = {engine};
      o.voices = few_voices(engine);
      o.count = 6;
      o.seed = 5;
      o.val_fraction = o.test_fraction = 0.25;
      auto rep = um::synthesize(o);
      BOOST_REQUIRE_EQUAL(rep.rows.size(), 6u);
      auto back = um::read_manifest(rep.manifest_path);
      BOOST_REQUIRE_EQUAL(back.size(), 6u);
      BOOST_CHECK_NO_THROW(um::check_speaker_disjoint(back));
      std::map<std::string, um::split_kind> table;
      for (const auto& v : o.voices) table[v.speaker_id()] = v.split;
      for (const auto& r : back) {
        BOOST_TEST_CONTEXT(r.audio) {
          BOOST_REQUIRE(fs::exists(r.audio));
          BOOST_TEST(r.corpus == "synth");
          BOOST_TEST(um::four_class_index(r.emotion) >= 0);
          BOOST_TEST(r.source["engine"] == engine);
          BOOST_TEST((table.at(r.speaker) == r.split));
          auto a = um::load_audio(r.audio, um::audio_options{0});
          BOOST_TEST(a.info.source_rate == 16000);
          BOOST_TEST(a.info.source_channels == 1);
          BOOST_TEST(std::abs(a.seconds() - *r.duration_s) < 1e-3);
          // ~2.5-4.5 words/s, plus 0.2 s of margins.
          double words = double(std::count(r.transcript.begin(), r.transcript.end(), ' ') + 1);
          BOOST_TEST(a.seconds() > words / 6.0);
          BOOST_TEST(a.seconds() < words / 1.2 + 1.0);
          auto st = um::measure_prosody(a.samples, a.sample_rate);
          BOOST_TEST(st.active_rms_db > -45.0, "non-silent");
          BOOST_TEST(st.f0_median_hz > 50.0, "voiced speech");  // whisper is not in these classes
        }
      }
      // Same seed, same manifest and audio.
      o.out_dir = (t.path / "b").string();
      auto rep2 = um::synthesize(o);
      BOOST_TEST(slurp(rep.manifest_path) == slurp(rep2.manifest_path));
      for (size_t i = 0; i < rep.rows.size(); ++i) {
        bool same_audio = slurp(rep.rows[i].audio) == slurp(rep2.rows[i].audio);
        BOOST_TEST(same_audio, "audio of utterance " << i << " (" << rep.rows[i].speaker << ") differs between runs");
      }
      ++tested;
    }
  }
  BOOST_TEST(tested > 0u, "no TTS engine installed");
}

BOOST_AUTO_TEST_CASE(synthetic_classes_differ_acoustically) {
  if (!installed("espeak-ng")) {
    BOOST_TEST_MESSAGE("espeak-ng not installed: skipped");
    return;
  }
  ut::temp_dir t;
  auto o = base_options(t.str());
  o.engines = {"espeak-ng"};
  o.voices = few_voices("espeak-ng");
  o.count = 32;
  o.seed = 11;
  o.strong_fraction = 0;
  auto rep = um::synthesize(o);
  struct acc {
    double n = 0, rms = 0, f0 = 0, range = 0, sec_per_char = 0;
  };
  std::map<um::emotion_label, acc> by;
  for (const auto& r : rep.rows) {
    auto a = um::load_audio(r.audio);
    auto st = um::measure_prosody(a.samples, a.sample_rate);
    auto& x = by[r.emotion];
    x.n++;
    x.rms += st.active_rms_db;
    x.f0 += std::log2(st.f0_median_hz);
    x.range += st.f0_sd_st;
    x.sec_per_char += (st.duration_s - 0.2) / double(r.transcript.size());
  }
  for (auto& [e, x] : by) {
    x.rms /= x.n, x.f0 /= x.n, x.range /= x.n, x.sec_per_char /= x.n;
    BOOST_TEST_MESSAGE(um::to_string(e) << ": rms " << x.rms << " dBFS, log2 f0 " << x.f0 << ", f0 sd " << x.range
                                        << " st, " << x.sec_per_char * 1000 << " ms/char");
  }
  using E = um::emotion_label;
  BOOST_TEST(by[E::angry].rms > by[E::neutral].rms + 3);
  BOOST_TEST(by[E::sad].rms < by[E::neutral].rms - 3);
  BOOST_TEST(by[E::sad].sec_per_char > by[E::neutral].sec_per_char * 1.1);
  BOOST_TEST(by[E::happy].f0 > by[E::sad].f0 + 0.2);  // > 2.4 semitones apart
  BOOST_TEST(by[E::sad].range < by[E::happy].range);
}
