// A versioned directory of speech-encoder checkpoints (issue 7, docs/hot-swap.md),
// torch-free: the fine-tune process publishes into it, the engine serves its
// `current` version and can be told to hot-swap to another one, and
// `undertone model list|verify|publish|rollback` manage it.
//
// Layout (encoder.registry; "" = <model_home>/encoders):
//
//   <dir>/versions/<name>/projector.safetensors       projector::save format
//   <dir>/versions/<name>/encoder_layers.safetensors  optional: trained top encoder layers
//   <dir>/versions/<name>/meta.json                   written last (see below)
//   <dir>/current                                     one line: the served version's name
//   <dir>/history.jsonl                               one JSON object per publish / current change
//   <dir>/.lock                                       flock(2) held by every writer
//   <dir>/versions/.tmp-<pid>-<n>/                    a publish in progress (ignored; cleaned)
//
// Names are v0001, v0002, ... in publish order. meta.json: {"version", "parent"
// (the current version when it was published, or the caller's), "created" (UTC
// ISO 8601), "created_unix", "source", "metrics" (free JSON from the caller),
// "files": {file: {"sha256", "size"}}, "projector": {stack, d_in, d_hidden,
// d_out, dtype}} plus any other keys the caller passed.
//
// Crash safety: a publish copies the files into a temporary directory, fsyncs
// them, re-hashes and checks the copies, writes meta.json, fsyncs, and renames
// the directory into versions/ (atomic), then fsyncs versions/. `current` is
// replaced with write-temp + fsync + rename + fsync of the directory. A crash
// leaves either the old state or the new one, plus at worst a .tmp-* directory
// that list() ignores and the next writer deletes (when its process is gone).
// history.jsonl is appended (O_APPEND + fsync) after the change it records; a
// torn last line is skipped when read.
//
// Threads and processes: every writer (publish, set_current, rollback,
// clean_temp) holds an exclusive flock on <dir>/.lock, so concurrent writers in
// several processes are serialized; readers take no lock (every file they read
// is replaced atomically). An encoder_registry object holds only its path.
#pragma once

#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace undertone::models {

/// Any registry failure: a missing version, a corrupt checkpoint (names the
/// file and what is wrong), an I/O error.
class registry_error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// Shape of a projector checkpoint, from its safetensors header.
struct projector_shape {
  int64_t stack = 0, d_in = 0, d_hidden = 0, d_out = 0;
  std::string dtype;  ///< "F32", "BF16", ...
  std::string to_string() const;
};

/// Checks, without loading it into torch, that `path` is a complete projector
/// checkpoint (projector::save format): valid safetensors, metadata format
/// "undertone.projector" version 1, the three tensors with the shapes the
/// metadata implies, and finite values. Returns its shape; throws
/// registry_error naming the file.
projector_shape check_projector_file(const std::string& path);

/// One version of list().
struct version_info {
  std::string name;    ///< v0001, ...
  std::string dir;     ///< absolute version directory
  bool current = false;
  bool ok = true;      ///< meta.json readable (not a full verify())
  std::string error;   ///< why not ok
  nlohmann::json meta; ///< meta.json (null if unreadable)
};

class encoder_registry {
 public:
  /// `dir` need not exist yet (created by the first publish).
  explicit encoder_registry(std::string dir);
  const std::string& dir() const { return dir_; }

  /// Copies `projector_path` (and `encoder_layers_path` if not "") into a new
  /// version and returns its name. The copy is verified (check_projector_file,
  /// sha256 re-read) before it becomes visible; a projector whose stack, d_in
  /// or d_out differs from the current version's is refused. `meta` (a JSON
  /// object or null) may carry "source", "parent", "metrics" and any other
  /// keys (kept in meta.json). With make_current the new version also becomes
  /// `current` (history event "publish" with current = true). Throws
  /// registry_error; nothing is changed then.
  std::string publish(const std::string& projector_path, const nlohmann::json& meta, bool make_current = true,
                      const std::string& encoder_layers_path = "");

  /// The served version (the `current` file), or nullopt if none was set.
  std::optional<std::string> current() const;
  /// Version directory; throws registry_error if there is no such version.
  std::string dir_of(const std::string& version) const;
  /// The version's projector.safetensors; throws registry_error if the version
  /// does not exist.
  std::string path_of(const std::string& version) const;
  /// The version's encoder_layers.safetensors, or "" if it has none.
  std::string encoder_layers_of(const std::string& version) const;
  /// meta.json of a version; throws registry_error if missing or unreadable.
  nlohmann::json meta_of(const std::string& version) const;

  /// Full check of a version: meta.json readable, every listed file present
  /// with its size and sha256, the projector header consistent and finite.
  /// Throws registry_error naming the version, file and problem.
  void verify(const std::string& version) const;

  /// Makes `version` current after verify() (history event `event`, e.g.
  /// "swap" when a running server was switched to it). No-op if it already is.
  void set_current(const std::string& version, const std::string& event = "set_current");

  /// Makes the previous current version current again (each call goes one
  /// step further back through the history of `current`), or `to` if given.
  /// The target is verified first; throws registry_error (current unchanged)
  /// if it is corrupt or there is nothing to roll back to. Returns the new
  /// current version.
  std::string rollback(const std::string& to = "");
  /// The version rollback("") would choose, or nullopt.
  std::optional<std::string> rollback_target() const;

  /// Every version, sorted by name (temporary directories excluded).
  std::vector<version_info> list() const;
  /// history.jsonl events, oldest first (torn or invalid lines skipped).
  std::vector<nlohmann::json> history() const;

  /// Deletes .tmp-* directories whose publishing process no longer runs;
  /// returns how many. publish() calls it.
  size_t clean_temp();

 private:
  std::string dir_;
};

}  // namespace undertone::models
