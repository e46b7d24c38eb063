// `undertone data ravdess|synth|read-speech|merge|stats`: training data manifests
// (docs/data.md).
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <iostream>
#include <map>
#include <sstream>

#include "apps/common.hpp"
#include "models/audio.hpp"
#include "models/manifest.hpp"
#include "models/train_metrics.hpp"
#include "models/speech_synth.hpp"

namespace undertone::apps {

namespace {

struct data_flags {
  // ravdess
  std::string ravdess_root = "/work/shared/data/ravdess-train", ravdess_out;
  std::vector<int> val_actors = {15, 16}, test_actors;
  bool no_duration = false;
  // synth
  std::string synth_out, sentences, format = "flac";
  size_t count = 100;
  std::vector<std::string> engines = models::synth_engine_names();
  std::vector<std::string> classes = {"neutral", "happy", "sad", "angry"};
  uint64_t seed = 1;
  int workers = 2;
  double strong_fraction = 0.5, neutral_text = 0.5, congruent = 0.3, val_fraction = 0.1, test_fraction = 0.1;
  // read-speech
  std::string read_root, read_out, speaker, corpus;
  std::vector<std::string> val_speakers, test_speakers;
  // merge / stats
  std::vector<std::string> inputs;
  std::string merge_out;
  bool acoustic = false;
  size_t max_per_class = 200;
};

/// Progress of a long job: models::progress_bar (bar on a TTY, a plain line
/// every 10 s otherwise) driven by (done, total) callbacks.
class progress_printer {
 public:
  explicit progress_printer(const char* what) : bar_(what, -1, 10.0) {}
  void operator()(size_t done, size_t total) {
    bar_.update(int64_t(done), int64_t(total), 0, "");
    if (done == total) bar_.finish();
  }

 private:
  models::progress_bar bar_;
};

void print_summary(const std::vector<models::utterance>& rows, std::ostream& os) {
  auto s = models::summarize(rows);
  os << s.rows << " utterances, " << s.by_speaker.size() << " speakers, " << std::fixed;
  os.precision(1);
  os << s.total_seconds / 60.0 << " min of audio\n";
  os << "  corpora:";
  for (const auto& [k, v] : s.by_corpus) os << " " << k << "=" << v;
  os << "\n  labels: ";
  for (const auto& [k, v] : s.by_emotion) os << " " << k << "=" << v;
  os << "\n";
  for (const auto& [split, m] : s.emotion_by_split) {
    std::map<std::string, int> spk;
    for (const auto& r : rows)
      if (models::to_string(r.split) == split) spk[r.speaker]++;
    os << "  " << split << ": " << s.by_split[split] << " utterances, " << spk.size() << " speakers;";
    for (const auto& [e, n] : m) os << " " << e << "=" << n;
    os << "\n";
  }
}

/// Per-class means of the prosodic statistics (up to `max_per_class` rows each).
void print_acoustic(const std::vector<models::utterance>& rows, size_t max_per_class, std::ostream& os) {
  struct acc {
    size_t n = 0;
    double dur = 0, rms = 0, f0 = 0, f0n = 0, sd = 0, voiced = 0, hf = 0;
  };
  std::map<std::string, acc> by;
  for (const auto& r : rows) {
    std::string key = r.corpus + "/" + models::to_string(r.emotion);
    auto& a = by[key];
    if (a.n >= max_per_class) continue;
    models::audio au;
    try {
      au = models::load_audio(r.audio);
    } catch (const std::exception& e) {
      std::cerr << "skipping " << r.audio << ": " << e.what() << "\n";
      continue;
    }
    auto st = models::measure_prosody(au.samples, au.sample_rate);
    a.n++;
    a.dur += st.duration_s;
    a.rms += st.active_rms_db;
    if (st.f0_median_hz > 0) a.f0 += st.f0_median_hz, a.sd += st.f0_sd_st, a.f0n++;
    a.voiced += st.voiced_fraction;
    a.hf += st.hf_ratio_db;
  }
  char buf[256];
  std::snprintf(buf, sizeof buf, "%-26s %5s %8s %9s %9s %9s %8s %9s\n", "corpus/class", "n", "dur_s", "rms_dBFS",
                "f0_med_Hz", "f0_sd_st", "voiced", "hf/lf_dB");
  os << buf;
  for (const auto& [k, a] : by) {
    if (!a.n) continue;
    double n = double(a.n), fn = a.f0n ? a.f0n : 1;
    std::snprintf(buf, sizeof buf, "%-26s %5zu %8.2f %9.1f %9.1f %9.2f %8.2f %9.1f\n", k.c_str(), a.n, a.dur / n,
                  a.rms / n, a.f0 / fn, a.sd / fn, a.voiced / n, a.hf / n);
    os << buf;
  }
}

template <class T>
void run_guarded(T&& fn) {
  try {
    fn();
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << "\n";
    exit_code() = 1;
  }
}

}  // namespace

void add_data_command(CLI::App& app, global_options& /*g*/) {
  static data_flags f;
  auto* cmd = app.add_subcommand("data", "Build and inspect training-data manifests (JSONL; see docs/data.md)");
  cmd->require_subcommand(1);

  // ---- ravdess
  auto* rav = cmd->add_subcommand("ravdess", "Manifest for the RAVDESS speech folder (03-01-EE-II-SS-RR-AA.flac)");
  rav->add_option("--root", f.ravdess_root, "RAVDESS folder")->capture_default_str();
  rav->add_option("--out", f.ravdess_out, "manifest to write (JSONL)")->required();
  rav->add_option("--val-speakers", f.val_actors, "actor numbers held out as validation speakers")
      ->delimiter(',')
      ->capture_default_str();
  rav->add_option("--test-speakers", f.test_actors, "actor numbers held out as test speakers (default none)")
      ->delimiter(',');
  rav->add_flag("--no-duration", f.no_duration, "do not read each file's header for duration_s");
  rav->callback([] {
    run_guarded([] {
      models::ravdess_options o;
      o.val_actors = f.val_actors;
      o.test_actors = f.test_actors;
      o.with_duration = !f.no_duration;
      auto rows = models::load_ravdess(f.ravdess_root, o);
      models::write_manifest(f.ravdess_out, rows);
      std::cout << "wrote " << f.ravdess_out << ": ";
      print_summary(rows, std::cout);
    });
  });

  // ---- synth
  auto* syn = cmd->add_subcommand("synth", "Synthesise labelled expressive speech with espeak-ng, flite and festival");
  syn->add_option("--out", f.synth_out, "output folder (audio/ + manifest.jsonl)")->required();
  syn->add_option("--count", f.count, "number of utterances")->capture_default_str();
  syn->add_option("--engines", f.engines, "TTS engines")->delimiter(',')->capture_default_str();
  syn->add_option("--classes", f.classes, "classes: neutral,happy,sad,angry and optionally whisper")
      ->delimiter(',')
      ->capture_default_str();
  syn->add_option("--seed", f.seed, "random seed (same seed, same manifest and audio)")->capture_default_str();
  syn->add_option("-j,--workers", f.workers, "engine processes in parallel")->capture_default_str();
  syn->add_option("--sentences", f.sentences, "sentence file (default: data/sentences.txt)");
  syn->add_option("--format", f.format, "flac (16-bit) or wav (float)")->capture_default_str();
  syn->add_option("--strong-fraction", f.strong_fraction, "non-neutral utterances with strong intensity")
      ->capture_default_str();
  syn->add_option("--neutral-text", f.neutral_text, "fraction of sentences with neutral content")->capture_default_str();
  syn->add_option("--congruent-text", f.congruent, "fraction whose content matches the class")->capture_default_str();
  syn->add_option("--val-fraction", f.val_fraction, "share of utterances from validation voices")->capture_default_str();
  syn->add_option("--test-fraction", f.test_fraction, "share of utterances from test voices")->capture_default_str();
  syn->callback([] {
    run_guarded([] {
      models::synth_options o;
      o.out_dir = f.synth_out;
      o.count = f.count;
      o.engines = f.engines;
      o.classes.clear();
      for (const auto& c : f.classes) o.classes.push_back(models::parse_emotion(c));
      o.seed = f.seed;
      o.workers = f.workers;
      o.sentences_file = f.sentences;
      o.audio_format = f.format;
      o.strong_fraction = f.strong_fraction;
      o.neutral_text_fraction = f.neutral_text;
      o.congruent_fraction = f.congruent;
      o.val_fraction = f.val_fraction;
      o.test_fraction = f.test_fraction;
      progress_printer pp("synth");
      auto rep = models::synthesize(o, [&pp](size_t d, size_t t) { pp(d, t); });
      for (const auto& s : rep.skipped_voices) std::cerr << "warning: skipped voice " << s << "\n";
      std::printf("wrote %s: %zu utterances, %.1f min of audio in %s (%.2f utterances/s, %d workers)\n",
                  rep.manifest_path.c_str(), rep.rows.size(), rep.audio_seconds / 60, models::format_duration(rep.wall_seconds).c_str(),
                  rep.rows.size() / std::max(rep.wall_seconds, 1e-9), o.workers);
      print_summary(rep.rows, std::cout);
    });
  });

  // ---- read-speech
  auto* rs = cmd->add_subcommand("read-speech",
                                 "Manifest for read speech with transcripts: DIR/transcripts.tsv or Sphinx "
                                 "fileids+transcription (e.g. /usr/share/pocketsphinx/test/data)");
  rs->add_option("--root", f.read_root, "folder")->required();
  rs->add_option("--out", f.read_out, "manifest to write (JSONL)")->required();
  rs->add_option("--speaker", f.speaker, "speaker id when the layout has none");
  rs->add_option("--corpus", f.corpus, "corpus name (default read-speech / sphinx-FOLDER)");
  rs->add_option("--val-speakers", f.val_speakers, "speakers held out for validation")->delimiter(',');
  rs->add_option("--test-speakers", f.test_speakers, "speakers held out for test")->delimiter(',');
  rs->callback([] {
    run_guarded([] {
      models::read_speech_options o;
      o.corpus = f.corpus;
      o.default_speaker = f.speaker;
      o.val_speakers = f.val_speakers;
      o.test_speakers = f.test_speakers;
      auto rows = models::load_read_speech(f.read_root, o);
      models::write_manifest(f.read_out, rows);
      std::cout << "wrote " << f.read_out << ": ";
      print_summary(rows, std::cout);
    });
  });

  // ---- merge
  auto* mg = cmd->add_subcommand("merge", "Concatenate manifests (paths re-based, splits checked speaker-disjoint)");
  mg->add_option("--out", f.merge_out, "manifest to write")->required();
  mg->add_option("MANIFEST", f.inputs, "input manifests")->required()->check(CLI::ExistingFile);
  mg->callback([] {
    run_guarded([] {
      std::vector<models::utterance> all;
      for (const auto& in : f.inputs) {
        auto rows = models::read_manifest(in);
        all.insert(all.end(), rows.begin(), rows.end());
      }
      models::check_speaker_disjoint(all);
      models::write_manifest(f.merge_out, all);
      std::cout << "wrote " << f.merge_out << ": ";
      print_summary(all, std::cout);
    });
  });

  // ---- stats
  auto* stt = cmd->add_subcommand("stats", "Counts per label/split/speaker; --acoustic adds per-class prosody means");
  stt->add_option("MANIFEST", f.inputs, "manifests")->required()->check(CLI::ExistingFile);
  stt->add_flag("--acoustic", f.acoustic, "measure duration, level, F0 median/range, voicing, spectral tilt per class");
  stt->add_option("--max-per-class", f.max_per_class, "files measured per corpus/class")->capture_default_str();
  stt->callback([] {
    run_guarded([] {
      std::vector<models::utterance> all;
      for (const auto& in : f.inputs) {
        auto rows = models::read_manifest(in);
        all.insert(all.end(), rows.begin(), rows.end());
      }
      print_summary(all, std::cout);
      try {
        models::check_speaker_disjoint(all);
        std::cout << "splits are speaker-disjoint\n";
      } catch (const std::exception& e) {
        std::cout << "WARNING: " << e.what() << "\n";
        exit_code() = 1;
      }
      if (f.acoustic) print_acoustic(all, f.max_per_class, std::cout);
    });
  });
}

}  // namespace undertone::apps
