// Projector: frame stacking + SwiGLU, streaming == offline, batching,
// safetensors save/load (bit-exact), clear errors for mismatched checkpoints.
#include <boost/test/unit_test.hpp>

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <torch/csrc/autograd/generated/variable_factories.h>

#include <random>

#include "models/nn/projector.hpp"
#include "models/safetensors.hpp"
#include "tests/support.hpp"

namespace ut = undertone::testing;
using namespace undertone::models;

namespace {

torch::Tensor random_frames(int64_t n, int64_t t, int64_t d, uint64_t seed) {
  auto gen = at::detail::createCPUGenerator(seed);
  return at::randn({n, t, d}, gen, at::kFloat);
}

bool bit_equal(const torch::Tensor& a, const torch::Tensor& b) {
  return a.scalar_type() == b.scalar_type() && a.sizes() == b.sizes() && at::equal(a, b);
}

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const std::exception& e) {
    return e.what();
  }
  return "";
}

}  // namespace

BOOST_AUTO_TEST_SUITE(projector_suite)

BOOST_AUTO_TEST_CASE(stacks_frames_then_swiglu) {
  projector_config cfg{4, 6, 10, 5};
  projector p(cfg, torch::kCPU, torch::kFloat32, 7);
  auto x = random_frames(2, 9, 6, 1);
  auto y = p.forward(x);
  BOOST_REQUIRE(y.sizes() == at::IntArrayRef({2, 2, 5}));
  // Token j of row n = SwiGLU(concat(frames 4j .. 4j+3)), computed by hand.
  auto params = p.named_parameters();
  auto g = params["gate_weight"], u = params["up_weight"], dn = params["down_weight"];
  for (int64_t n = 0; n < 2; ++n)
    for (int64_t j = 0; j < 2; ++j) {
      std::vector<torch::Tensor> parts;
      for (int64_t f = 0; f < 4; ++f) parts.push_back(x[n][4 * j + f]);
      auto s = at::cat(parts, 0);
      auto a = at::matmul(g, s), b = at::matmul(u, s);
      auto want = at::matmul(dn, a * at::sigmoid(a) * b);
      BOOST_TEST(at::allclose(y[n][j], want, 1e-5, 1e-6));
    }
  // pad_last adds a token from the last frame, zero-padded.
  auto yp = p.forward(x, true);
  BOOST_REQUIRE(yp.size(1) == 3);
  auto padded = at::cat({x.narrow(1, 8, 1), at::zeros({2, 3, 6})}, 1);
  BOOST_TEST(at::allclose(yp.narrow(1, 2, 1), p.forward(padded), 1e-6, 1e-7));
  BOOST_TEST(at::allclose(yp.narrow(1, 0, 2), y, 1e-5, 1e-6));
}

BOOST_AUTO_TEST_CASE(streaming_equals_offline) {
  projector_config cfg{8, 16, 32, 12};
  projector p(cfg);
  auto x = random_frames(1, 203, 16, 2)[0];  // 25 tokens + 3 leftover frames
  auto want = p.forward(x.unsqueeze(0), true)[0];
  std::mt19937 rng(5);
  for (int trial = 0; trial < 4; ++trial) {
    auto st = p.init_state();
    std::vector<torch::Tensor> toks;
    int64_t off = 0;
    while (off < x.size(0)) {
      const int64_t piece = std::min<int64_t>(x.size(0) - off, trial == 0 ? 1 : int64_t(rng() % 20));
      auto out = p.forward_stream({x.narrow(0, off, piece)}, {&st})[0];
      off += piece;
      // A token is out as soon as its 8th frame arrived.
      BOOST_TEST(st.tokens_out() == off / 8);
      BOOST_TEST(st.pending() == off % 8);
      toks.push_back(out);
    }
    toks.push_back(p.flush(st));
    BOOST_TEST(st.pending() == 0);
    auto got = at::cat(toks, 0);
    BOOST_REQUIRE(got.size(0) == 26);
    BOOST_TEST(at::allclose(got, want, 1e-5, 1e-6));
  }
  auto empty = p.init_state();
  BOOST_TEST(p.flush(empty).size(0) == 0);
}

BOOST_AUTO_TEST_CASE(batched_streams_equal_alone) {
  projector_config cfg{8, 16, 32, 12};
  projector p(cfg);
  auto x = random_frames(3, 100, 16, 3);
  std::vector<projector_state> a(3, p.init_state()), b(3, p.init_state());
  const std::vector<std::vector<int64_t>> pieces{{5, 11, 0, 30, 54}, {16, 16, 16, 16, 36}, {1, 2, 3, 4, 90}};
  std::vector<int64_t> off(3, 0);
  for (size_t step = 0; step < 5; ++step) {
    std::vector<torch::Tensor> fr;
    std::vector<projector_state*> ptrs;
    for (size_t s = 0; s < 3; ++s) {
      fr.push_back(x[int64_t(s)].narrow(0, off[s], pieces[s][step]));
      ptrs.push_back(&b[s]);
    }
    auto out = p.forward_stream(fr, ptrs);
    for (size_t s = 0; s < 3; ++s) {
      auto alone = p.forward_stream({fr[s]}, {&a[s]})[0];
      BOOST_TEST(at::allclose(out[s], alone, 1e-5, 1e-6));
      off[s] += pieces[s][step];
    }
  }
}

BOOST_AUTO_TEST_CASE(save_load_round_trip_is_bit_identical) {
  ut::temp_dir tmp;
  projector_config cfg{8, 384, 64, 576};
  for (auto dt : {torch::kFloat32, torch::kBFloat16}) {
    projector p(cfg, torch::kCPU, dt, 11);
    const std::string path = tmp.str() + "/proj.safetensors";
    p.save(path);
    safetensors_file f(path);
    BOOST_TEST(f.metadata().at("stack") == "8");
    BOOST_TEST(f.metadata().at("d_out") == "576");
    auto q = projector::load(path, torch::kCPU, dt);
    BOOST_TEST((q->config() == cfg));
    auto pp = p.named_parameters(), qp = q->named_parameters();
    for (const auto& kv : pp) BOOST_TEST(bit_equal(kv.value(), qp[kv.key()]), kv.key());
    auto x = random_frames(1, 24, 384, 4);
    BOOST_TEST(bit_equal(p.forward(x), q->forward(x)));
    // load_weights into an existing projector of the same shape.
    projector r(cfg, torch::kCPU, dt, 99);
    BOOST_TEST(!bit_equal(r.forward(x), p.forward(x)));
    r.load_weights(path);
    BOOST_TEST(bit_equal(r.forward(x), p.forward(x)));
    // Loading into another dtype converts.
    auto q32 = projector::load(path, torch::kCPU, torch::kFloat32);
    BOOST_TEST(q32->dtype() == torch::kFloat32);
    BOOST_TEST(at::equal(q32->named_parameters()["down_weight"].to(dt), pp["down_weight"]));
  }
}

BOOST_AUTO_TEST_CASE(mismatched_checkpoints_are_clear_errors) {
  ut::temp_dir tmp;
  projector_config cfg{8, 16, 32, 12};
  projector p(cfg);
  const std::string good = tmp.str() + "/good.safetensors";
  p.save(good);
  // Another config: load_weights refuses and changes nothing.
  projector other(projector_config{4, 16, 32, 12});
  auto before = other.named_parameters()["gate_weight"].clone();
  auto msg = error_of([&] { other.load_weights(good); });
  BOOST_TEST(msg.find("stack=8") != std::string::npos, msg);
  BOOST_TEST(at::equal(before, other.named_parameters()["gate_weight"]));
  // A tensor whose shape disagrees with the metadata.
  std::vector<float> g(32 * 128), u(32 * 128), d(12 * 31);
  const std::map<std::string, std::string> md{{"format", "undertone.projector"}, {"version", "1"},
                                              {"stack", "8"}, {"d_in", "16"}, {"d_hidden", "32"},
                                              {"d_out", "12"}};
  const std::string bad = tmp.str() + "/bad.safetensors";
  write_safetensors(bad, {{"gate.weight", st_dtype::f32, {32, 128}, g.data()},
                          {"up.weight", st_dtype::f32, {32, 128}, u.data()},
                          {"down.weight", st_dtype::f32, {12, 31}, d.data()}},
                    md);
  msg = error_of([&] { projector::load(bad); });
  BOOST_TEST(msg.find("down.weight") != std::string::npos, msg);
  BOOST_TEST(msg.find("[12, 31]") != std::string::npos, msg);
  // Missing metadata / missing tensor.
  const std::string nometa = tmp.str() + "/nometa.safetensors";
  write_safetensors(nometa, {{"gate.weight", st_dtype::f32, {32, 128}, g.data()}});
  msg = error_of([&] { projector::load(nometa); });
  BOOST_TEST(msg.find("format") != std::string::npos, msg);
  const std::string missing = tmp.str() + "/missing.safetensors";
  write_safetensors(missing, {{"gate.weight", st_dtype::f32, {32, 128}, g.data()}}, md);
  msg = error_of([&] { projector::load(missing); });
  BOOST_TEST(msg.find("up.weight") != std::string::npos, msg);
  BOOST_CHECK_THROW(p.forward(random_frames(1, 8, 15, 1)), std::invalid_argument);
}

BOOST_AUTO_TEST_CASE(trainable) {
  projector p(projector_config{2, 4, 8, 3});
  for (const auto& t : p.parameters()) BOOST_TEST(t.requires_grad());
  p.forward(random_frames(2, 6, 4, 9)).pow(2).sum().backward();
  for (const auto& t : p.parameters()) BOOST_TEST((t.grad().defined() && t.grad().abs().sum().item<double>() > 0));
}

BOOST_AUTO_TEST_SUITE_END()
