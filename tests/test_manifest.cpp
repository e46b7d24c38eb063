// Manifests (models/manifest.hpp): JSONL round trip, error messages, label
// vocabulary and 4-class mapping, RAVDESS scan of the real folder, read speech.
#include <boost/test/unit_test.hpp>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <set>

#include "models/audio.hpp"
#include "models/manifest.hpp"
#include "tests/support.hpp"

namespace um = undertone::models;
namespace ut = undertone::testing;
namespace fs = std::filesystem;

namespace {

std::string ravdess_dir() { return undertone::testing::ravdess_dir(); }
boost::test_tools::assertion_result have_ravdess(boost::unit_test::test_unit_id) {
  boost::test_tools::assertion_result r(fs::exists(ravdess_dir() + "/03-01-01-01-01-01-01.flac"));
  r.message() << "needs the RAVDESS folder " << ravdess_dir() << " (set UT_RAVDESS_DIR)";
  return r;
}

void write_text(const fs::path& p, const std::string& s) {
  fs::create_directories(p.parent_path());
  std::ofstream(p) << s;
}

void write_tone(const fs::path& p, double seconds) {
  fs::create_directories(p.parent_path());
  std::vector<float> x(size_t(seconds * 16000));
  for (size_t i = 0; i < x.size(); ++i) x[i] = 0.3f * float(std::sin(2 * M_PI * 220 * double(i) / 16000));
  um::save_audio(p.string(), x.data(), x.size(), 16000, 1);
}

um::utterance sample_row(const std::string& audio) {
  um::utterance u;
  u.audio = audio;
  u.transcript = "Kids are talking by the door";
  u.emotion = um::emotion_label::angry;
  u.intensity = um::intensity_level::strong;
  u.speaker = "ravdess-03";
  u.corpus = "ravdess";
  u.split = um::split_kind::val;
  u.gender = um::gender_kind::male;
  u.duration_s = 3.25;
  u.source = {{"actor", 3}, {"file", "x.flac"}};
  return u;
}

std::string error_of(const std::string& manifest) {
  try {
    um::read_manifest(manifest);
  } catch (const um::manifest_error& e) {
    return e.what();
  }
  return "";
}

}  // namespace

BOOST_AUTO_TEST_CASE(labels_and_four_class_mapping) {
  BOOST_TEST(um::all_emotion_labels().size() == 10u);
  for (auto e : um::all_emotion_labels()) BOOST_TEST((um::parse_emotion(um::to_string(e)) == e));
  BOOST_TEST(um::four_class_labels().size() == 4u);
  for (size_t i = 0; i < 4; ++i) {
    auto e = um::four_class_labels()[i];
    BOOST_TEST((um::to_four_class(e) == e));
    BOOST_TEST(um::four_class_index(e) == int(i));
  }
  for (auto e : {um::emotion_label::calm, um::emotion_label::fearful, um::emotion_label::disgust,
                 um::emotion_label::surprised, um::emotion_label::whisper, um::emotion_label::unlabeled}) {
    BOOST_TEST(!um::to_four_class(e).has_value(), um::to_string(e) << " must be excluded by default");
    BOOST_TEST(um::four_class_index(e) == -1);
  }
  BOOST_TEST((um::to_four_class(um::emotion_label::calm, um::four_class_policy::calm_as_neutral) ==
              um::emotion_label::neutral));
  BOOST_TEST(!um::to_four_class(um::emotion_label::fearful, um::four_class_policy::calm_as_neutral).has_value());
  BOOST_CHECK_THROW(um::parse_emotion("joyful"), um::manifest_error);
  BOOST_TEST(um::to_string(um::split_kind::val) == "val");
  BOOST_TEST((um::parse_intensity("strong") == um::intensity_level::strong));
}

BOOST_AUTO_TEST_CASE(round_trip_relative_and_absolute_paths) {
  ut::temp_dir t;
  fs::path manifest = t.path / "sub" / "m.jsonl";
  std::vector<um::utterance> rows;
  rows.push_back(sample_row((t.path / "sub" / "audio" / "a.flac").string()));  // under the manifest dir
  auto b = sample_row("/somewhere/else/b.wav");                                 // outside: stays absolute
  b.emotion = um::emotion_label::unlabeled;
  b.gender.reset();
  b.duration_s.reset();
  b.source = nullptr;
  b.split = um::split_kind::train;
  b.extra = {{"future_key", {1, 2}}};
  rows.push_back(b);
  um::write_manifest(manifest.string(), rows);

  // Relative path on disk, no temp file left behind.
  std::ifstream in(manifest);
  std::string first;
  std::getline(in, first);
  BOOST_TEST(first.find("\"audio\":\"audio/a.flac\"") != std::string::npos, first);
  BOOST_TEST(first.rfind("{\"audio\":", 0) == 0u, "documented key order starts with audio");
  size_t files = 0;
  for (auto& e : fs::directory_iterator(manifest.parent_path())) files += e.is_regular_file();
  BOOST_TEST(files == 1u);

  auto back = um::read_manifest(manifest.string());
  BOOST_REQUIRE_EQUAL(back.size(), 2u);
  BOOST_TEST((back[0] == rows[0]));
  BOOST_TEST((back[1] == rows[1]));
  BOOST_TEST(back[1].extra["future_key"].size() == 2u);

  // Overwrite atomically with fewer rows; comments and blank lines are skipped.
  um::write_manifest(manifest.string(), {rows[0]});
  BOOST_TEST(um::read_manifest(manifest.string()).size() == 1u);
  write_text(t.path / "c.jsonl", "# comment\n\n" + um::to_json(rows[1]).dump() + "\n");
  BOOST_TEST(um::read_manifest((t.path / "c.jsonl").string()).size() == 1u);
}

BOOST_AUTO_TEST_CASE(error_messages_name_line_and_field) {
  ut::temp_dir t;
  std::string good = um::to_json(sample_row("/a.flac")).dump();
  auto make = [&](const std::string& name, const std::string& bad) {
    fs::path p = t.path / name;
    write_text(p, good + "\n" + good + "\n" + bad + "\n");
    return p.string();
  };
  std::string e = error_of(make("json.jsonl", "{\"audio\": \"x.flac\", "));
  BOOST_TEST(e.find("json.jsonl:3") != std::string::npos, e);
  BOOST_TEST(e.find("not valid JSON") != std::string::npos, e);

  auto j = nlohmann::json::parse(good);
  j.erase("speaker");
  e = error_of(make("missing.jsonl", j.dump()));
  BOOST_TEST(e.find("missing.jsonl:3: field 'speaker': missing") != std::string::npos, e);

  j = nlohmann::json::parse(good);
  j["emotion"] = "joyful";
  e = error_of(make("label.jsonl", j.dump()));
  BOOST_TEST(e.find("label.jsonl:3: field 'emotion': unknown emotion label 'joyful'") != std::string::npos, e);
  BOOST_TEST(e.find("neutral, happy, sad, angry") != std::string::npos, e);

  j = nlohmann::json::parse(good);
  j["duration_s"] = "long";
  e = error_of(make("type.jsonl", j.dump()));
  BOOST_TEST(e.find("field 'duration_s': expected a number, got string") != std::string::npos, e);

  j = nlohmann::json::parse(good);
  j["split"] = "dev";
  e = error_of(make("split.jsonl", j.dump()));
  BOOST_TEST(e.find("field 'split': unknown split 'dev'") != std::string::npos, e);

  e = error_of(make("array.jsonl", "[1, 2]"));
  BOOST_TEST(e.find("array.jsonl:3: expected a JSON object") != std::string::npos, e);

  e = error_of((t.path / "nope.jsonl").string());
  BOOST_TEST(e.find("cannot open manifest") != std::string::npos, e);
}

BOOST_AUTO_TEST_CASE(speaker_disjoint_check) {
  auto a = sample_row("/a.flac"), b = a;
  b.split = um::split_kind::train;
  BOOST_CHECK_NO_THROW(um::check_speaker_disjoint({a, a}));
  try {
    um::check_speaker_disjoint({a, b});
    BOOST_FAIL("expected manifest_error");
  } catch (const um::manifest_error& e) {
    BOOST_TEST(std::string(e.what()).find("ravdess-03") != std::string::npos);
  }
}

BOOST_AUTO_TEST_CASE(ravdess_real_folder, *boost::unit_test::precondition(have_ravdess)) {
  auto rows = um::load_ravdess(ravdess_dir());
  BOOST_REQUIRE_EQUAL(rows.size(), 960u);
  auto s = um::summarize(rows);
  BOOST_TEST(s.by_speaker.size() == 16u);
  for (const auto& [spk, n] : s.by_speaker) BOOST_TEST(n == 60u, spk);
  BOOST_TEST(s.by_emotion.size() == 8u);
  for (const auto& [e, n] : s.by_emotion) BOOST_TEST(n == (e == "neutral" ? 64u : 128u), e);
  BOOST_TEST(s.by_split["val"] == 120u);
  BOOST_TEST(s.by_split["train"] == 840u);
  BOOST_CHECK_NO_THROW(um::check_speaker_disjoint(rows));
  std::set<std::string> train_spk, val_spk;
  for (const auto& r : rows) {
    (r.split == um::split_kind::train ? train_spk : val_spk).insert(r.speaker);
    BOOST_TEST((r.transcript == "Kids are talking by the door" || r.transcript == "Dogs are sitting by the door"));
    int actor = r.source["actor"].get<int>();
    BOOST_TEST((r.gender == (actor % 2 ? um::gender_kind::male : um::gender_kind::female)));
    BOOST_TEST((r.emotion != um::emotion_label::neutral || r.intensity == um::intensity_level::normal));
    BOOST_TEST(fs::path(r.audio).is_absolute());
    BOOST_REQUIRE(r.duration_s.has_value());
    BOOST_TEST(*r.duration_s > 2.0);
    BOOST_TEST(*r.duration_s < 7.0);
  }
  BOOST_TEST((val_spk == std::set<std::string>{"ravdess-15", "ravdess-16"}));
  for (const auto& v : val_spk) BOOST_TEST(!train_spk.count(v));
  // A known file's fields.
  auto it = std::find_if(rows.begin(), rows.end(),
                         [](const um::utterance& u) { return u.source["file"] == "03-01-05-02-01-01-01.flac"; });
  BOOST_REQUIRE(it != rows.end());
  BOOST_TEST((it->emotion == um::emotion_label::angry));
  BOOST_TEST((it->intensity == um::intensity_level::strong));
  BOOST_TEST(it->speaker == "ravdess-01");

  // Configurable held-out speakers.
  um::ravdess_options o;
  o.val_actors = {1, 2};
  o.test_actors = {3};
  o.with_duration = false;
  auto r2 = um::load_ravdess(ravdess_dir(), o);
  auto s2 = um::summarize(r2);
  BOOST_TEST(s2.by_split["val"] == 120u);
  BOOST_TEST(s2.by_split["test"] == 60u);
  BOOST_TEST(!r2[0].duration_s.has_value());
}

BOOST_AUTO_TEST_CASE(ravdess_bad_names) {
  ut::temp_dir t;
  write_tone(t.path / "03-01-05-02-01-01-01.flac", 0.2);
  write_text(t.path / "README.md", "ignored");
  BOOST_TEST(um::load_ravdess(t.str()).size() == 1u);
  write_tone(t.path / "03-02-05-02-01-01-01.flac", 0.2);  // song
  try {
    um::load_ravdess(t.str());
    BOOST_FAIL("expected manifest_error");
  } catch (const um::manifest_error& e) {
    BOOST_TEST(std::string(e.what()).find("vocal channel") != std::string::npos, e.what());
  }
  fs::remove(t.path / "03-02-05-02-01-01-01.flac");
  write_tone(t.path / "clip.flac", 0.2);
  try {
    um::load_ravdess(t.str());
    BOOST_FAIL("expected manifest_error");
  } catch (const um::manifest_error& e) {
    BOOST_TEST(std::string(e.what()).find("clip.flac: not a RAVDESS file name") != std::string::npos, e.what());
  }
}

BOOST_AUTO_TEST_CASE(read_speech_tsv_and_sphinx) {
  ut::temp_dir t;
  fs::path tsv_dir = t.path / "tsv";
  write_tone(tsv_dir / "a.wav", 1.0);
  write_tone(tsv_dir / "x" / "b.flac", 0.5);
  write_text(tsv_dir / "transcripts.tsv", "# audio\ttranscript\tspeaker\na.wav\thello world\tspk1\nx/b.flac\tgood bye\n");
  um::read_speech_options o;
  o.default_speaker = "spk2";
  o.val_speakers = {"spk2"};
  auto rows = um::load_read_speech(tsv_dir.string(), o);
  BOOST_REQUIRE_EQUAL(rows.size(), 2u);
  BOOST_TEST(rows[0].transcript == "hello world");
  BOOST_TEST(rows[0].speaker == "spk1");
  BOOST_TEST((rows[0].split == um::split_kind::train));
  BOOST_TEST((rows[1].split == um::split_kind::val));
  BOOST_TEST((rows[0].emotion == um::emotion_label::unlabeled));
  BOOST_TEST(std::abs(*rows[1].duration_s - 0.5) < 1e-6);

  write_text(tsv_dir / "transcripts.tsv", "a.wav\n");
  try {
    um::load_read_speech(tsv_dir.string(), o);
    BOOST_FAIL("expected manifest_error");
  } catch (const um::manifest_error& e) {
    BOOST_TEST(std::string(e.what()).find("transcripts.tsv:1: expected AUDIO<TAB>TRANSCRIPT") != std::string::npos,
               e.what());
  }

  fs::path sph = t.path / "sph" / "cards";
  write_tone(sph / "001.wav", 0.4);
  write_tone(sph / "002.wav", 0.6);
  write_text(sph / "cards.fileids", "001\n002\n");
  write_text(sph / "cards.transcription", "<s> ten of clubs </s> (001)\n<s> five five  </s> (002)\n");
  rows = um::load_read_speech((t.path / "sph").string());
  BOOST_REQUIRE_EQUAL(rows.size(), 2u);
  BOOST_TEST(rows[1].transcript == "five five");
  BOOST_TEST(rows[1].speaker == "sphinx-cards");
  BOOST_TEST(fs::path(rows[1].audio).filename() == "002.wav");

  BOOST_CHECK_THROW(um::load_read_speech((t.path / "tsv" / "x").string()), um::manifest_error);
}

BOOST_AUTO_TEST_CASE(read_speech_pocketsphinx_testdata) {
  const std::string dir = "/usr/share/pocketsphinx/test/data";
  if (!fs::exists(dir + "/librivox/transcription")) {
    BOOST_TEST_MESSAGE("pocketsphinx-testdata not installed: skipped");
    return;
  }
  auto rows = um::load_read_speech(dir);
  auto s = um::summarize(rows);
  BOOST_TEST(s.by_corpus["sphinx-librivox"] == 5u);
  BOOST_TEST(s.by_corpus["sphinx-cards"] == 5u);
  for (const auto& r : rows) BOOST_TEST(fs::exists(r.audio));
}
