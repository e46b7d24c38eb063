#include "models/speech_synth.hpp"

#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <mutex>
#include <set>
#include <sstream>
#include <thread>

#include "models/audio.hpp"

extern char** environ;

namespace undertone::models {

namespace fs = std::filesystem;

namespace {

/// Removes a temporary directory (and what is in it) when the scope ends.
struct remove_on_exit {
  fs::path p;
  ~remove_on_exit() {
    std::error_code ec;
    fs::remove_all(p, ec);
  }
};

// ---- deterministic randomness (own generator: std distributions differ between
// standard libraries, and the plan must not) ----------------------------------------
struct rng {
  uint64_t s;
  explicit rng(uint64_t seed) : s(seed) {}
  uint64_t next() {
    uint64_t z = (s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  double uniform() { return double(next() >> 11) * (1.0 / 9007199254740992.0); }  // [0, 1)
  size_t pick(size_t n) { return size_t(uniform() * double(n)) % n; }
  double normal() {
    double u1 = std::max(uniform(), 1e-300), u2 = uniform();
    return std::sqrt(-2.0 * std::log(u1)) * std::cos(2.0 * M_PI * u2);
  }
};

uint64_t job_seed(uint64_t seed, uint64_t index) {
  rng r(seed ^ (0xD1B54A32D192ED03ull * (index + 1)));
  r.next();
  return r.next();
}

constexpr double k_reference_dbfs = -26.0;  // active-speech level of a neutral utterance
constexpr double k_peak_limit = 0.98;
constexpr double k_shelf_hz = 1000.0;

struct engine_info {
  const char* name;
  const char* program;
  const char* package;
};
const engine_info engines_info[] = {
    {"espeak-ng", "espeak-ng", "espeak-ng"},
    {"flite", "flite", "flite"},
    {"festival", "text2wave", "festival"},
};

const engine_info& engine_by_name(const std::string& name) {
  for (const auto& e : engines_info)
    if (name == e.name) return e;
  std::string all;
  for (const auto& e : engines_info) all += std::string(all.empty() ? "" : ", ") + e.name;
  throw synth_error("unknown TTS engine '" + name + "' (known: " + all + ")");
}

std::string festival_voice_package(const std::string& voice) {
  if (voice == "kal_diphone") return "festvox-kallpc16k";
  if (voice == "ked_diphone") return "festvox-kdlpc16k";
  if (voice == "cmu_us_slt_arctic_hts") return "festvox-us-slt-hts";
  return "a festvox-* package providing " + voice;
}

std::string find_program(const std::string& name, const std::string& search_path) {
  std::string path = search_path;
  if (path.empty()) {
    const char* p = std::getenv("PATH");
    path = p ? p : "/usr/bin:/bin";
  }
  std::stringstream ss(path);
  std::string dir;
  while (std::getline(ss, dir, ':')) {
    if (dir.empty()) continue;
    fs::path cand = fs::path(dir) / name;
    if (::access(cand.c_str(), X_OK) == 0 && fs::is_regular_file(cand)) return cand.string();
  }
  return "";
}

std::string tail_of_file(const std::string& path, size_t max_chars = 600) {
  std::ifstream in(path);
  std::string s((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (s.size() > max_chars) s = "..." + s.substr(s.size() - max_chars);
  while (!s.empty() && (s.back() == '\n' || s.back() == ' ')) s.pop_back();
  return s;
}

std::string quote_argv(const std::vector<std::string>& argv) {
  std::string s;
  for (const auto& a : argv) {
    s += s.empty() ? "" : " ";
    if (a.find_first_of(" \t'\"()") == std::string::npos)
      s += a;
    else
      s += "'" + a + "'";
  }
  return s;
}

/// Runs argv[0] (an absolute path) with stdin/stdout from/to /dev/null and stderr
/// into `stderr_path`; kills it after `timeout_s`. Throws synth_error on failure.
void run_program(const std::vector<std::string>& argv, const std::string& stderr_path, double timeout_s = 120) {
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDONLY, 0);
  posix_spawn_file_actions_addopen(&fa, 1, "/dev/null", O_WRONLY, 0);
  posix_spawn_file_actions_addopen(&fa, 2, stderr_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  std::vector<char*> args;
  for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
  args.push_back(nullptr);
  pid_t pid = 0;
  int rc = posix_spawn(&pid, argv[0].c_str(), &fa, nullptr, args.data(), environ);
  posix_spawn_file_actions_destroy(&fa);
  if (rc != 0) throw synth_error("cannot start " + argv[0] + ": " + std::strerror(rc));
  int status = 0;
  auto t0 = std::chrono::steady_clock::now();
  for (;;) {
    pid_t r = ::waitpid(pid, &status, WNOHANG);
    if (r == pid) break;
    if (r < 0 && errno != EINTR) throw synth_error("waitpid failed for " + argv[0] + ": " + std::strerror(errno));
    if (std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() > timeout_s) {
      ::kill(pid, SIGKILL);
      ::waitpid(pid, &status, 0);
      throw synth_error("timed out after " + std::to_string(int(timeout_s)) + " s: " + quote_argv(argv));
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(3));
  }
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
    std::string why = WIFEXITED(status) ? "exit status " + std::to_string(WEXITSTATUS(status))
                                        : "killed by signal " + std::to_string(WTERMSIG(status));
    throw synth_error(quote_argv(argv) + " failed (" + why + "): " + tail_of_file(stderr_path));
  }
}

std::string xml_escape(const std::string& s) {
  std::string o;
  for (char c : s) {
    switch (c) {
      case '&': o += "&amp;"; break;
      case '<': o += "&lt;"; break;
      case '>': o += "&gt;"; break;
      case '"': o += "&quot;"; break;
      case '\'': o += "&apos;"; break;
      default: o += c;
    }
  }
  return o;
}

std::string fmt(double v, int decimals = 3) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.*f", decimals, v);
  return buf;
}

double round_to(double v, double step) { return std::round(v / step) * step; }

}  // namespace

// ---- voices -----------------------------------------------------------------------

const std::vector<std::string>& synth_engine_names() {
  static const std::vector<std::string> v = {"espeak-ng", "flite", "festival"};
  return v;
}

std::string synth_voice::speaker_id() const {
  return engine + ":" + voice + (variant.empty() ? "" : "+" + variant);
}

std::vector<synth_voice> default_synth_voices(const std::vector<std::string>& engines) {
  std::vector<synth_voice> out;
  auto want = [&](const char* e) { return std::find(engines.begin(), engines.end(), e) != engines.end(); };
  for (const auto& e : engines) engine_by_name(e);  // validates names
  if (want("espeak-ng")) {
    static const char* const accents[] = {"en-us",      "en-gb",          "en-gb-scotland", "en-gb-x-rp",
                                          "en-029",     "en-gb-x-gbclan", "en-gb-x-gbcwmd"};
    struct variant {
      const char* name;
      gender_kind g;
      split_kind s;
    };
    using G = gender_kind;
    using S = split_kind;
    static const variant variants[] = {
        {"m1", G::male, S::train},       {"m2", G::male, S::train},    {"m4", G::male, S::train},
        {"m5", G::male, S::train},       {"m7", G::male, S::train},    {"m8", G::male, S::train},
        {"klatt", G::male, S::train},    {"klatt4", G::male, S::train}, {"Andy", G::male, S::train},
        {"david", G::male, S::train},    {"max", G::male, S::train},   {"f1", G::female, S::train},
        {"f3", G::female, S::train},     {"f5", G::female, S::train},  {"Annie", G::female, S::train},
        {"linda", G::female, S::train},  {"m3", G::male, S::val},      {"klatt2", G::male, S::val},
        {"paul", G::male, S::val},       {"f2", G::female, S::val},    {"belinda", G::female, S::val},
        {"m6", G::male, S::test},        {"klatt3", G::male, S::test}, {"victor", G::male, S::test},
        {"f4", G::female, S::test},      {"steph", G::female, S::test},
    };
    for (const char* a : accents) {
      for (const auto& v : variants) {
        synth_voice sv;
        sv.engine = "espeak-ng";
        sv.voice = a;
        sv.variant = v.name;
        sv.group = std::string("espeak-ng+") + v.name;
        sv.gender = v.g;
        sv.split = v.s;
        out.push_back(sv);
      }
      for (auto [name, g, s] : {std::tuple{"whisper", G::male, S::train}, std::tuple{"whisperf", G::female, S::val}}) {
        synth_voice sv;
        sv.engine = "espeak-ng";
        sv.voice = a;
        sv.variant = name;
        sv.group = std::string("espeak-ng+") + name;
        sv.gender = g;
        sv.split = s;
        sv.whisper = true;
        out.push_back(sv);
      }
    }
  }
  auto add = [&](const char* engine, const char* voice, const char* group, gender_kind g, split_kind s, bool pitch,
                 bool range, double f0, double f0_sd) {
    synth_voice sv;
    sv.engine = engine;
    sv.voice = voice;
    sv.group = group;
    sv.gender = g;
    sv.split = s;
    sv.engine_pitch = pitch;
    sv.engine_range = range;
    sv.base_f0_hz = f0;
    sv.base_f0_sd_hz = f0_sd;
    out.push_back(sv);
  };
  // F0 targets: the voices' own neutral levels, measured (docs/data.md). flite's
  // rms and festival's HTS slt ignore F0 targets: sox shifts their pitch.
  if (want("flite")) {
    add("flite", "kal16", "kal", gender_kind::male, split_kind::train, true, true, 95, 11);
    add("flite", "awb", "awb", gender_kind::male, split_kind::train, true, true, 130, 15);
    add("flite", "rms", "rms", gender_kind::male, split_kind::val, false, false, 0, 0);
    add("flite", "slt", "slt", gender_kind::female, split_kind::test, true, true, 170, 20);
  }
  if (want("festival")) {
    add("festival", "kal_diphone", "kal", gender_kind::male, split_kind::train, true, true, 105, 14);
    add("festival", "ked_diphone", "ked", gender_kind::male, split_kind::val, true, true, 105, 15);
    add("festival", "cmu_us_slt_arctic_hts", "slt", gender_kind::female, split_kind::test, false, false, 0, 0);
  }
  return out;
}

// ---- prosody ----------------------------------------------------------------------

prosody class_prosody(emotion_label e, intensity_level i) {
  prosody p;
  switch (e) {
    case emotion_label::neutral: break;
    case emotion_label::happy: p = {1.08, 3.0, 1.5, 2.0, 2.0}; break;
    case emotion_label::sad: p = {0.80, -2.0, 0.55, -6.0, -4.0}; break;
    case emotion_label::angry: p = {1.12, 1.0, 1.35, 6.0, 5.0}; break;
    case emotion_label::whisper: p = {0.95, 0.0, 1.0, -8.0, 0.0}; break;
    default:
      throw synth_error("no synthetic prosody for class '" + to_string(e) +
                        "' (synthesisable: neutral, happy, sad, angry, whisper)");
  }
  if (i == intensity_level::strong && e != emotion_label::neutral && e != emotion_label::whisper) {
    constexpr double k = 1.6;
    p.rate = std::pow(p.rate, k);
    p.pitch_st *= k;
    p.range = std::pow(p.range, k);
    p.gain_db *= k;
    p.tilt_db *= k;
  }
  return p;
}

// ---- sentences --------------------------------------------------------------------

std::vector<sentence> read_sentences(const std::string& path) {
  std::ifstream in(path);
  if (!in) throw synth_error(path + ": cannot open the sentence file (see data/make_sentences.py)");
  std::vector<sentence> out;
  std::string line;
  size_t lineno = 0;
  while (std::getline(in, line)) {
    ++lineno;
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (line.empty() || line[0] == '#') continue;
    size_t tab = line.find('\t');
    std::string where = path + ":" + std::to_string(lineno);
    if (tab == std::string::npos) throw synth_error(where + ": expected KIND<TAB>SENTENCE");
    sentence s{line.substr(0, tab), line.substr(tab + 1)};
    if (s.kind != "neutral" && s.kind.rfind("loaded:", 0) != 0)
      throw synth_error(where + ": kind '" + s.kind + "' is neither 'neutral' nor 'loaded:CLASS'");
    if (s.kind != "neutral") {
      try {
        parse_emotion(s.kind.substr(7));
      } catch (const std::exception& e) {
        throw synth_error(where + ": " + e.what());
      }
    }
    if (s.text.find_first_not_of(" \t") == std::string::npos) throw synth_error(where + ": empty sentence");
    out.push_back(std::move(s));
  }
  if (out.empty()) throw synth_error(path + ": no sentences");
  return out;
}

std::string find_sentences_file() {
  if (const char* d = std::getenv("UNDERTONE_DATA_DIR"); d && *d) {
    fs::path p = fs::path(d) / "sentences.txt";
    if (fs::exists(p)) return p.string();
    throw synth_error("UNDERTONE_DATA_DIR=" + std::string(d) + " has no sentences.txt");
  }
  std::error_code ec;
  std::vector<fs::path> starts;
  fs::path exe = fs::read_symlink("/proc/self/exe", ec);
  if (!ec) starts.push_back(exe.parent_path());
  starts.push_back(fs::current_path(ec));
  for (fs::path dir : starts) {
    for (int up = 0; up < 8 && !dir.empty(); ++up) {
      fs::path cand = dir / "data" / "sentences.txt";
      if (fs::exists(cand)) return cand.string();
      if (dir == dir.parent_path()) break;
      dir = dir.parent_path();
    }
  }
  throw synth_error("cannot find data/sentences.txt (looked upwards from the executable and the working "
                    "directory); pass --sentences FILE or set UNDERTONE_DATA_DIR");
}

// ---- plan -------------------------------------------------------------------------

std::vector<synth_job> plan_synthesis(const synth_options& opt, const std::vector<synth_voice>& voices,
                                      const std::vector<sentence>& sentences) {
  if (opt.classes.empty()) throw synth_error("no classes to synthesise");
  if (sentences.empty()) throw synth_error("no sentences");
  for (auto c : opt.classes) class_prosody(c, intensity_level::normal);  // validates
  if (opt.audio_format != "flac" && opt.audio_format != "wav")
    throw synth_error("audio format '" + opt.audio_format + "': use flac or wav");

  std::map<std::string, std::vector<size_t>> by_kind;
  for (size_t i = 0; i < sentences.size(); ++i) by_kind[sentences[i].kind].push_back(i);
  std::vector<std::string> loaded_kinds;
  for (const auto& [k, v] : by_kind)
    if (k != "neutral") loaded_kinds.push_back(k);

  // Class order: a seed-dependent permutation, then round robin (balanced classes).
  std::vector<emotion_label> order = opt.classes;
  {
    rng r(job_seed(opt.seed, ~0ull));
    for (size_t i = order.size(); i > 1; --i) std::swap(order[i - 1], order[r.pick(i)]);
  }

  std::vector<synth_job> jobs;
  jobs.reserve(opt.count);
  for (size_t idx = 0; idx < opt.count; ++idx) {
    rng r(job_seed(opt.seed, idx));
    synth_job j;
    j.index = idx;
    j.emotion = order[idx % order.size()];
    bool whisper = j.emotion == emotion_label::whisper;
    bool has_intensity = j.emotion != emotion_label::neutral && !whisper;
    j.intensity = has_intensity && r.uniform() < opt.strong_fraction ? intensity_level::strong : intensity_level::normal;

    // Split first (so split shares follow val/test_fraction whatever the voice
    // counts), then an engine uniformly, then a voice of that engine.
    double u = r.uniform();
    split_kind want = u < opt.val_fraction ? split_kind::val
                      : u < opt.val_fraction + opt.test_fraction ? split_kind::test
                                                                 : split_kind::train;
    std::vector<const synth_voice*> cand;
    for (split_kind s : {want, split_kind::val, split_kind::train, split_kind::test}) {
      for (const auto& v : voices)
        if (v.whisper == whisper && v.split == s) cand.push_back(&v);
      if (!cand.empty()) break;
    }
    if (cand.empty())
      throw synth_error(std::string("no voice can render class '") + to_string(j.emotion) + "'" +
                        (whisper ? " (needs espeak-ng's whisper variants)" : ""));
    std::vector<std::string> engines;
    for (auto* v : cand)
      if (std::find(engines.begin(), engines.end(), v->engine) == engines.end()) engines.push_back(v->engine);
    std::string engine = engines[r.pick(engines.size())];
    std::vector<const synth_voice*> of_engine;
    for (auto* v : cand)
      if (v->engine == engine) of_engine.push_back(v);
    j.voice = *of_engine[r.pick(of_engine.size())];

    // Sentence content: neutral, congruent with the class, or another class's.
    std::string cls_kind = "loaded:" + to_string(j.emotion);
    double k = r.uniform();
    std::string kind;
    if (k < opt.neutral_text_fraction || loaded_kinds.empty()) {
      kind = "neutral";
    } else if (k < opt.neutral_text_fraction + opt.congruent_fraction && by_kind.count(cls_kind)) {
      kind = cls_kind;
    } else {
      std::vector<std::string> others;
      for (const auto& lk : loaded_kinds)
        if (lk != cls_kind) others.push_back(lk);
      kind = others.empty() ? loaded_kinds[0] : others[r.pick(others.size())];
    }
    if (!by_kind.count(kind)) kind = by_kind.begin()->first;
    const auto& pool = by_kind[kind];
    j.text = sentences[pool[r.pick(pool.size())]];
    j.congruent = kind == cls_kind || (j.emotion == emotion_label::neutral && kind == "neutral");

    // Class mean + jitter, rounded so that the manifest states what the engine got.
    prosody p = class_prosody(j.emotion, j.intensity);
    p.rate = round_to(p.rate * std::exp(0.05 * r.normal()), 0.001);
    p.pitch_st = round_to(p.pitch_st + 0.8 * r.normal(), 0.01);
    p.range = round_to(p.range * std::exp(0.12 * r.normal()), 0.01);
    p.gain_db = round_to(p.gain_db + 1.5 * r.normal(), 0.01);
    p.tilt_db = round_to(p.tilt_db + 1.0 * r.normal(), 0.01);
    if (whisper) p.pitch_st = 0, p.range = 1;  // no voicing: pitch is meaningless
    if (!j.voice.engine_range) p.range = 1;    // the engine cannot scale the range
    j.p = p;
    char name[64];
    std::snprintf(name, sizeof name, "audio/u%06zu_%s.%s", idx, to_string(j.emotion).c_str(), opt.audio_format.c_str());
    j.audio_rel = name;
    jobs.push_back(std::move(j));
  }
  return jobs;
}

// ---- one utterance ---------------------------------------------------------------

namespace {

struct engine_paths {
  std::string espeak, flite, text2wave, sox;
};

engine_paths resolve_engines(const synth_options& opt, const std::vector<synth_voice>& voices) {
  engine_paths ep;
  std::set<std::string> used;
  bool need_sox = false;
  for (const auto& v : voices) {
    used.insert(v.engine);
    if (!v.engine_pitch) need_sox = true;
  }
  for (const auto& e : used) {
    const auto& info = engine_by_name(e);
    std::string p = find_program(info.program, opt.search_path);
    if (p.empty())
      throw synth_error("TTS engine '" + e + "' is not installed: program '" + info.program + "' not found in " +
                        (opt.search_path.empty() ? "PATH" : "'" + opt.search_path + "'") +
                        "; install the Debian package '" + info.package + "' (apt-get install " + info.package +
                        ") or leave it out of --engines");
    if (e == "espeak-ng") ep.espeak = p;
    if (e == "flite") ep.flite = p;
    if (e == "festival") ep.text2wave = p;
  }
  if (need_sox) {
    ep.sox = find_program("sox", opt.search_path);
    if (ep.sox.empty())
      throw synth_error("sox is not installed (needed to shift the pitch of voices whose engine cannot: flite rms, "
                        "festival HTS slt); install the Debian package 'sox'");
  }
  return ep;
}

std::vector<std::string> engine_command(const synth_job& job, const engine_paths& ep, const std::string& wav,
                                        const std::string& txt) {
  const auto& v = job.voice;
  const auto& p = job.p;
  double pitch_factor = std::pow(2.0, p.pitch_st / 12.0);
  if (v.engine == "espeak-ng") {
    int wpm = int(std::lround(175.0 * p.rate));
    long pitch_pct = std::lround((pitch_factor - 1.0) * 100.0);
    long range_pct = std::lround(p.range * 100.0);
    std::string ssml = "<speak><prosody pitch=\"" + std::string(pitch_pct >= 0 ? "+" : "") + std::to_string(pitch_pct) +
                       "%\" range=\"" + std::to_string(range_pct) + "%\">" + xml_escape(job.text.text) +
                       "</prosody></speak>";
    return {ep.espeak, "-v", v.voice + "+" + v.variant, "-s", std::to_string(wpm), "-m", "-w", wav, ssml};
  }
  if (v.engine == "flite") {
    std::vector<std::string> cmd = {ep.flite, "-voice", v.voice, "--setf", "duration_stretch=" + fmt(1.0 / p.rate)};
    if (v.engine_pitch) {
      double f0 = v.base_f0_hz * pitch_factor;
      double sd = v.base_f0_sd_hz * pitch_factor * (v.engine_range ? p.range : 1.0);
      cmd.insert(cmd.end(), {"--setf", "int_f0_target_mean=" + fmt(f0, 2), "--setf", "int_f0_target_stddev=" + fmt(sd, 2)});
    }
    cmd.insert(cmd.end(), {"-f", txt, "-o", wav});
    return cmd;
  }
  // festival (text2wave)
  std::vector<std::string> cmd = {ep.text2wave, "-eval", "(voice_" + v.voice + ")"};
  if (v.voice.find("_hts") != std::string::npos) {
    cmd.insert(cmd.end(), {"-eval", "(set! hts_engine_params (append hts_engine_params '((\"-r\" " + fmt(p.rate) + "))))"});
  } else {
    cmd.insert(cmd.end(), {"-eval", "(Parameter.set 'Duration_Stretch " + fmt(1.0 / p.rate) + ")"});
    if (v.engine_pitch) {
      double f0 = v.base_f0_hz * pitch_factor;
      double sd = v.base_f0_sd_hz * pitch_factor * (v.engine_range ? p.range : 1.0);
      // assoc finds the first entry: prepending overrides the voice's targets.
      cmd.insert(cmd.end(), {"-eval", "(set! int_lr_params (append '((target_f0_mean " + fmt(f0, 2) +
                                          ") (target_f0_std " + fmt(sd, 2) + ")) int_lr_params))"});
    }
  }
  cmd.insert(cmd.end(), {txt, "-o", wav});
  return cmd;
}

struct level_result {
  double limited_db = 0;
};

/// Trims leading/trailing silence (keeps 100 ms), applies the spectral tilt and
/// sets the active-speech level; limits the peak.
level_result post_process(std::vector<float>& x, int sr, const prosody& p) {
  level_result lr;
  const size_t hop = size_t(sr / 100);
  if (x.size() < hop) return lr;
  size_t nfr = x.size() / hop;
  std::vector<double> e(nfr);
  double emax = 0;
  for (size_t f = 0; f < nfr; ++f) {
    double s = 0;
    for (size_t i = 0; i < hop; ++i) s += double(x[f * hop + i]) * x[f * hop + i];
    e[f] = s / hop;
    emax = std::max(emax, e[f]);
  }
  if (emax <= 0) return lr;  // silent: left as is (the caller rejects it)
  double thr = emax * 1e-4;  // -40 dB
  size_t first = 0, last = nfr - 1;
  while (first < nfr && e[first] < thr) ++first;
  while (last > first && e[last] < thr) --last;
  size_t margin = size_t(sr / 10);
  size_t a = first * hop > margin ? first * hop - margin : 0;
  size_t b = std::min(x.size(), (last + 1) * hop + margin);
  x = std::vector<float>(x.begin() + std::ptrdiff_t(a), x.begin() + std::ptrdiff_t(b));

  // First-order high shelf: lp + g * (x - lp).
  if (p.tilt_db != 0) {
    double c = std::exp(-2.0 * M_PI * k_shelf_hz / sr), g = std::pow(10.0, p.tilt_db / 20.0), lp = 0;
    for (auto& s : x) {
      lp = c * lp + (1 - c) * s;
      s = float(lp + g * (s - lp));
    }
  }
  // Level: RMS over active 10 ms frames (within 35 dB of the loudest).
  nfr = x.size() / hop;
  std::vector<double> fe(nfr);
  double fmax = 0;
  for (size_t f = 0; f < nfr; ++f) {
    double s = 0;
    for (size_t i = 0; i < hop; ++i) s += double(x[f * hop + i]) * x[f * hop + i];
    fe[f] = s / hop;
    fmax = std::max(fmax, fe[f]);
  }
  double sum = 0;
  size_t n = 0;
  for (double v : fe)
    if (v >= fmax * std::pow(10.0, -3.5)) sum += v, ++n;
  if (n == 0 || sum <= 0) return lr;
  double rms = std::sqrt(sum / n);
  double gain = std::pow(10.0, (k_reference_dbfs + p.gain_db) / 20.0) / rms;
  float peak = 0;
  for (float s : x) peak = std::max(peak, std::fabs(s));
  if (peak * gain > k_peak_limit) {
    double g2 = k_peak_limit / peak;
    lr.limited_db = 20.0 * std::log10(gain / g2);
    gain = g2;
  }
  for (auto& s : x) s = float(s * gain);
  return lr;
}

}  // namespace

utterance synthesize_one(const synth_job& job, const std::string& out_path, const synth_options& opt,
                         const std::string& tmp_dir) {
  std::vector<synth_voice> one = {job.voice};
  engine_paths ep = resolve_engines(opt, one);
  std::string stem = (fs::path(tmp_dir) / ("j" + std::to_string(job.index))).string();
  std::string wav = stem + ".wav", txt = stem + ".txt", err = stem + ".err", shifted = stem + ".p.wav";
  struct cleanup {
    std::vector<std::string> files;
    ~cleanup() {
      for (const auto& f : files) ::unlink(f.c_str());
    }
  } clean{{wav, txt, err, shifted}};
  {
    std::ofstream t(txt);
    t << job.text.text << "\n";
    if (!t) throw synth_error("cannot write " + txt);
  }
  auto cmd = engine_command(job, ep, wav, txt);
  run_program(cmd, err);
  std::string src = wav;
  if (!job.voice.engine_pitch && job.p.pitch_st != 0) {
    // -D: no dither (sox dithers randomly, which would break determinism); float out.
    run_program({ep.sox, "-D", wav, "-e", "floating-point", "-b", "32", shifted, "pitch", fmt(job.p.pitch_st * 100.0, 1)},
                err);
    src = shifted;
  }
  audio a;
  try {
    a = load_audio(src, audio_options{k_speech_sample_rate, 120.0, nonfinite_policy::error});
  } catch (const std::exception& e) {
    throw synth_error(job.voice.speaker_id() + " produced no usable audio (" + e.what() + "); engine stderr: " +
                      tail_of_file(err) + "; command: " + quote_argv(cmd));
  }
  auto lr = post_process(a.samples, a.sample_rate, job.p);
  float peak = 0;
  for (float s : a.samples) peak = std::max(peak, std::fabs(s));
  if (a.samples.size() < size_t(a.sample_rate / 10) || peak < 1e-4f)
    throw synth_error(job.voice.speaker_id() + " produced silence for \"" + job.text.text + "\"; engine stderr: " +
                      tail_of_file(err) + "; command: " + quote_argv(cmd));
  fs::create_directories(fs::path(out_path).parent_path());
  std::string part = out_path + ".part." + opt.audio_format;  // libsndfile picks the format from the extension
  save_audio(part, a.samples.data(), a.samples.size(), a.sample_rate, 1);
  fs::rename(part, out_path);

  utterance u;
  u.audio = fs::absolute(out_path).lexically_normal().string();
  u.transcript = job.text.text;
  u.emotion = job.emotion;
  u.intensity = job.intensity;
  u.speaker = job.voice.speaker_id();
  u.corpus = "synth";
  u.split = job.voice.split;
  u.gender = job.voice.gender;
  u.duration_s = std::round(a.seconds() * 1e4) / 1e4;
  nlohmann::json src_json = {
      {"engine", job.voice.engine},
      {"voice", job.voice.voice},
      {"variant", job.voice.variant},
      {"voice_group", job.voice.group},
      {"sentence_kind", job.text.kind},
      {"congruent", job.congruent},
      {"rate", job.p.rate},
      {"pitch_st", job.p.pitch_st},
      {"range", job.p.range},
      {"gain_db", job.p.gain_db},
      {"tilt_db", job.p.tilt_db},
      {"limited_db", std::round(lr.limited_db * 100) / 100},
      {"pitch_by", job.voice.engine_pitch ? "engine" : "sox"},
      {"seed", opt.seed},
      {"index", job.index},
  };
  u.source = src_json;
  return u;
}

// ---- probing and the whole run ------------------------------------------------------

std::vector<synth_voice> probe_voices(const synth_options& opt, std::vector<std::string>* skipped) {
  std::vector<synth_voice> voices = opt.voices.empty() ? default_synth_voices(opt.engines) : opt.voices;
  if (voices.empty()) throw synth_error("no voices for engines (use espeak-ng, flite, festival)");
  resolve_engines(opt, voices);  // missing engines: error now

  fs::path tmp = fs::temp_directory_path() / ("undertone-probe-" + std::to_string(::getpid()) + "-" +
                                              std::to_string(std::chrono::steady_clock::now().time_since_epoch().count()));
  fs::create_directories(tmp);
  remove_on_exit rm_tmp{tmp};

  // One probe per engine voice and per espeak-ng variant (accent x variant combos
  // are all valid once both parts are).
  std::map<std::string, std::string> failure;  // probe key -> reason
  std::set<std::string> probed;
  size_t n = 0;
  auto probe = [&](const synth_voice& v, const std::string& key) {
    if (probed.count(key)) return;
    probed.insert(key);
    synth_job j;
    j.index = n++;
    j.voice = v;
    j.emotion = v.whisper ? emotion_label::whisper : emotion_label::neutral;
    j.text = {"neutral", "This is a test."};
    j.audio_rel = "probe.wav";
    synth_options o = opt;
    o.audio_format = "wav";
    try {
      synthesize_one(j, (tmp / ("p" + std::to_string(j.index) + ".wav")).string(), o, tmp.string());
    } catch (const std::exception& e) {
      std::string why = e.what();
      if (v.engine == "festival")
        why = "festival voice '" + v.voice + "' does not work (install the Debian package " +
              festival_voice_package(v.voice) + "): " + why;
      failure[key] = why;
    }
  };
  for (const auto& v : voices) {
    if (v.engine == "espeak-ng") {
      probe(v, "espeak-ng voice " + v.voice);
      probe(v, "espeak-ng variant " + v.variant);
    } else {
      probe(v, v.engine + " voice " + v.voice);
    }
  }
  std::vector<synth_voice> ok;
  std::map<std::string, std::vector<std::string>> engine_failures;
  std::set<std::string> engines_ok;
  for (const auto& v : voices) {
    std::vector<std::string> keys = {v.engine + " voice " + v.voice};
    if (v.engine == "espeak-ng") keys.push_back("espeak-ng variant " + v.variant);
    std::string why;
    for (const auto& k : keys)
      if (failure.count(k)) why = failure[k];
    if (why.empty()) {
      ok.push_back(v);
      engines_ok.insert(v.engine);
    } else {
      if (skipped) skipped->push_back(v.speaker_id() + ": " + why);
      engine_failures[v.engine].push_back(why);
    }
  }
  for (const auto& [engine, whys] : engine_failures)
    if (!engines_ok.count(engine))
      throw synth_error("no working voice for TTS engine '" + engine + "': " + whys.front());
  return ok;
}

synth_report synthesize(const synth_options& opt, const synth_progress& progress) {
  if (opt.out_dir.empty()) throw synth_error("no output directory (--out)");
  if (opt.count == 0) throw synth_error("--count must be > 0");
  if (opt.workers < 1) throw synth_error("workers must be >= 1");
  auto t0 = std::chrono::steady_clock::now();
  synth_report rep;
  auto sentences = read_sentences(opt.sentences_file.empty() ? find_sentences_file() : opt.sentences_file);
  auto voices = probe_voices(opt, &rep.skipped_voices);
  auto jobs = plan_synthesis(opt, voices, sentences);

  fs::path out = fs::absolute(opt.out_dir).lexically_normal();
  fs::create_directories(out / "audio");
  fs::path tmp = out / (".tmp-" + std::to_string(::getpid()));
  fs::create_directories(tmp);
  remove_on_exit rm_tmp{tmp};

  std::vector<utterance> rows(jobs.size());
  std::atomic<size_t> next{0};
  std::atomic<bool> failed{false};
  std::mutex mu;
  std::string first_error;
  size_t done = 0;
  auto worker = [&] {
    for (;;) {
      if (failed) return;
      size_t i = next++;
      if (i >= jobs.size()) return;
      try {
        rows[i] = synthesize_one(jobs[i], (out / jobs[i].audio_rel).string(), opt, tmp.string());
      } catch (const std::exception& e) {
        std::lock_guard<std::mutex> lk(mu);
        if (!failed) first_error = "utterance " + std::to_string(i) + ": " + e.what();
        failed = true;
        return;
      }
      std::lock_guard<std::mutex> lk(mu);
      ++done;
      if (progress) progress(done, jobs.size());
    }
  };
  std::vector<std::thread> threads;
  int nw = int(std::min<size_t>(size_t(opt.workers), jobs.size()));
  for (int w = 0; w < nw; ++w) threads.emplace_back(worker);
  for (auto& t : threads) t.join();
  if (failed) throw synth_error(first_error);

  check_speaker_disjoint(rows);
  rep.manifest_path = (out / "manifest.jsonl").string();
  write_manifest(rep.manifest_path, rows);
  for (const auto& r : rows) rep.audio_seconds += r.duration_s.value_or(0);
  rep.rows = std::move(rows);
  rep.wall_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return rep;
}

// ---- acoustic measurement -------------------------------------------------------

prosody_stats measure_prosody(const std::vector<float>& x, int sr) {
  prosody_stats st;
  if (sr <= 0) return st;
  st.duration_s = double(x.size()) / sr;
  const size_t hop = size_t(sr / 100), win = size_t(sr / 40);
  const size_t min_lag = size_t(sr / 500), max_lag = size_t(sr / 60);
  if (x.size() < win + max_lag + 1) return st;
  size_t nfr = (x.size() - win - max_lag) / hop + 1;
  std::vector<double> e(nfr);
  double emax = 0;
  for (size_t f = 0; f < nfr; ++f) {
    double s = 0;
    for (size_t i = 0; i < win; ++i) s += double(x[f * hop + i]) * x[f * hop + i];
    e[f] = s / win;
    emax = std::max(emax, e[f]);
  }
  if (emax <= 1e-12) return st;
  double thr = std::max(emax * std::pow(10.0, -3.5), 1e-8);
  double sum = 0;
  size_t active = 0;
  std::vector<double> f0s;
  std::vector<double> d(max_lag + 1), cm(max_lag + 1);
  for (size_t f = 0; f < nfr; ++f) {
    if (e[f] < thr) continue;
    sum += e[f];
    ++active;
    const float* p = x.data() + f * hop;
    // YIN: difference function, cumulative-mean normalisation, absolute threshold.
    for (size_t t = 1; t <= max_lag; ++t) {
      double s = 0;
      for (size_t i = 0; i < win; ++i) {
        double dd = double(p[i]) - p[i + t];
        s += dd * dd;
      }
      d[t] = s;
    }
    double run = 0;
    cm[0] = 1;
    for (size_t t = 1; t <= max_lag; ++t) {
      run += d[t];
      cm[t] = run > 0 ? d[t] * double(t) / run : 1;
    }
    for (size_t t = min_lag; t < max_lag; ++t) {
      if (cm[t] < 0.15) {
        while (t + 1 < max_lag && cm[t + 1] < cm[t]) ++t;
        f0s.push_back(double(sr) / double(t));
        break;
      }
    }
  }
  if (active) st.active_rms_db = 10.0 * std::log10(sum / active);
  st.voiced_fraction = active ? double(f0s.size()) / active : 0;
  if (!f0s.empty()) {
    std::vector<double> s = f0s;
    std::nth_element(s.begin(), s.begin() + std::ptrdiff_t(s.size() / 2), s.end());
    st.f0_median_hz = s[s.size() / 2];
    double acc = 0;
    for (double f : f0s) {
      double c = 12.0 * std::log2(f / st.f0_median_hz);
      acc += c * c;
    }
    st.f0_sd_st = std::sqrt(acc / f0s.size());
  }
  double c = std::exp(-2.0 * M_PI * k_shelf_hz / sr), lp = 0, el = 0, eh = 0;
  for (float s : x) {
    lp = c * lp + (1 - c) * s;
    el += lp * lp;
    eh += (s - lp) * (s - lp);
  }
  st.hf_ratio_db = (el > 0 && eh > 0) ? 10.0 * std::log10(eh / el) : 0;
  return st;
}

}  // namespace undertone::models
