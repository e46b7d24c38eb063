// Sampler: greedy, top-k, top-p, temperature statistics, repetition penalty,
// seeding; stop strings across token boundaries.
#include <boost/test/unit_test.hpp>

#include <cmath>
#include <map>

#include "models/sampler.hpp"

using namespace undertone::models;

namespace {
std::vector<float> logits_of(std::vector<double> probs) {
  std::vector<float> l;
  for (double p : probs) l.push_back(float(std::log(p)));
  return l;
}
}  // namespace

BOOST_AUTO_TEST_CASE(greedy_is_argmax_with_lowest_id_on_ties) {
  sampler s({0.0, 40, 0.95, 1.0, 64, 1});
  std::vector<float> l{0.1f, 2.0f, -1.0f, 2.0f};
  BOOST_CHECK_EQUAL(s.sample(l.data(), 4, {}), 1);
  sampler k1({1.5, 1, 1.0, 1.0, 64, 1});  // top_k = 1 is greedy at any temperature
  for (int i = 0; i < 20; ++i) BOOST_CHECK_EQUAL(k1.sample(l.data(), 4, {}), 1);
}

BOOST_AUTO_TEST_CASE(temperature_one_matches_softmax_frequencies) {
  std::vector<double> p{0.5, 0.25, 0.15, 0.1};
  auto l = logits_of(p);
  sampler s({1.0, 0, 1.0, 1.0, 64, 123});
  std::map<int, int> count;
  const int n = 40000;
  for (int i = 0; i < n; ++i) count[s.sample(l.data(), 4, {})]++;
  for (int t = 0; t < 4; ++t) {
    double f = double(count[t]) / n;
    double sd = std::sqrt(p[size_t(t)] * (1 - p[size_t(t)]) / n);
    BOOST_TEST_INFO("token " << t << " freq " << f);
    BOOST_CHECK_LT(std::fabs(f - p[size_t(t)]), 5 * sd);
  }
}

BOOST_AUTO_TEST_CASE(low_temperature_sharpens) {
  // p_i ~ p_i^(1/T): at T = 0.05 the 0.4 vs 0.35 split becomes ~0.935 vs ~0.065.
  std::vector<double> p{0.4, 0.35, 0.25};
  auto l = logits_of(p);
  const double T = 0.05;
  double z = 0;
  for (double x : p) z += std::pow(x, 1 / T);
  double want = std::pow(p[0], 1 / T) / z;
  sampler s({T, 0, 1.0, 1.0, 64, 9});
  const int n = 20000;
  int top = 0;
  for (int i = 0; i < n; ++i) top += s.sample(l.data(), 3, {}) == 0;
  BOOST_CHECK_GT(want, 0.9);
  BOOST_CHECK_LT(std::fabs(double(top) / n - want), 5 * std::sqrt(want * (1 - want) / n));
}

BOOST_AUTO_TEST_CASE(top_k_and_top_p_never_sample_outside_the_kept_set) {
  auto l = logits_of({0.4, 0.3, 0.2, 0.06, 0.04});
  sampler k2({1.0, 2, 1.0, 1.0, 64, 5});
  sampler p07({1.0, 0, 0.7, 1.0, 64, 5});  // 0.4 + 0.3 >= 0.7: tokens {0, 1}
  std::map<int, int> ck, cp;
  for (int i = 0; i < 5000; ++i) ck[k2.sample(l.data(), 5, {})]++, cp[p07.sample(l.data(), 5, {})]++;
  BOOST_CHECK_EQUAL(ck.size(), 2u);
  BOOST_CHECK(ck.count(0) && ck.count(1));
  BOOST_CHECK_EQUAL(cp.size(), 2u);
  BOOST_CHECK(cp.count(0) && cp.count(1));
  // Renormalized within the set: 0.4 / 0.7.
  BOOST_CHECK_CLOSE(double(cp[0]) / 5000, 0.4 / 0.7, 5.0);
}

BOOST_AUTO_TEST_CASE(same_seed_same_sequence_other_seed_differs) {
  auto l = logits_of({0.2, 0.2, 0.2, 0.2, 0.2});
  sampler a({1.0, 0, 1.0, 1.0, 64, 77}), b({1.0, 0, 1.0, 1.0, 64, 77}), c({1.0, 0, 1.0, 1.0, 64, 78});
  std::vector<int> sa, sb, sc;
  for (int i = 0; i < 64; ++i)
    sa.push_back(a.sample(l.data(), 5, {})), sb.push_back(b.sample(l.data(), 5, {})), sc.push_back(c.sample(l.data(), 5, {}));
  BOOST_CHECK(sa == sb);
  BOOST_CHECK(sa != sc);
}

BOOST_AUTO_TEST_CASE(repetition_penalty_discourages_recent_tokens) {
  std::vector<float> l{3.0f, 2.9f, -1.0f, -1.2f};
  sampler plain({0.0, 0, 1.0, 1.0, 64, 1});
  sampler pen({0.0, 0, 1.0, 1.3, 64, 1});
  BOOST_CHECK_EQUAL(plain.sample(l.data(), 4, {0}), 0);
  BOOST_CHECK_EQUAL(pen.sample(l.data(), 4, {0}), 1);  // 3.0 / 1.3 < 2.9
  // Negative logits are multiplied (pushed further down), not divided.
  std::vector<float> neg{-1.0f, -1.1f};
  BOOST_CHECK_EQUAL(pen.sample(neg.data(), 2, {0}), 1);  // -1.3 < -1.1
  // Only the last repeat_last_n tokens count.
  sampler window({0.0, 0, 1.0, 1.3, 2, 1});
  BOOST_CHECK_EQUAL(window.sample(l.data(), 4, {0, 3, 3}), 0);
}

BOOST_AUTO_TEST_CASE(stop_string_across_pieces_is_cut_and_held_back_text_released) {
  stop_matcher m({"<|im_end|>", "\nUser:"});
  std::string out;
  out += m.feed("Hello");
  out += m.feed(" there<|im");
  BOOST_CHECK_EQUAL(out, "Hello there");  // "<|im" held back
  out += m.feed("_end|> ignored");
  BOOST_CHECK(m.stopped());
  BOOST_CHECK_EQUAL(out, "Hello there");
  BOOST_CHECK_EQUAL(m.feed("more"), "");
  BOOST_CHECK_EQUAL(m.flush(), "");

  stop_matcher n({"<|im_end|>"});
  std::string o2 = n.feed("a <|i");
  o2 += n.feed("nstead");  // not a stop after all: released
  o2 += n.flush();
  BOOST_CHECK_EQUAL(o2, "a <|instead");
  BOOST_CHECK(!n.stopped());
}

BOOST_AUTO_TEST_CASE(earliest_stop_string_wins) {
  stop_matcher m({"BB", "A"});
  BOOST_CHECK_EQUAL(m.feed("xxBBA"), "xx");
  BOOST_CHECK(m.stopped());
}
