// Training/evaluation data manifests (JSONL, one utterance per line) and the
// corpus loaders that produce them: RAVDESS (acted emotion) and read speech with
// transcripts (a TSV, or the CMU Sphinx `fileids` + `transcription` layout).
// Synthetic expressive speech is produced by models/speech_synth.hpp.
// Format, label vocabulary and split policy: docs/data.md.
//
// Torch-free; errors are manifest_error with "FILE:LINE: field 'x': what" messages.
#pragma once

#include <map>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace undertone::models {

/// Any manifest or corpus-loader failure; the message names the file, line and field.
struct manifest_error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

/// Emotion or speaking-style label. The first four are the evaluation classes;
/// calm..surprised are the other RAVDESS emotions (kept, excluded from 4-class
/// evaluation by default); whisper is a speaking style of the synthetic corpus;
/// unlabeled marks read speech with no emotion annotation (semantic stage only).
enum class emotion_label { neutral, happy, sad, angry, calm, fearful, disgust, surprised, whisper, unlabeled };

/// All labels in enum order.
const std::vector<emotion_label>& all_emotion_labels();
/// The 4 evaluation classes in their canonical order (class index = position).
const std::vector<emotion_label>& four_class_labels();
/// Lowercase name as written in manifests ("neutral", ..., "unlabeled").
std::string to_string(emotion_label e);
/// Inverse of to_string; throws manifest_error listing the vocabulary on an unknown name.
emotion_label parse_emotion(const std::string& name);

/// How labels outside the 4 evaluation classes are treated by to_four_class().
enum class four_class_policy {
  strict,     ///< only neutral/happy/sad/angry map; everything else is excluded (default)
  calm_as_neutral  ///< additionally calm -> neutral (RAVDESS's calm is a low-arousal neutral)
};
/// Maps a label to the 4-class set: the class, or nullopt when the utterance is
/// excluded from 4-class training/evaluation (calm, fearful, disgust, surprised,
/// whisper, unlabeled under `strict`).
std::optional<emotion_label> to_four_class(emotion_label e, four_class_policy p = four_class_policy::strict);
/// Index of a 4-class label in four_class_labels() (0..3), or -1 if it is not one.
int four_class_index(emotion_label e);

/// Emotional intensity as acted/synthesised. RAVDESS: neutral only has normal.
enum class intensity_level { normal, strong };
std::string to_string(intensity_level i);
intensity_level parse_intensity(const std::string& name);

/// Dataset split. Splits are by speaker: no speaker appears in two splits.
enum class split_kind { train, val, test };
std::string to_string(split_kind s);
split_kind parse_split(const std::string& name);

enum class gender_kind { male, female };
std::string to_string(gender_kind g);
gender_kind parse_gender(const std::string& name);

/// One manifest row (one utterance).
struct utterance {
  /// Audio file. After read_manifest(): absolute (relative paths in the file are
  /// resolved against the manifest's directory). Written relative when it lies
  /// under the manifest's directory, else absolute (see write_manifest).
  std::string audio;
  std::string transcript;  ///< what is said, plain text
  emotion_label emotion = emotion_label::neutral;
  intensity_level intensity = intensity_level::normal;
  std::string speaker;  ///< corpus-unique speaker id, e.g. "ravdess-07", "espeak-ng:en-us+m3"
  std::string corpus;   ///< e.g. "ravdess", "synth", "sphinx-librivox"
  split_kind split = split_kind::train;
  std::optional<gender_kind> gender;
  std::optional<double> duration_s;  ///< seconds, when known
  /// Free-form provenance: RAVDESS file-name fields, synthesis engine/voice/prosody
  /// parameters, ... (a JSON object; null when absent).
  nlohmann::json source;
  /// Unknown keys found when reading, kept so that rewriting a newer manifest loses nothing.
  nlohmann::json extra;

  bool operator==(const utterance& o) const;
};

/// Parses one JSONL line into an utterance. `where` ("FILE:LINE") prefixes error
/// messages; relative audio paths are resolved against `base_dir` (unless empty).
/// Required keys: audio, transcript, emotion, speaker, corpus, split; optional:
/// intensity (default normal), gender, duration_s, source.
utterance parse_manifest_line(const std::string& line, const std::string& where, const std::string& base_dir);

/// One utterance as a JSON object; `audio` written relative to `base_dir` when under it.
nlohmann::json to_json(const utterance& u, const std::string& base_dir = "");

/// Reads a JSONL manifest. Blank lines and lines starting with '#' are skipped.
/// Errors name the file, the 1-based line and the field.
std::vector<utterance> read_manifest(const std::string& path);

/// Writes atomically (temp file in the same directory + fsync + rename): a reader
/// never sees a half-written manifest. Creates the parent directory if needed.
void write_manifest(const std::string& path, const std::vector<utterance>& rows);

/// Counts used by `undertone data stats` and the tests.
struct manifest_summary {
  size_t rows = 0;
  double total_seconds = 0;  ///< sum of known durations
  std::map<std::string, size_t> by_emotion, by_split, by_speaker, by_corpus;
  std::map<std::string, std::map<std::string, size_t>> emotion_by_split;  ///< [split][emotion]
};
manifest_summary summarize(const std::vector<utterance>& rows);

/// Throws manifest_error naming the first speaker found in two splits.
void check_speaker_disjoint(const std::vector<utterance>& rows);

/// Length of an audio file from its header (libsndfile), seconds. Throws manifest_error.
double audio_duration_seconds(const std::string& path);

// ---- corpus loaders ----------------------------------------------------------

/// RAVDESS speech ("03-01-EE-II-SS-RR-AA.flac|wav", see the corpus README).
struct ravdess_options {
  std::vector<int> val_actors = {15, 16};  ///< held-out speakers -> split val
  std::vector<int> test_actors = {};        ///< held-out speakers -> split test
  bool with_duration = true;                ///< read each file's header for duration_s
};
/// Scans `root` (non-recursive) for RAVDESS speech files, sorted by file name.
/// Rows: transcript from the statement, emotion/intensity from the fields,
/// speaker "ravdess-AA", gender (odd actor male, even female), corpus "ravdess",
/// split by actor. Files that do not match the naming scheme are an error naming
/// the file (other extensions and README files are ignored); audio-visual or song
/// files (modality != 03 or channel != 01) are errors too.
std::vector<utterance> load_ravdess(const std::string& root, const ravdess_options& opt = {});

/// Read speech with transcripts (emotion "unlabeled"). Layouts, auto-detected:
///  - tsv:    DIR/transcripts.tsv, lines `AUDIO<TAB>TRANSCRIPT[<TAB>SPEAKER]`, AUDIO
///            relative to DIR; '#' comments; speaker defaults to `default_speaker`.
///  - sphinx: any number of `X.fileids` + `X.transcription` pairs (CMU Sphinx test
///            layout, e.g. Debian's pocketsphinx-testdata), in DIR or its direct
///            subfolders; each fileids line is an audio path without extension
///            (tried .wav, .flac, .raw is not supported), each transcription line
///            `<s> words </s> (ID)`; speaker = "sphinx-" + folder name unless given.
struct read_speech_options {
  std::string corpus;                    ///< default "read-speech" (tsv) / "sphinx-FOLDER"
  std::string default_speaker;           ///< speaker when the layout has none
  std::vector<std::string> val_speakers;   ///< -> split val (everything else train)
  std::vector<std::string> test_speakers;  ///< -> split test
  bool with_duration = true;
};
std::vector<utterance> load_read_speech(const std::string& dir, const read_speech_options& opt = {});

}  // namespace undertone::models
