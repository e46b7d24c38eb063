// The session store (issue 7): every logged turn's audio, text, timings, events
// and model versions, with an SQLite index and a history of labels.
//
// On-disk layout (docs/store.md):
//   STORE/index.sqlite                       schema_version, sessions, turns, annotations
//   STORE/audio/<run>/session-<id>/turn-<n>.flac   the user's audio of the turn, 16 kHz mono
//   STORE/writer.lock                        flock held by the store object that may recover
//
// Durability: append() writes the FLAC to a temporary name, fsyncs it, renames it
// into place and fsyncs the directory BEFORE the row is committed (WAL,
// synchronous=FULL), so a committed row never names missing audio. A crash
// between the two leaves an audio file without a row: the next open removes it
// (open_report().orphans_removed). prune() deletes rows first, then files.
//
// Torch-free, CAF-free. One session_store object is used by one thread at a time;
// several objects (or processes) may open the same store (SQLite locking; a
// busy store is waited for up to 5 s).
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace undertone::models {

/// Any store failure; the message names the file and what to do.
struct store_error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

/// One stored turn.
struct stored_turn {
  int64_t id = 0;                 ///< store-wide turn id (stable; `undertone annotate --id`)
  std::string run;                ///< one per server start ("run-<unix>-<pid>"): session ids restart with it
  uint64_t session = 0;           ///< the engine's session id within the run
  std::string client;             ///< the client's hello name
  int64_t turn = 0;               ///< 1-based turn number within the session
  double started_unix_s = 0;
  std::string audio;              ///< absolute path, "" for text turns
  int64_t audio_samples = 0;      ///< 16 kHz samples in the FLAC
  std::string user_text, answer, stop_reason, llm_version, encoder_version;
  std::string transcript, emotion;  ///< latest annotation (each the newest non-empty one), "" if none
  nlohmann::json timings;         ///< turn_timings as an object (docs/store.md)
  std::vector<std::string> events;  ///< "t_ms name label value" lines
};

/// One entry of a turn's label history.
struct stored_annotation {
  int64_t id = 0;
  std::string transcript, emotion;  ///< "" = not given in this entry
  std::string source;               ///< "client" (protocol) or "cli" (`undertone annotate`)
  double unix_s = 0;
};

/// One stored session with its counts.
struct stored_session {
  std::string run;
  uint64_t session = 0;
  std::string client;
  double first_unix_s = 0, last_unix_s = 0;  ///< first / last turn start
  int64_t turns = 0, audio_turns = 0, annotated_turns = 0;
  int64_t audio_bytes = 0;
};

/// What turns() returns.
struct turn_filter {
  std::string run;                ///< "" = any run
  int64_t session = -1;           ///< -1 = any session (of `run`, or of any run)
  bool annotated_only = false;    ///< only turns with at least one annotation
  bool with_audio_only = false;   ///< only speech turns (with a FLAC)
  double since_unix_s = 0;        ///< only turns started at or after this time
  int64_t limit = 0;              ///< 0 = all; else the first `limit` in store order
};

struct store_options {
  bool create = true;             ///< false: a missing index is a store_error (CLI on a wrong --store)
  bool recover = true;            ///< remove audio files without a row at open (only if the writer lock is free)
  double retention_days = 0;      ///< prune(): sessions whose last turn is older are deleted; 0 = keep
  int64_t max_bytes = 0;          ///< prune(): oldest sessions deleted until audio + index fit; 0 = unlimited
};

/// What open found and did.
struct open_report {
  size_t orphans_removed = 0;     ///< audio files with no row (crash between FLAC and commit)
  bool recovered = false;         ///< false: another store object holds the writer lock; no recovery ran
};

struct prune_result {
  size_t sessions = 0, turns = 0;
  int64_t bytes = 0;              ///< audio bytes freed
};

struct export_options {
  std::string run;                ///< "" = all runs
  int64_t session = -1;           ///< -1 = all sessions
  double val_fraction = 0;        ///< share of speakers put in split val by speaker hash; 0 = all train
  std::string corpus = "sessions";
  bool require_transcript = true; ///< skip turns annotated with an emotion only
};

struct export_result {
  size_t written = 0;
  size_t skipped_label = 0;       ///< emotion not in the manifest vocabulary (parse_emotion)
  size_t skipped_no_transcript = 0;
  std::map<std::string, size_t> unknown_labels;  ///< label -> count
};

/// The speaker name export_manifest gives a turn: "session:<client>", or
/// "session:<run>/<session>" when the client sent no name.
std::string export_speaker(const stored_turn& t);
/// The split export_manifest gives a speaker: val when
/// (fnv1a64(speaker) % 10000) / 10000.0 < val_fraction, else train.
std::string export_split(const std::string& speaker, double val_fraction);

class session_store {
 public:
  /// Opens (or, with opt.create, creates) the store in `dir`. Throws store_error
  /// naming the index file if it is not a readable SQLite database, was written by
  /// a newer undertone, or is missing with create = false.
  explicit session_store(const std::string& dir, store_options opt = {});
  ~session_store();
  session_store(const session_store&) = delete;
  session_store& operator=(const session_store&) = delete;

  /// Stores one turn: `audio_16k` (mono, 16 kHz; empty for text turns) as FLAC,
  /// then the row, durably (see the file comment). t.run, t.session, t.turn
  /// address it (unique); t.id and t.audio are ignored; a non-empty t.transcript
  /// or t.emotion is stored as a first annotation with source "client".
  /// Returns the turn id. Throws store_error (duplicate turn, disk full, ...).
  int64_t append(const stored_turn& t, const std::vector<float>& audio_16k);

  /// Turns matching `f`, ordered by session (first stored first), then turn number.
  std::vector<stored_turn> turns(const turn_filter& f = {}) const;
  /// One turn by id, or nullopt.
  std::optional<stored_turn> turn_by_id(int64_t id) const;
  /// The id of turn `turn` of `run`/`session`, or nullopt.
  std::optional<int64_t> find_turn(const std::string& run, uint64_t session, int64_t turn) const;
  /// All sessions, oldest first.
  std::vector<stored_session> sessions() const;
  /// Runs, oldest first.
  std::vector<std::string> runs() const;
  /// A turn's label history, oldest first.
  std::vector<stored_annotation> annotations(int64_t turn_id) const;

  /// Adds a label entry to a stored turn. `source`: "client" or "cli". Throws
  /// store_error naming the turn if it is not stored, or on a bad source.
  void annotate(const std::string& run, uint64_t session, int64_t turn, const std::string& transcript,
                const std::string& emotion, const std::string& source);
  void annotate(int64_t turn_id, const std::string& transcript, const std::string& emotion, const std::string& source);

  /// Applies the retention limits of store_options, oldest sessions first.
  prune_result prune();

  /// Writes annotated audio turns as a manifest (models/manifest.hpp) at `path`;
  /// returns the number of utterances written.
  size_t export_manifest(const std::string& path, const export_options& o) const;
  /// Same, with the skip counts.
  export_result export_manifest_detailed(const std::string& path, const export_options& o) const;

  /// SQLite's PRAGMA integrity_check result ("ok" when healthy).
  std::string integrity_check() const;
  /// Bytes of audio referenced by rows plus the index files.
  int64_t size_bytes() const;

  const std::string& dir() const;
  /// STORE/index.sqlite
  std::string index_path() const;
  const open_report& opened() const;

 private:
  struct impl;
  std::unique_ptr<impl> p_;
};

}  // namespace undertone::models
