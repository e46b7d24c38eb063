#include "models/nn/alignment.hpp"

#include <fcntl.h>
#include <openssl/sha.h>
#include <unistd.h>

#include <ATen/ATen.h>
#include <torch/csrc/autograd/generated/variable_factories.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <random>
#include <set>
#include <sstream>
#include <stdexcept>
#include <tuple>

#include <nlohmann/json.hpp>

#include "models/audio.hpp"
#include "models/gguf.hpp"
#include "models/safetensors.hpp"
#include "models/train_metrics.hpp"

namespace undertone::models {

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

std::string sha256_hex(const std::string& s) {
  unsigned char md[SHA256_DIGEST_LENGTH];
  SHA256(reinterpret_cast<const unsigned char*>(s.data()), s.size(), md);
  static const char* hex = "0123456789abcdef";
  std::string r;
  for (unsigned char c : md) {
    r += hex[c >> 4];
    r += hex[c & 15];
  }
  return r;
}

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

std::string file_identity(const fs::path& p) {
  auto mt = fs::last_write_time(p).time_since_epoch();
  return p.filename().string() + "|" + std::to_string(fs::file_size(p)) + "|" +
         std::to_string(std::chrono::duration_cast<std::chrono::nanoseconds>(mt).count());
}

void fsync_path(const fs::path& p, bool directory) {
  int fd = ::open(p.c_str(), directory ? (O_RDONLY | O_DIRECTORY) : O_RDONLY);
  if (fd < 0) throw std::runtime_error("cannot open " + p.string() + " to fsync it");
  int rc = ::fsync(fd);
  ::close(fd);
  if (rc != 0) throw std::runtime_error("fsync failed on " + p.string());
}

/// Writes text to `path` atomically: temp file in the same directory, fsync, rename, fsync dir.
void write_text_atomic(const fs::path& path, const std::string& text) {
  fs::path tmp = path;
  tmp += ".tmp-" + std::to_string(::getpid());
  {
    std::ofstream f(tmp, std::ios::binary | std::ios::trunc);
    f << text;
    f.flush();
    if (!f) throw std::runtime_error("cannot write " + tmp.string() + " (disk full?)");
  }
  fsync_path(tmp, false);
  fs::rename(tmp, path);
  fsync_path(path.has_parent_path() ? path.parent_path() : fs::path("."), true);
}

std::string read_text(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  if (!f) throw std::runtime_error("cannot read " + p.string());
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

/// Named float32 CPU tensors -> safetensors (atomic).
void write_tensors(const std::string& path, const std::vector<std::pair<std::string, torch::Tensor>>& named,
                   const std::map<std::string, std::string>& meta) {
  std::vector<torch::Tensor> keep;
  std::vector<st_tensor_view> views;
  for (const auto& [name, t] : named) {
    torch::Tensor c = t.detach().to(torch::kCPU, torch::kFloat32).contiguous();
    keep.push_back(c);
    views.push_back({name, st_dtype::f32, c.sizes().vec(), c.data_ptr()});
  }
  write_safetensors(path, views, meta);
}

/// All tensors of a safetensors file as float32 CPU tensors.
std::map<std::string, torch::Tensor> read_tensors(const std::string& path, std::map<std::string, std::string>* meta) {
  safetensors_file f(path);
  if (meta) *meta = f.metadata();
  std::map<std::string, torch::Tensor> r;
  for (const auto& t : f.tensors()) {
    torch::Tensor x = torch::empty(t.shape, torch::kFloat32);
    f.to_float32(t, x.data_ptr<float>());
    r.emplace(t.name, x);
  }
  return r;
}

torch::Tensor ids_tensor(const std::vector<int32_t>& ids, torch::Device dev) {
  std::vector<int64_t> v(ids.begin(), ids.end());
  return torch::tensor(v, torch::kLong).to(dev);
}

}  // namespace

// ---------------------------------------------------------------- names and prompts

std::string to_string(alignment_task t) {
  switch (t) {
    case alignment_task::semantic: return "semantic";
    case alignment_task::emotion: return "emotion";
    case alignment_task::emotion_question: return "emotion_question";
  }
  return "?";
}

alignment_task parse_alignment_task(const std::string& s) {
  if (s == "semantic") return alignment_task::semantic;
  if (s == "emotion") return alignment_task::emotion;
  if (s == "emotion_question") return alignment_task::emotion_question;
  throw std::invalid_argument("unknown alignment task '" + s + "' (semantic, emotion, emotion_question)");
}

std::string to_string(alignment_stage s) {
  switch (s) {
    case alignment_stage::semantic: return "semantic";
    case alignment_stage::emotion: return "emotion";
    case alignment_stage::both: return "both";
  }
  return "?";
}

alignment_stage parse_alignment_stage(const std::string& s) {
  if (s == "semantic") return alignment_stage::semantic;
  if (s == "emotion") return alignment_stage::emotion;
  if (s == "both") return alignment_stage::both;
  throw std::invalid_argument("unknown stage '" + s + "' (semantic, emotion, both)");
}

std::vector<alignment_task> stage_tasks(alignment_stage s) {
  switch (s) {
    case alignment_stage::semantic: return {alignment_task::semantic};
    case alignment_stage::emotion: return {alignment_task::emotion, alignment_task::emotion_question};
    case alignment_stage::both:
      return {alignment_task::semantic, alignment_task::emotion, alignment_task::emotion_question};
  }
  return {};
}

std::string emotion_cue(emotion_label e) {
  switch (e) {
    case emotion_label::unlabeled:
      throw std::invalid_argument("emotion_cue: an unlabeled utterance has no emotion to state");
    case emotion_label::whisper: return "The speaker is whispering.";
    default: return "The speaker sounds " + to_string(e) + ".";
  }
}

std::string teacher_user_text(alignment_task task, const std::string& transcript, emotion_label emotion) {
  switch (task) {
    case alignment_task::semantic: return transcript;
    case alignment_task::emotion: return "[" + emotion_cue(emotion) + "] " + transcript;
    case alignment_task::emotion_question:
      return "[" + emotion_cue(emotion) + "] " + transcript + "\n" + k_emotion_question;
  }
  return transcript;
}

std::string llm_identity(const std::string& path) {
  fs::path p(path);
  if (!fs::exists(p)) throw std::runtime_error("LLM checkpoint " + path + " does not exist");
  if (!fs::is_directory(p)) return file_identity(p);
  std::vector<std::string> parts;
  for (const auto& e : fs::directory_iterator(p))
    if (e.is_regular_file()) parts.push_back(file_identity(e.path()));
  std::sort(parts.begin(), parts.end());
  std::string r;
  for (const auto& s : parts) r += s + ";";
  return r;
}

alignment_llm alignment_llm::load(const std::string& path, const llama_options& opt,
                                  const std::string& chat_template_name) {
  alignment_llm L;
  L.path = path;
  L.identity = llm_identity(path);
  L.model = llama_model::load(path, opt);
  if (fs::is_directory(path)) {
    L.tok = tokenizer::from_hf_dir(path);
  } else {
    gguf_file g(path);
    L.tok = tokenizer::from_gguf(g);
  }
  std::string bos_text = L.tok->bos_id() >= 0 ? L.tok->piece(L.tok->bos_id()) : "<|begin_of_text|>";
  L.templ = chat_template::select(chat_template_name == "llama-3" ? "llama3" : chat_template_name,
                                  L.tok->chat_template_text(), bos_text);
  const char* eot = L.templ.format() == chat_format::chatml ? "<|im_end|>" : "<|eot_id|>";
  auto id = L.tok->token_id(eot);
  if (!id) throw std::runtime_error("LLM " + path + ": tokenizer has no " + eot + " token for its chat format");
  L.end_of_turn = *id;
  return L;
}

namespace {
// Chatml's text needs BOS added by the caller (llama3's text starts with it).
std::vector<int32_t> encode_prompt(const alignment_llm& L, const std::string& text, bool at_start) {
  std::vector<int32_t> ids;
  if (at_start && L.templ.format() == chat_format::chatml && L.tok->add_bos() && L.tok->bos_id() >= 0)
    ids.push_back(L.tok->bos_id());
  auto t = L.tok->encode(text, true);
  ids.insert(ids.end(), t.begin(), t.end());
  return ids;
}
}  // namespace

std::vector<int32_t> alignment_llm::teacher_prompt(alignment_task task, const std::string& transcript,
                                                   emotion_label emotion) const {
  return text_prompt(teacher_user_text(task, transcript, emotion));
}

std::vector<int32_t> alignment_llm::text_prompt(const std::string& user_text) const {
  return encode_prompt(*this, templ.apply({{"user", user_text}}, true), true);
}

std::pair<std::vector<int32_t>, std::vector<int32_t>> alignment_llm::student_prompt(alignment_task task) const {
  static const std::string sentinel = "\x1f\x1eSPEECH\x1e\x1f";
  std::string content = sentinel;
  if (task == alignment_task::emotion_question) content += std::string("\n") + k_emotion_question;
  std::string text = templ.apply({{"user", content}}, true);
  auto at = text.find(sentinel);
  if (at == std::string::npos) throw std::logic_error("student_prompt: chat template dropped the speech placeholder");
  return {encode_prompt(*this, text.substr(0, at), true),
          encode_prompt(*this, text.substr(at + sentinel.size()), false)};
}

// ---------------------------------------------------------------- teacher

bool teacher_request::operator<(const teacher_request& o) const {
  return std::tie(task, transcript, emotion) < std::tie(o.task, o.transcript, o.emotion);
}
bool teacher_request::operator==(const teacher_request& o) const {
  return task == o.task && transcript == o.transcript && emotion == o.emotion;
}

teacher_cache::teacher_cache(const std::string& dir, std::string identity, int64_t max_tokens)
    : file_((fs::path(dir) / "teacher.jsonl").string()), identity_(std::move(identity)), max_tokens_(max_tokens) {
  fs::create_directories(dir);
  std::ifstream in(file_);
  std::string line;
  while (std::getline(in, line)) {
    if (line.empty()) continue;
    auto j = json::parse(line, nullptr, false);
    if (j.is_discarded() || !j.is_object() || !j.contains("key")) continue;  // torn line after a crash
    teacher_response r;
    r.tokens = j.value("tokens", std::vector<int32_t>{});
    r.text = j.value("response", "");
    r.ended = j.value("ended", false);
    entries_.emplace(j["key"].get<std::string>(), std::move(r));
  }
}

std::string teacher_cache::key(const teacher_request& r) const {
  const bool sem = r.task == alignment_task::semantic;
  return sha256_hex(identity_ + "\n" + k_alignment_template_version + "\n" + to_string(r.task) + "\n" +
                    (sem ? std::string() : to_string(r.emotion)) + "\n" + std::to_string(max_tokens_) + "\n" +
                    r.transcript);
}

std::optional<teacher_response> teacher_cache::find(const teacher_request& r) const {
  auto it = entries_.find(key(r));
  if (it == entries_.end()) return std::nullopt;
  return it->second;
}

void teacher_cache::put(const teacher_request& r, const teacher_response& resp) {
  std::string k = key(r);
  if (!entries_.emplace(k, resp).second) return;
  json j = {{"key", k},
            {"template", k_alignment_template_version},
            {"task", to_string(r.task)},
            {"emotion", r.task == alignment_task::semantic ? std::string() : to_string(r.emotion)},
            {"transcript", r.transcript},
            {"max_tokens", max_tokens_},
            {"response", utf8_sanitize(resp.text)},  // an answer cut mid-character is not valid UTF-8
            {"ended", resp.ended},
            {"tokens", resp.tokens}};
  // A crash mid-append leaves a torn last line without its newline; start on a
  // fresh line so this answer is not glued to (and discarded with) it.
  bool need_newline = false;
  {
    std::ifstream last(file_, std::ios::binary | std::ios::ate);
    if (last && last.tellg() > 0) {
      last.seekg(-1, std::ios::end);
      char c = 0;
      last.get(c);
      need_newline = c != '\n';
    }
  }
  std::ofstream out(file_, std::ios::app | std::ios::binary);
  if (need_newline) out << "\n";
  // An answer cut at the token cap can end inside a multi-byte character; the
  // ids are what training uses, so the readable text gets U+FFFD there.
  out << j.dump(-1, ' ', false, json::error_handler_t::replace) << "\n";
  out.flush();
  if (!out) throw std::runtime_error("teacher cache " + file_ + ": append failed (disk full?)");
}

std::vector<teacher_response> greedy_generate(const alignment_llm& llm, const std::vector<prompt_input>& prompts,
                                              int64_t max_tokens, int64_t batch_size) {
  torch::NoGradGuard no_grad;
  std::vector<teacher_response> out(prompts.size());
  const size_t bs = size_t(std::max<int64_t>(1, batch_size));
  for (size_t b0 = 0; b0 < prompts.size(); b0 += bs) {
    const size_t n = std::min(prompts.size() - b0, bs);
    int64_t cells = 0;
    llm_batch batch;
    std::vector<int64_t> pos(n);
    std::vector<size_t> active(n);
    for (size_t i = 0; i < n; ++i) {
      const auto& p = prompts[b0 + i];
      const int64_t ne = p.embeds.defined() ? p.embeds.size(0) : 0;
      const int64_t len = int64_t(p.pre.size()) + ne + int64_t(p.post.size());
      if (len == 0) throw std::invalid_argument("greedy_generate: empty prompt");
      std::vector<int64_t> pre(p.pre.begin(), p.pre.end()), post(p.post.begin(), p.post.end());
      batch.add_tokens(pre, int32_t(i), 0, ne == 0 && post.empty());
      if (ne) batch.add_embeddings(p.embeds, int32_t(i), int64_t(pre.size()), post.empty());
      batch.add_tokens(post, int32_t(i), int64_t(pre.size()) + ne, true);
      cells += len + max_tokens;
      pos[i] = len;
      active[i] = i;
    }
    kv_cache cache = llm.model->make_cache(cells);
    torch::Tensor logits = llm.model->step(batch, cache);
    while (!active.empty()) {
      torch::Tensor next = logits.argmax(-1).to(torch::kCPU);
      const int64_t* nx = next.data_ptr<int64_t>();
      batch.clear();
      std::vector<size_t> still;
      for (size_t k = 0; k < active.size(); ++k) {
        const size_t i = active[k];
        const int32_t t = int32_t(nx[k]);
        auto& r = out[b0 + i];
        if (llm.tok->is_stop(t)) {
          r.ended = true;
          continue;
        }
        r.tokens.push_back(t);
        if (int64_t(r.tokens.size()) >= max_tokens) continue;
        batch.add_token(t, int32_t(i), pos[i]++, true);
        still.push_back(i);
      }
      active = std::move(still);
      if (!active.empty()) logits = llm.model->step(batch, cache);
    }
    for (size_t i = 0; i < n; ++i) out[b0 + i].text = utf8_sanitize(llm.tok->decode(out[b0 + i].tokens));
  }
  return out;
}

std::vector<teacher_response> generate_teacher(const alignment_llm& llm, const std::vector<teacher_request>& reqs,
                                               const teacher_options& opt) {
  std::vector<prompt_input> prompts(reqs.size());
  for (size_t i = 0; i < reqs.size(); ++i)
    prompts[i].pre = llm.teacher_prompt(reqs[i].task, reqs[i].transcript, reqs[i].emotion);
  return greedy_generate(llm, prompts, opt.max_tokens, opt.batch);
}

std::vector<teacher_response> teacher_responses(const alignment_llm& llm, teacher_cache& cache,
                                                const std::vector<teacher_request>& reqs, const teacher_options& opt,
                                                teacher_stats* stats,
                                                const std::function<void(size_t, size_t)>& progress) {
  teacher_stats st;
  st.requests = reqs.size();
  std::vector<teacher_request> missing;
  std::set<std::string> seen;
  for (const auto& r : reqs) {
    if (cache.find(r)) {
      ++st.hits;
      continue;
    }
    if (seen.insert(cache.key(r)).second) missing.push_back(r);
  }
  auto t0 = std::chrono::steady_clock::now();
  const size_t bs = size_t(std::max<int64_t>(1, opt.batch));
  for (size_t b0 = 0; b0 < missing.size(); b0 += bs) {
    std::vector<teacher_request> part(missing.begin() + long(b0),
                                      missing.begin() + long(std::min(missing.size(), b0 + bs)));
    auto got = generate_teacher(llm, part, opt);
    for (size_t i = 0; i < part.size(); ++i) {
      cache.put(part[i], got[i]);
      st.tokens += int64_t(got[i].tokens.size()) + (got[i].ended ? 1 : 0);
    }
    st.generated += part.size();
    if (progress) progress(std::min(missing.size(), b0 + bs), missing.size());
  }
  st.seconds = seconds_since(t0);
  std::vector<teacher_response> out;
  out.reserve(reqs.size());
  for (const auto& r : reqs) out.push_back(*cache.find(r));
  if (stats) *stats = st;
  return out;
}

torch::Dtype llm_dtype_of(const std::string& s, const std::string& what) {
  if (s == "fp32") return torch::kFloat32;
  if (s == "bf16") return torch::kBFloat16;
  throw std::invalid_argument(what + " '" + s + "' is not fp32 or bf16");
}

std::vector<teacher_response> teacher_responses_in_dtype(
    const alignment_llm& llm, const llama_options& llm_options, const std::string& teacher_dtype,
    const std::string& chat_template_name, teacher_cache& cache, const std::vector<teacher_request>& reqs,
    const teacher_options& opt, teacher_stats* stats, const std::function<void(size_t, size_t)>& progress,
    const std::string& what_prefix) {
  size_t missing = 0;
  for (const auto& q : reqs) missing += !cache.find(q);
  // A second LLM costs its weights in memory and seconds to load: only when
  // something must be generated and the serving dtype is not the teacher's.
  std::optional<alignment_llm> teacher_llm;
  const alignment_llm* teacher = &llm;
  if (missing) {
    const auto td = llm_dtype_of(teacher_dtype, what_prefix + "teacher dtype");
    if (td != llm_options.dtype) {
      llama_options to = llm_options;
      to.dtype = td;
      teacher_llm = alignment_llm::load(llm.path, to, chat_template_name);
      teacher = &*teacher_llm;
    }
  }
  return teacher_responses(*teacher, cache, reqs, opt, stats, progress);
}

// ---------------------------------------------------------------- features

feature_store::feature_store(const std::string& dir, const mel_config& mel, std::shared_ptr<whisper_encoder> encoder,
                             std::string encoder_identity, bool encoder_outputs)
    : dir_((fs::path(dir) / "features").string()),
      mel_(mel),
      encoder_(std::move(encoder)),
      encoder_identity_(std::move(encoder_identity)),
      encoder_outputs_(encoder_outputs) {
  if (encoder_outputs_ && !encoder_)
    throw std::invalid_argument("feature_store: encoder outputs requested but no encoder given");
  fs::create_directories(dir_);
}

void feature_store::prepare(const std::vector<utterance>& utts, const std::function<void(size_t, size_t)>& progress) {
  feats_.clear();
  feats_.reserve(utts.size());
  hits_ = 0;
  std::string what = "feat-v1\n" + mel_.to_string();
  if (encoder_outputs_) {
    const auto& o = encoder_->options();
    what += "\nencoder " + encoder_identity_ + "|chunk " + std::to_string(o.chunk_ms) + "|ctx " +
            std::to_string(encoder_->context_blocks()) + "|dtype " + std::string(c10::toString(o.dtype));
  }
  for (size_t i = 0; i < utts.size(); ++i) {
    const auto& u = utts[i];
    fs::path a = fs::absolute(u.audio);
    if (!fs::exists(a)) throw std::runtime_error("feature_store: audio file " + u.audio + " does not exist");
    const std::string key = sha256_hex(what + "\n" + a.string() + "|" + file_identity(a));
    const std::string file = (fs::path(dir_) / (key.substr(0, 32) + ".safetensors")).string();
    torch::Tensor x;
    if (fs::exists(file)) {
      try {
        x = read_tensors(file, nullptr).at("x");
        ++hits_;
      } catch (const std::exception&) {
        x = torch::Tensor();  // unreadable cache entry: recompute
      }
    }
    if (!x.defined()) {
      audio au = load_audio(u.audio);
      std::vector<float> m = log_mel_spectrogram(au.samples, mel_);
      const int64_t T = int64_t(m.size()) / mel_.n_mels;
      if (T < 2) throw std::runtime_error("feature_store: " + u.audio + " is too short (" + std::to_string(T) +
                                          " mel frames); drop it from the manifest");
      x = torch::from_blob(m.data(), {T, int64_t(mel_.n_mels)}, torch::kFloat32).clone();
      if (encoder_outputs_) {
        torch::NoGradGuard ng;
        x = encoder_->forward_block_causal(x.unsqueeze(0))[0].to(torch::kCPU, torch::kFloat32).contiguous();
      }
      write_tensors(file, {{"x", x}}, {{"format", "undertone.features"}, {"audio", a.string()}});
    }
    feats_.push_back(x);
    if (progress) progress(i + 1, utts.size());
  }
}

// ---------------------------------------------------------------- examples and batches

torch::Tensor speech_model::speech_tokens(const torch::Tensor& features, bool features_are_encoder_outputs) {
  torch::Tensor frames;
  if (features_are_encoder_outputs) {
    frames = features;
  } else {
    if (!encoder) throw std::logic_error("speech_model: log-mel features need an encoder");
    frames = encoder->forward_block_causal(features.unsqueeze(0))[0];
  }
  return proj->forward(frames.unsqueeze(0).to(proj->device(), proj->dtype()), true)[0];
}

std::vector<std::pair<std::string, torch::Tensor>> speech_model::trainables() {
  std::vector<std::pair<std::string, torch::Tensor>> r;
  for (const auto& p : proj->named_parameters())
    if (p.value().requires_grad()) r.emplace_back("projector." + p.key(), p.value());
  if (encoder)
    for (const auto& p : encoder->named_parameters())
      if (p.value().requires_grad()) r.emplace_back("encoder." + p.key(), p.value());
  return r;
}

alignment_batch continuation_batch(const alignment_llm& llm, const std::vector<torch::Tensor>& prefixes,
                                   const std::vector<std::vector<int32_t>>& continuations,
                                   const std::vector<int64_t>& scored) {
  const auto dev = llm.model->device();
  const int64_t D = llm.model->d_model();
  const int64_t B = int64_t(prefixes.size());
  if (continuations.size() != prefixes.size() || scored.size() != prefixes.size())
    throw std::invalid_argument("continuation_batch: prefixes, continuations and scored differ in length");
  std::vector<torch::Tensor> rows;
  std::vector<int64_t> lens;
  int64_t T = 0, n_tok = 0;
  for (int64_t i = 0; i < B; ++i) {
    const auto& c = continuations[size_t(i)];
    const int64_t ns = scored[size_t(i)];
    const int64_t P = prefixes[size_t(i)].size(0);
    if (ns < 0 || ns > int64_t(c.size()) || (ns > 0 && P + int64_t(c.size()) - ns < 1))
      throw std::invalid_argument("continuation_batch: row " + std::to_string(i) + " scores " + std::to_string(ns) +
                                  " of " + std::to_string(c.size()) + " continuation tokens after a prefix of " +
                                  std::to_string(P));
    torch::Tensor pre = prefixes[size_t(i)].to(dev, torch::kFloat32);
    rows.push_back(c.empty() ? pre : torch::cat({pre, llm.model->embed_tokens(ids_tensor(c, dev))}, 0));
    lens.push_back(P + int64_t(c.size()));
    T = std::max(T, lens.back());
    n_tok += ns;
  }
  alignment_batch b;
  b.n_tokens = n_tok;
  std::vector<torch::Tensor> padded;
  std::vector<int64_t> am(size_t(B * T), 0), tg(size_t(B * T), 0), lm(size_t(B * T), 0);
  for (int64_t i = 0; i < B; ++i) {
    const int64_t L = lens[size_t(i)], P = prefixes[size_t(i)].size(0);
    const auto& c = continuations[size_t(i)];
    padded.push_back(L < T ? torch::cat({rows[size_t(i)], torch::zeros({T - L, D}, rows[size_t(i)].options())}, 0)
                           : rows[size_t(i)]);
    for (int64_t p = 0; p < L; ++p) am[size_t(i * T + p)] = 1;
    // Position p predicts the token at p + 1 (only continuation tokens are known).
    for (int64_t j = 0; j < int64_t(c.size()); ++j)
      if (P + j >= 1) tg[size_t(i * T + P + j - 1)] = c[size_t(j)];
    for (int64_t j = int64_t(c.size()) - scored[size_t(i)]; j < int64_t(c.size()); ++j)
      lm[size_t(i * T + P + j - 1)] = 1;
  }
  b.embeds = torch::stack(padded);
  b.attention_mask = torch::tensor(am, torch::kLong).view({B, T}).to(dev);
  b.targets = torch::tensor(tg, torch::kLong).view({B, T}).to(dev);
  b.loss_mask = torch::tensor(lm, torch::kLong).view({B, T}).to(dev).to(torch::kBool);
  return b;
}

alignment_batch collate(const alignment_llm& llm, speech_model& sm, const feature_store& feats,
                        const std::vector<const alignment_example*>& examples, bool with_teacher) {
  const auto dev = llm.model->device();
  const int64_t B = int64_t(examples.size());
  std::map<alignment_task, std::pair<std::vector<int32_t>, std::vector<int32_t>>> prompts;
  std::vector<torch::Tensor> prefixes;
  std::vector<std::vector<int32_t>> conts, tids;
  std::vector<int64_t> scored, tstart;
  int64_t T2 = 0;
  for (const auto* e : examples) {
    auto it = prompts.find(e->task);
    if (it == prompts.end()) it = prompts.emplace(e->task, llm.student_prompt(e->task)).first;
    const auto& [pre, suf] = it->second;
    std::vector<int32_t> resp = e->response;
    if (e->ended) resp.push_back(llm.end_of_turn);
    torch::Tensor sp = sm.speech_tokens(feats.get(e->utt), feats.encoder_outputs()).to(dev, torch::kFloat32);
    prefixes.push_back(torch::cat({llm.model->embed_tokens(ids_tensor(pre, dev)), sp}, 0));
    std::vector<int32_t> after = suf;
    after.insert(after.end(), resp.begin(), resp.end());
    conts.push_back(std::move(after));
    scored.push_back(int64_t(resp.size()));
    if (with_teacher) {
      std::vector<int32_t> ti = e->teacher_prompt;
      tstart.push_back(int64_t(ti.size()));
      ti.insert(ti.end(), resp.begin(), resp.end());
      T2 = std::max(T2, int64_t(ti.size()));
      tids.push_back(std::move(ti));
    }
  }
  alignment_batch b = continuation_batch(llm, prefixes, conts, scored);
  if (with_teacher) {
    std::vector<int64_t> ids(size_t(B * T2), 0), mk(size_t(B * T2), 0), tl(size_t(B * T2), 0);
    for (int64_t i = 0; i < B; ++i) {
      const auto& ti = tids[size_t(i)];
      for (size_t p = 0; p < ti.size(); ++p) {
        ids[size_t(i * T2) + p] = ti[p];
        mk[size_t(i * T2) + p] = 1;
      }
      for (int64_t p = tstart[size_t(i)] - 1; p + 1 < int64_t(ti.size()); ++p) tl[size_t(i * T2 + p)] = 1;
    }
    b.teacher_ids = torch::tensor(ids, torch::kLong).view({B, T2}).to(dev);
    b.teacher_mask = torch::tensor(mk, torch::kLong).view({B, T2}).to(dev);
    b.teacher_loss_mask = torch::tensor(tl, torch::kLong).view({B, T2}).to(dev).to(torch::kBool);
  }
  return b;
}

torch::Tensor loss_position_logits(const alignment_llm& llm, const alignment_batch& b) {
  const auto& m = *llm.model;
  torch::Tensor hidden = m.forward_embeddings(b.embeds, b.attention_mask, {}, true);
  torch::Tensor idx = b.loss_mask.reshape({-1}).nonzero().squeeze(1);
  return m.lm_head(hidden.reshape({-1, m.d_model()}).index_select(0, idx));  // [N, V] float32
}

std::pair<torch::Tensor, torch::Tensor> row_log_likelihood(const alignment_llm& llm, const alignment_batch& b) {
  torch::Tensor logp = at::log_softmax(loss_position_logits(llm, b), -1);
  torch::Tensor idx = b.loss_mask.reshape({-1}).nonzero().squeeze(1);
  torch::Tensor tg = b.targets.reshape({-1}).index_select(0, idx);
  torch::Tensor lp = logp.gather(1, tg.unsqueeze(1)).squeeze(1).to(torch::kCPU, torch::kFloat64);
  const int64_t B = b.loss_mask.size(0);
  torch::Tensor row = b.loss_mask.reshape({-1}).nonzero().squeeze(1).to(torch::kCPU).div(b.loss_mask.size(1), "floor");
  torch::Tensor sum = torch::zeros({B}, torch::kFloat64).index_add_(0, row, lp);
  torch::Tensor cnt = b.loss_mask.sum(1).to(torch::kCPU, torch::kFloat64);
  return {sum, cnt};
}

loss_value alignment_loss(const alignment_llm& llm, const alignment_batch& b, const loss_options& opt) {
  const auto& m = *llm.model;
  const int64_t D = m.d_model();
  torch::Tensor logits = loss_position_logits(llm, b);  // [N, V] float32
  torch::Tensor idx = b.loss_mask.reshape({-1}).nonzero().squeeze(1);
  torch::Tensor tg = b.targets.reshape({-1}).index_select(0, idx);
  torch::Tensor logp = at::log_softmax(logits, -1);
  torch::Tensor ce = -logp.gather(1, tg.unsqueeze(1)).mean();
  loss_value r;
  r.tokens = idx.size(0);
  r.ce = ce.item<double>();
  r.loss = ce * opt.ce_weight;
  if (opt.kl_weight > 0) {
    if (!b.teacher_ids.defined()) throw std::invalid_argument("alignment_loss: KL needs a batch collated with the teacher");
    torch::Tensor tlogits;
    {
      torch::NoGradGuard ng;
      torch::Tensor th = m.forward_embeddings(m.embed_tokens(b.teacher_ids), b.teacher_mask, {}, true);
      torch::Tensor tidx = b.teacher_loss_mask.reshape({-1}).nonzero().squeeze(1);
      if (tidx.size(0) != idx.size(0))
        throw std::logic_error("alignment_loss: teacher and student loss positions differ in number");
      tlogits = m.lm_head(th.reshape({-1, D}).index_select(0, tidx));
    }
    const double tau = opt.kl_temperature;
    torch::Tensor lt = at::log_softmax(tlogits / tau, -1);
    torch::Tensor ls = at::log_softmax(logits / tau, -1);
    torch::Tensor kl = (lt.exp() * (lt - ls)).sum(-1).mean() * (tau * tau);
    r.kl = kl.item<double>();
    r.loss = r.loss + kl * opt.kl_weight;
  }
  return r;
}

std::vector<alignment_example> build_examples(const alignment_llm& llm, teacher_cache& cache,
                                              const std::vector<utterance>& utts,
                                              const std::vector<alignment_task>& tasks,
                                              const std::function<bool(emotion_label)>& use_label,
                                              const teacher_options& topt, teacher_stats* stats,
                                              const std::function<void(size_t, size_t)>& progress) {
  std::vector<teacher_request> reqs;
  std::vector<alignment_example> ex;
  for (size_t i = 0; i < utts.size(); ++i) {
    const auto& u = utts[i];
    if (u.transcript.empty()) continue;
    for (auto t : tasks) {
      if (t != alignment_task::semantic &&
          (u.emotion == emotion_label::unlabeled || (use_label && !use_label(u.emotion))))
        continue;
      teacher_request r{t, u.transcript, t == alignment_task::semantic ? emotion_label::unlabeled : u.emotion};
      alignment_example e;
      e.utt = i;
      e.task = t;
      reqs.push_back(r);
      ex.push_back(std::move(e));
    }
  }
  // Teacher prompts for semantic requests have no emotion; teacher_prompt must not see "unlabeled" there.
  auto resp = teacher_responses(llm, cache, reqs, topt, stats, progress);
  for (size_t k = 0; k < ex.size(); ++k) {
    ex[k].response = resp[k].tokens;
    ex[k].ended = resp[k].ended;
    ex[k].teacher_prompt = llm.teacher_prompt(reqs[k].task, reqs[k].transcript, reqs[k].emotion);
  }
  // An empty answer that did not even end teaches nothing.
  ex.erase(std::remove_if(ex.begin(), ex.end(), [](const auto& e) { return e.response.empty() && !e.ended; }),
           ex.end());
  return ex;
}

// ---------------------------------------------------------------- optimizer

std::string train_options::to_string() const {
  std::ostringstream o;
  o << "stage " << models::to_string(stage) << ", " << steps << " steps, batch " << batch << " x accum " << accum
    << ", lr " << lr << " (warmup " << warmup << ", cosine to x" << min_lr_ratio << "), wd " << weight_decay
    << ", clip " << clip << ", ce " << loss.ce_weight << ", kl " << loss.kl_weight << " (tau " << loss.kl_temperature
    << "), seed " << seed;
  return o.str();
}

double lr_at(const train_options& o, int64_t step) {
  if (o.warmup > 0 && step < o.warmup) return o.lr * double(step + 1) / double(o.warmup);
  const double span = double(std::max<int64_t>(1, o.steps - o.warmup));
  const double p = std::clamp(double(step - o.warmup) / span, 0.0, 1.0);
  const double pi = 3.14159265358979323846;
  return o.lr * (o.min_lr_ratio + (1.0 - o.min_lr_ratio) * 0.5 * (1.0 + std::cos(pi * p)));
}

adamw::adamw(std::vector<std::pair<std::string, torch::Tensor>> params, double beta1, double beta2, double eps,
             double weight_decay)
    : params_(std::move(params)), b1_(beta1), b2_(beta2), eps_(eps), wd_(weight_decay) {
  for (const auto& [n, p] : params_) {
    m_.push_back(torch::zeros_like(p, torch::TensorOptions().dtype(torch::kFloat32)));
    v_.push_back(torch::zeros_like(p, torch::TensorOptions().dtype(torch::kFloat32)));
  }
}

void adamw::step(double lr) {
  torch::NoGradGuard ng;
  ++t_;
  const double bc1 = 1.0 - std::pow(b1_, double(t_)), bc2 = 1.0 - std::pow(b2_, double(t_));
  for (size_t i = 0; i < params_.size(); ++i) {
    torch::Tensor& p = params_[i].second;
    torch::Tensor g = p.grad().defined() ? p.grad().to(torch::kFloat32) : torch::zeros_like(m_[i]);
    if (wd_ > 0 && p.dim() >= 2) p.mul_(1.0 - lr * wd_);
    m_[i].mul_(b1_).add_(g, 1.0 - b1_);
    v_[i].mul_(b2_).addcmul_(g, g, 1.0 - b2_);
    torch::Tensor denom = (v_[i] / bc2).sqrt_().add_(eps_);
    p.add_((m_[i] / denom).to(p.scalar_type()), -lr / bc1);
  }
}

void adamw::zero_grad() {
  for (auto& [n, p] : params_)
    if (p.grad().defined()) p.mutable_grad() = torch::Tensor();
}

std::vector<std::pair<std::string, torch::Tensor>> adamw::state() const {
  std::vector<std::pair<std::string, torch::Tensor>> r;
  for (size_t i = 0; i < params_.size(); ++i) {
    r.emplace_back("m." + params_[i].first, m_[i]);
    r.emplace_back("v." + params_[i].first, v_[i]);
  }
  return r;
}

void adamw::load_state(const std::map<std::string, torch::Tensor>& st, int64_t t) {
  std::vector<torch::Tensor> m, v;
  for (size_t i = 0; i < params_.size(); ++i) {
    for (const char* k : {"m.", "v."}) {
      auto it = st.find(k + params_[i].first);
      if (it == st.end()) throw std::runtime_error("optimizer state lacks " + std::string(k) + params_[i].first);
      if (!it->second.sizes().equals(params_[i].second.sizes()))
        throw std::runtime_error("optimizer state " + std::string(k) + params_[i].first + " has the wrong shape");
      (k[0] == 'm' ? m : v).push_back(it->second.to(m_[i].device(), torch::kFloat32).clone());
    }
  }
  m_ = std::move(m);
  v_ = std::move(v);
  t_ = t;
}

double clip_grad_norm(const std::vector<std::pair<std::string, torch::Tensor>>& params, double max_norm) {
  torch::NoGradGuard ng;
  double sq = 0;
  for (const auto& [n, p] : params)
    if (p.grad().defined()) sq += p.grad().to(torch::kFloat64).pow(2).sum().item<double>();
  const double norm = std::sqrt(sq);
  if (max_norm > 0 && norm > max_norm) {
    const double s = max_norm / (norm + 1e-6);
    for (const auto& [n, p] : params)
      if (p.grad().defined()) p.grad().mul_(s);
  }
  return norm;
}

std::vector<size_t> data_sampler::next(int phase, size_t pool, size_t n) {
  if (pool == 0) throw std::invalid_argument("data_sampler: no examples for this stage");
  auto perm_of = [&](int64_t epoch) {
    std::vector<size_t> p(pool);
    for (size_t i = 0; i < pool; ++i) p[i] = i;
    std::mt19937_64 rng(seed * 0x9E3779B97F4A7C15ull + uint64_t(phase) * 0xBF58476D1CE4E5B9ull +
                        uint64_t(epoch) * 0x94D049BB133111EBull);
    for (size_t i = pool - 1; i > 0; --i) std::swap(p[i], p[size_t(rng() % (i + 1))]);
    return p;
  };
  auto& st = phases[phase];
  std::vector<size_t> perm = perm_of(st.epoch), out;
  for (size_t k = 0; k < n; ++k) {
    if (st.cursor >= int64_t(pool)) {
      ++st.epoch;
      st.cursor = 0;
      perm = perm_of(st.epoch);
    }
    out.push_back(perm[size_t(st.cursor++)]);
  }
  return out;
}

// ---------------------------------------------------------------- checkpoints of trainables

void save_trainables(speech_model& sm, const std::string& path, const std::map<std::string, std::string>& meta) {
  auto m = meta;
  m["format"] = "undertone.alignment-trainables";
  const auto& c = sm.proj->config();
  m["projector"] = c.to_string();
  write_tensors(path, sm.trainables(), m);
}

void load_trainables(speech_model& sm, const std::string& path) {
  auto st = read_tensors(path, nullptr);
  torch::NoGradGuard ng;
  for (auto& [n, p] : sm.trainables()) {
    auto it = st.find(n);
    if (it == st.end()) throw std::runtime_error(path + ": no tensor " + n + " (trained with other trainables?)");
    if (!it->second.sizes().equals(p.sizes())) throw std::runtime_error(path + ": tensor " + n + " has the wrong shape");
    p.copy_(it->second.to(p.device(), p.scalar_type()));
  }
}

// ---------------------------------------------------------------- trainer

alignment_trainer::alignment_trainer(const alignment_llm& llm, speech_model& sm, const feature_store& train_feats,
                                     const feature_store* val_feats, std::vector<alignment_example> train_sem,
                                     std::vector<alignment_example> train_emo, std::vector<alignment_example> val,
                                     train_options opt)
    : llm_(llm), sm_(sm), train_feats_(train_feats), val_feats_(val_feats), val_(std::move(val)), opt_(std::move(opt)) {
  pools_[0] = std::move(train_sem);
  pools_[1] = std::move(train_emo);
  if (opt_.out_dir.empty()) throw std::invalid_argument("alignment_trainer: out_dir is empty");
  if (opt_.batch < 1 || opt_.accum < 1 || opt_.steps < 1)
    throw std::invalid_argument("alignment_trainer: steps, batch and accum must be >= 1");
  for (const auto& [n, p] : llm_.model->named_parameters())
    if (p.requires_grad()) throw std::logic_error("alignment_trainer: LLM parameter " + n + " requires grad");
  auto tr = sm_.trainables();
  if (tr.empty()) throw std::invalid_argument("alignment_trainer: nothing to train");
  optim_ = std::make_unique<adamw>(tr, opt_.beta1, opt_.beta2, opt_.eps, opt_.weight_decay);
  sampler_.seed = opt_.seed;
  // A fixed validation subset, the same for every run and seed.
  if (int64_t(val_.size()) > opt_.val_examples) {
    std::mt19937_64 rng(12345);
    for (size_t i = val_.size() - 1; i > 0; --i) std::swap(val_[i], val_[size_t(rng() % (i + 1))]);
    val_.resize(size_t(std::max<int64_t>(0, opt_.val_examples)));
  }
  for (int ph = 0; ph < 2; ++ph) {
    bool used = opt_.stage == alignment_stage::both || (ph == 0) == (opt_.stage == alignment_stage::semantic);
    if (used && pools_[ph].empty())
      throw std::invalid_argument(std::string("alignment_trainer: no training examples for stage ") +
                                  (ph ? "emotion (need labelled utterances)" : "semantic"));
  }
  fs::create_directories(opt_.out_dir);
}

int alignment_trainer::phase_at(int64_t step) const {
  switch (opt_.stage) {
    case alignment_stage::semantic: return 0;
    case alignment_stage::emotion: return 1;
    case alignment_stage::both:
      return step < int64_t(std::llround(opt_.semantic_fraction * double(opt_.steps))) ? 0 : 1;
  }
  return 1;
}

std::vector<const alignment_example*> alignment_trainer::next_batch(int phase) {
  auto idx = sampler_.next(phase, pools_[phase].size(), size_t(opt_.batch));
  std::vector<const alignment_example*> r;
  for (size_t i : idx) r.push_back(&pools_[phase][i]);
  return r;
}

loss_value alignment_trainer::validate() {
  loss_value acc;
  if (val_.empty() || !val_feats_) return acc;
  torch::NoGradGuard ng;
  double ce = 0, kl = 0;
  int64_t tok = 0;
  for (size_t b0 = 0; b0 < val_.size(); b0 += size_t(opt_.batch)) {
    std::vector<const alignment_example*> ex;
    for (size_t i = b0; i < std::min(val_.size(), b0 + size_t(opt_.batch)); ++i) ex.push_back(&val_[i]);
    auto b = collate(llm_, sm_, *val_feats_, ex, opt_.loss.kl_weight > 0);
    auto l = alignment_loss(llm_, b, opt_.loss);
    ce += l.ce * double(l.tokens);
    kl += l.kl * double(l.tokens);
    tok += l.tokens;
  }
  acc.tokens = tok;
  acc.ce = tok ? ce / double(tok) : 0;
  acc.kl = tok ? kl / double(tok) : 0;
  return acc;
}

std::string alignment_trainer::save_checkpoint() {
  const fs::path root = fs::path(opt_.out_dir) / "checkpoints";
  fs::create_directories(root);
  for (const auto& e : fs::directory_iterator(root))  // leftovers of an interrupted save
    if (e.path().filename().string().rfind(".tmp-", 0) == 0) fs::remove_all(e.path());
  char name[32];
  std::snprintf(name, sizeof name, "step-%07lld", (long long)step_);
  const fs::path tmp = root / (std::string(".tmp-") + name);
  fs::create_directories(tmp);
  auto hook = [&](const char* f) {
    if (on_checkpoint_file) on_checkpoint_file(f);
  };
  save_trainables(sm_, (tmp / "trainables.safetensors").string(), {{"step", std::to_string(step_)}});
  hook("trainables.safetensors");
  write_tensors((tmp / "optimizer.safetensors").string(), optim_->state(),
                {{"format", "undertone.adamw"}, {"t", std::to_string(optim_->steps())}});
  hook("optimizer.safetensors");
  json names = json::array();
  for (const auto& [n, p] : sm_.trainables()) names.push_back(n);
  json st = {{"format", "undertone.alignment-checkpoint"},
             {"version", 1},
             {"step", step_},
             {"optimizer_steps", optim_->steps()},
             {"sampler",
              {{"seed", sampler_.seed},
               {"phases",
                {{sampler_.phases[0].epoch, sampler_.phases[0].cursor},
                 {sampler_.phases[1].epoch, sampler_.phases[1].cursor}}}}},
             {"options",
              {{"stage", to_string(opt_.stage)},
               {"steps", opt_.steps},
               {"batch", opt_.batch},
               {"accum", opt_.accum},
               {"lr", opt_.lr},
               {"seed", opt_.seed},
               {"summary", opt_.to_string()}}},
             {"trainables", names},
             {"llm", llm_.identity},
             {"template", k_alignment_template_version}};
  if (!std::isnan(last_val_)) st["last_val_loss"] = last_val_;
  write_text_atomic(tmp / "state.json", st.dump(2) + "\n");
  hook("state.json");
  fsync_path(tmp, true);
  const fs::path dst = root / name;
  if (fs::exists(dst)) fs::remove_all(dst);
  fs::rename(tmp, dst);
  fsync_path(root, true);
  write_text_atomic(fs::path(opt_.out_dir) / "latest", std::string("checkpoints/") + name + "\n");
  // Prune the oldest complete checkpoints.
  std::vector<fs::path> steps;
  for (const auto& e : fs::directory_iterator(root))
    if (e.is_directory() && e.path().filename().string().rfind("step-", 0) == 0) steps.push_back(e.path());
  std::sort(steps.begin(), steps.end());
  const size_t keep = size_t(std::max<int64_t>(1, opt_.keep_checkpoints));
  for (size_t i = 0; i + keep < steps.size(); ++i)
    if (steps[i] != dst) fs::remove_all(steps[i]);
  return dst.string();
}

int64_t alignment_trainer::resume() {
  const fs::path latest = fs::path(opt_.out_dir) / "latest";
  if (!fs::exists(latest)) return 0;
  std::string rel = read_text(latest);
  while (!rel.empty() && (rel.back() == '\n' || rel.back() == '\r' || rel.back() == ' ')) rel.pop_back();
  const fs::path dir = fs::path(opt_.out_dir) / rel;
  auto st = json::parse(read_text(dir / "state.json"));
  if (st.value("format", "") != "undertone.alignment-checkpoint")
    throw std::runtime_error(dir.string() + "/state.json is not an alignment checkpoint");
  const auto& o = st["options"];
  auto mismatch = [&](const std::string& what, const std::string& was, const std::string& now) {
    if (was != now)
      throw std::runtime_error("cannot resume " + dir.string() + ": it was trained with " + what + " " + was +
                               ", this run asks for " + now + " (use a new --out, or the same settings)");
  };
  mismatch("stage", o.value("stage", ""), to_string(opt_.stage));
  mismatch("batch", std::to_string(o.value("batch", int64_t(0))), std::to_string(opt_.batch));
  mismatch("accum", std::to_string(o.value("accum", int64_t(0))), std::to_string(opt_.accum));
  mismatch("seed", std::to_string(o.value("seed", uint64_t(0))), std::to_string(opt_.seed));
  json names = json::array();
  for (const auto& [n, p] : sm_.trainables()) names.push_back(n);
  if (st["trainables"] != names)
    throw std::runtime_error("cannot resume " + dir.string() +
                             ": it trained other tensors (different --encoder-layers?)");
  load_trainables(sm_, (dir / "trainables.safetensors").string());
  std::map<std::string, std::string> meta;
  auto os = read_tensors((dir / "optimizer.safetensors").string(), &meta);
  optim_->load_state(os, std::stoll(meta.at("t")));
  sampler_.seed = st["sampler"]["seed"].get<uint64_t>();
  for (int ph = 0; ph < 2; ++ph) {
    sampler_.phases[ph].epoch = st["sampler"]["phases"][ph][0].get<int64_t>();
    sampler_.phases[ph].cursor = st["sampler"]["phases"][ph][1].get<int64_t>();
  }
  step_ = st["step"].get<int64_t>();
  last_val_ = st.value("last_val_loss", double(NAN));
  return step_;
}

void alignment_trainer::export_weights() const {
  sm_.proj->save((fs::path(opt_.out_dir) / "projector.safetensors").string());
  if (sm_.encoder) {
    std::vector<std::pair<std::string, torch::Tensor>> enc;
    for (const auto& p : sm_.encoder->named_parameters())
      if (p.value().requires_grad()) enc.emplace_back(p.key(), p.value());
    if (!enc.empty())
      write_tensors((fs::path(opt_.out_dir) / "encoder_layers.safetensors").string(), enc,
                    {{"format", "undertone.encoder-layers"}, {"note", "replace these tensors of the base encoder"}});
  }
}

double alignment_trainer::train(int64_t stop_at) {
  if (stop_at < 0 || stop_at > opt_.steps) stop_at = opt_.steps;
  const int64_t first = step_;
  metrics_log log((fs::path(opt_.out_dir) / "metrics.jsonl").string(), step_);
  progress_bar bar("train", opt_.progress_tty, 30.0);
  double last = NAN, ema = NAN;
  bool saved = false;
  auto run_val = [&] {
    if (val_.empty()) return;
    auto t0 = std::chrono::steady_clock::now();
    auto v = validate();
    last_val_ = v.ce;
    json row = {{"kind", "val"}, {"step", step_}, {"val_loss", v.ce}, {"val_ce", v.ce}, {"tokens", v.tokens},
                {"seconds", seconds_since(t0)}};
    if (opt_.loss.kl_weight > 0) row["val_kl"] = v.kl;
    log.write(row);
  };
  while (step_ < stop_at) {
    auto t0 = std::chrono::steady_clock::now();
    const double lr = lr_at(opt_, step_);
    optim_->zero_grad();
    const int phase = phase_at(step_);
    double loss = 0, ce = 0, kl = 0;
    int64_t tokens = 0;
    for (int64_t a = 0; a < opt_.accum; ++a) {
      auto ex = next_batch(phase);
      auto b = collate(llm_, sm_, train_feats_, ex, opt_.loss.kl_weight > 0);
      auto l = alignment_loss(llm_, b, opt_.loss);
      (l.loss / double(opt_.accum)).backward();
      loss += l.loss.item<double>() / double(opt_.accum);
      ce += l.ce / double(opt_.accum);
      kl += l.kl / double(opt_.accum);
      tokens += l.tokens;
    }
    if (!std::isfinite(loss))
      throw std::runtime_error("training diverged at step " + std::to_string(step_) +
                               " (loss is not finite); lower --lr or raise --warmup, then --resume");
    const double gn = clip_grad_norm(optim_->params(), opt_.clip);
    optim_->step(lr);
    ++step_;
    saved = false;
    last = loss;
    ema = std::isnan(ema) ? loss : 0.9 * ema + 0.1 * loss;
    json row = {{"kind", "train"}, {"step", step_},      {"phase", phase ? "emotion" : "semantic"},
                {"loss", loss},    {"ce", ce},           {"kl", kl},
                {"lr", lr},        {"grad_norm", gn},    {"tokens", tokens},
                {"step_s", seconds_since(t0)}};
    log.write(row);
    if (opt_.val_every > 0 && step_ % opt_.val_every == 0) run_val();
    if (opt_.ckpt_every > 0 && step_ % opt_.ckpt_every == 0) {
      save_checkpoint();
      saved = true;
    }
    if (!opt_.quiet) {
      char info[96];
      if (std::isnan(last_val_))
        std::snprintf(info, sizeof info, "loss %.3f", ema);
      else
        std::snprintf(info, sizeof info, "loss %.3f val %.3f", ema, last_val_);
      bar.update(step_, opt_.steps, first, info);
    }
    if (on_step && !on_step(step_, loss)) break;
  }
  if (step_ == opt_.steps && (opt_.val_every <= 0 || step_ % opt_.val_every != 0) && step_ > first) run_val();
  if (!saved && step_ > first) save_checkpoint();
  if (!opt_.quiet) bar.finish();
  if (step_ == opt_.steps) {
    export_weights();
    if (opt_.plot) {
      std::string err = plot_loss_curves(log.path(), (fs::path(opt_.out_dir) / "loss.png").string(),
                                         "alignment training (" + to_string(opt_.stage) + ")");
      if (!err.empty() && !opt_.quiet) std::fprintf(stderr, "note: no loss plot: %s\n", err.c_str());
    }
  }
  return last;
}

}  // namespace undertone::models
