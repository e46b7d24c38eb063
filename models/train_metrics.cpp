#include "models/train_metrics.hpp"

#include <sys/wait.h>
#include <unistd.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <stdexcept>

namespace undertone::models {

namespace fs = std::filesystem;

metrics_log::metrics_log(const std::string& path, int64_t keep_until_step) : path_(path) {
  fs::path p(path);
  if (p.has_parent_path()) fs::create_directories(p.parent_path());
  if (keep_until_step >= 0 && fs::exists(p)) {
    std::ifstream in(path);
    std::string tmp = path + ".tmp";
    {
      std::ofstream out(tmp, std::ios::trunc);
      std::string line;
      while (std::getline(in, line)) {
        if (line.empty()) continue;
        auto j = nlohmann::json::parse(line, nullptr, false);
        if (j.is_discarded() || !j.is_object()) continue;  // torn line from a crash
        if (j.value("step", int64_t(0)) > keep_until_step) continue;
        out << line << "\n";
      }
      if (!out) throw std::runtime_error("metrics log " + tmp + ": write failed (disk full?)");
    }
    fs::rename(tmp, p);
  }
  f_ = std::fopen(path.c_str(), "a");
  if (!f_) throw std::runtime_error("metrics log " + path + ": cannot open for appending");
}

metrics_log::~metrics_log() {
  if (f_) std::fclose(f_);
}

void metrics_log::write(const nlohmann::json& row) {
  std::string s = row.dump() + "\n";
  if (std::fwrite(s.data(), 1, s.size(), f_) != s.size() || std::fflush(f_) != 0)
    throw std::runtime_error("metrics log " + path_ + ": write failed (disk full?)");
}

std::vector<nlohmann::json> read_metrics(const std::string& path) {
  std::vector<nlohmann::json> rows;
  std::ifstream in(path);
  std::string line;
  while (std::getline(in, line)) {
    if (line.empty()) continue;
    auto j = nlohmann::json::parse(line, nullptr, false);
    if (!j.is_discarded() && j.is_object()) rows.push_back(std::move(j));
  }
  return rows;
}

std::string format_duration(double s) {
  if (!(s >= 0) || s > 1e8) return "--";
  long t = long(s + 0.5);
  char buf[48];
  if (t >= 3600)
    std::snprintf(buf, sizeof buf, "%ldh%02ldm%02lds", t / 3600, (t / 60) % 60, t % 60);
  else if (t >= 60)
    std::snprintf(buf, sizeof buf, "%ldm%02lds", t / 60, t % 60);
  else
    std::snprintf(buf, sizeof buf, "%lds", t);
  return buf;
}

progress_bar::progress_bar(std::string what, int tty, double line_every_s)
    : what_(std::move(what)),
      tty_(tty < 0 ? ::isatty(STDOUT_FILENO) == 1 : tty == 1),
      every_(line_every_s),
      t0_(std::chrono::steady_clock::now()) {}

void progress_bar::update(int64_t done, int64_t total, int64_t first, const std::string& info) {
  const double el = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0_).count();
  const int64_t run_done = done - first;
  const double per = run_done > 0 ? el / double(run_done) : -1;
  const double eta = per > 0 ? per * double(total - done) : -1;
  const bool end = done >= total;
  const double pct = total > 0 ? 100.0 * double(done) / double(total) : 100.0;
  if (tty_) {
    if (el - last_ < 0.1 && !end) return;
    last_ = el;
    const int width = 24;
    int fill = total > 0 ? int(width * done / total) : width;
    std::string bar(size_t(std::max(0, std::min(width, fill))), '#');
    bar.resize(width, '.');
    std::printf("\r%s [%s] %lld/%lld %3.0f%% %s %.2f s/step ETA %s  ", what_.c_str(), bar.c_str(), (long long)done,
                (long long)total, pct, info.c_str(), per > 0 ? per : 0.0, format_duration(eta).c_str());
    open_ = true;
    if (end) finish();
    std::fflush(stdout);
  } else {
    if (!end && el - last_ < every_) return;
    last_ = el;
    std::printf("%s %lld/%lld (%.1f%%) %s %.2f s/step elapsed %s ETA %s\n", what_.c_str(), (long long)done,
                (long long)total, pct, info.c_str(), per > 0 ? per : 0.0, format_duration(el).c_str(),
                format_duration(eta).c_str());
    std::fflush(stdout);
  }
}

void progress_bar::finish() {
  if (tty_ && open_) {
    std::printf("\n");
    std::fflush(stdout);
  }
  open_ = false;
}

std::string find_in_path(const std::string& program) {
  const char* path = std::getenv("PATH");
  std::stringstream ss(path ? path : "/usr/local/bin:/usr/bin:/bin");
  std::string dir;
  while (std::getline(ss, dir, ':')) {
    if (dir.empty()) continue;
    fs::path p = fs::path(dir) / program;
    if (::access(p.c_str(), X_OK) == 0 && fs::is_regular_file(p)) return p.string();
  }
  return "";
}

std::string gnuplot_quote(const std::string& s) {
  std::string r = "'";
  for (char c : s) r += c == '\'' ? std::string("''") : std::string(1, c);
  return r + "'";
}

std::string run_gnuplot(const std::string& script, const std::string& png) {
  const std::string gnuplot = find_in_path("gnuplot");
  if (gnuplot.empty()) return "gnuplot not found (install Debian's gnuplot-nox); the script is " + script;
  auto run = [&] {
    std::string cmd = "'" + gnuplot + "' '" + script + "' 2>&1";
    std::FILE* p = ::popen(cmd.c_str(), "r");
    if (!p) return std::string("cannot run gnuplot");
    std::string out;
    char buf[512];
    while (size_t n = std::fread(buf, 1, sizeof buf, p)) out.append(buf, n);
    int st = ::pclose(p);
    if (st != 0) return "gnuplot failed: " + out;
    return std::string();
  };
  std::string err = run();
  if (!err.empty()) {
    // Builds without cairo: the libgd terminal.
    std::ifstream in(script);
    std::stringstream ss;
    ss << in.rdbuf();
    std::string s = ss.str();
    const std::string cairo = "set terminal pngcairo ";
    auto at = s.find(cairo);
    if (at != std::string::npos) {
      s.replace(at, cairo.size(), "set terminal png ");
      std::ofstream(script, std::ios::trunc) << s;
      err = run();
    }
  }
  if (err.empty() && !fs::exists(png)) err = "gnuplot ran but wrote no " + png;
  return err;
}

std::string plot_loss_curves(const std::string& metrics_path, const std::string& png_path, const std::string& title) {
  auto rows = read_metrics(metrics_path);
  fs::path png(png_path);
  fs::path stem = png;
  stem.replace_extension("");
  const std::string tsv = stem.string() + ".tsv", gp = stem.string() + ".gp";
  if (png.has_parent_path()) fs::create_directories(png.parent_path());
  size_t n_train = 0, n_val = 0;
  {
    std::ofstream t(tsv, std::ios::trunc);
    t << "# kind step loss ema\n";
    double ema = NAN;
    for (const auto& r : rows) {
      if (r.value("kind", "") != "train" || !r.contains("loss")) continue;
      double l = r["loss"].get<double>();
      ema = std::isnan(ema) ? l : 0.9 * ema + 0.1 * l;
      t << "train " << r.value("step", int64_t(0)) << " " << l << " " << ema << "\n";
      ++n_train;
    }
    t << "\n\n";  // gnuplot data block separator: index 0 = train, index 1 = val
    for (const auto& r : rows) {
      if (r.value("kind", "") != "val" || !r.contains("val_loss")) continue;
      t << "val " << r.value("step", int64_t(0)) << " " << r["val_loss"].get<double>() << " 0\n";
      ++n_val;
    }
    if (!n_val) t << "val 0 NaN 0\n";  // keep index 1 present
  }
  if (n_train + n_val == 0) return "no train/val rows in " + metrics_path;
  {
    std::ofstream g(gp, std::ios::trunc);
    g << "# Redraw with: gnuplot " << gp << "\n"
      << "set terminal pngcairo size 960,540 noenhanced\n"
      << "set output " << gnuplot_quote(png.string()) << "\n"
      << "set title " << gnuplot_quote(title) << "\n"
      << "set xlabel 'step'\nset ylabel 'loss (nats/token)'\nset grid\nset key top right\n"
      << "plot " << gnuplot_quote(tsv) << " index 0 using 2:3 with lines lc rgb '#a0c0e0' title 'train',"
      << " '' index 0 using 2:4 with lines lw 2 lc rgb '#1f5fa0' title 'train (EMA 0.9)'";
    if (n_val) g << ", '' index 1 using 2:3 with linespoints lw 2 pt 7 lc rgb '#d04020' title 'validation'";
    g << "\n";
  }
  if (find_in_path("gnuplot").empty())
    return "gnuplot not found (install Debian's gnuplot-nox); data and script are in " + tsv + " and " + gp;
  return run_gnuplot(gp, png.string());
}

}  // namespace undertone::models
