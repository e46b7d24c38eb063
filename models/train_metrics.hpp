// Training bookkeeping, torch-free: a JSONL metrics log, a progress bar (TTY)
// or periodic lines (logs, CI), and PNG loss curves drawn by gnuplot.
//
// Metrics file: one JSON object per line, each with at least "step" (int) and
// "kind" ("train" | "val"); train rows carry "loss", "ce", "kl", "lr",
// "grad_norm", "tokens", "step_s"; val rows "val_loss" (and "val_ce", "val_kl").
// Used by models/nn/alignment.cpp (undertone train) and readable by any tool.
#pragma once

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace undertone::models {

/// Append-only JSONL log; every write is flushed (a crash loses at most the
/// line being written; read_metrics() skips a torn last line).
class metrics_log {
 public:
  /// Opens `path` for appending, creating its directory. When `keep_until_step`
  /// >= 0 (resume), rows with "step" > keep_until_step are dropped first (they
  /// belong to steps that will be redone), atomically (temp file + rename).
  explicit metrics_log(const std::string& path, int64_t keep_until_step = -1);
  ~metrics_log();
  metrics_log(const metrics_log&) = delete;
  metrics_log& operator=(const metrics_log&) = delete;
  /// Appends one row (a JSON object) and flushes. Throws std::runtime_error on I/O failure.
  void write(const nlohmann::json& row);
  const std::string& path() const { return path_; }

 private:
  std::string path_;
  std::FILE* f_ = nullptr;
};

/// All well-formed rows of a metrics file (an unparsable line is skipped).
/// Missing file: empty.
std::vector<nlohmann::json> read_metrics(const std::string& path);

/// "1h02m03s", "4m05s", "7s"; "--" for negative or absurd values.
std::string format_duration(double seconds);

/// Step progress: on a TTY a one-line bar redrawn at most 10x/s
/// ("train [####....] 120/1000 12% loss 2.31 val 2.45 0.8 s/step ETA 11m43s");
/// otherwise one plain line every `line_every_s` seconds (and at the end).
class progress_bar {
 public:
  /// `tty`: -1 = detect (isatty(stdout)), 0 = plain lines, 1 = bar.
  explicit progress_bar(std::string what, int tty = -1, double line_every_s = 30.0);
  /// `done` of `total` units finished; `first` is where this run started (for
  /// the rate, so a resumed run's ETA counts only its own steps); `info` is
  /// printed after the counts (e.g. "loss 2.31").
  void update(int64_t done, int64_t total, int64_t first, const std::string& info);
  /// Ends the bar's line (TTY).
  void finish();

 private:
  std::string what_;
  bool tty_;
  double every_;
  std::chrono::steady_clock::time_point t0_;
  double last_ = -1e9;
  bool open_ = false;
};

/// Full path of an executable found in $PATH, or "" if none.
std::string find_in_path(const std::string& program);

/// gnuplot string literal: single quotes, a quote doubled.
std::string gnuplot_quote(const std::string& s);

/// Runs gnuplot on the script file `script`, which writes `png`; a script whose
/// terminal is "set terminal pngcairo ..." is retried with the libgd "png"
/// terminal when cairo is missing. Returns "" on success, else why not
/// (gnuplot missing: install Debian's gnuplot-nox; gnuplot failed; no PNG).
std::string run_gnuplot(const std::string& script, const std::string& png);

/// Draws train loss (raw and an exponential moving average) and validation
/// loss against the step from a metrics file into `png_path` (gnuplot
/// pngcairo, else png). Also writes `png_path` minus ".png" + ".gp" (the
/// script) and ".tsv" (the data), so the plot can be redrawn or adapted by
/// hand. Returns "" on success, else why not (gnuplot missing: install Debian's
/// gnuplot-nox; no rows; gnuplot failed).
std::string plot_loss_curves(const std::string& metrics_path, const std::string& png_path,
                             const std::string& title = "alignment training");

}  // namespace undertone::models
