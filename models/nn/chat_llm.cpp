#include "models/chat_llm.hpp"

#include <chrono>
#include <filesystem>
#include <map>
#include <sstream>
#include <stdexcept>

#include "models/gguf.hpp"
#include "models/nn/llama.hpp"
#include "models/tokenizer.hpp"

namespace undertone::models {

namespace {
using clk = std::chrono::steady_clock;
double since(clk::time_point t) { return std::chrono::duration<double>(clk::now() - t).count(); }

torch::Dtype parse_dtype(const std::string& s) {
  if (s == "fp32") return torch::kFloat32;
  if (s == "bf16") return torch::kBFloat16;
  if (s == "fp16") return torch::kFloat16;
  throw std::runtime_error("unknown dtype '" + s + "' (fp32, bf16 or fp16)");
}

// Cache key of a prompt row: the token id, or -1 for an embedding row (never
// matched, so prefix reuse stops at the first embedding).
constexpr int64_t embedding_key = -1;
}  // namespace

struct chat_llm::impl {
  chat_llm_options opt;
  std::shared_ptr<llama_model> model;
  std::unique_ptr<tokenizer> tok;
  chat_template tmpl;
  kv_cache cache;
  std::map<int32_t, std::vector<int64_t>> cached;  // per sequence: keys of the rows in the KV cache
  std::string name;

  impl(const chat_llm_options& o, std::shared_ptr<llama_model> m, std::unique_ptr<tokenizer> t, chat_template ct)
      : opt(o), model(std::move(m)), tok(std::move(t)), tmpl(std::move(ct)), cache(model->make_cache(o.kv_cells)) {}
};

chat_llm::chat_llm(const chat_llm_options& o) {
  if (o.path.empty()) throw std::runtime_error("chat_llm: no model path given");
  llama_options lo;
  lo.device = torch::Device(o.device);
  lo.dtype = parse_dtype(o.dtype);
  if (lo.device.is_cuda() && !torch::cuda::is_available())
    throw std::runtime_error("llm.device is " + o.device + " but no CUDA device is available");
  auto model = llama_model::load(o.path, lo);
  std::unique_ptr<tokenizer> tok;
  std::string name = std::filesystem::path(o.path).filename().string();
  if (std::filesystem::is_directory(o.path)) {
    tok = tokenizer::from_hf_dir(o.path);
  } else {
    gguf_file g(o.path);
    tok = tokenizer::from_gguf(g);
    name = g.get_string_or("general.name", name);
  }
  std::string bos_text = tok->bos_id() >= 0 ? tok->piece(tok->bos_id()) : "<|begin_of_text|>";
  auto tmpl = chat_template::select(o.chat_template == "llama-3" ? "llama3" : o.chat_template,
                                    tok->chat_template_text(), bos_text);
  p_ = std::make_unique<impl>(o, std::move(model), std::move(tok), std::move(tmpl));
  p_->name = name;
}

chat_llm::~chat_llm() = default;

std::string chat_llm::describe() const {
  const auto& hp = p_->model->hparams();
  std::ostringstream os;
  os << p_->name << " (" << hp.arch << ", " << hp.n_layer << " layers, d " << hp.d_model << ", " << hp.n_head << "/"
     << hp.n_head_kv << " heads, vocab " << hp.n_vocab << ", " << p_->opt.dtype << " on " << p_->opt.device
     << ", template " << p_->tmpl.name() << ", KV " << p_->opt.kv_cells << " cells)";
  return os.str();
}

int64_t chat_llm::d_model() const { return p_->model->d_model(); }
const chat_template& chat_llm::templ() const { return p_->tmpl; }

std::string chat_llm::format_chat(const std::vector<chat_message>& messages) const {
  return p_->tmpl.apply(messages, true);
}

std::vector<int32_t> chat_llm::tokenize(const std::string& text) const { return p_->tok->encode(text, true); }

std::vector<float> chat_llm::embed_tokens(const std::vector<int32_t>& ids) const {
  auto t = torch::tensor(std::vector<int64_t>(ids.begin(), ids.end()), torch::kInt64).to(p_->model->device());
  auto e = p_->model->embed_tokens(t).to(torch::kCPU, torch::kFloat32).contiguous();
  return std::vector<float>(e.data_ptr<float>(), e.data_ptr<float>() + e.numel());
}

void chat_llm::reset(int32_t seq) {
  p_->cache.remove(seq);
  p_->cached.erase(seq);
}

generation_result chat_llm::generate(int32_t seq, const std::vector<prompt_part>& prompt, const generation_request& req,
                                     const std::function<bool(const std::string&)>& on_text) {
  auto t_start = clk::now();
  auto& P = *p_;
  const int64_t d = P.model->d_model();

  // 1. Prompt rows: keys (token id or embedding marker) and the batch content.
  std::vector<int64_t> keys;
  std::vector<torch::Tensor> embd_rows;  // per key: defined for embedding rows
  for (size_t i = 0; i < prompt.size(); ++i) {
    const auto& part = prompt[i];
    if (part.n_embeddings > 0) {
      if (int64_t(part.embeddings.size()) != part.n_embeddings * d)
        throw std::runtime_error("prompt part " + std::to_string(i) + ": " + std::to_string(part.embeddings.size()) +
                                 " floats is not " + std::to_string(part.n_embeddings) + " x d_model " +
                                 std::to_string(d));
      auto e = torch::from_blob(const_cast<float*>(part.embeddings.data()), {part.n_embeddings, d}, torch::kFloat32);
      for (int64_t r = 0; r < part.n_embeddings; ++r) keys.push_back(embedding_key), embd_rows.push_back(e[r]);
    } else {
      auto ids = P.tok->encode(part.text, true);
      if (i == 0 && P.tok->add_bos() && P.tok->bos_id() >= 0 && (ids.empty() || ids[0] != P.tok->bos_id())) {
        keys.push_back(P.tok->bos_id());
        embd_rows.emplace_back();
      }
      for (auto id : ids) keys.push_back(id), embd_rows.emplace_back();
    }
  }
  if (keys.empty()) throw std::runtime_error("empty prompt");
  const int64_t n_prompt = int64_t(keys.size());
  if (n_prompt >= P.opt.context_tokens)
    throw std::runtime_error("prompt of " + std::to_string(n_prompt) + " rows does not fit llm.context_tokens = " +
                             std::to_string(P.opt.context_tokens));

  // 2. Reuse the cached prefix; always recompute at least the last prompt row
  // (its logits start the answer).
  auto& old = P.cached[seq];
  int64_t keep = 0;
  while (keep < int64_t(old.size()) && keep < n_prompt - 1 && old[size_t(keep)] == keys[size_t(keep)] &&
         keys[size_t(keep)] != embedding_key)
    ++keep;
  P.cache.truncate(seq, keep);
  old.resize(size_t(keep));

  generation_result res;
  res.prompt_tokens = n_prompt;
  res.reused_tokens = keep;

  // 3. Prefill the rest in chunks of max_batch_rows; logits of the last row only.
  torch::Tensor logits;
  for (int64_t start = keep; start < n_prompt; start += P.opt.max_batch_rows) {
    int64_t end = std::min(n_prompt, start + P.opt.max_batch_rows);
    llm_batch b;
    for (int64_t r = start; r < end; ++r) {
      bool last = r == n_prompt - 1;
      if (keys[size_t(r)] == embedding_key) b.add_embedding(embd_rows[size_t(r)], seq, r, last);
      else b.add_token(keys[size_t(r)], seq, r, last);
    }
    logits = P.model->step(b, P.cache);
    old.insert(old.end(), keys.begin() + start, keys.begin() + end);
  }
  res.prefill_s = since(t_start);

  // 4. Decode.
  sampler smp(req.sampling);
  stop_matcher stops(req.stop_strings);
  token_stream_decoder dec(*P.tok);
  std::vector<int32_t> history(keys.begin(), keys.end());  // embedding rows count as -1: never penalized
  int64_t pos = n_prompt;
  const int64_t budget = std::min(req.max_tokens, P.opt.context_tokens - n_prompt);
  auto emit = [&](const std::string& piece) {
    std::string out = stops.feed(piece);
    if (!out.empty()) {
      if (res.first_token_s == 0) res.first_token_s = since(t_start);
      res.text += out;
      if (on_text && !on_text(out)) return false;
    }
    return true;
  };
  auto t_first = clk::now();
  res.stop_reason = budget < req.max_tokens ? "context" : "max_tokens";
  for (int64_t i = 0; i < budget; ++i) {
    auto row = logits[logits.size(0) - 1].to(torch::kCPU).contiguous();
    int32_t next = smp.sample(row.data_ptr<float>(), row.size(0), history);
    if (i == 0) t_first = clk::now();
    if (P.tok->is_stop(next)) {
      res.stop_reason = "stop_token";
      break;
    }
    res.tokens.push_back(next);
    history.push_back(next);
    if (!emit(dec.push(next))) {
      res.stop_reason = "cancelled";
      break;
    }
    if (stops.stopped()) {
      res.stop_reason = "stop_string";
      break;
    }
    if (i + 1 == budget) break;  // no need to compute logits we will not use
    llm_batch b;
    b.add_token(next, seq, pos, true);
    logits = P.model->step(b, P.cache);
    old.push_back(next);
    ++pos;
  }
  if (res.stop_reason != "cancelled" && res.stop_reason != "stop_string") {
    emit(dec.flush());
    std::string tail = stops.flush();
    if (!tail.empty()) {
      res.text += tail;
      if (on_text) on_text(tail);
    }
  }
  res.decode_s = since(t_first);
  if (res.first_token_s == 0) res.first_token_s = since(t_start);
  return res;
}

}  // namespace undertone::models
