// Synthetic expressive speech from Debian's TTS engines (espeak-ng, flite,
// festival): labelled utterances whose emotion/style is carried by prosody
// (rate, mean pitch, pitch range, level, spectral tilt) and, for whisper, by the
// voice, over the project's sentence set (data/sentences.txt). Output: 16 kHz
// mono FLAC (or WAV) plus a manifest (models/manifest.hpp) with speaker-disjoint
// splits. The class -> prosody mapping and the voice/split table are documented
// in docs/data.md.
//
// Torch-free. Engines run as child processes (posix_spawn, no shell); `workers`
// of them at a time. Deterministic: the plan (class, voice, sentence, prosody of
// utterance i) depends only on the seed and i, and the engines are deterministic.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "models/manifest.hpp"

namespace undertone::models {

/// Synthesis failure: missing engine/voice (with the Debian package to install),
/// an engine that failed (with its stderr), unusable options.
struct synth_error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

/// Engines known to the synthesiser, in default order.
const std::vector<std::string>& synth_engine_names();

/// One synthetic speaker: engine + voice + variant.
struct synth_voice {
  std::string engine;   ///< "espeak-ng", "flite" or "festival"
  std::string voice;    ///< the engine's voice name: "en-us", "slt", "kal_diphone", ...
  std::string variant;  ///< espeak-ng voice variant ("m3", "f2", "whisper"); empty otherwise
  /// Identity used for splitting: every voice with the same group is in the same
  /// split (espeak-ng: the variant, which sets the timbre; flite/festival: the
  /// recorded speaker, e.g. "slt" is both flite's slt and festival's slt HTS).
  std::string group;
  std::optional<gender_kind> gender;
  split_kind split = split_kind::train;
  bool whisper = false;          ///< renders the whisper style (and only it)
  bool engine_pitch = true;      ///< the engine shifts mean F0 itself (else sox `pitch` does)
  bool engine_range = true;      ///< the engine scales the F0 range (else the range is left as is)
  double base_f0_hz = 0;         ///< flite/festival-diphone neutral F0 target mean, Hz
  double base_f0_sd_hz = 0;      ///< ... and standard deviation, Hz

  /// Manifest speaker id: "espeak-ng:en-gb+m3", "flite:slt", "festival:kal_diphone".
  std::string speaker_id() const;
};

/// The built-in voice table restricted to `engines` (docs/data.md lists it):
/// espeak-ng: 7 English accents x 26 variants (+2 whisper variants);
/// flite: kal16, awb (train), rms (val), slt (test);
/// festival: kal_diphone (train), ked_diphone (val), cmu_us_slt_arctic_hts (test).
std::vector<synth_voice> default_synth_voices(const std::vector<std::string>& engines);

/// Prosody relative to the voice's neutral rendering.
struct prosody {
  double rate = 1.0;      ///< speaking-rate factor (> 1 faster)
  double pitch_st = 0.0;  ///< mean F0 shift, semitones
  double range = 1.0;     ///< F0 range (standard deviation) factor
  double gain_db = 0.0;   ///< active-speech level relative to the reference level (-26 dBFS)
  double tilt_db = 0.0;   ///< high-shelf gain above ~1 kHz, dB (vocal effort)
};

/// Class means: neutral/happy/sad/angry/whisper (others throw synth_error).
/// `strong` scales every deviation from neutral by 1.6 (log domain for rate/range).
prosody class_prosody(emotion_label e, intensity_level i);

/// One line of the sentence set.
struct sentence {
  std::string kind;  ///< "neutral" or "loaded:happy|sad|angry"
  std::string text;
};
/// Reads KIND<TAB>TEXT lines ('#' comments). Throws synth_error naming file:line.
std::vector<sentence> read_sentences(const std::string& path);
/// data/sentences.txt: $UNDERTONE_DATA_DIR/sentences.txt, else the first
/// data/sentences.txt found walking up from the executable's directory, else from
/// the working directory. Throws synth_error if none.
std::string find_sentences_file();

struct synth_options {
  std::string out_dir;             ///< created; audio goes to OUT/audio/, the manifest to OUT/manifest.jsonl
  size_t count = 100;              ///< utterances
  std::vector<std::string> engines = synth_engine_names();
  std::vector<emotion_label> classes = {emotion_label::neutral, emotion_label::happy, emotion_label::sad,
                                        emotion_label::angry};  ///< may add emotion_label::whisper
  uint64_t seed = 1;
  int workers = 2;                 ///< engine processes at a time
  std::string sentences_file;      ///< empty: find_sentences_file()
  double strong_fraction = 0.5;    ///< non-neutral utterances with intensity strong
  double neutral_text_fraction = 0.5;  ///< sentences with neutral content ...
  double congruent_fraction = 0.3;     ///< ... content matching the class; the rest: another class's content
  double val_fraction = 0.1, test_fraction = 0.1;  ///< share of utterances drawn for val/test voices
  std::string audio_format = "flac";  ///< "flac" (16-bit) or "wav" (32-bit float)
  std::string search_path;         ///< where to look for the engines; empty: $PATH
  /// Voices to use; empty: default_synth_voices(engines).
  std::vector<synth_voice> voices;
};

/// What one utterance will be (a pure function of the seed and the index).
struct synth_job {
  size_t index = 0;
  synth_voice voice;
  emotion_label emotion = emotion_label::neutral;
  intensity_level intensity = intensity_level::normal;
  sentence text;
  bool congruent = false;  ///< loaded sentence whose class matches the emotion
  prosody p;               ///< class mean + per-utterance jitter
  std::string audio_rel;   ///< "audio/u000012_sad.flac"
};

/// The plan for `opt.count` utterances over `voices` and `sentences`.
std::vector<synth_job> plan_synthesis(const synth_options& opt, const std::vector<synth_voice>& voices,
                                      const std::vector<sentence>& sentences);

/// Throws synth_error if an engine's program (or sox, needed for some voices) is
/// not installed, naming the Debian package. Returns the voices whose probe
/// synthesis works; `skipped` gets "speaker: reason" for the others.
std::vector<synth_voice> probe_voices(const synth_options& opt, std::vector<std::string>* skipped = nullptr);

/// Runs the engine(s) for one job and writes 16 kHz mono audio to `out_path`.
/// Returns the manifest row (audio = out_path, duration from the written samples).
utterance synthesize_one(const synth_job& job, const std::string& out_path, const synth_options& opt,
                         const std::string& tmp_dir);

/// Progress: (done, total), called from worker threads (serialised).
using synth_progress = std::function<void(size_t done, size_t total)>;

struct synth_report {
  std::vector<utterance> rows;       ///< in index order, also written to the manifest
  std::string manifest_path;
  std::vector<std::string> skipped_voices;
  double wall_seconds = 0;
  double audio_seconds = 0;
};

/// Probe, plan, synthesise with `opt.workers` parallel engine processes, write
/// the manifest atomically. Throws synth_error (the first failure; the others
/// are not started).
synth_report synthesize(const synth_options& opt, const synth_progress& progress = {});

// ---- acoustic measurement -------------------------------------------------------

/// Prosodic statistics of mono audio, used to check that classes differ.
struct prosody_stats {
  double duration_s = 0;
  double active_rms_db = -120;  ///< RMS over active 10 ms frames (within 35 dB of the loudest), dBFS
  double f0_median_hz = 0;      ///< YIN, voiced frames only; 0 if none
  double f0_sd_st = 0;          ///< standard deviation of F0 in semitones around the median
  double voiced_fraction = 0;   ///< voiced frames / active frames
  double hf_ratio_db = 0;       ///< energy above 1 kHz relative to below, dB (spectral tilt)
};
/// `samples`: [n] mono at `sample_rate` Hz (16 kHz expected; others work).
prosody_stats measure_prosody(const std::vector<float>& samples, int sample_rate);

}  // namespace undertone::models
