#include "models/evaluation.hpp"

#include <algorithm>
#include <cctype>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <stdexcept>

#include "models/train_metrics.hpp"

namespace undertone::models {

namespace fs = std::filesystem;
using nlohmann::json;

// ---------------------------------------------------------------- label mapping

const std::vector<class_keywords>& answer_keywords() {
  // "upset", "emotional", "stressed" are left out on purpose: they fit sad and angry alike; "down" and
  // "content" too: "calm down", "the content of".
  static const std::vector<class_keywords> k = {
      {emotion_label::neutral,
       {"neutral", "neutrally", "calm", "calmly", "composed", "indifferent", "unemotional", "emotionless",
        "impassive", "detached", "matter of fact", "matter-of-fact", "flat", "monotone", "relaxed", "even-toned",
        "no particular emotion", "no strong emotion"}},
      {emotion_label::happy,
       {"happy", "happily", "happiness", "joy", "joyful", "joyous", "glad", "delighted", "cheerful", "excited",
        "excitement", "thrilled", "elated", "ecstatic", "overjoyed", "pleased", "enthusiastic", "upbeat", "amused",
        "grateful", "hopeful", "optimistic"}},
      {emotion_label::sad,
       {"sad", "sadly", "sadness", "unhappy", "sorrow", "sorrowful", "grief", "grieving", "heartbroken",
        "depressed", "melancholy", "melancholic", "miserable", "gloomy", "feeling down", "disappointed", "lonely",
        "devastated", "hurt", "crying", "tearful", "hopeless", "mournful", "despair"}},
      {emotion_label::angry,
       {"angry", "angrily", "anger", "furious", "mad", "irritated", "annoyed", "frustrated", "frustration",
        "outraged", "rage", "enraged", "livid", "irate", "hostile", "resentful", "fed up", "infuriated",
        "exasperated", "indignant"}},
  };
  return k;
}

std::vector<std::string> word_tokens(const std::string& text_in) {
  std::string text = text_in;
  for (size_t at; (at = text.find("\xE2\x80\x99")) != std::string::npos;) text.replace(at, 3, "'");
  std::vector<std::string> out;
  std::string cur;
  for (char ch : text) {
    const unsigned char c = static_cast<unsigned char>(ch);
    if (std::isalnum(c) || c == '\'' || c >= 0x80) {
      cur += char(std::tolower(c));
    } else if (!cur.empty()) {
      out.push_back(std::move(cur));
      cur.clear();
    }
  }
  if (!cur.empty()) out.push_back(std::move(cur));
  // Leading/trailing apostrophes are quotes, not part of the word.
  for (auto& w : out) {
    while (!w.empty() && w.front() == '\'') w.erase(w.begin());
    while (!w.empty() && w.back() == '\'') w.pop_back();
  }
  out.erase(std::remove(out.begin(), out.end(), std::string()), out.end());
  return out;
}

namespace {
bool is_negation(const std::string& w) {
  static const char* neg[] = {"not", "no", "never", "nor", "without", "neither", "hardly"};
  for (const char* n : neg)
    if (w == n) return true;
  return w.size() > 3 && w.compare(w.size() - 3, 3, "n't") == 0;
}
}  // namespace

int answer_to_class(const std::string& answer) {
  const auto words = word_tokens(answer);
  int found = -1;
  const auto& kw = answer_keywords();
  for (size_t c = 0; c < kw.size(); ++c) {
    bool hit = false;
    for (const auto& k : kw[c].words) {
      const auto phrase = word_tokens(k);
      if (phrase.empty() || phrase.size() > words.size()) continue;
      for (size_t i = 0; i + phrase.size() <= words.size() && !hit; ++i) {
        if (!std::equal(phrase.begin(), phrase.end(), words.begin() + long(i))) continue;
        bool negated = false;
        for (size_t j = i >= 3 ? i - 3 : 0; j < i; ++j) negated = negated || is_negation(words[j]);
        // "I'm happy to help", "glad to share": willingness, not the speaker's emotion.
        const size_t after = i + phrase.size();
        const bool willing = phrase.size() == 1 && after < words.size() && words[after] == "to" &&
                             (phrase[0] == "happy" || phrase[0] == "glad" || phrase[0] == "pleased");
        hit = !negated && !willing;
      }
      if (hit) break;
    }
    if (!hit) continue;
    if (found >= 0) return -1;  // two classes named: ambiguous
    found = int(c);
  }
  return found;
}

double rouge_l_f1(const std::vector<std::string>& cand, const std::vector<std::string>& ref) {
  if (cand.empty() && ref.empty()) return 1.0;
  if (cand.empty() || ref.empty()) return 0.0;
  std::vector<size_t> prev(ref.size() + 1, 0), cur(ref.size() + 1, 0);
  for (size_t i = 1; i <= cand.size(); ++i) {
    for (size_t j = 1; j <= ref.size(); ++j)
      cur[j] = cand[i - 1] == ref[j - 1] ? prev[j - 1] + 1 : std::max(prev[j], cur[j - 1]);
    std::swap(prev, cur);
  }
  const double l = double(prev[ref.size()]);
  if (l == 0) return 0.0;
  const double p = l / double(cand.size()), r = l / double(ref.size());
  return 2 * p * r / (p + r);
}

// ---------------------------------------------------------------- class_metric

void class_metric::add(int truth, int pred) {
  if (truth < 0 || truth > 3) throw std::invalid_argument("class_metric::add: true class must be 0..3");
  if (pred < -1 || pred > 3) throw std::invalid_argument("class_metric::add: prediction must be -1..3");
  available = true;
  ++confusion[size_t(truth)][size_t(pred < 0 ? 4 : pred)];
}

int64_t class_metric::n() const {
  int64_t s = 0;
  for (const auto& r : confusion)
    for (auto v : r) s += v;
  return s;
}
int64_t class_metric::correct() const {
  int64_t s = 0;
  for (size_t c = 0; c < 4; ++c) s += confusion[c][c];
  return s;
}
int64_t class_metric::unknown() const {
  int64_t s = 0;
  for (const auto& r : confusion) s += r[4];
  return s;
}
double class_metric::accuracy() const {
  if (!std::isnan(expected)) return expected;
  const int64_t t = n();
  return t ? double(correct()) / double(t) : NAN;
}
double class_metric::recall(int c) const {
  if (!std::isnan(expected)) return expected;
  int64_t t = 0;
  for (auto v : confusion[size_t(c)]) t += v;
  return t ? double(confusion[size_t(c)][size_t(c)]) / double(t) : NAN;
}
double class_metric::unknown_rate() const {
  const int64_t t = n();
  return t ? double(unknown()) / double(t) : NAN;
}

namespace {
json num(double v) { return std::isnan(v) ? json(nullptr) : json(v); }
}  // namespace

json class_metric::to_json() const {
  if (!available) return nullptr;
  json per = json::object();
  const auto& labels = four_class_labels();
  for (int c = 0; c < 4; ++c) per[to_string(labels[size_t(c)])] = num(recall(c));
  json j = {{"accuracy", num(accuracy())}, {"per_class_recall", per}};
  if (std::isnan(expected)) {
    j["n"] = n();
    j["correct"] = correct();
    j["unknown"] = unknown();
    j["unknown_rate"] = num(unknown_rate());
    j["confusion"] = confusion;
    j["confusion_axes"] = "rows: true neutral,happy,sad,angry; columns: predicted neutral,happy,sad,angry,unknown";
  } else {
    j["analytic"] = true;
  }
  return j;
}

// ---------------------------------------------------------------- writers

namespace {

std::string pct(double v) {
  if (std::isnan(v)) return "-";
  char b[32];
  std::snprintf(b, sizeof b, "%.1f", 100.0 * v);
  return b;
}
std::string fix3(double v) {
  if (std::isnan(v)) return "-";
  char b[32];
  std::snprintf(b, sizeof b, "%.3f", v);
  return b;
}

std::string metric_cell(const class_metric& m) {
  if (!m.available) return "-";
  if (!std::isnan(m.expected)) return pct(m.expected);
  return pct(m.accuracy()) + " (" + std::to_string(m.correct()) + "/" + std::to_string(m.n()) + ")";
}

}  // namespace

std::string eval_markdown(const eval_report& r) {
  std::ostringstream o;
  const auto& labels = four_class_labels();
  o << "# undertone eval\n\n";
  if (r.setup.contains("split"))
    o << "Split `" << r.setup["split"].get<std::string>() << "`: ";
  int64_t total = 0;
  for (auto c : r.class_counts) total += c;
  o << total << " utterances (";
  for (size_t c = 0; c < 4; ++c) o << (c ? ", " : "") << to_string(labels[c]) << " " << r.class_counts[c];
  o << "); probe trained on " << r.probe_train << " utterances of other speakers. ";
  if (r.setup.contains("calm_as_neutral"))
    o << "Calm " << (r.setup["calm_as_neutral"].get<bool>() ? "folded into neutral" : "excluded") << ". ";
  o << "Accuracies in %, (correct/n). Metrics: docs/evaluation.md.\n\n";
  o << "| system | probe acc | LLM-answer acc | answer unknown | ranking acc | ROUGE-L F1 | hidden cos |\n"
    << "|---|---|---|---|---|---|---|\n";
  for (const auto& s : r.systems) {
    o << "| " << s.name << " | " << metric_cell(s.probe) << " | " << metric_cell(s.answer) << " | "
      << (s.answer.available && std::isnan(s.answer.expected) ? pct(s.answer.unknown_rate()) : "-") << " | "
      << metric_cell(s.ranking) << " | " << (s.fidelity_reference ? "1 (ref)" : fix3(s.rouge_l)) << " | "
      << (s.fidelity_reference ? "1 (ref)" : fix3(s.hidden_cosine)) << " |\n";
  }
  o << "\nSystems:\n\n";
  for (const auto& s : r.systems) o << "- **" << s.name << "**: " << s.description << "\n";
  const std::pair<const char*, class_metric system_result::*> metrics[] = {
      {"probe", &system_result::probe},
      {"LLM answer", &system_result::answer},
      {"ranking", &system_result::ranking}};
  for (const auto& [title, mem] : metrics) {
    o << "\n## Per-class recall: " << title << "\n\n| system |";
    for (size_t c = 0; c < 4; ++c) o << " " << to_string(labels[c]) << " (n=" << r.class_counts[c] << ") |";
    o << "\n|---|---|---|---|---|\n";
    for (const auto& s : r.systems) {
      const class_metric& m = s.*mem;
      if (!m.available) continue;
      o << "| " << s.name << " |";
      for (int c = 0; c < 4; ++c) o << " " << pct(m.recall(c)) << " |";
      o << "\n";
    }
  }
  char secs[64];
  std::snprintf(secs, sizeof secs, "%.0f", r.seconds);
  o << "\nWall time: " << secs << " s (";
  for (size_t i = 0; i < r.systems.size(); ++i) {
    char b[64];
    std::snprintf(b, sizeof b, "%s%s %.0f s", i ? ", " : "", r.systems[i].name.c_str(), r.systems[i].seconds);
    o << b;
  }
  o << "; the rest: loading, features, teacher answers, probes).\n";
  return o.str();
}

json eval_json(const eval_report& r) {
  json sys = json::array();
  for (const auto& s : r.systems) {
    sys.push_back({{"name", s.name},
                   {"description", s.description},
                   {"probe", s.probe.to_json()},
                   {"answer", s.answer.to_json()},
                   {"ranking", s.ranking.to_json()},
                   {"fidelity",
                    s.fidelity_reference ? json{{"reference", true}}
                                         : json{{"rouge_l_f1", num(s.rouge_l)}, {"hidden_cosine", num(s.hidden_cosine)}}},
                   {"seconds", s.seconds},
                   {"utterances", s.utterances}});
  }
  json counts = json::object();
  for (size_t c = 0; c < 4; ++c) counts[to_string(four_class_labels()[c])] = r.class_counts[c];
  return {{"format", "undertone.eval"},   {"version", 1},        {"setup", r.setup}, {"class_counts", counts},
          {"probe_train", r.probe_train}, {"seconds", r.seconds}, {"systems", sys}};
}

std::string plot_confusion(const class_metric& m, const std::string& png_path, const std::string& title) {
  if (!m.available || !std::isnan(m.expected)) return "no counts to plot";
  fs::path png(png_path), stem = png;
  stem.replace_extension("");
  const std::string tsv = stem.string() + ".tsv", gp = stem.string() + ".gp";
  if (png.has_parent_path()) fs::create_directories(png.parent_path());
  const int cols = m.unknown() > 0 ? 5 : 4;
  {
    std::ofstream t(tsv, std::ios::trunc);
    t << "# predicted true share_of_true_row count\n";
    for (int y = 0; y < 4; ++y) {
      int64_t row = 0;
      for (auto v : m.confusion[size_t(y)]) row += v;
      for (int x = 0; x < cols; ++x) {
        const int64_t v = m.confusion[size_t(y)][size_t(x)];
        t << x << " " << y << " " << (row ? double(v) / double(row) : 0.0) << " " << v << "\n";
      }
    }
  }
  {
    const auto& labels = four_class_labels();
    std::ofstream g(gp, std::ios::trunc);
    g << "# Redraw with: gnuplot " << gp << "\n"
      << "set terminal pngcairo size 640,560 noenhanced\n"
      << "set output " << gnuplot_quote(png.string()) << "\n"
      << "set title " << gnuplot_quote(title) << "\n"
      << "set xlabel 'predicted'\nset ylabel 'true'\nset cblabel 'share of the true class'\n"
      << "set cbrange [0:1]\nset palette defined (0 '#ffffff', 1 '#1f5fa0')\n"
      << "set xrange [-0.5:" << cols - 0.5 << "]\nset yrange [3.5:-0.5]\nunset key\nset tics nomirror\n"
      << "set xtics (";
    for (int x = 0; x < cols; ++x)
      g << (x ? ", " : "") << gnuplot_quote(x < 4 ? to_string(labels[size_t(x)]) : "unknown") << " " << x;
    g << ")\nset ytics (";
    for (int y = 0; y < 4; ++y) g << (y ? ", " : "") << gnuplot_quote(to_string(labels[size_t(y)])) << " " << y;
    g << ")\n"
      << "plot " << gnuplot_quote(tsv) << " using 1:2:3 with image, '' using 1:2:(sprintf('%d', $4)) with labels "
      << "font ',14' tc rgb '#d04020'\n";
  }
  return run_gnuplot(gp, png.string());
}

std::vector<std::string> write_eval_outputs(const eval_report& r, const std::string& dir) {
  fs::create_directories(dir);
  const fs::path d(dir);
  std::vector<std::string> problems;
  {
    std::ofstream f(d / "eval.md", std::ios::trunc);
    f << eval_markdown(r);
    if (!f) throw std::runtime_error("cannot write " + (d / "eval.md").string());
  }
  {
    std::ofstream f(d / "eval.json", std::ios::trunc);
    f << eval_json(r).dump(2, ' ', false, json::error_handler_t::replace) << "\n";
    if (!f) throw std::runtime_error("cannot write " + (d / "eval.json").string());
  }
  const std::pair<const char*, class_metric system_result::*> metrics[] = {
      {"probe", &system_result::probe},
      {"answer", &system_result::answer},
      {"ranking", &system_result::ranking}};
  for (const auto& s : r.systems)
    for (const auto& [name, mem] : metrics) {
      const class_metric& m = s.*mem;
      if (!m.available || !std::isnan(m.expected)) continue;
      const std::string png = (d / ("confusion_" + s.name + "_" + name + ".png")).string();
      char title[160];
      std::snprintf(title, sizeof title, "%s: %s (accuracy %.1f%%, n=%lld)", s.name.c_str(), name,
                    100.0 * m.accuracy(), (long long)m.n());
      std::string err = plot_confusion(m, png, title);
      if (!err.empty()) problems.push_back(png + ": " + err);
    }
  return problems;
}

}  // namespace undertone::models
