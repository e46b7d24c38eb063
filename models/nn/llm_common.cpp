#include "models/nn/llm_common.hpp"

#include <filesystem>
#include <sstream>
#include <stdexcept>
#include <system_error>

#include "models/gguf.hpp"

namespace undertone::models {

torch::Dtype parse_llm_dtype(const std::string& s) {
  if (s == "fp32") return torch::kFloat32;
  if (s == "bf16") return torch::kBFloat16;
  if (s == "fp16") return torch::kFloat16;
  throw std::runtime_error("unknown dtype '" + s + "' (fp32, bf16 or fp16)");
}

namespace {
// Bytes of a weights file, or of the regular files directly inside a checkpoint directory.
uintmax_t weights_bytes(const std::filesystem::path& p) {
  std::error_code ec;
  if (!std::filesystem::is_directory(p, ec)) return std::filesystem::file_size(p, ec);
  uintmax_t n = 0;
  for (const auto& e : std::filesystem::directory_iterator(p, ec))
    if (e.is_regular_file(ec)) n += e.file_size(ec);
  return n;
}
}  // namespace

loaded_llm load_llm(const chat_llm_options& o, const std::string& who) {
  if (o.path.empty()) throw std::runtime_error(who + ": no model path given");
  llama_options lo;
  lo.device = torch::Device(o.device);
  lo.dtype = parse_llm_dtype(o.dtype);
  if (o.cpu_decode != "auto" && o.cpu_decode != "off")
    throw std::runtime_error("llm.cpu_decode must be auto or off, got '" + o.cpu_decode + "'");
  lo.cpu_decode = o.cpu_decode == "auto";
  if (lo.device.is_cuda() && !torch::cuda::is_available())
    throw std::runtime_error("llm.device is " + o.device + " but no CUDA device is available");
  loaded_llm m;
  m.model = llama_model::load(o.path, lo);
  const std::filesystem::path path(o.path);
  std::string file_name = path.filename().string();
  if (file_name.empty()) file_name = path.parent_path().filename().string();  // "dir/"
  m.name = file_name;
  if (std::filesystem::is_directory(path)) {
    m.tok = tokenizer::from_hf_dir(o.path);
  } else {
    gguf_file g(o.path);
    m.tok = tokenizer::from_gguf(g);
    m.name = g.get_string_or("general.name", m.name);
  }
  m.version = file_name + "|" + std::to_string(weights_bytes(path));
  std::string bos_text = m.tok->bos_id() >= 0 ? m.tok->piece(m.tok->bos_id()) : "<|begin_of_text|>";
  m.tmpl = chat_template::select(o.chat_template == "llama-3" ? "llama3" : o.chat_template,
                                 m.tok->chat_template_text(), bos_text);
  return m;
}

std::string describe_llm(const loaded_llm& m, const chat_llm_options& o) {
  const auto& hp = m.model->hparams();
  std::ostringstream os;
  os << m.name << " (" << hp.arch << ", " << hp.n_layer << " layers, d " << hp.d_model << ", " << hp.n_head << "/"
     << hp.n_head_kv << " heads, vocab " << hp.n_vocab << ", " << o.dtype << " on " << o.device << ", template "
     << m.tmpl.name() << ", KV " << o.kv_cells << " cells)";
  return os.str();
}

std::vector<int32_t> prompt_text_tokens(const tokenizer& tok, const std::string& text, bool first_in_context) {
  auto ids = tok.encode(text, true);
  if (first_in_context && tok.add_bos() && tok.bos_id() >= 0 && (ids.empty() || ids[0] != tok.bos_id()))
    ids.insert(ids.begin(), tok.bos_id());
  return ids;
}

// ---------------------------------------------------------------- answer_stream

answer_stream::answer_stream(const tokenizer& tok, const generation_request& req, int64_t budget,
                             std::vector<int32_t> history)
    : tok_(&tok), smp_(req.sampling), stops_(req.stop_strings), dec_(tok), history_(std::move(history)),
      budget_(budget) {
  res_.stop_reason = budget < req.max_tokens ? "context" : "max_tokens";
  done_ = budget <= 0;
}

std::string answer_stream::next(const float* logits, int64_t n_vocab) {
  if (done_) throw std::logic_error("answer_stream::next after the answer ended");
  last_ = smp_.sample(logits, n_vocab, history_);
  last_was_stop_ = tok_->is_stop(last_);
  if (last_was_stop_) {
    res_.stop_reason = "stop_token";
    done_ = true;
    return {};
  }
  res_.tokens.push_back(last_);
  history_.push_back(last_);
  std::string out = stops_.feed(dec_.push(last_));
  res_.text += out;
  if (stops_.stopped()) {
    res_.stop_reason = "stop_string";
    done_ = true;
  } else if (int64_t(res_.tokens.size()) >= budget_) {
    done_ = true;  // stop_reason already "context" or "max_tokens"
  }
  return out;
}

void answer_stream::cancel() {
  res_.stop_reason = "cancelled";
  done_ = true;
}

std::string answer_stream::finish() {
  done_ = true;
  if (finished_ || res_.stop_reason == "cancelled" || stops_.stopped()) {
    finished_ = true;
    return {};
  }
  finished_ = true;
  std::string out = stops_.feed(dec_.flush());
  if (stops_.stopped()) res_.stop_reason = "stop_string";  // the stop string ended in the held-back bytes
  out += stops_.flush();
  res_.text += out;
  return out;
}

}  // namespace undertone::models
