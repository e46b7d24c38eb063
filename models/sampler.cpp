#include "models/sampler.hpp"

#include <algorithm>
#include <cmath>
#include <unordered_set>

namespace undertone::models {

sampler::sampler(const sampling_params& p) : p_(p), rng_(p.seed) {}

int32_t sampler::sample(const float* logits, int64_t n_vocab, const std::vector<int32_t>& history) {
  cand_.resize(size_t(n_vocab));
  for (int64_t i = 0; i < n_vocab; ++i) cand_[size_t(i)] = {logits[i], int32_t(i)};

  if (p_.repetition_penalty != 1.0 && !history.empty()) {
    // Penalize each distinct recent token once (CTRL-style: shrink towards less likely).
    std::unordered_set<int32_t> seen;
    size_t from = history.size() > size_t(p_.repeat_last_n) ? history.size() - size_t(p_.repeat_last_n) : 0;
    for (size_t i = from; i < history.size(); ++i) {
      int32_t t = history[i];
      if (t < 0 || t >= n_vocab || !seen.insert(t).second) continue;
      float& l = cand_[size_t(t)].first;
      l = l > 0 ? float(l / p_.repetition_penalty) : float(l * p_.repetition_penalty);
    }
  }

  auto by_logit = [](const auto& a, const auto& b) { return a.first > b.first || (a.first == b.first && a.second < b.second); };
  if (p_.temperature <= 0.0 || p_.top_k == 1)
    return std::min_element(cand_.begin(), cand_.end(), by_logit)->second;

  size_t k = p_.top_k > 0 ? std::min<size_t>(size_t(p_.top_k), cand_.size()) : cand_.size();
  std::partial_sort(cand_.begin(), cand_.begin() + std::ptrdiff_t(k), cand_.end(), by_logit);
  cand_.resize(k);

  // Softmax with temperature over the kept candidates (max-subtracted for stability).
  double mx = cand_[0].first, sum = 0;
  std::vector<double> prob(k);
  for (size_t i = 0; i < k; ++i) sum += prob[i] = std::exp((cand_[i].first - mx) / p_.temperature);
  for (auto& x : prob) x /= sum;

  // Nucleus: the smallest prefix (by probability) with mass >= top_p.
  size_t keep = k;
  if (p_.top_p < 1.0) {
    double acc = 0;
    for (size_t i = 0; i < k; ++i) {
      acc += prob[i];
      if (acc >= p_.top_p) {
        keep = i + 1;
        break;
      }
    }
  }
  double mass = 0;
  for (size_t i = 0; i < keep; ++i) mass += prob[i];
  double u = std::uniform_real_distribution<double>(0.0, mass)(rng_);
  for (size_t i = 0; i < keep; ++i) {
    u -= prob[i];
    if (u <= 0) return cand_[i].second;
  }
  return cand_[keep - 1].second;
}

stop_matcher::stop_matcher(std::vector<std::string> stops) : stops_(std::move(stops)) {
  stops_.erase(std::remove(stops_.begin(), stops_.end(), std::string{}), stops_.end());
}

std::string stop_matcher::feed(const std::string& text) {
  if (stopped_) return {};
  pending_ += text;
  // A complete stop string: emit what precedes the earliest one and stop.
  size_t cut = std::string::npos;
  for (const auto& s : stops_) cut = std::min(cut, pending_.find(s));
  if (cut != std::string::npos) {
    std::string out = pending_.substr(0, cut);
    pending_.clear();
    stopped_ = true;
    return out;
  }
  // Hold back the longest suffix that is a prefix of some stop string.
  size_t hold = 0;
  for (const auto& s : stops_)
    for (size_t n = std::min(s.size() - 1, pending_.size()); n > hold; --n)
      if (pending_.compare(pending_.size() - n, n, s, 0, n) == 0) {
        hold = n;
        break;
      }
  std::string out = pending_.substr(0, pending_.size() - hold);
  pending_.erase(0, pending_.size() - hold);
  return out;
}

std::string stop_matcher::flush() {
  if (stopped_) return {};
  std::string out;
  out.swap(pending_);
  return out;
}

}  // namespace undertone::models
