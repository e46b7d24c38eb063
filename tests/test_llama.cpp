// Frozen llama decoder (models/nn/llama.hpp) on the pinned SmolLM2-135M Q4_1 GGUF.
//
// Reference: llama.cpp via llama-cpp-python (tests/golden/make_llm_golden.py),
// twice, both with an F32 KV cache:
//  - "f32": llama.cpp on an F32 GGUF holding exactly our dequantized weights.
//    Same weights, same fp32 arithmetic up to summation order: measured max
//    |dlogit| 6.7e-5 over llama.cpp's top-10 logits at all 280 prompt positions
//    (logits are O(10)); asserted <= kLogitTolF32 = 1e-3, top-1 equal at every
//    position, and all 6 greedy continuations identical over 64 tokens. This
//    also proves the inverse of the converter's q/k row permutation.
//  - "q4_1": llama.cpp on the pinned Q4_1 file as it serves it: it multiplies
//    the stored Q4_1/Q8_0 blocks with activations quantized to q8_1/q8_0 per
//    block of 32, whereas we compute with fp32 activations. That rounding
//    accumulates over 30 layers: measured max |dlogit| 2.2 (mean 0.16), so
//    kLogitTolQ41 = 3.0 and a mean <= 0.25. Top-1 differs at 9 of 280
//    positions, all near-ties for llama.cpp (its top-1/top-2 margin <= 0.63
//    there): asserted only where its margin < kTieTolQ41 = 1.0, and at <= 5% of
//    positions. Greedy continuations are identical until the first such
//    near-tie; the test asserts that the first divergence (5 of 6 prompts, at
//    steps 6-34) is one: our token is within kTieTolQ41 of llama.cpp's top-1
//    in llama.cpp's own logits (measured gaps <= 0.09).
#include <boost/test/unit_test.hpp>

#include <torch/torch.h>

#include <chrono>
#include <cmath>
#include <fstream>
#include <map>
#include <sstream>
#include <memory>

#include <nlohmann/json.hpp>

#include "models/nn/llama.hpp"
#include "support.hpp"

using namespace undertone;
using models::llama_model;
using models::llm_batch;

namespace {

constexpr double kLogitTolF32 = 1e-3;  // measured 6.7e-5
constexpr double kLogitTolQ41 = 3.0;   // measured 2.2 (max), 0.16 (mean)
constexpr double kMeanTolQ41 = 0.25;
constexpr double kTieTolQ41 = 1.0;     // measured: top-1 flips only where llama.cpp's margin <= 0.63

const nlohmann::json& golden() {
  static nlohmann::json j = [] {
    std::ifstream in(testing::source_dir() + "/tests/golden/llm_golden.json");
    if (!in) throw std::runtime_error("missing tests/golden/llm_golden.json (run tests/golden/make_llm_golden.py)");
    nlohmann::json g;
    in >> g;
    return g;
  }();
  return j;
}

std::shared_ptr<llama_model> fp32_model() {
  static std::shared_ptr<llama_model> m = [] {
    at::set_num_threads(2);
    auto t0 = std::chrono::steady_clock::now();
    auto r = llama_model::load(testing::llm_gguf_path());
    BOOST_TEST_MESSAGE("fp32 model loaded in "
                       << std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() << " s");
    return r;
  }();
  return m;
}

std::vector<int64_t> ids_of(const nlohmann::json& a) { return a.get<std::vector<int64_t>>(); }

/// Prefills `toks` for sequence `seq` in one step, logits at every position [T, V].
torch::Tensor prefill_all(const llama_model& m, models::kv_cache& c, const std::vector<int64_t>& toks, int32_t seq = 0,
                          int64_t pos0 = 0) {
  llm_batch b;
  for (size_t i = 0; i < toks.size(); ++i) b.add_token(toks[i], seq, pos0 + int64_t(i), true);
  return m.step(b, c);
}

int64_t top1(const torch::Tensor& row) { return row.argmax().item<int64_t>(); }

/// Greedy continuation of `prompt` by one-token decode steps.
std::vector<int64_t> greedy(const llama_model& m, const std::vector<int64_t>& prompt, int n, double* tok_s = nullptr) {
  auto c = m.make_cache(512);
  llm_batch b;
  b.add_tokens(prompt, 0, 0, true);
  torch::Tensor lg = m.step(b, c);
  std::vector<int64_t> out;
  auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < n; ++i) {
    out.push_back(top1(lg[0]));
    if (i + 1 == n) break;
    b.clear();
    b.add_token(out.back(), 0, int64_t(prompt.size()) + i, true);
    lg = m.step(b, c);
  }
  if (tok_s) *tok_s = (n - 1) / std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return out;
}

}  // namespace

BOOST_AUTO_TEST_CASE(hparams_from_gguf) {
  const auto& hp = fp32_model()->hparams();
  BOOST_TEST_MESSAGE(hp.to_string());
  BOOST_CHECK_EQUAL(hp.arch, "llama");
  BOOST_CHECK_EQUAL(hp.n_layer, 30);
  BOOST_CHECK_EQUAL(hp.d_model, 576);
  BOOST_CHECK_EQUAL(hp.n_head, 9);
  BOOST_CHECK_EQUAL(hp.n_head_kv, 3);
  BOOST_CHECK_EQUAL(hp.head_dim, 64);
  BOOST_CHECK_EQUAL(hp.d_ff, 1536);
  BOOST_CHECK_EQUAL(hp.n_vocab, 49152);
  BOOST_CHECK_CLOSE(hp.rope_theta, 1e5, 1e-6);
  BOOST_CHECK_CLOSE(hp.rms_eps, 1e-5, 1e-3);
  BOOST_CHECK(hp.tied_embeddings);
  BOOST_CHECK(!hp.attn_bias);
}

namespace {

struct logit_stats {
  double worst = 0, mean = 0;
  int64_t disagree = 0, ties = 0, positions = 0;
  double max_tie_margin = 0;  ///< largest llama.cpp top-1/top-2 margin where top-1 differed
};

/// Prefills every prompt of reference `ref` ("f32" | "q4_1") and compares our
/// logits at llama.cpp's top-k ids with llama.cpp's, position by position.
logit_stats compare_prompts(const std::string& ref, double tie_tol) {
  const auto& m = *fp32_model();
  logit_stats st;
  double sum = 0;
  int64_t n = 0;
  for (const auto& p : golden()[ref]) {
    const auto toks = ids_of(p["tokens"]);
    auto c = m.make_cache(512);
    auto t0 = std::chrono::steady_clock::now();
    torch::Tensor lg = prefill_all(m, c, toks);
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    BOOST_REQUIRE_EQUAL(lg.size(0), int64_t(toks.size()));
    double pw = 0;
    for (size_t t = 0; t < toks.size(); ++t) {
      const auto ids = ids_of(p["topk_ids"][t]);
      const auto vals = p["topk_logits"][t].get<std::vector<double>>();
      auto row = lg[int64_t(t)];
      const float* r = row.data_ptr<float>();
      for (size_t k = 0; k < ids.size(); ++k) {
        const double d = std::abs(double(r[ids[k]]) - vals[k]);
        pw = std::max(pw, d);
        sum += d;
        ++n;
      }
      ++st.positions;
      if (top1(row) != ids[0]) {
        st.max_tie_margin = std::max(st.max_tie_margin, vals[0] - vals[1]);
        if (vals[0] - vals[1] < tie_tol) {
          ++st.ties;
        } else {
          ++st.disagree;
          BOOST_ERROR(ref << ": top-1 differs at position " << t << " of the " << toks.size()
                          << "-token prompt: ours " << top1(row) << ", llama.cpp " << ids[0] << " (margin "
                          << vals[0] - vals[1] << ")");
        }
      }
    }
    st.worst = std::max(st.worst, pw);
    BOOST_TEST_MESSAGE(ref << " " << toks.size() << " tokens: max |dlogit| " << pw << ", prefill "
                           << double(toks.size()) / secs << " tok/s");
  }
  st.mean = sum / double(n);
  BOOST_TEST_MESSAGE(ref << " top-k logits vs llama.cpp: max abs diff " << st.worst << ", mean " << st.mean
                         << ", top-1 disagreements at near-ties " << st.ties << " of " << st.positions
                         << " positions (largest llama.cpp margin there " << st.max_tie_margin << ")");
  return st;
}

/// Our greedy continuation of golden prompt `i` (the prompts' tokens are the
/// same in both references), computed once.
const std::vector<int64_t>& our_greedy(size_t i) {
  static std::map<size_t, std::vector<int64_t>> memo;
  auto it = memo.find(i);
  if (it != memo.end()) return it->second;
  const auto& p = golden()["f32"][i];
  double tps = 0;
  auto out = greedy(*fp32_model(), ids_of(p["tokens"]), int(p["greedy"].size()), &tps);
  BOOST_TEST_MESSAGE(p["tokens"].size() << "-token prompt: fp32 decode " << tps << " tok/s");
  return memo[i] = std::move(out);
}

/// Greedy continuations vs reference `ref`. Identical up to the first step
/// where llama.cpp's top-1/top-2 margin is below `tie_tol`; beyond it, the
/// first divergence (if any) must be a near-tie for llama.cpp: our token is
/// in its top-k with a logit within `tie_tol` of its top-1. Returns the number
/// of continuations identical over all their tokens.
int compare_greedy(const std::string& ref, double tie_tol) {
  int identical = 0;
  const auto& prompts = golden()[ref];
  for (size_t pi = 0; pi < prompts.size(); ++pi) {
    const auto& p = prompts[pi];
    const auto want = ids_of(p["greedy"]);
    const auto margin = p["greedy_margin"].get<std::vector<double>>();
    const auto& ours = our_greedy(pi);
    BOOST_REQUIRE_EQUAL(ours.size(), want.size());
    size_t first_diff = want.size(), first_tie = want.size();
    for (size_t i = 0; i < want.size() && first_diff == want.size(); ++i)
      if (ours[i] != want[i]) first_diff = i;
    for (size_t i = 0; i < want.size() && first_tie == want.size(); ++i)
      if (margin[i] < tie_tol) first_tie = i;
    identical += first_diff == want.size();
    std::ostringstream why;
    if (first_diff < want.size()) {
      const auto ids = ids_of(p["greedy_topk_ids"][first_diff]);
      const auto vals = p["greedy_topk_logits"][first_diff].get<std::vector<double>>();
      double gap = 1e9;
      for (size_t k = 0; k < ids.size(); ++k)
        if (ids[k] == ours[first_diff]) gap = vals[0] - vals[k];
      why << "; diverges at " << first_diff << " where llama.cpp prefers " << want[first_diff] << " over our "
          << ours[first_diff] << " by " << gap;
      BOOST_CHECK_MESSAGE(gap <= tie_tol, ref << " prompt " << pi << ": divergence is not a near-tie" << why.str());
    }
    BOOST_TEST_MESSAGE(ref << " prompt " << pi << " (" << p["tokens"].size() << " tokens): identical for "
                           << first_diff << "/" << want.size() << " (first llama.cpp margin < " << tie_tol
                           << " at " << first_tie << ")" << why.str());
    BOOST_CHECK_GE(first_diff, first_tie);
  }
  return identical;
}

}  // namespace

BOOST_AUTO_TEST_CASE(prompt_logits_match_llama_cpp_f32) {
  const auto st = compare_prompts("f32", 2 * kLogitTolF32);
  BOOST_CHECK_LE(st.worst, kLogitTolF32);
  BOOST_CHECK_EQUAL(st.disagree, 0);
  BOOST_CHECK_EQUAL(st.ties, 0);
}

BOOST_AUTO_TEST_CASE(prompt_logits_match_llama_cpp_q4_1) {
  const auto st = compare_prompts("q4_1", kTieTolQ41);
  BOOST_CHECK_LE(st.worst, kLogitTolQ41);
  BOOST_CHECK_LE(st.mean, kMeanTolQ41);
  BOOST_CHECK_EQUAL(st.disagree, 0);
  // The quantized reference flips near-ties; measured 9 of 280 positions.
  BOOST_CHECK_LE(double(st.ties) / double(st.positions), 0.05);
}

BOOST_AUTO_TEST_CASE(greedy_continuations_match_llama_cpp_f32) {
  // Same weights, both in fp32: all 64 tokens of every continuation agree.
  BOOST_CHECK_EQUAL(compare_greedy("f32", 2 * kLogitTolF32), int(golden()["f32"].size()));
}

BOOST_AUTO_TEST_CASE(greedy_continuations_match_llama_cpp_q4_1) {
  const int identical = compare_greedy("q4_1", kTieTolQ41);
  BOOST_TEST_MESSAGE("q4_1: " << identical << " of " << golden()["q4_1"].size()
                              << " continuations identical over all 64 tokens");
}

BOOST_AUTO_TEST_CASE(weights_frozen_and_gradient_reaches_embeddings) {
  const auto& m = *fp32_model();
  const auto params = m.named_parameters();
  BOOST_REQUIRE(!params.empty());
  double before = 0;
  for (const auto& [name, t] : params) {
    BOOST_CHECK_MESSAGE(!t.requires_grad(), name << " requires grad");
    before += t.to(torch::kDouble).abs().sum().item<double>();
  }
  const auto toks = ids_of(golden()["f32"][0]["tokens"]);
  torch::Tensor ids = torch::tensor(toks).unsqueeze(0);
  torch::Tensor e = m.embed_tokens(ids).detach().clone().set_requires_grad(true);  // [1, T, D]
  torch::Tensor logits = m.forward_embeddings(e);
  BOOST_CHECK_EQUAL(logits.sizes(), torch::IntArrayRef({1, int64_t(toks.size()), m.n_vocab()}));
  // cross-entropy of the next token at every position
  torch::Tensor target = ids.narrow(1, 1, int64_t(toks.size()) - 1).reshape({-1});
  torch::Tensor loss = torch::nn::functional::cross_entropy(
      logits.narrow(1, 0, int64_t(toks.size()) - 1).reshape({-1, m.n_vocab()}), target);
  loss.backward();
  BOOST_REQUIRE(e.grad().defined());
  BOOST_CHECK(torch::isfinite(e.grad()).all().item<bool>());
  BOOST_CHECK_GT(e.grad().abs().sum().item<double>(), 0.0);
  double after = 0;
  for (const auto& [name, t] : m.named_parameters()) {
    BOOST_CHECK(!t.grad().defined());
    after += t.to(torch::kDouble).abs().sum().item<double>();
  }
  BOOST_CHECK_EQUAL(before, after);

  // The training forward equals the cached step on the same tokens.
  auto c = m.make_cache(64);
  torch::Tensor step_logits = prefill_all(m, c, toks);
  BOOST_CHECK_LE((step_logits - logits[0].detach()).abs().max().item<double>(), 1e-3);
}

BOOST_AUTO_TEST_CASE(forward_embeddings_padding) {
  const auto& m = *fp32_model();
  torch::NoGradGuard ng;
  const auto a = ids_of(golden()["f32"][0]["tokens"]);  // 5 tokens
  const auto b = ids_of(golden()["f32"][3]["tokens"]);  // longer
  const int64_t Ta = int64_t(a.size()), Tb = int64_t(b.size());
  torch::Tensor ea = m.embed_tokens(torch::tensor(a)), eb = m.embed_tokens(torch::tensor(b));
  torch::Tensor ref_a = m.forward_embeddings(ea.unsqueeze(0))[0];
  torch::Tensor ref_b = m.forward_embeddings(eb.unsqueeze(0))[0];
  const int64_t T = Tb, D = m.d_model();
  // right padding
  torch::Tensor x = torch::zeros({2, T, D});
  x[0].narrow(0, 0, Ta).copy_(ea);
  x[1].copy_(eb);
  torch::Tensor mask = torch::zeros({2, T}, torch::kLong);
  mask[0].narrow(0, 0, Ta).fill_(1);
  mask[1].fill_(1);
  torch::Tensor out = m.forward_embeddings(x, mask);
  BOOST_CHECK(torch::isfinite(out).all().item<bool>());
  BOOST_CHECK_LE((out[0].narrow(0, 0, Ta) - ref_a).abs().max().item<double>(), 1e-3);
  BOOST_CHECK_LE((out[1] - ref_b).abs().max().item<double>(), 1e-3);
  // left padding
  x.zero_();
  x[0].narrow(0, T - Ta, Ta).copy_(ea);
  x[1].copy_(eb);
  mask.zero_();
  mask[0].narrow(0, T - Ta, Ta).fill_(1);
  mask[1].fill_(1);
  out = m.forward_embeddings(x, mask);
  BOOST_CHECK(torch::isfinite(out).all().item<bool>());
  BOOST_CHECK_LE((out[0].narrow(0, T - Ta, Ta) - ref_a).abs().max().item<double>(), 1e-3);
}

BOOST_AUTO_TEST_CASE(embedding_rows_equal_token_rows) {
  const auto& m = *fp32_model();
  const auto toks = ids_of(golden()["f32"][1]["tokens"]);
  auto c1 = m.make_cache(128), c2 = m.make_cache(128);
  torch::Tensor ref = prefill_all(m, c1, toks);
  torch::Tensor e = m.embed_tokens(torch::tensor(toks));  // [T, D]
  llm_batch b;
  // Mixed: even rows as embeddings, odd rows as token ids.
  for (size_t i = 0; i < toks.size(); ++i) {
    if (i % 2 == 0)
      b.add_embedding(e[int64_t(i)], 0, int64_t(i), true);
    else
      b.add_token(toks[i], 0, int64_t(i), true);
  }
  torch::Tensor got = m.step(b, c2);
  BOOST_CHECK_LE((got - ref).abs().max().item<double>(), 1e-4);
  // All embeddings, then a decode step by embedding.
  auto c3 = m.make_cache(128);
  b.clear();
  b.add_embeddings(e, 0, 0, true);
  torch::Tensor last = m.step(b, c3);
  BOOST_CHECK_LE((last[0] - ref[int64_t(toks.size()) - 1]).abs().max().item<double>(), 1e-4);
}

BOOST_AUTO_TEST_CASE(batch_of_8_equals_each_alone) {
  const auto& m = *fp32_model();
  // 8 sequences of different lengths (prefixes of the golden prompts).
  std::vector<std::vector<int64_t>> prompts;
  const auto& gp = golden()["f32"];
  const std::vector<size_t> lens{5, 41, 17, 3, 60, 11, 1, 29};
  for (size_t s = 0; s < 8; ++s) {
    auto t = ids_of(gp[s % gp.size()]["tokens"]);
    if (t.size() < lens[s]) t = ids_of(gp[2]["tokens"]);
    t.resize(lens[s]);
    prompts.push_back(t);
  }
  const int n_dec = 4;
  // Alone: prefill (all logits), then n_dec greedy decode steps.
  std::vector<torch::Tensor> alone_logits;        // [len + n_dec, V]
  std::vector<std::vector<int64_t>> alone_tokens;  // prompt + decoded
  for (const auto& p : prompts) {
    auto c = m.make_cache(128);
    std::vector<torch::Tensor> rows{prefill_all(m, c, p)};
    std::vector<int64_t> toks = p;
    for (int i = 0; i < n_dec; ++i) {
      toks.push_back(top1(rows.back()[rows.back().size(0) - 1]));
      llm_batch b;
      b.add_token(toks.back(), 0, int64_t(toks.size()) - 1, true);
      rows.push_back(m.step(b, c));
    }
    alone_logits.push_back(torch::cat(rows));
    alone_tokens.push_back(toks);
  }
  // Batched: step 1 prefills sequences 0-3; then every step decodes the ones
  // already prefilled while sequences 4-7 prefill in step 2 (mixed step).
  auto c = m.make_cache(512);
  double worst = 0;
  std::vector<int64_t> next(8, 0);  // next position to feed per sequence
  for (int stepno = 0; stepno < 2 + n_dec; ++stepno) {
    llm_batch b;
    std::vector<std::pair<int, int64_t>> who;  // (seq, pos) per logits row
    for (int s = 0; s < 8; ++s) {
      const bool late = s >= 4;
      if (late && stepno == 0) continue;
      const auto& toks = alone_tokens[size_t(s)];
      int64_t upto = next[size_t(s)] == 0 ? int64_t(prompts[size_t(s)].size()) : next[size_t(s)] + 1;
      upto = std::min<int64_t>(upto, int64_t(toks.size()));
      for (int64_t p = next[size_t(s)]; p < upto; ++p) {
        b.add_token(toks[size_t(p)], s + 10, p, true);  // seq ids need not be dense
        who.emplace_back(s, p);
      }
      next[size_t(s)] = upto;
    }
    if (b.empty()) continue;
    torch::Tensor lg = m.step(b, c);
    BOOST_REQUIRE_EQUAL(lg.size(0), int64_t(who.size()));
    for (size_t r = 0; r < who.size(); ++r) {
      const double d = (lg[int64_t(r)] - alone_logits[size_t(who[r].first)][who[r].second]).abs().max().item<double>();
      worst = std::max(worst, d);
    }
  }
  BOOST_TEST_MESSAGE("batched vs alone: max abs logit diff " << worst);
  BOOST_CHECK_LE(worst, 2e-3);
  for (int s = 0; s < 8; ++s) BOOST_CHECK_EQUAL(c.used(s + 10), int64_t(alone_tokens[size_t(s)].size()));
}

BOOST_AUTO_TEST_CASE(only_wanted_rows_return_logits) {
  const auto& m = *fp32_model();
  const auto toks = ids_of(golden()["f32"][4]["tokens"]);
  auto c1 = m.make_cache(64), c2 = m.make_cache(64);
  torch::Tensor all = prefill_all(m, c1, toks);
  llm_batch b;
  b.add_tokens(toks, 3, 0, true);
  b.logits[2] = 1;
  torch::Tensor some = m.step(b, c2);
  BOOST_REQUIRE_EQUAL(some.size(0), 2);
  BOOST_CHECK_LE((some[0] - all[2]).abs().max().item<double>(), 1e-4);
  BOOST_CHECK_LE((some[1] - all[int64_t(toks.size()) - 1]).abs().max().item<double>(), 1e-4);
  BOOST_CHECK_EQUAL(some.scalar_type(), torch::kFloat32);
}

BOOST_AUTO_TEST_CASE(bad_rows_are_rejected_and_leave_cache_unchanged) {
  const auto& m = *fp32_model();
  auto c = m.make_cache(32);
  llm_batch b;
  b.add_tokens({1, 2, 3}, 0, 0, true);
  m.step(b, c);
  BOOST_CHECK_EQUAL(c.used(), 3);
  llm_batch bad;
  bad.add_token(m.n_vocab(), 0, 3, true);
  BOOST_CHECK_THROW(m.step(bad, c), std::invalid_argument);
  bad.clear();
  bad.add_token(5, 0, 2, true);  // position already cached
  BOOST_CHECK_THROW(m.step(bad, c), std::invalid_argument);
  bad.clear();
  bad.add_embedding(torch::zeros({7}), 0, 3, true);
  BOOST_CHECK_THROW(m.step(bad, c), std::invalid_argument);
  BOOST_CHECK_EQUAL(c.used(), 3);
}

BOOST_AUTO_TEST_CASE(bf16_agrees_with_fp32) {
  at::set_num_threads(2);
  auto bf = llama_model::load(testing::llm_gguf_path(), {torch::kCPU, torch::kBFloat16});
  const auto& f = *fp32_model();
  int64_t n = 0, agree = 0;
  for (const auto& p : golden()["f32"]) {
    const auto toks = ids_of(p["tokens"]);
    auto c1 = f.make_cache(256);
    auto c2 = bf->make_cache(256);
    torch::Tensor a = prefill_all(f, c1, toks).argmax(-1), bb = prefill_all(*bf, c2, toks).argmax(-1);
    agree += (a == bb).sum().item<int64_t>();
    n += a.size(0);
  }
  double tps = 0;
  greedy(*bf, ids_of(golden()["f32"][0]["tokens"]), 16, &tps);
  BOOST_TEST_MESSAGE("bf16 vs fp32 top-1 agreement " << agree << "/" << n << ", bf16 decode " << tps << " tok/s");
  BOOST_CHECK_GE(double(agree) / double(n), 0.9);
}

BOOST_AUTO_TEST_CASE(checkpoint_variants_and_errors) {
  at::set_num_threads(2);
  const auto ck = models::load_gguf_llm(testing::llm_gguf_path());
  BOOST_CHECK_EQUAL(ck.format, "gguf");
  BOOST_CHECK(ck.weights.count("output.weight") == 0);
  const auto toks = ids_of(golden()["f32"][3]["tokens"]);
  auto run = [&](const models::llm_checkpoint& c) {
    llama_model m(c);
    auto cache = m.make_cache(64);
    return prefill_all(m, cache, toks);
  };
  const torch::Tensor ref = run(ck);
  {  // untied output equal to the embeddings
    auto c = ck;
    c.hp.tied_embeddings = false;
    c.weights["output.weight"] = ck.weights.at("token_embd.weight").clone();
    BOOST_CHECK_LE((run(c) - ref).abs().max().item<double>(), 1e-4);
  }
  {  // qwen2-style q/k/v biases (zero here)
    auto c = ck;
    c.hp.attn_bias = true;
    const int64_t Q = c.hp.n_head * c.hp.head_dim, KV = c.hp.n_head_kv * c.hp.head_dim;
    for (int64_t i = 0; i < c.hp.n_layer; ++i) {
      const std::string b = "blk." + std::to_string(i) + ".";
      c.weights[b + "attn_q.bias"] = torch::zeros({Q});
      c.weights[b + "attn_k.bias"] = torch::zeros({KV});
      c.weights[b + "attn_v.bias"] = torch::zeros({KV});
    }
    BOOST_CHECK_LE((run(c) - ref).abs().max().item<double>(), 1e-4);
    // a non-zero v bias changes the logits
    c.weights["blk.0.attn_v.bias"] = torch::full({KV}, 0.5);
    BOOST_CHECK_GT((run(c) - ref).abs().max().item<double>(), 1e-2);
  }
  auto expect_error = [&](const models::llm_checkpoint& c, const std::string& needle) {
    try {
      llama_model m(c);
      BOOST_ERROR("expected an error mentioning " << needle);
    } catch (const std::runtime_error& e) {
      BOOST_TEST_MESSAGE(e.what());
      BOOST_CHECK_MESSAGE(std::string(e.what()).find(needle) != std::string::npos, e.what());
    }
  };
  {
    auto c = ck;
    c.weights.erase("blk.7.ffn_up.weight");
    expect_error(c, "missing tensor blk.7.ffn_up.weight");
  }
  {
    auto c = ck;
    c.weights["blk.2.attn_k.weight"] = torch::zeros({10, 576});
    expect_error(c, "blk.2.attn_k.weight");
  }
  BOOST_CHECK_THROW(models::load_llm_checkpoint("/nonexistent/model.gguf"), std::runtime_error);
}

BOOST_AUTO_TEST_CASE(rope_scaling_variants) {
  at::set_num_threads(2);
  const auto ck = models::load_gguf_llm(testing::llm_gguf_path());
  const auto toks = ids_of(golden()["f32"][4]["tokens"]);
  auto run = [&](const models::llm_checkpoint& c, int64_t stride) {
    llama_model m(c);
    auto cache = m.make_cache(64);
    llm_batch b;
    for (size_t i = 0; i < toks.size(); ++i) b.add_token(toks[i], 0, int64_t(i) * stride, true);
    return m.step(b, cache);
  };
  const torch::Tensor ref = run(ck, 1);
  // Linear scaling by 2 at positions 0, 2, 4, ... == no scaling at 0, 1, 2, ...
  auto lin = ck;
  lin.hp.rope_scaling = "linear";
  lin.hp.rope_factor = 2.0;
  BOOST_CHECK_LE((run(lin, 2) - ref).abs().max().item<double>(), 1e-3);
  BOOST_CHECK_GT((run(lin, 1) - ref).abs().max().item<double>(), 1e-2);
  // llama3: every wavelength shorter than original_ctx / high_freq_factor is kept...
  auto l3 = ck;
  l3.hp.rope_scaling = "llama3";
  l3.hp.rope_factor = 2.0;
  l3.hp.rope_original_ctx = int64_t(1) << 40;
  BOOST_CHECK_LE((run(l3, 1) - ref).abs().max().item<double>(), 1e-4);
  // ...and every one longer than original_ctx / low_freq_factor is scaled like "linear".
  l3.hp.rope_original_ctx = 1;
  BOOST_CHECK_LE((run(l3, 2) - ref).abs().max().item<double>(), 1e-3);
}
