// Unified KV cache (models/nn/kv_cache.hpp): cell bookkeeping, and the
// per-sequence operations through the real model (truncate = barge-in, copy =
// prompt-prefix reuse) compared with recomputing from scratch.
#include <boost/test/unit_test.hpp>

#include <torch/torch.h>

#include <memory>

#include "models/nn/kv_cache.hpp"
#include "models/nn/llama.hpp"
#include "support.hpp"

using namespace undertone;
using models::kv_cache;
using models::llama_model;
using models::llm_batch;

namespace {

models::llama_hparams tiny() {
  models::llama_hparams hp;
  hp.n_layer = 2;
  hp.d_model = 8;
  hp.n_head = 2;
  hp.n_head_kv = 1;
  hp.head_dim = 4;
  hp.d_ff = 16;
  hp.n_vocab = 10;
  return hp;
}

std::shared_ptr<llama_model> model() {
  static std::shared_ptr<llama_model> m = [] {
    at::set_num_threads(2);
    return llama_model::load(testing::llm_gguf_path());
  }();
  return m;
}

// A fixed token sequence (ids of ordinary English-ish tokens).
std::vector<int64_t> tokens(size_t n, int64_t salt = 0) {
  std::vector<int64_t> t;
  for (size_t i = 0; i < n; ++i) t.push_back(1000 + int64_t((i * 7919 + size_t(salt) * 104729) % 20000));
  return t;
}

torch::Tensor run(const llama_model& m, kv_cache& c, const std::vector<int64_t>& toks, int32_t seq, int64_t pos0,
                  bool all_logits) {
  llm_batch b;
  for (size_t i = 0; i < toks.size(); ++i)
    b.add_token(toks[i], seq, pos0 + int64_t(i), all_logits || i + 1 == toks.size());
  return m.step(b, c);
}

double max_diff(const torch::Tensor& a, const torch::Tensor& b) { return (a - b).abs().max().item<double>(); }

}  // namespace

BOOST_AUTO_TEST_CASE(bookkeeping) {
  kv_cache c(tiny(), 8);
  BOOST_CHECK_EQUAL(c.capacity(), 8);
  BOOST_CHECK_EQUAL(c.used(), 0);
  BOOST_CHECK_EQUAL(c.k(0).sizes(), torch::IntArrayRef({1, 8, 4}));
  auto a = c.allocate({0, 0, 0}, {0, 1, 2});
  auto b = c.allocate({1, 1}, {0, 1});
  BOOST_CHECK_EQUAL(c.used(), 5);
  BOOST_CHECK_EQUAL(c.used(0), 3);
  BOOST_CHECK_EQUAL(c.used(1), 2);
  BOOST_CHECK_EQUAL(c.seq_pos_max(0), 2);
  BOOST_CHECK_EQUAL(c.seq_pos_max(7), -1);
  BOOST_CHECK_EQUAL(c.extent(), 5);
  c.truncate(0, 1);  // keep pos 0 of seq 0
  BOOST_CHECK_EQUAL(c.used(0), 1);
  BOOST_CHECK_EQUAL(c.used(), 3);
  BOOST_CHECK_EQUAL(c.extent(), 5);  // seq 1 still at cells 3, 4
  // freed cells are reused first
  auto d = c.allocate({2}, {0});
  BOOST_CHECK_EQUAL(d[0], 1);
  c.remove(1);
  BOOST_CHECK_EQUAL(c.extent(), 2);
  BOOST_CHECK((c.sequences() == std::vector<int32_t>{0, 2}));
  c.copy(0, 5);
  BOOST_CHECK_EQUAL(c.used(5), 1);
  BOOST_CHECK_EQUAL(c.seq_pos_max(5), 0);
  c.clear();
  BOOST_CHECK_EQUAL(c.used(), 0);
  BOOST_CHECK_EQUAL(c.extent(), 0);
  (void)a;
  (void)b;
}

BOOST_AUTO_TEST_CASE(full_cache_is_a_clear_error_and_changes_nothing) {
  kv_cache c(tiny(), 4);
  c.allocate({0, 0, 0}, {0, 1, 2});
  try {
    c.allocate({1, 1}, {0, 1});
    BOOST_FAIL("expected an exception");
  } catch (const std::runtime_error& e) {
    const std::string msg = e.what();
    BOOST_TEST_MESSAGE(msg);
    BOOST_CHECK(msg.find("KV cache full: 3 cells in use of 4") != std::string::npos);
    BOOST_CHECK(msg.find("llm.kv_cells") != std::string::npos);
  }
  BOOST_CHECK_EQUAL(c.used(), 3);
  BOOST_CHECK_THROW(c.copy(0, 1), std::runtime_error);  // a 3-cell copy does not fit in 1 free cell
  BOOST_CHECK_THROW(kv_cache(tiny(), 0), std::invalid_argument);
}

BOOST_AUTO_TEST_CASE(step_on_full_cache_throws_and_leaves_it_usable) {
  const auto& m = *model();
  auto c = m.make_cache(10);
  run(m, c, tokens(8), 0, 0, false);
  BOOST_CHECK_THROW(run(m, c, tokens(3, 1), 1, 0, false), std::runtime_error);
  BOOST_CHECK_EQUAL(c.used(), 8);
  BOOST_CHECK_EQUAL(c.used(1), 0);
  torch::Tensor lg = run(m, c, tokens(2, 1), 1, 0, false);  // still fits
  BOOST_CHECK_EQUAL(lg.size(0), 1);
}

BOOST_AUTO_TEST_CASE(truncate_then_redecode_equals_fresh_decode) {
  const auto& m = *model();
  const auto prompt = tokens(20);
  const auto spoken = tokens(6, 3);      // generated, then interrupted (barge-in)
  const auto user_next = tokens(5, 4);   // what comes after the cut
  auto c = m.make_cache(64);
  run(m, c, prompt, 0, 0, false);
  run(m, c, spoken, 0, 20, false);
  // Another sequence shares the cache and must not be disturbed.
  torch::Tensor other_before = run(m, c, tokens(7, 9), 1, 0, true);
  c.truncate(0, 22);  // keep the first 2 spoken tokens
  BOOST_CHECK_EQUAL(c.used(0), 22);
  torch::Tensor got = run(m, c, user_next, 0, 22, true);

  auto fresh = m.make_cache(64);
  std::vector<int64_t> all = prompt;
  all.insert(all.end(), spoken.begin(), spoken.begin() + 2);
  run(m, fresh, all, 0, 0, false);
  torch::Tensor want = run(m, fresh, user_next, 0, 22, true);
  const double d = max_diff(got, want);
  BOOST_TEST_MESSAGE("truncate + re-decode vs fresh: max abs logit diff " << d);
  BOOST_CHECK_LE(d, 1e-3);
  // The other sequence decodes on as if nothing happened.
  auto solo = m.make_cache(64);
  run(m, solo, tokens(7, 9), 1, 0, false);
  torch::Tensor next_solo = run(m, solo, {42}, 1, 7, true);
  torch::Tensor next_shared = run(m, c, {42}, 1, 7, true);
  BOOST_CHECK_LE(max_diff(next_solo, next_shared), 1e-3);
  (void)other_before;
}

BOOST_AUTO_TEST_CASE(copy_prefix_then_continue_equals_full_prefill) {
  const auto& m = *model();
  const auto system = tokens(30);
  const auto user = tokens(9, 5);
  auto c = m.make_cache(128);
  run(m, c, system, 0, 0, false);  // seq 0: the shared system prompt
  c.copy(0, 3);
  c.copy(0, 4, 10);  // only the first 10 positions
  BOOST_CHECK_EQUAL(c.used(3), 30);
  BOOST_CHECK_EQUAL(c.used(4), 10);
  torch::Tensor got = run(m, c, user, 3, 30, true);

  auto fresh = m.make_cache(128);
  std::vector<int64_t> all = system;
  all.insert(all.end(), user.begin(), user.end());
  torch::Tensor want = run(m, fresh, all, 0, 0, true).narrow(0, 30, int64_t(user.size()));
  const double d = max_diff(got, want);
  BOOST_TEST_MESSAGE("copy(prefix) + continue vs full prefill: max abs logit diff " << d);
  BOOST_CHECK_LE(d, 1e-3);

  // Sequence 4 (copied prefix of 10) continues from position 10.
  std::vector<int64_t> ten(system.begin(), system.begin() + 10);
  auto fresh4 = m.make_cache(64);
  run(m, fresh4, ten, 0, 0, false);
  BOOST_CHECK_LE(max_diff(run(m, c, user, 4, 10, true), run(m, fresh4, user, 0, 10, true)), 1e-3);
  // The source is untouched by its copies' decoding.
  c.remove(3);
  c.remove(4);
  BOOST_CHECK_EQUAL(c.used(), 30);
  BOOST_CHECK_LE(max_diff(run(m, c, user, 0, 30, true), want), 1e-3);
}
