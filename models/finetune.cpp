// Torch-free parts of the online fine-tuner (models/finetune.hpp); the round
// itself is in models/nn/finetune.cpp.
#include "models/finetune.hpp"

#include <cmath>
#include <ctime>
#include <filesystem>
#include <map>
#include <sstream>

#include "models/manifest.hpp"

namespace undertone::models {

namespace fs = std::filesystem;
using nlohmann::json;

std::string to_string(gate_metric_kind g) {
  switch (g) {
    case gate_metric_kind::val_loss: return "val_loss";
    case gate_metric_kind::ranking: return "ranking";
    case gate_metric_kind::both: return "both";
  }
  return "?";
}

gate_metric_kind parse_gate_metric(const std::string& s) {
  if (s == "val_loss") return gate_metric_kind::val_loss;
  if (s == "ranking") return gate_metric_kind::ranking;
  if (s == "both") return gate_metric_kind::both;
  throw std::invalid_argument("gate metric '" + s + "' is not val_loss, ranking or both");
}

json finetune_result::to_json() const {
  json m = json::array();
  for (const auto& g : metrics) {
    auto num = [](double v) { return std::isfinite(v) ? json(v) : json(nullptr); };
    m.push_back({{"metric", g.metric},
                 {"current", num(g.current)},
                 {"candidate", num(g.candidate)},
                 {"margin", g.margin},
                 {"higher_is_better", g.higher_is_better},
                 {"gating", g.gating},
                 {"passed", g.passed},
                 {"n", g.n}});
  }
  return {{"passed", passed},
          {"published", published},
          {"published_version", published_version},
          {"reason", reason},
          {"candidate", candidate},
          {"base_projector", base_projector},
          {"out_dir", out_dir},
          {"metrics", m},
          {"session_turns", session_turns},
          {"session_examples", session_examples},
          {"replay_examples", replay_examples},
          {"val_utterances", val_utterances},
          {"val_examples", val_examples},
          {"steps", steps},
          {"first_loss", first_loss},
          {"last_loss", last_loss},
          {"seconds", seconds},
          {"train_seconds", train_seconds},
          {"paused_seconds", paused_seconds},
          {"gate_seconds", gate_seconds},
          {"priority", priority}};
}

void check_held_out(const std::vector<std::pair<std::string, std::string>>& train_speakers,
                    const std::vector<std::pair<std::string, std::string>>& val_speakers) {
  std::map<std::string, std::string> train;
  for (const auto& [spk, where] : train_speakers) train.emplace(spk, where);
  for (const auto& [spk, where] : val_speakers) {
    auto it = train.find(spk);
    if (it != train.end())
      throw std::invalid_argument("speaker '" + spk + "' of the held-out set (" + where +
                                  ") also occurs in the training data (" + it->second +
                                  "); the gate must be measured on speakers the round does not train on: "
                                  "use another validation manifest or drop that speaker's turns");
  }
}

std::string new_round_dir(const std::string& root) {
  std::time_t t = std::time(nullptr);
  std::tm tm{};
  gmtime_r(&t, &tm);
  char buf[32];
  std::strftime(buf, sizeof buf, "round-%Y%m%d-%H%M%S", &tm);
  fs::create_directories(root);
  for (int i = 0;; ++i) {
    fs::path p = fs::path(root) / (i ? std::string(buf) + "-" + std::to_string(i) : std::string(buf));
    if (fs::create_directory(p)) return p.string();
  }
}

std::string gate_table(const finetune_result& r) {
  std::ostringstream o;
  char line[256];
  std::snprintf(line, sizeof line, "%-9s %10s %10s %8s  %-28s %s\n", "metric", "current", "candidate", "margin",
                "rule", "decision");
  o << line;
  for (const auto& g : r.metrics) {
    const std::string rule = g.higher_is_better ? "candidate >= current - margin" : "candidate <= current + margin";
    std::snprintf(line, sizeof line, "%-9s %10.4f %10.4f %8.4f  %-28s %s%s\n", g.metric.c_str(), g.current,
                  g.candidate, g.margin, rule.c_str(), g.passed ? "pass" : "FAIL", g.gating ? "" : " (not gating)");
    o << line;
  }
  o << "decision: " << (r.passed ? "publish" : "keep the current projector") << " - " << r.reason << "\n";
  return o.str();
}

std::vector<std::string> split_list(const std::string& s) {
  std::vector<std::string> out;
  std::string cur;
  auto flush = [&] {
    const auto b = cur.find_first_not_of(" \t");
    const auto e = cur.find_last_not_of(" \t");
    if (b != std::string::npos) out.push_back(cur.substr(b, e - b + 1));
    cur.clear();
  };
  for (char c : s) {
    if (c == ',') flush();
    else cur += c;
  }
  flush();
  return out;
}

int64_t count_annotated_turns(const std::vector<std::string>& manifests, bool calm_as_neutral) {
  int64_t n = 0;
  const auto pol = calm_as_neutral ? four_class_policy::calm_as_neutral : four_class_policy::strict;
  for (const auto& m : manifests)
    for (const auto& u : read_manifest(m)) {
      if (u.transcript.empty()) continue;
      if (u.emotion == emotion_label::unlabeled || to_four_class(u.emotion, pol)) ++n;
    }
  return n;
}

}  // namespace undertone::models
