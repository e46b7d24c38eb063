#include "models/model_info.hpp"

#include <filesystem>
#include <fstream>
#include <sstream>

#include <nlohmann/json.hpp>

#include "models/ct2_model.hpp"
#include "models/gguf.hpp"

namespace fs = std::filesystem;

namespace undertone::models {
namespace {

std::string human_bytes(uint64_t b) {
  std::ostringstream os;
  os.precision(3);
  if (b >= (1ull << 30)) os << double(b) / double(1ull << 30) << " GiB";
  else if (b >= (1ull << 20)) os << double(b) / double(1ull << 20) << " MiB";
  else os << b << " B";
  return os.str();
}

std::string human_count(int64_t n) {
  std::ostringstream os;
  os.precision(4);
  if (n >= 1000000000) os << double(n) / 1e9 << " B";
  else if (n >= 1000000) os << double(n) / 1e6 << " M";
  else os << n;
  return os.str();
}

}  // namespace

std::string model_summary::to_string() const {
  std::ostringstream os;
  os << path << "\n  format: " << format << "\n  file size: " << human_bytes(file_bytes) << " (" << file_bytes
     << " bytes)\n  parameters: " << human_count(parameters) << " (" << parameters << ")\n";
  size_t w = 0;
  for (const auto& f : facts) w = std::max(w, f.first.size());
  for (const auto& [k, v] : facts) os << "  " << k << ": " << std::string(w - k.size(), ' ') << v << "\n";
  return os.str();
}

model_summary summarize_gguf(const std::string& path) {
  gguf_file g(path);
  model_summary s;
  s.path = path;
  s.format = "gguf v" + std::to_string(g.version());
  s.file_bytes = g.file_size();
  std::string arch = g.get_string_or("general.architecture", "?");
  auto key = [&](const std::string& k) { return arch + "." + k; };
  auto add = [&](const std::string& name, const std::string& v) { s.facts.emplace_back(name, v); };
  auto add_int = [&](const std::string& name, const std::string& k) {
    if (g.has(k)) add(name, std::to_string(g.get_int(k)));
  };
  add("name", g.get_string_or("general.name", "?"));
  add("architecture", arch);
  add_int("layers", key("block_count"));
  add_int("width (d_model)", key("embedding_length"));
  add_int("ffn width", key("feed_forward_length"));
  add_int("attention heads", key("attention.head_count"));
  add_int("kv heads", key("attention.head_count_kv"));
  add_int("trained context", key("context_length"));
  if (g.has(key("rope.freq_base"))) add("rope theta", std::to_string(g.get_float(key("rope.freq_base"))));
  if (g.has(key("attention.layer_norm_rms_epsilon")))
    add("rms eps", std::to_string(g.get_float(key("attention.layer_norm_rms_epsilon"))));
  if (g.has("tokenizer.ggml.tokens")) add("vocabulary", std::to_string(g.get_strings("tokenizer.ggml.tokens").size()) + " tokens");
  add("tokenizer", g.get_string_or("tokenizer.ggml.model", "?") + " / pre " + g.get_string_or("tokenizer.ggml.pre", "?"));
  if (g.has("tokenizer.ggml.merges")) add("merges", std::to_string(g.get_strings("tokenizer.ggml.merges").size()));
  for (const char* sk : {"bos", "eos", "padding", "unknown"}) {
    std::string k = std::string("tokenizer.ggml.") + sk + "_token_id";
    if (g.has(k)) add(std::string(sk) + " id", std::to_string(g.get_int(k)));
  }
  add("chat template", g.has("tokenizer.chat_template") ? "present (" + std::to_string(g.get_string("tokenizer.chat_template").size()) + " chars)" : "absent");
  std::map<std::string, int> types;
  for (const auto& t : g.tensors()) {
    s.parameters += t.n_elements();
    types[ggml_type_name(t.type)]++;
  }
  std::string ts;
  for (const auto& [t, n] : types) ts += (ts.empty() ? "" : ", ") + std::to_string(n) + " " + t;
  add("tensors", std::to_string(g.tensors().size()) + " (" + ts + ")");
  return s;
}

model_summary summarize_ct2_whisper(const std::string& dir) {
  ct2_model m(dir);
  model_summary s;
  s.path = dir;
  s.format = "ctranslate2 v" + std::to_string(m.binary_version()) + " (" + m.spec_name() + " rev " +
             std::to_string(m.spec_revision()) + ")";
  s.file_bytes = fs::file_size(fs::path(dir) / "model.bin");
  auto add = [&](const std::string& name, const std::string& v) { s.facts.emplace_back(name, v); };
  int enc_layers = 0, dec_layers = 0;
  while (m.find("encoder/layer_" + std::to_string(enc_layers) + "/ffn/layer_norm/gamma")) ++enc_layers;
  while (m.find("decoder/layer_" + std::to_string(dec_layers) + "/ffn/layer_norm/gamma")) ++dec_layers;
  add("encoder layers", std::to_string(enc_layers));
  add("decoder layers", std::to_string(dec_layers));
  if (const auto* pe = m.find("encoder/position_encodings/encodings"); pe && pe->shape.size() == 2) {
    add("width (d_model)", std::to_string(pe->shape[1]));
    add("encoder positions", std::to_string(pe->shape[0]) + " frames (" + std::to_string(pe->shape[0] / 50) + " s)");
  }
  if (m.find("encoder/num_heads")) add("attention heads", std::to_string(m.scalar_int("encoder/num_heads")));
  if (const auto* c = m.find("encoder/conv1/weight"); c && c->shape.size() == 3)
    add("mel bins", std::to_string(c->shape[1]));
  if (const auto* e = m.find("decoder/embeddings/weight"); e && !e->shape.empty())
    add("vocabulary", std::to_string(e->shape[0]) + " tokens");
  std::map<std::string, int> types;
  for (const auto& v : m.variables()) {
    s.parameters += v.n_elements();
    types[ct2_dtype_name(v.dtype)]++;
  }
  std::string ts;
  for (const auto& [t, n] : types) ts += (ts.empty() ? "" : ", ") + std::to_string(n) + " " + t;
  add("variables", std::to_string(m.variables().size()) + " (" + ts + ")");
  return s;
}

model_summary summarize_any(const std::string& path) {
  if (fs::is_regular_file(path) && path.size() > 5 && path.substr(path.size() - 5) == ".gguf") return summarize_gguf(path);
  if (fs::is_directory(path) && fs::exists(fs::path(path) / "model.bin")) return summarize_ct2_whisper(path);
  throw std::runtime_error(path + ": not a recognized checkpoint (.gguf file or CTranslate2 directory)");
}

}  // namespace undertone::models
