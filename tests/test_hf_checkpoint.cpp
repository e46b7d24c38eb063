// Hugging Face checkpoint loader (load_hf_llm) on the tiny transformers-made
// checkpoints of tests/golden/hf (tests/golden/make_hf_golden.py): hparams,
// canonical names, shapes and values; config variants; broken checkpoints;
// and the llama_model forward pass against transformers' float32 logits.
//
// Logit tolerance: 1e-4 absolute. Both sides compute in float32 from the same
// (exactly converted) weights; the only differences are summation order in
// matmuls / softmax and the 7 significant digits kept in the golden file, which
// give errors of ~1e-6 on logits of magnitude < 10.
#include <boost/test/unit_test.hpp>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>

#include "models/nn/llama.hpp"
#include "models/nn/llm_checkpoint.hpp"
#include "models/safetensors.hpp"
#include "support.hpp"

namespace fs = std::filesystem;
using namespace undertone::models;
using undertone::testing::temp_dir;
using json = nlohmann::json;

namespace {

const json& golden() {
  static const json g = [] {
    std::ifstream in(undertone::testing::source_dir() + "/tests/golden/hf/golden.json");
    if (!in) throw std::runtime_error("missing tests/golden/hf/golden.json (run tests/golden/make_hf_golden.py)");
    return json::parse(in);
  }();
  return g;
}

const json& golden_model(const std::string& name) {
  for (const auto& m : golden()["models"])
    if (m["name"] == name) return m;
  throw std::runtime_error("no golden model " + name);
}

std::string golden_dir(const std::string& name) {
  return undertone::testing::source_dir() + "/tests/golden/hf/" + name;
}

// HF name -> canonical name, written from the table in llm_checkpoint.hpp.
std::string canonical(const std::string& hf) {
  static const std::vector<std::pair<std::string, std::string>> layer_map = {
      {"input_layernorm.weight", "attn_norm.weight"},
      {"self_attn.q_proj.weight", "attn_q.weight"},
      {"self_attn.k_proj.weight", "attn_k.weight"},
      {"self_attn.v_proj.weight", "attn_v.weight"},
      {"self_attn.q_proj.bias", "attn_q.bias"},
      {"self_attn.k_proj.bias", "attn_k.bias"},
      {"self_attn.v_proj.bias", "attn_v.bias"},
      {"self_attn.o_proj.weight", "attn_output.weight"},
      {"post_attention_layernorm.weight", "ffn_norm.weight"},
      {"mlp.gate_proj.weight", "ffn_gate.weight"},
      {"mlp.up_proj.weight", "ffn_up.weight"},
      {"mlp.down_proj.weight", "ffn_down.weight"},
  };
  if (hf == "model.embed_tokens.weight") return "token_embd.weight";
  if (hf == "model.norm.weight") return "output_norm.weight";
  if (hf == "lm_head.weight") return "output.weight";
  const std::string pre = "model.layers.";
  if (hf.rfind(pre, 0) == 0) {
    size_t dot = hf.find('.', pre.size());
    const std::string layer = hf.substr(pre.size(), dot - pre.size()), rest = hf.substr(dot + 1);
    for (const auto& [h, c] : layer_map)
      if (rest == h) return "blk." + layer + "." + c;
  }
  throw std::runtime_error("test has no mapping for " + hf);
}

// Copies a golden checkpoint directory to a scratch directory.
fs::path copy_golden(const std::string& name, const temp_dir& tmp) {
  fs::path dst = tmp.path / name;
  fs::copy(golden_dir(name), dst, fs::copy_options::recursive);
  for (const auto& e : fs::directory_iterator(dst))
    fs::permissions(e.path(), fs::perms::owner_read | fs::perms::owner_write, fs::perm_options::add);
  return dst;
}

json read_json(const fs::path& p) {
  std::ifstream in(p);
  return json::parse(in);
}
void write_json(const fs::path& p, const json& j) { std::ofstream(p) << j.dump(2); }

// Rewrites a safetensors file through `edit`, which may change the list of
// tensors (the views point into the original mapping, alive during the write).
void rewrite(const fs::path& file, const std::function<void(std::vector<st_tensor_view>&)>& edit) {
  safetensors_file f(file.string());
  std::vector<st_tensor_view> views;
  for (const auto& t : f.tensors()) views.push_back({t.name, t.dtype, t.shape, f.data(t)});
  edit(views);
  write_safetensors(file.string(), views, f.metadata());
}

// Expects load_hf_llm(dir) to throw with every needle in the message.
void expect_load_error(const fs::path& dir, const std::vector<std::string>& needles) {
  try {
    load_hf_llm(dir.string());
    BOOST_ERROR("loading " << dir << " should have failed (expected: " << needles.front() << ")");
  } catch (const std::runtime_error& e) {
    const std::string msg = e.what();
    BOOST_TEST_MESSAGE("error as expected: " << msg);
    for (const auto& n : needles) BOOST_TEST(msg.find(n) != std::string::npos, "'" << n << "' in: " << msg);
  }
}

void check_against_golden(const std::string& name, torch::Dtype dtype) {
  const json& g = golden_model(name);
  const json& ghp = g["hparams"];
  llm_checkpoint ck = load_hf_llm(golden_dir(name), dtype);
  const llama_hparams& hp = ck.hp;
  BOOST_TEST_MESSAGE(name << ": " << hp.to_string());
  BOOST_TEST(ck.format == "hf-safetensors");
  BOOST_TEST(ck.path == golden_dir(name));
  BOOST_TEST(hp.arch == (ghp["architecture"] == "Qwen2ForCausalLM" ? "qwen2" : "llama"));
  BOOST_TEST(hp.attn_bias == (ghp["architecture"] == "Qwen2ForCausalLM"));
  BOOST_TEST(hp.n_layer == ghp["n_layer"].get<int64_t>());
  BOOST_TEST(hp.d_model == ghp["d_model"].get<int64_t>());
  BOOST_TEST(hp.n_head == ghp["n_head"].get<int64_t>());
  BOOST_TEST(hp.n_head_kv == ghp["n_head_kv"].get<int64_t>());
  BOOST_TEST(hp.head_dim == ghp["head_dim"].get<int64_t>());
  BOOST_TEST(hp.d_ff == ghp["d_ff"].get<int64_t>());
  BOOST_TEST(hp.n_vocab == ghp["n_vocab"].get<int64_t>());
  BOOST_TEST(hp.train_ctx == ghp["train_ctx"].get<int64_t>());
  BOOST_TEST(hp.rms_eps == ghp["rms_eps"].get<double>());
  BOOST_TEST(hp.rope_theta == ghp["rope_theta"].get<double>());
  BOOST_TEST(hp.tied_embeddings == ghp["tied_embeddings"].get<bool>());
  const std::string rope_type = ghp["rope_type"];
  BOOST_TEST(hp.rope_scaling == (rope_type == "default" ? "none" : rope_type));
  if (rope_type == "llama3") {
    BOOST_TEST(hp.rope_factor == ghp["rope_factor"].get<double>());
    BOOST_TEST(hp.rope_low_freq_factor == ghp["rope_low_freq_factor"].get<double>());
    BOOST_TEST(hp.rope_high_freq_factor == ghp["rope_high_freq_factor"].get<double>());
    BOOST_TEST(hp.rope_original_ctx == ghp["rope_original_ctx"].get<int64_t>());
  }

  // Exactly the canonical tensors of the golden file's HF tensors.
  size_t n_expected = 0;
  for (const auto& [hf, t] : g["tensors"].items()) {
    if (hf == "lm_head.weight" && hp.tied_embeddings) continue;
    ++n_expected;
    const std::string c = canonical(hf);
    BOOST_TEST_CONTEXT(name << ": " << hf << " -> " << c) {
      auto it = ck.weights.find(c);
      BOOST_REQUIRE(it != ck.weights.end());
      const torch::Tensor& w = it->second;
      BOOST_TEST(w.scalar_type() == dtype);
      BOOST_TEST(w.device().is_cpu());
      BOOST_TEST(w.is_contiguous());
      BOOST_TEST(!w.requires_grad());
      BOOST_TEST(w.sizes().vec() == t["shape"].get<std::vector<int64_t>>(), boost::test_tools::per_element());
      torch::Tensor x = w.to(torch::kFloat64).reshape({-1});
      if (dtype == torch::kFloat32) {
        // Conversion from F32/F16/BF16 to float32 is exact: sums agree up to
        // summation order, the first values exactly.
        const double tol = 1e-9 * (1 + t["abs_sum"].get<double>());
        BOOST_TEST(std::fabs(x.sum().item<double>() - t["sum"].get<double>()) <= tol);
        BOOST_TEST(std::fabs(x.abs().sum().item<double>() - t["abs_sum"].get<double>()) <= tol);
        const auto first = t["first"].get<std::vector<double>>();
        for (size_t i = 0; i < first.size(); ++i) BOOST_TEST(x[int64_t(i)].item<double>() == first[i]);
      }
    }
  }
  BOOST_TEST(ck.weights.size() == n_expected);
  BOOST_TEST(ck.weights.count("output.weight") == size_t(hp.tied_embeddings ? 0 : 1));
}

}  // namespace

BOOST_AUTO_TEST_CASE(llama3_rope_scaling_untied_bf16_weights) { check_against_golden("llama3", torch::kFloat32); }
BOOST_AUTO_TEST_CASE(qwen2_biases_tied_f32_weights) { check_against_golden("qwen2", torch::kFloat32); }
BOOST_AUTO_TEST_CASE(sharded_f16_weights) { check_against_golden("sharded", torch::kFloat32); }

BOOST_AUTO_TEST_CASE(converts_to_requested_dtype) {
  for (const std::string name : {"llama3", "qwen2", "sharded"}) {
    llm_checkpoint f32 = load_hf_llm(golden_dir(name), torch::kFloat32);
    for (torch::Dtype dt : {torch::kBFloat16, torch::kFloat16}) {
      llm_checkpoint ck = load_hf_llm(golden_dir(name), dt);
      BOOST_TEST(ck.weights.size() == f32.weights.size());
      for (const auto& [k, w] : ck.weights) {
        BOOST_TEST_CONTEXT(name << " " << k << " as " << dt) {
          BOOST_TEST(w.scalar_type() == dt);
          BOOST_TEST(torch::equal(w, f32.weights.at(k).to(dt)));
        }
      }
    }
  }
}

BOOST_AUTO_TEST_CASE(dispatch_routes_directories_to_hf_loader) {
  llm_checkpoint ck = load_llm_checkpoint(golden_dir("qwen2"));
  BOOST_TEST(ck.format == "hf-safetensors");
  BOOST_TEST(ck.hp.arch == "qwen2");
}

BOOST_AUTO_TEST_CASE(config_variants) {
  temp_dir tmp;
  const fs::path d = copy_golden("llama3", tmp);
  const json base = read_json(d / "config.json");
  auto with = [&](const std::function<void(json&)>& edit) {
    json c = base;
    edit(c);
    write_json(d / "config.json", c);
  };

  // Linear RoPE scaling (older "type" key).
  with([](json& c) { c["rope_scaling"] = {{"type", "linear"}, {"factor", 4.0}}; });
  llama_hparams hp = load_hf_llm(d.string()).hp;
  BOOST_TEST(hp.rope_scaling == "linear");
  BOOST_TEST(hp.rope_factor == 4.0);
  // No scaling at all, and transformers-5 style rope_parameters.
  with([](json& c) { c.erase("rope_scaling"); c["rope_theta"] = 500000.0; });
  hp = load_hf_llm(d.string()).hp;
  BOOST_TEST(hp.rope_scaling == "none");
  BOOST_TEST(hp.rope_theta == 500000.0);
  with([](json& c) {
    c.erase("rope_scaling");
    c.erase("rope_theta");
    c["rope_parameters"] = {{"rope_type", "llama3"}, {"rope_theta", 5e5}, {"factor", 32.0},
                            {"low_freq_factor", 1.0}, {"high_freq_factor", 4.0},
                            {"original_max_position_embeddings", 8192}};
  });
  hp = load_hf_llm(d.string()).hp;
  BOOST_TEST(hp.rope_scaling == "llama3");
  BOOST_TEST(hp.rope_theta == 5e5);
  BOOST_TEST(hp.rope_factor == 32.0);
  BOOST_TEST(hp.rope_original_ctx == 8192);
  // Unsupported scaling types are refused.
  with([](json& c) { c["rope_scaling"] = {{"rope_type", "yarn"}, {"factor", 4.0}}; });
  expect_load_error(d, {"yarn", "not supported"});
  with([](json& c) { c["rope_scaling"] = {{"rope_type", "llama3"}, {"factor", 8.0}}; });
  expect_load_error(d, {"llama3"});

  // Mistral: accepted without sliding window (or with one covering the context).
  with([](json& c) { c["architectures"] = {"MistralForCausalLM"}; c["sliding_window"] = nullptr; });
  hp = load_hf_llm(d.string()).hp;
  BOOST_TEST(hp.arch == "llama");
  with([](json& c) { c["architectures"] = {"MistralForCausalLM"}; c["sliding_window"] = 512; });
  BOOST_TEST(load_hf_llm(d.string()).hp.arch == "llama");
  with([](json& c) { c["architectures"] = {"MistralForCausalLM"}; c["sliding_window"] = 128; });
  expect_load_error(d, {"sliding_window 128", "max_position_embeddings 512"});

  // Only model_type, no architectures list.
  with([](json& c) { c.erase("architectures"); });
  BOOST_TEST(load_hf_llm(d.string()).hp.arch == "llama");

  // Other refusals.
  with([](json& c) { c["architectures"] = {"GPT2LMHeadModel"}; });
  expect_load_error(d, {"GPT2LMHeadModel", "not supported"});
  with([](json& c) { c["hidden_act"] = "gelu"; });
  expect_load_error(d, {"gelu"});
  with([](json& c) { c["attention_bias"] = true; });
  expect_load_error(d, {"attention_bias"});
  with([](json& c) { c.erase("num_hidden_layers"); });
  expect_load_error(d, {"num_hidden_layers"});
  with([](json& c) { c["hidden_size"] = "64"; });
  expect_load_error(d, {"hidden_size"});
  with([](json& c) { c["num_key_value_heads"] = 3; });
  expect_load_error(d, {"num_key_value_heads"});
  // head_dim is taken from the config when present: 32 makes k/v_proj [64, 64]
  // (and q_proj [128, 64]); the first mismatch in file order is reported.
  with([](json& c) { c["head_dim"] = 32; });
  expect_load_error(d, {"'model.layers.0.self_attn.", "has shape [32, 64], expected [64, 64]"});
  write_json(d / "config.json", base);
  std::ofstream(d / "config.json") << "{ not json";
  expect_load_error(d, {"config.json", "not valid JSON"});
  fs::remove(d / "config.json");
  expect_load_error(d, {"no config.json"});
  expect_load_error(tmp.path / "nope", {"not a directory"});

  // Qwen2 (transformers-5 config): sliding-window layers are refused.
  const fs::path q = copy_golden("qwen2", tmp);
  const json qbase = read_json(q / "config.json");
  BOOST_TEST(qbase.contains("rope_parameters"));
  json qc = qbase;
  qc["use_sliding_window"] = true;
  write_json(q / "config.json", qc);
  expect_load_error(q, {"use_sliding_window"});
  qc = qbase;
  qc["layer_types"][1] = "sliding_attention";
  write_json(q / "config.json", qc);
  expect_load_error(q, {"sliding_attention"});
}

BOOST_AUTO_TEST_CASE(tensor_errors_name_the_tensor) {
  temp_dir tmp;
  const fs::path d = copy_golden("llama3", tmp);
  const fs::path st = d / "model.safetensors";
  const fs::path pristine = tmp.path / "pristine.safetensors";
  fs::copy_file(st, pristine);
  auto restore = [&] { fs::copy_file(pristine, st, fs::copy_options::overwrite_existing); };

  // Missing tensor.
  rewrite(st, [](auto& v) {
    v.erase(std::find_if(v.begin(), v.end(), [](auto& t) { return t.name == "model.layers.1.mlp.up_proj.weight"; }));
  });
  expect_load_error(d, {"missing tensor 'model.layers.1.mlp.up_proj.weight'"});
  restore();
  // Untied model without lm_head.
  rewrite(st, [](auto& v) {
    v.erase(std::find_if(v.begin(), v.end(), [](auto& t) { return t.name == "lm_head.weight"; }));
  });
  expect_load_error(d, {"'lm_head.weight'"});
  restore();

  // Unexpected tensor; an ignorable rotary buffer is fine.
  std::vector<float> extra(16, 1.0f);
  rewrite(st, [&](auto& v) { v.push_back({"model.layers.0.self_attn.q_norm.weight", st_dtype::f32, {16}, extra.data()}); });
  expect_load_error(d, {"unexpected tensor 'model.layers.0.self_attn.q_norm.weight'"});
  restore();
  rewrite(st, [&](auto& v) {
    v.push_back({"model.layers.1.self_attn.rotary_emb.inv_freq", st_dtype::f32, {8}, extra.data()});
  });
  BOOST_TEST(load_hf_llm(d.string()).weights.size() == 2u * 9 + 3);
  restore();

  // Wrong shape.
  std::vector<float> k(16 * 64, 0.5f);
  rewrite(st, [&](auto& v) {
    for (auto& t : v)
      if (t.name == "model.layers.0.self_attn.k_proj.weight") t = {t.name, st_dtype::f32, {16, 64}, k.data()};
  });
  expect_load_error(d, {"'model.layers.0.self_attn.k_proj.weight'", "[16, 64]", "[32, 64]"});
  restore();

  // Non-float weights.
  std::vector<int32_t> ints(64, 1);
  rewrite(st, [&](auto& v) {
    for (auto& t : v)
      if (t.name == "model.norm.weight") t = {t.name, st_dtype::i32, {64}, ints.data()};
  });
  expect_load_error(d, {"'model.norm.weight'", "I32"});
  restore();

  // Corrupt header: break the JSON.
  undertone::testing::corrupt_byte(st.string(), 8);
  expect_load_error(d, {st.string()});
  restore();
  undertone::testing::corrupt_byte(st.string(), 40);
  expect_load_error(d, {st.string()});
  restore();
  // Truncated file.
  undertone::testing::copy_prefix(pristine.string(), st.string(), fs::file_size(pristine) - 100);
  expect_load_error(d, {st.string(), "truncated"});
  undertone::testing::copy_prefix(pristine.string(), st.string(), 4);
  expect_load_error(d, {st.string(), "too small"});
  fs::remove(st);
  expect_load_error(d, {"no model.safetensors"});
}

BOOST_AUTO_TEST_CASE(shard_index_errors) {
  temp_dir tmp;
  const fs::path d = copy_golden("sharded", tmp);
  const json index = read_json(d / "model.safetensors.index.json");
  const std::string shard = index["weight_map"]["model.layers.0.mlp.up_proj.weight"];

  // Index placing a tensor in the wrong shard.
  json bad = index;
  const std::string other = shard == "model-00001-of-00004.safetensors" ? "model-00002-of-00004.safetensors"
                                                                         : "model-00001-of-00004.safetensors";
  bad["weight_map"]["model.layers.0.mlp.up_proj.weight"] = other;
  write_json(d / "model.safetensors.index.json", bad);
  expect_load_error(d, {"'model.layers.0.mlp.up_proj.weight'", "index places it"});
  // Index listing a tensor no shard has.
  bad = index;
  bad["weight_map"]["model.layers.7.mlp.up_proj.weight"] = shard;
  write_json(d / "model.safetensors.index.json", bad);
  expect_load_error(d, {"'model.layers.7.mlp.up_proj.weight'"});
  // Index naming a path outside the directory.
  bad = index;
  bad["weight_map"]["model.layers.0.mlp.up_proj.weight"] = "../evil.safetensors";
  write_json(d / "model.safetensors.index.json", bad);
  expect_load_error(d, {"outside the directory"});
  // A missing shard.
  write_json(d / "model.safetensors.index.json", index);
  BOOST_TEST(load_hf_llm(d.string()).weights.size() == 3u * 9 + 2);
  fs::remove(d / shard);
  expect_load_error(d, {shard, "missing"});
}

namespace {

constexpr double logit_tol = 1e-4;

torch::Tensor golden_logits(const json& c) {
  const auto rows = c["logits"].get<std::vector<std::vector<float>>>();
  torch::Tensor t = torch::empty({int64_t(rows.size()), int64_t(rows[0].size())}, torch::kFloat32);
  for (size_t i = 0; i < rows.size(); ++i)
    std::memcpy(t[int64_t(i)].data_ptr<float>(), rows[i].data(), rows[i].size() * sizeof(float));
  return t;
}

double max_diff(const torch::Tensor& a, const torch::Tensor& b) {
  BOOST_REQUIRE(a.sizes() == b.sizes());
  return (a.to(torch::kCPU, torch::kFloat32) - b).abs().max().item<double>();
}

}  // namespace

BOOST_AUTO_TEST_CASE(logits_match_transformers) {
  for (const std::string name : {"llama3", "qwen2", "sharded"}) {
    const json& g = golden_model(name);
    auto model = llama_model::load(golden_dir(name));
    BOOST_TEST(model->hparams().arch == load_hf_llm(golden_dir(name)).hp.arch);
    const auto& cases = g["cases"];
    std::vector<std::vector<int64_t>> seqs;
    std::vector<torch::Tensor> want;
    for (const auto& c : cases) {
      seqs.push_back(c["tokens"].get<std::vector<int64_t>>());
      want.push_back(golden_logits(c));
    }
    double worst = 0;
    auto check = [&](const torch::Tensor& got, const torch::Tensor& ref, const std::string& what) {
      const double d = max_diff(got, ref);
      worst = std::max(worst, d);
      BOOST_TEST(d <= logit_tol, name << " " << what << ": max |logit diff| " << d);
    };

    // 1. Each sequence alone, through the training entry point.
    for (size_t s = 0; s < seqs.size(); ++s) {
      torch::Tensor ids = torch::tensor(seqs[s], torch::kInt64).unsqueeze(0);
      torch::Tensor out = model->forward_embeddings(model->embed_tokens(ids));
      check(out[0], want[s], "forward_embeddings seq " + std::to_string(s));
    }

    // 2. All sequences in one right-padded batch.
    int64_t T = 0;
    for (const auto& s : seqs) T = std::max<int64_t>(T, int64_t(s.size()));
    torch::Tensor ids = torch::zeros({int64_t(seqs.size()), T}, torch::kInt64);
    torch::Tensor mask = torch::zeros({int64_t(seqs.size()), T}, torch::kInt64);
    for (size_t s = 0; s < seqs.size(); ++s)
      for (size_t t = 0; t < seqs[s].size(); ++t) ids[int64_t(s)][int64_t(t)] = seqs[s][t], mask[int64_t(s)][int64_t(t)] = 1;
    torch::Tensor padded = model->forward_embeddings(model->embed_tokens(ids), mask);
    for (size_t s = 0; s < seqs.size(); ++s)
      check(padded[int64_t(s)].narrow(0, 0, int64_t(seqs[s].size())), want[s], "padded batch seq " + std::to_string(s));

    // 3. One batched step with every row of every sequence (prefill), logits for all.
    {
      kv_cache cache = model->make_cache(128);
      llm_batch b;
      for (size_t s = 0; s < seqs.size(); ++s)
        for (size_t t = 0; t < seqs[s].size(); ++t) b.add_token(seqs[s][t], int32_t(s), int64_t(t), true);
      torch::Tensor out = model->step(b, cache);
      int64_t row = 0;
      for (size_t s = 0; s < seqs.size(); ++s) {
        check(out.narrow(0, row, int64_t(seqs[s].size())), want[s], "step prefill seq " + std::to_string(s));
        row += int64_t(seqs[s].size());
      }
    }

    // 4. KV-cached decoding: prefill half of the long sequence, then one token per step.
    {
      const auto& s = seqs.back();
      kv_cache cache = model->make_cache(64);
      const int64_t half = int64_t(s.size()) / 2;
      llm_batch b;
      b.add_tokens(std::vector<int64_t>(s.begin(), s.begin() + half), 0, 0, true);
      torch::Tensor out = model->step(b, cache);
      check(out[0], want.back()[half - 1], "decode prefill");
      for (int64_t t = half; t < int64_t(s.size()); ++t) {
        b.clear();
        b.add_token(s[size_t(t)], 0, t, true);
        check(model->step(b, cache)[0], want.back()[t], "decode pos " + std::to_string(t));
      }
    }
    BOOST_TEST_MESSAGE(name << ": worst |logit - transformers| = " << worst);
  }
}
