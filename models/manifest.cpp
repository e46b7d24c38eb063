#include "models/manifest.hpp"

#include <fcntl.h>
#include <sndfile.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <regex>
#include <set>
#include <sstream>

namespace undertone::models {

namespace fs = std::filesystem;

namespace {

const char* const emotion_names[] = {"neutral", "happy",     "sad",     "angry",    "calm",
                                     "fearful", "disgust",   "surprised", "whisper", "unlabeled"};

std::string join_names(const char* const* names, size_t n) {
  std::string s;
  for (size_t i = 0; i < n; ++i) s += (i ? ", " : "") + std::string(names[i]);
  return s;
}

template <class Enum, size_t N>
Enum parse_enum(const std::string& name, const char* const (&names)[N], const char* what) {
  for (size_t i = 0; i < N; ++i)
    if (name == names[i]) return Enum(i);
  throw manifest_error("unknown " + std::string(what) + " '" + name + "' (expected one of " + join_names(names, N) +
                       ")");
}

const char* const intensity_names[] = {"normal", "strong"};
const char* const split_names[] = {"train", "val", "test"};
const char* const gender_names[] = {"male", "female"};

std::string abs_dir_of(const std::string& file) {
  fs::path p = fs::absolute(fs::path(file)).lexically_normal();
  return p.parent_path().string();
}

std::string resolve(const std::string& audio, const std::string& base_dir) {
  fs::path p(audio);
  if (p.is_absolute() || base_dir.empty()) return p.lexically_normal().string();
  return (fs::path(base_dir) / p).lexically_normal().string();
}

const char* json_type(const nlohmann::json& j) { return j.type_name(); }

}  // namespace

// ---- vocabularies ------------------------------------------------------------

const std::vector<emotion_label>& all_emotion_labels() {
  static const std::vector<emotion_label> v = {
      emotion_label::neutral, emotion_label::happy,   emotion_label::sad,       emotion_label::angry,
      emotion_label::calm,    emotion_label::fearful, emotion_label::disgust,   emotion_label::surprised,
      emotion_label::whisper, emotion_label::unlabeled};
  return v;
}

const std::vector<emotion_label>& four_class_labels() {
  static const std::vector<emotion_label> v = {emotion_label::neutral, emotion_label::happy, emotion_label::sad,
                                               emotion_label::angry};
  return v;
}

std::string to_string(emotion_label e) { return emotion_names[size_t(e)]; }
emotion_label parse_emotion(const std::string& name) {
  return parse_enum<emotion_label>(name, emotion_names, "emotion label");
}

std::optional<emotion_label> to_four_class(emotion_label e, four_class_policy p) {
  switch (e) {
    case emotion_label::neutral:
    case emotion_label::happy:
    case emotion_label::sad:
    case emotion_label::angry:
      return e;
    case emotion_label::calm:
      if (p == four_class_policy::calm_as_neutral) return emotion_label::neutral;
      return std::nullopt;
    default:
      return std::nullopt;
  }
}

int four_class_index(emotion_label e) {
  const auto& v = four_class_labels();
  auto it = std::find(v.begin(), v.end(), e);
  return it == v.end() ? -1 : int(it - v.begin());
}

std::string to_string(intensity_level i) { return intensity_names[size_t(i)]; }
intensity_level parse_intensity(const std::string& name) {
  return parse_enum<intensity_level>(name, intensity_names, "intensity");
}
std::string to_string(split_kind s) { return split_names[size_t(s)]; }
split_kind parse_split(const std::string& name) { return parse_enum<split_kind>(name, split_names, "split"); }
std::string to_string(gender_kind g) { return gender_names[size_t(g)]; }
gender_kind parse_gender(const std::string& name) { return parse_enum<gender_kind>(name, gender_names, "gender"); }

bool utterance::operator==(const utterance& o) const {
  return audio == o.audio && transcript == o.transcript && emotion == o.emotion && intensity == o.intensity &&
         speaker == o.speaker && corpus == o.corpus && split == o.split && gender == o.gender &&
         duration_s == o.duration_s && source == o.source && extra == o.extra;
}

// ---- JSONL -------------------------------------------------------------------

utterance parse_manifest_line(const std::string& line, const std::string& where, const std::string& base_dir) {
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(line);
  } catch (const nlohmann::json::parse_error& e) {
    throw manifest_error(where + ": not valid JSON (" + e.what() + "); each line must be one JSON object");
  }
  if (!j.is_object()) throw manifest_error(where + ": expected a JSON object, got " + json_type(j));

  auto fail = [&](const std::string& field, const std::string& what) -> manifest_error {
    return manifest_error(where + ": field '" + field + "': " + what);
  };
  auto get_string = [&](const char* field, bool required) -> std::optional<std::string> {
    auto it = j.find(field);
    if (it == j.end() || it->is_null()) {
      if (required) throw fail(field, "missing (required)");
      return std::nullopt;
    }
    if (!it->is_string()) throw fail(field, std::string("expected a string, got ") + json_type(*it));
    return it->get<std::string>();
  };
  auto parse_field = [&](const char* field, auto parser, const std::string& value) {
    try {
      return parser(value);
    } catch (const manifest_error& e) {
      throw fail(field, e.what());
    }
  };

  utterance u;
  u.audio = *get_string("audio", true);
  if (u.audio.empty()) throw fail("audio", "empty path");
  u.audio = resolve(u.audio, base_dir);
  u.transcript = *get_string("transcript", true);
  u.emotion = parse_field("emotion", parse_emotion, *get_string("emotion", true));
  if (auto s = get_string("intensity", false)) u.intensity = parse_field("intensity", parse_intensity, *s);
  u.speaker = *get_string("speaker", true);
  if (u.speaker.empty()) throw fail("speaker", "empty (splits are by speaker: every row needs one)");
  u.corpus = *get_string("corpus", true);
  u.split = parse_field("split", parse_split, *get_string("split", true));
  if (auto s = get_string("gender", false)) u.gender = parse_field("gender", parse_gender, *s);
  if (auto it = j.find("duration_s"); it != j.end() && !it->is_null()) {
    if (!it->is_number()) throw fail("duration_s", std::string("expected a number, got ") + json_type(*it));
    double d = it->get<double>();
    if (!(d >= 0)) throw fail("duration_s", "must be >= 0, got " + it->dump());
    u.duration_s = d;
  }
  if (auto it = j.find("source"); it != j.end() && !it->is_null()) {
    if (!it->is_object()) throw fail("source", std::string("expected an object, got ") + json_type(*it));
    u.source = *it;
  }
  static const std::set<std::string> known = {"audio",   "transcript", "emotion", "intensity",  "speaker",
                                              "corpus",  "split",      "gender",  "duration_s", "source"};
  for (auto it = j.begin(); it != j.end(); ++it)
    if (!known.count(it.key())) u.extra[it.key()] = it.value();
  return u;
}

nlohmann::json to_json(const utterance& u, const std::string& base_dir) {
  // ordered_json keeps a readable, stable key order; converted at the end.
  nlohmann::ordered_json j;
  std::string audio = u.audio;
  if (!base_dir.empty()) {
    fs::path a = fs::path(audio).lexically_normal();
    fs::path rel = a.lexically_relative(fs::path(base_dir).lexically_normal());
    if (a.is_absolute() && !rel.empty() && *rel.begin() != "..") audio = rel.string();
  }
  j["audio"] = audio;
  j["transcript"] = u.transcript;
  j["emotion"] = to_string(u.emotion);
  j["intensity"] = to_string(u.intensity);
  j["speaker"] = u.speaker;
  j["corpus"] = u.corpus;
  j["split"] = to_string(u.split);
  if (u.gender) j["gender"] = to_string(*u.gender);
  if (u.duration_s) j["duration_s"] = *u.duration_s;
  if (!u.source.is_null()) j["source"] = u.source;
  if (u.extra.is_object())
    for (auto it = u.extra.begin(); it != u.extra.end(); ++it) j[it.key()] = it.value();
  return nlohmann::json::parse(j.dump());
}

std::vector<utterance> read_manifest(const std::string& path) {
  std::ifstream in(path);
  if (!in) throw manifest_error(path + ": cannot open manifest (" + std::strerror(errno) + ")");
  std::string base = abs_dir_of(path);
  std::vector<utterance> rows;
  std::string line;
  size_t lineno = 0;
  while (std::getline(in, line)) {
    ++lineno;
    if (!line.empty() && line.back() == '\r') line.pop_back();
    size_t first = line.find_first_not_of(" \t");
    if (first == std::string::npos || line[first] == '#') continue;
    rows.push_back(parse_manifest_line(line, path + ":" + std::to_string(lineno), base));
  }
  if (in.bad()) throw manifest_error(path + ": read error after line " + std::to_string(lineno));
  return rows;
}

void write_manifest(const std::string& path, const std::vector<utterance>& rows) {
  fs::path target = fs::absolute(fs::path(path)).lexically_normal();
  std::error_code ec;
  if (!target.parent_path().empty()) fs::create_directories(target.parent_path(), ec);
  if (ec) throw manifest_error(path + ": cannot create directory " + target.parent_path().string() + ": " + ec.message());
  std::string base = target.parent_path().string();
  std::string data;
  for (const auto& u : rows) {
    // nlohmann::json sorts keys; write in the documented order instead.
    nlohmann::ordered_json o;
    nlohmann::json j = to_json(u, base);
    for (const char* k : {"audio", "transcript", "emotion", "intensity", "speaker", "corpus", "split", "gender",
                          "duration_s", "source"})
      if (j.contains(k)) o[k] = j[k];
    for (auto it = j.begin(); it != j.end(); ++it)
      if (!o.contains(it.key())) o[it.key()] = it.value();
    data += o.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
    data += '\n';
  }
  std::string tmp = target.string() + ".tmp." + std::to_string(::getpid());
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) throw manifest_error(path + ": cannot write temp file " + tmp + ": " + std::strerror(errno));
  size_t off = 0;
  while (off < data.size()) {
    ssize_t n = ::write(fd, data.data() + off, data.size() - off);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      int err = errno;
      ::close(fd);
      ::unlink(tmp.c_str());
      throw manifest_error(path + ": write failed: " + std::strerror(err));
    }
    off += size_t(n);
  }
  if (::fsync(fd) != 0 || ::close(fd) != 0) {
    int err = errno;
    ::unlink(tmp.c_str());
    throw manifest_error(path + ": fsync/close failed: " + std::strerror(err));
  }
  if (std::rename(tmp.c_str(), target.c_str()) != 0) {
    int err = errno;
    ::unlink(tmp.c_str());
    throw manifest_error(path + ": rename from " + tmp + " failed: " + std::strerror(err));
  }
}

manifest_summary summarize(const std::vector<utterance>& rows) {
  manifest_summary s;
  s.rows = rows.size();
  for (const auto& u : rows) {
    if (u.duration_s) s.total_seconds += *u.duration_s;
    s.by_emotion[to_string(u.emotion)]++;
    s.by_split[to_string(u.split)]++;
    s.by_speaker[u.speaker]++;
    s.by_corpus[u.corpus]++;
    s.emotion_by_split[to_string(u.split)][to_string(u.emotion)]++;
  }
  return s;
}

void check_speaker_disjoint(const std::vector<utterance>& rows) {
  std::map<std::string, split_kind> seen;
  for (const auto& u : rows) {
    auto [it, inserted] = seen.emplace(u.speaker, u.split);
    if (!inserted && it->second != u.split)
      throw manifest_error("speaker '" + u.speaker + "' appears in both split " + to_string(it->second) + " and " +
                           to_string(u.split) + " (" + u.audio + "); splits must be by speaker");
  }
}

double audio_duration_seconds(const std::string& path) {
  SF_INFO info{};
  SNDFILE* f = sf_open(path.c_str(), SFM_READ, &info);
  if (!f) throw manifest_error(path + ": cannot read audio header: " + sf_strerror(nullptr));
  sf_close(f);
  if (info.samplerate <= 0) throw manifest_error(path + ": audio header has sample rate 0");
  return double(info.frames) / info.samplerate;
}

// ---- RAVDESS -------------------------------------------------------------------

std::vector<utterance> load_ravdess(const std::string& root, const ravdess_options& opt) {
  std::error_code ec;
  if (!fs::is_directory(root, ec))
    throw manifest_error(root + ": not a directory (expected the RAVDESS speech folder, e.g. "
                                "/work/shared/data/ravdess-train)");
  for (int a : opt.val_actors)
    if (std::find(opt.test_actors.begin(), opt.test_actors.end(), a) != opt.test_actors.end())
      throw manifest_error("RAVDESS actor " + std::to_string(a) + " is in both the val and the test speakers");
  static const emotion_label emotions[] = {emotion_label::neutral, emotion_label::calm,    emotion_label::happy,
                                           emotion_label::sad,     emotion_label::angry,   emotion_label::fearful,
                                           emotion_label::disgust, emotion_label::surprised};
  static const char* const statements[] = {"Kids are talking by the door", "Dogs are sitting by the door"};
  static const std::regex name_re(R"((\d\d)-(\d\d)-(\d\d)-(\d\d)-(\d\d)-(\d\d)-(\d\d))");

  std::vector<fs::path> files;
  for (const auto& e : fs::directory_iterator(root, ec)) {
    if (!e.is_regular_file()) continue;
    std::string ext = e.path().extension().string();
    if (ext == ".flac" || ext == ".wav") files.push_back(e.path());
  }
  if (ec) throw manifest_error(root + ": cannot list directory: " + ec.message());
  std::sort(files.begin(), files.end());
  if (files.empty()) throw manifest_error(root + ": no .flac or .wav files (expected 03-01-EE-II-SS-RR-AA.flac)");

  std::vector<utterance> rows;
  rows.reserve(files.size());
  for (const auto& p : files) {
    std::string stem = p.stem().string();
    std::smatch m;
    if (!std::regex_match(stem, m, name_re))
      throw manifest_error(p.string() + ": not a RAVDESS file name (expected 03-01-EE-II-SS-RR-AA, 7 two-digit fields)");
    int f[7];
    for (int i = 0; i < 7; ++i) f[i] = std::stoi(m[size_t(i + 1)].str());
    auto bad = [&](const char* field, int v, const char* expect) {
      return manifest_error(p.string() + ": field " + field + " = " + std::to_string(v) + ", expected " + expect);
    };
    if (f[0] != 3) throw bad("modality", f[0], "03 (audio-only)");
    if (f[1] != 1) throw bad("vocal channel", f[1], "01 (speech; song is not supported)");
    if (f[2] < 1 || f[2] > 8) throw bad("emotion", f[2], "01..08");
    if (f[3] < 1 || f[3] > 2) throw bad("intensity", f[3], "01 or 02");
    if (f[4] < 1 || f[4] > 2) throw bad("statement", f[4], "01 or 02");
    if (f[5] < 1 || f[5] > 2) throw bad("repetition", f[5], "01 or 02");
    if (f[6] < 1 || f[6] > 24) throw bad("actor", f[6], "01..24");
    utterance u;
    u.audio = fs::absolute(p).lexically_normal().string();
    u.transcript = statements[f[4] - 1];
    u.emotion = emotions[f[2] - 1];
    u.intensity = f[3] == 2 ? intensity_level::strong : intensity_level::normal;
    char spk[16];
    std::snprintf(spk, sizeof spk, "ravdess-%02d", f[6]);
    u.speaker = spk;
    u.corpus = "ravdess";
    auto in = [&](const std::vector<int>& v) { return std::find(v.begin(), v.end(), f[6]) != v.end(); };
    u.split = in(opt.val_actors) ? split_kind::val : in(opt.test_actors) ? split_kind::test : split_kind::train;
    u.gender = (f[6] % 2 == 1) ? gender_kind::male : gender_kind::female;
    if (opt.with_duration) u.duration_s = audio_duration_seconds(u.audio);
    u.source = {{"file", p.filename().string()}, {"statement", f[4]}, {"repetition", f[5]}, {"actor", f[6]}};
    rows.push_back(std::move(u));
  }
  return rows;
}

// ---- read speech -----------------------------------------------------------------

namespace {

std::string trim(const std::string& s) {
  size_t a = s.find_first_not_of(" \t\r\n");
  if (a == std::string::npos) return "";
  size_t b = s.find_last_not_of(" \t\r\n");
  return s.substr(a, b - a + 1);
}

std::vector<std::string> split_tabs(const std::string& s) {
  std::vector<std::string> out;
  size_t start = 0;
  for (;;) {
    size_t t = s.find('\t', start);
    out.push_back(s.substr(start, t == std::string::npos ? std::string::npos : t - start));
    if (t == std::string::npos) break;
    start = t + 1;
  }
  return out;
}

split_kind split_for(const std::string& speaker, const read_speech_options& opt) {
  if (std::find(opt.val_speakers.begin(), opt.val_speakers.end(), speaker) != opt.val_speakers.end())
    return split_kind::val;
  if (std::find(opt.test_speakers.begin(), opt.test_speakers.end(), speaker) != opt.test_speakers.end())
    return split_kind::test;
  return split_kind::train;
}

void load_tsv(const fs::path& tsv, const read_speech_options& opt, std::vector<utterance>& rows) {
  std::ifstream in(tsv);
  if (!in) throw manifest_error(tsv.string() + ": cannot open");
  std::string base = fs::absolute(tsv).lexically_normal().parent_path().string();
  std::string line;
  size_t lineno = 0;
  while (std::getline(in, line)) {
    ++lineno;
    std::string where = tsv.string() + ":" + std::to_string(lineno);
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (trim(line).empty() || trim(line)[0] == '#') continue;
    auto cols = split_tabs(line);
    if (cols.size() < 2 || cols.size() > 3)
      throw manifest_error(where + ": expected AUDIO<TAB>TRANSCRIPT[<TAB>SPEAKER], got " +
                           std::to_string(cols.size()) + " column(s)");
    utterance u;
    u.audio = resolve(trim(cols[0]), base);
    if (trim(cols[0]).empty()) throw manifest_error(where + ": column 1 (audio): empty");
    if (!fs::exists(u.audio)) throw manifest_error(where + ": column 1 (audio): file not found: " + u.audio);
    u.transcript = trim(cols[1]);
    if (u.transcript.empty()) throw manifest_error(where + ": column 2 (transcript): empty");
    u.speaker = cols.size() == 3 ? trim(cols[2]) : opt.default_speaker;
    if (u.speaker.empty())
      throw manifest_error(where + ": no speaker (add a third column or pass a default speaker, --speaker)");
    u.emotion = emotion_label::unlabeled;
    u.corpus = opt.corpus.empty() ? "read-speech" : opt.corpus;
    u.split = split_for(u.speaker, opt);
    if (opt.with_duration) u.duration_s = audio_duration_seconds(u.audio);
    rows.push_back(std::move(u));
  }
}

void load_sphinx_pair(const fs::path& fileids, const fs::path& transcription, const read_speech_options& opt,
                      std::vector<utterance>& rows) {
  fs::path dir = fs::absolute(fileids).lexically_normal().parent_path();
  std::string folder = dir.filename().string();
  // id -> audio path (fileids lines are paths relative to the folder, no extension).
  std::map<std::string, fs::path> audio_by_id;
  {
    std::ifstream in(fileids);
    std::string line;
    size_t lineno = 0;
    while (std::getline(in, line)) {
      ++lineno;
      std::string id = trim(line);
      if (id.empty()) continue;
      fs::path found;
      for (const char* ext : {".wav", ".flac"}) {
        fs::path cand = dir / (id + ext);
        if (fs::exists(cand)) {
          found = cand;
          break;
        }
      }
      if (found.empty())
        throw manifest_error(fileids.string() + ":" + std::to_string(lineno) + ": no audio for '" + id + "' (looked for " +
                             (dir / id).string() + ".wav/.flac)");
      audio_by_id[fs::path(id).filename().string()] = found;
    }
  }
  static const std::regex line_re(R"(^\s*(?:<s>)?\s*(.*?)\s*(?:</s>)?\s*\(([^()]+)\)\s*$)");
  std::ifstream in(transcription);
  std::string line;
  size_t lineno = 0;
  while (std::getline(in, line)) {
    ++lineno;
    if (trim(line).empty()) continue;
    std::string where = transcription.string() + ":" + std::to_string(lineno);
    std::smatch m;
    if (!std::regex_match(line, m, line_re))
      throw manifest_error(where + ": expected '<s> words </s> (ID)'");
    std::string id = trim(m[2].str());
    auto it = audio_by_id.find(id);
    if (it == audio_by_id.end()) throw manifest_error(where + ": ID '" + id + "' is not listed in " + fileids.string());
    utterance u;
    u.audio = it->second.string();
    u.transcript = trim(m[1].str());
    if (u.transcript.empty()) throw manifest_error(where + ": empty transcript");
    u.emotion = emotion_label::unlabeled;
    u.speaker = opt.default_speaker.empty() ? "sphinx-" + folder : opt.default_speaker;
    u.corpus = opt.corpus.empty() ? "sphinx-" + folder : opt.corpus;
    u.split = split_for(u.speaker, opt);
    if (opt.with_duration) u.duration_s = audio_duration_seconds(u.audio);
    u.source = {{"id", id}};
    rows.push_back(std::move(u));
  }
}

void find_sphinx_pairs(const fs::path& dir, std::vector<std::pair<fs::path, fs::path>>& pairs) {
  std::error_code ec;
  std::vector<fs::path> names;
  for (const auto& e : fs::directory_iterator(dir, ec))
    if (e.is_regular_file()) names.push_back(e.path());
  std::sort(names.begin(), names.end());
  for (const auto& p : names) {
    std::string n = p.filename().string();
    std::string tname;
    if (n == "fileids")
      tname = "transcription";
    else if (n.size() > 8 && n.compare(n.size() - 8, 8, ".fileids") == 0)
      tname = n.substr(0, n.size() - 8) + ".transcription";
    else
      continue;
    if (fs::exists(dir / tname)) pairs.emplace_back(p, dir / tname);
  }
}

}  // namespace

std::vector<utterance> load_read_speech(const std::string& dir, const read_speech_options& opt) {
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) throw manifest_error(dir + ": not a directory");
  std::vector<utterance> rows;
  fs::path tsv = fs::path(dir) / "transcripts.tsv";
  if (fs::exists(tsv)) {
    load_tsv(tsv, opt, rows);
    return rows;
  }
  std::vector<std::pair<fs::path, fs::path>> pairs;
  find_sphinx_pairs(dir, pairs);
  std::vector<fs::path> subdirs;
  for (const auto& e : fs::directory_iterator(dir, ec))
    if (e.is_directory()) subdirs.push_back(e.path());
  std::sort(subdirs.begin(), subdirs.end());
  for (const auto& s : subdirs) find_sphinx_pairs(s, pairs);
  if (pairs.empty())
    throw manifest_error(dir + ": no read-speech layout found: expected transcripts.tsv "
                               "(AUDIO<TAB>TRANSCRIPT[<TAB>SPEAKER]) or Sphinx X.fileids + X.transcription pairs "
                               "(in the folder or its direct subfolders); see docs/data.md");
  for (const auto& [f, t] : pairs) load_sphinx_pair(f, t, opt, rows);
  return rows;
}

}  // namespace undertone::models
