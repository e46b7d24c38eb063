// Hugging Face checkpoint directories (config.json + *.safetensors) -> llm_checkpoint.
//
// HF's Llama/Qwen2/Mistral q/k projections are already in rotate-half order and
// nn.Linear weights are [out, in], which is the canonical layout, so tensors are
// only renamed and converted to the requested dtype.
#include "models/nn/llm_checkpoint.hpp"

#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <regex>
#include <set>

#include <nlohmann/json.hpp>

#include "models/safetensors.hpp"

namespace undertone::models {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

[[noreturn]] void fail(const std::string& dir, const std::string& what) {
  throw std::runtime_error("HF checkpoint " + dir + ": " + what);
}

json read_json(const fs::path& p, const std::string& dir) {
  std::ifstream in(p);
  if (!in) fail(dir, "cannot open " + p.filename().string());
  try {
    return json::parse(in);
  } catch (const json::exception& e) {
    fail(dir, p.filename().string() + " is not valid JSON: " + e.what());
  }
}

// Typed config lookups with the key named in every error.
struct config_reader {
  const json& cfg;
  const std::string& dir;

  bool present(const char* key) const { return cfg.contains(key) && !cfg.at(key).is_null(); }
  int64_t get_int(const char* key) const {
    if (!present(key)) fail(dir, std::string("config.json lacks \"") + key + "\"");
    return as_int(cfg.at(key), key);
  }
  int64_t get_int_or(const char* key, int64_t dflt) const { return present(key) ? as_int(cfg.at(key), key) : dflt; }
  double get_float_or(const char* key, double dflt) const {
    if (!present(key)) return dflt;
    const json& v = cfg.at(key);
    if (!v.is_number()) fail(dir, std::string("config.json \"") + key + "\" is not a number: " + v.dump());
    return v.get<double>();
  }
  bool get_bool_or(const char* key, bool dflt) const {
    if (!present(key)) return dflt;
    const json& v = cfg.at(key);
    if (!v.is_boolean()) fail(dir, std::string("config.json \"") + key + "\" is not a boolean: " + v.dump());
    return v.get<bool>();
  }
  std::string get_string_or(const char* key, const std::string& dflt) const {
    if (!present(key)) return dflt;
    const json& v = cfg.at(key);
    if (!v.is_string()) fail(dir, std::string("config.json \"") + key + "\" is not a string: " + v.dump());
    return v.get<std::string>();
  }
  int64_t as_int(const json& v, const std::string& key) const {
    if (!v.is_number_integer() || v.get<int64_t>() < 0)
      fail(dir, "config.json \"" + key + "\" is not a non-negative integer: " + v.dump());
    return v.get<int64_t>();
  }
};

llama_hparams parse_config(const json& cfg, const std::string& dir) {
  if (!cfg.is_object()) fail(dir, "config.json is not a JSON object");
  config_reader c{cfg, dir};
  std::string arch_name;
  if (c.present("architectures")) {
    const json& a = cfg.at("architectures");
    if (!a.is_array() || a.size() != 1 || !a[0].is_string())
      fail(dir, "config.json \"architectures\" must list exactly one architecture, got " + a.dump());
    arch_name = a[0].get<std::string>();
  } else {
    const std::string mt = c.get_string_or("model_type", "");
    if (mt == "llama") arch_name = "LlamaForCausalLM";
    else if (mt == "qwen2") arch_name = "Qwen2ForCausalLM";
    else if (mt == "mistral") arch_name = "MistralForCausalLM";
    else fail(dir, "config.json has neither \"architectures\" nor a known \"model_type\" (got \"" + mt + "\")");
  }

  llama_hparams hp;
  hp.n_layer = c.get_int("num_hidden_layers");
  hp.d_model = c.get_int("hidden_size");
  hp.n_head = c.get_int("num_attention_heads");
  hp.n_head_kv = c.get_int_or("num_key_value_heads", hp.n_head);
  hp.d_ff = c.get_int("intermediate_size");
  hp.n_vocab = c.get_int("vocab_size");
  hp.train_ctx = c.get_int_or("max_position_embeddings", 2048);
  hp.rope_theta = c.get_float_or("rope_theta", 10000.0);
  // Every supported transformers config class defaults these two as below.
  hp.rms_eps = c.get_float_or("rms_norm_eps", 1e-6);
  hp.tied_embeddings = c.get_bool_or("tie_word_embeddings", false);

  if (hp.n_layer <= 0 || hp.d_model <= 0 || hp.n_head <= 0 || hp.n_head_kv <= 0 || hp.d_ff <= 0 || hp.n_vocab <= 0)
    fail(dir, "config.json has a zero size (layers, hidden, heads, kv heads, intermediate or vocab)");
  if (hp.n_head % hp.n_head_kv != 0)
    fail(dir, "num_attention_heads " + std::to_string(hp.n_head) + " is not a multiple of num_key_value_heads " +
                  std::to_string(hp.n_head_kv));
  if (c.present("head_dim")) {
    hp.head_dim = c.get_int("head_dim");
  } else {
    if (hp.d_model % hp.n_head != 0)
      fail(dir, "hidden_size is not a multiple of num_attention_heads and config.json has no head_dim");
    hp.head_dim = hp.d_model / hp.n_head;
  }
  if (hp.head_dim <= 0 || hp.head_dim % 2 != 0)
    fail(dir, "head_dim " + std::to_string(hp.head_dim) + " must be positive and even for RoPE");

  const std::string act = c.get_string_or("hidden_act", "silu");
  if (act != "silu")
    fail(dir, "hidden_act \"" + act + "\" is not supported (only silu, i.e. SwiGLU)");

  if (arch_name == "LlamaForCausalLM" || arch_name == "MistralForCausalLM") {
    hp.arch = "llama";
    if (c.get_bool_or("attention_bias", false))
      fail(dir, "attention_bias = true (biases on q/k/v/o) is not supported for " + arch_name);
    if (c.get_bool_or("mlp_bias", false)) fail(dir, "mlp_bias = true is not supported");
    if (arch_name == "MistralForCausalLM" && c.present("sliding_window")) {
      const int64_t w = c.get_int("sliding_window");
      if (w < hp.train_ctx)
        fail(dir, "sliding-window attention (sliding_window " + std::to_string(w) + " < max_position_embeddings " +
                      std::to_string(hp.train_ctx) +
                      ") is not supported; only Mistral checkpoints with sliding_window null or >= the context");
    }
  } else if (arch_name == "Qwen2ForCausalLM") {
    hp.arch = "qwen2";
    hp.attn_bias = true;
    if (c.get_bool_or("use_sliding_window", false))
      fail(dir, "use_sliding_window = true is not supported for Qwen2ForCausalLM");
  } else {
    fail(dir, "architecture \"" + arch_name +
                  "\" is not supported (LlamaForCausalLM, Qwen2ForCausalLM, MistralForCausalLM)");
  }
  // transformers >= 5 lists the attention kind of every layer.
  if (c.present("layer_types")) {
    const json& lt = cfg.at("layer_types");
    if (!lt.is_array()) fail(dir, "config.json \"layer_types\" is not an array");
    for (const auto& t : lt)
      if (t != "full_attention")
        fail(dir, "layer_types contains " + t.dump() + "; only full_attention layers are supported");
  }

  // RoPE: transformers < 5 writes "rope_theta" and "rope_scaling" at the top
  // level (what published checkpoints have); transformers >= 5 writes one
  // "rope_parameters" object holding rope_theta and the scaling keys.
  const json* rope = nullptr;
  if (c.present("rope_parameters")) {
    rope = &cfg.at("rope_parameters");
    if (!rope->is_object()) fail(dir, "config.json \"rope_parameters\" is not an object: " + rope->dump());
    hp.rope_theta = config_reader{*rope, dir}.get_float_or("rope_theta", hp.rope_theta);
  } else if (c.present("rope_scaling")) {
    rope = &cfg.at("rope_scaling");
    if (!rope->is_object()) fail(dir, "config.json \"rope_scaling\" is not an object: " + rope->dump());
  }
  if (!(hp.rope_theta > 0)) fail(dir, "rope_theta must be positive");
  if (rope) {
    config_reader r{*rope, dir};
    // transformers >= 4.45 says "rope_type"; older configs say "type".
    std::string type = r.get_string_or("rope_type", r.get_string_or("type", "default"));
    if (type == "default") {
      hp.rope_scaling = "none";
    } else if (type == "linear") {
      hp.rope_scaling = "linear";
      hp.rope_factor = r.get_float_or("factor", 0.0);
      if (!(hp.rope_factor > 0)) fail(dir, "rope scaling \"linear\" needs a positive \"factor\"");
    } else if (type == "llama3") {
      hp.rope_scaling = "llama3";
      hp.rope_factor = r.get_float_or("factor", 0.0);
      hp.rope_low_freq_factor = r.get_float_or("low_freq_factor", 0.0);
      hp.rope_high_freq_factor = r.get_float_or("high_freq_factor", 0.0);
      hp.rope_original_ctx = r.get_int_or("original_max_position_embeddings", 0);
      if (!(hp.rope_factor > 0) || !(hp.rope_low_freq_factor > 0) ||
          !(hp.rope_high_freq_factor > hp.rope_low_freq_factor) || hp.rope_original_ctx <= 0)
        fail(dir, "rope scaling \"llama3\" needs factor > 0, 0 < low_freq_factor < high_freq_factor and "
                  "original_max_position_embeddings > 0, got " + rope->dump());
    } else {
      fail(dir, "rope scaling type \"" + type + "\" is not supported (default, linear, llama3)");
    }
  }
  return hp;
}

// Expected canonical tensors, HF name -> {canonical name, shape}.
struct expected_tensor {
  std::string canonical;
  std::vector<int64_t> shape;
};

std::map<std::string, expected_tensor> expected_tensors(const llama_hparams& hp) {
  std::map<std::string, expected_tensor> m;
  const int64_t d = hp.d_model, q = hp.n_head * hp.head_dim, kv = hp.n_head_kv * hp.head_dim;
  m["model.embed_tokens.weight"] = {"token_embd.weight", {hp.n_vocab, d}};
  m["model.norm.weight"] = {"output_norm.weight", {d}};
  if (!hp.tied_embeddings) m["lm_head.weight"] = {"output.weight", {hp.n_vocab, d}};
  for (int64_t i = 0; i < hp.n_layer; ++i) {
    const std::string h = "model.layers." + std::to_string(i) + ".", b = "blk." + std::to_string(i) + ".";
    m[h + "input_layernorm.weight"] = {b + "attn_norm.weight", {d}};
    m[h + "self_attn.q_proj.weight"] = {b + "attn_q.weight", {q, d}};
    m[h + "self_attn.k_proj.weight"] = {b + "attn_k.weight", {kv, d}};
    m[h + "self_attn.v_proj.weight"] = {b + "attn_v.weight", {kv, d}};
    m[h + "self_attn.o_proj.weight"] = {b + "attn_output.weight", {d, q}};
    if (hp.attn_bias) {
      m[h + "self_attn.q_proj.bias"] = {b + "attn_q.bias", {q}};
      m[h + "self_attn.k_proj.bias"] = {b + "attn_k.bias", {kv}};
      m[h + "self_attn.v_proj.bias"] = {b + "attn_v.bias", {kv}};
    }
    m[h + "post_attention_layernorm.weight"] = {b + "ffn_norm.weight", {d}};
    m[h + "mlp.gate_proj.weight"] = {b + "ffn_gate.weight", {hp.d_ff, d}};
    m[h + "mlp.up_proj.weight"] = {b + "ffn_up.weight", {hp.d_ff, d}};
    m[h + "mlp.down_proj.weight"] = {b + "ffn_down.weight", {d, hp.d_ff}};
  }
  return m;
}

// Tensors some exporters include that carry nothing the model needs: RoPE
// frequency buffers of old transformers versions (recomputed from the config).
bool ignorable(const std::string& name) {
  static const std::regex re(R"(^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$|^model\.rotary_emb\.inv_freq$)");
  return std::regex_match(name, re);
}

std::string shape_str(const std::vector<int64_t>& s) {
  std::string r = "[";
  for (size_t i = 0; i < s.size(); ++i) r += (i ? ", " : "") + std::to_string(s[i]);
  return r + "]";
}

torch::Tensor to_torch(const safetensors_file& f, const st_tensor_info& t, torch::Dtype dtype) {
  torch::Dtype src;
  switch (t.dtype) {
    case st_dtype::f32: src = torch::kFloat32; break;
    case st_dtype::f16: src = torch::kFloat16; break;
    case st_dtype::bf16: src = torch::kBFloat16; break;
    case st_dtype::f64: src = torch::kFloat64; break;
    default:
      throw std::runtime_error(f.path() + ": tensor '" + t.name + "' has dtype " + st_dtype_name(t.dtype) +
                               "; LLM weights must be F32, F16, BF16 or F64");
  }
  // Copy out of the mapping: the data may be unaligned and the file is unmapped
  // when loading ends.
  torch::Tensor out = torch::empty(t.shape, torch::TensorOptions().dtype(src));
  if (t.n_bytes() > 0) std::memcpy(out.data_ptr(), f.data(t), size_t(t.n_bytes()));
  return src == dtype ? out : out.to(dtype);
}

}  // namespace

llm_checkpoint load_hf_llm(const std::string& dir_path, torch::Dtype dtype) {
  const std::string& dir = dir_path;
  const fs::path root(dir_path);
  if (!fs::is_directory(root)) fail(dir, "not a directory");
  if (!fs::exists(root / "config.json")) fail(dir, "no config.json");

  llm_checkpoint ck;
  ck.path = dir_path;
  ck.format = "hf-safetensors";
  ck.hp = parse_config(read_json(root / "config.json", dir), dir);

  // Which files to open: the shard index if there is one, else model.safetensors.
  std::vector<std::string> files;
  std::map<std::string, std::string> weight_map;  // tensor -> shard file (sharded only)
  const fs::path index_path = root / "model.safetensors.index.json";
  if (fs::exists(index_path)) {
    json idx = read_json(index_path, dir);
    if (!idx.is_object() || !idx.contains("weight_map") || !idx.at("weight_map").is_object())
      fail(dir, "model.safetensors.index.json has no \"weight_map\" object");
    std::set<std::string> seen;
    for (const auto& [name, file] : idx.at("weight_map").items()) {
      if (!file.is_string()) fail(dir, "weight_map entry of '" + name + "' is not a file name");
      const std::string f = file.get<std::string>();
      if (f.empty() || f.find('/') != std::string::npos || f == "." || f == "..")
        fail(dir, "weight_map entry of '" + name + "' names a file outside the directory: \"" + f + "\"");
      weight_map[name] = f;
      if (seen.insert(f).second) files.push_back(f);
    }
    if (files.empty()) fail(dir, "model.safetensors.index.json lists no tensors");
  } else if (fs::exists(root / "model.safetensors")) {
    files.push_back("model.safetensors");
  } else {
    fail(dir, "no model.safetensors or model.safetensors.index.json (only safetensors checkpoints are supported; "
              "convert pytorch_model.bin with transformers' save_pretrained(safe_serialization=True))");
  }

  const auto expected = expected_tensors(ck.hp);
  std::set<std::string> found;
  for (const std::string& fname : files) {
    const std::string fpath = (root / fname).string();
    if (!fs::exists(fpath)) fail(dir, "shard " + fname + " listed in model.safetensors.index.json is missing");
    safetensors_file f(fpath);
    for (const st_tensor_info& t : f.tensors()) {
      if (!weight_map.empty()) {
        auto w = weight_map.find(t.name);
        if (w == weight_map.end())
          fail(dir, "tensor '" + t.name + "' in " + fname + " is not listed in model.safetensors.index.json");
        if (w->second != fname)
          fail(dir, "tensor '" + t.name + "' is in " + fname + " but the index places it in " + w->second);
      }
      if (!found.insert(t.name).second) fail(dir, "tensor '" + t.name + "' appears in more than one shard");
      auto e = expected.find(t.name);
      if (e == expected.end()) {
        if (ignorable(t.name)) continue;
        // Tied checkpoints sometimes also store the (identical) head; it is not used.
        if (t.name == "lm_head.weight" && ck.hp.tied_embeddings) continue;
        fail(dir, "unexpected tensor '" + t.name + "' in " + fname + " (not part of a " + ck.hp.arch +
                      " model with this config.json)");
      }
      if (t.shape != e->second.shape)
        fail(dir, "tensor '" + t.name + "' in " + fname + " has shape " + shape_str(t.shape) + ", expected " +
                      shape_str(e->second.shape) + " from config.json");
      ck.weights[e->second.canonical] = to_torch(f, t, dtype);
    }
  }
  for (const auto& [name, file] : weight_map)
    if (!found.count(name)) fail(dir, "tensor '" + name + "' is listed in the index but missing from " + file);
  for (const auto& [hf_name, e] : expected)
    if (!found.count(hf_name)) fail(dir, "missing tensor '" + hf_name + "' (" + e.canonical + ")");
  return ck;
}

}  // namespace undertone::models
