#include "models/chat_llm.hpp"

#include <map>
#include <stdexcept>

#include "models/nn/llama.hpp"
#include "models/nn/llm_common.hpp"
#include "models/tokenizer.hpp"

namespace undertone::models {

namespace {
// Cache key of a prompt row: the token id, or -1 for an embedding row (never
// matched, so prefix reuse stops at the first embedding).
constexpr int64_t embedding_key = -1;
}  // namespace

struct chat_llm::impl {
  chat_llm_options opt;
  loaded_llm m;
  llama_model* model;  // m.model
  tokenizer* tok;      // m.tok
  kv_cache cache;
  std::map<int32_t, std::vector<int64_t>> cached;  // per sequence: keys of the rows in the KV cache

  impl(const chat_llm_options& o, loaded_llm lm)
      : opt(o), m(std::move(lm)), model(m.model.get()), tok(m.tok.get()), cache(model->make_cache(o.kv_cells)) {}
};

chat_llm::chat_llm(const chat_llm_options& o) : p_(std::make_unique<impl>(o, load_llm(o, "chat_llm"))) {}

chat_llm::~chat_llm() = default;

std::string chat_llm::describe() const { return describe_llm(p_->m, p_->opt); }

int64_t chat_llm::d_model() const { return p_->model->d_model(); }
const chat_template& chat_llm::templ() const { return p_->m.tmpl; }

std::string chat_llm::format_chat(const std::vector<chat_message>& messages) const {
  return p_->m.tmpl.apply(messages, true);
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
  auto t_start = llm_clock::now();
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
      for (auto id : prompt_text_tokens(*P.tok, part.text, i == 0)) keys.push_back(id), embd_rows.emplace_back();
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
  res.prefill_s = seconds_since(t_start);

  // 4. Decode.
  int64_t pos = n_prompt;
  answer_stream ans(*P.tok, req, std::min(req.max_tokens, P.opt.context_tokens - n_prompt),
                    std::vector<int32_t>(keys.begin(), keys.end()));  // embedding rows count as -1: never penalized
  auto t_first = llm_clock::now();
  bool first = true;
  while (!ans.done()) {
    auto row = logits[logits.size(0) - 1].to(torch::kCPU).contiguous();
    std::string out = ans.next(row.data_ptr<float>(), row.size(0));
    if (first) t_first = llm_clock::now(), first = false;
    if (!out.empty()) {
      if (ans.result().first_token_s == 0) ans.result().first_token_s = seconds_since(t_start);
      if (on_text && !on_text(out)) {
        ans.cancel();
        break;
      }
    }
    if (ans.done()) break;  // no need to compute logits we will not use
    llm_batch b;
    b.add_token(ans.last_token(), seq, pos, true);
    logits = P.model->step(b, P.cache);
    old.push_back(ans.last_token());
    ++pos;
  }
  std::string tail = ans.finish();
  if (!tail.empty() && on_text) on_text(tail);
  generation_result out = std::move(ans.result());
  out.prompt_tokens = res.prompt_tokens;
  out.reused_tokens = res.reused_tokens;
  out.prefill_s = res.prefill_s;
  out.decode_s = seconds_since(t_first);
  if (out.first_token_s == 0) out.first_token_s = seconds_since(t_start);
  return out;
}

}  // namespace undertone::models
