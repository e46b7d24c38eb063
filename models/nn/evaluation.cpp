#include "models/nn/evaluation.hpp"

#include <ATen/ATen.h>
#include <torch/csrc/autograd/generated/variable_factories.h>
#include <torch/optim/lbfgs.h>

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <optional>
#include <random>
#include <regex>
#include <set>
#include <sstream>
#include <stdexcept>

#include "models/evaluation.hpp"
#include "models/safetensors.hpp"
#include "models/train_metrics.hpp"

namespace undertone::models {

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

torch::Tensor ids_tensor(const std::vector<int32_t>& ids, torch::Device dev) {
  std::vector<int64_t> v(ids.begin(), ids.end());
  return torch::tensor(v, torch::kLong).to(dev);
}

}  // namespace

// ---------------------------------------------------------------- building blocks

linear_probe_fit fit_linear_probe(const torch::Tensor& x_train, const std::vector<int>& y_train,
                                  const torch::Tensor& x_test, int n_classes, double l2, int64_t iterations) {
  if (x_train.dim() != 2 || x_test.dim() != 2 || x_train.size(1) != x_test.size(1))
    throw std::invalid_argument("fit_linear_probe: features must be [N, D] and [M, D] with the same D");
  if (int64_t(y_train.size()) != x_train.size(0) || y_train.empty())
    throw std::invalid_argument("fit_linear_probe: need one label per training row (and at least one row)");
  for (int y : y_train)
    if (y < 0 || y >= n_classes) throw std::invalid_argument("fit_linear_probe: label out of range");
  torch::NoGradGuard outer;
  torch::Tensor xt = x_train.detach().to(torch::kCPU, torch::kFloat64);
  torch::Tensor xs = x_test.detach().to(torch::kCPU, torch::kFloat64);
  torch::Tensor mu = xt.mean(0);
  torch::Tensor sd = (xt - mu).pow(2).mean(0).sqrt().clamp_min(1e-6);
  xt = (xt - mu) / sd;
  xs = (xs - mu) / sd;
  std::vector<int64_t> yv(y_train.begin(), y_train.end());
  torch::Tensor y = torch::tensor(yv, torch::kLong);
  const int64_t D = xt.size(1);
  torch::Tensor W = torch::zeros({D, n_classes}, torch::kFloat64).requires_grad_(true);
  torch::Tensor b = torch::zeros({n_classes}, torch::kFloat64).requires_grad_(true);
  {
    torch::AutoGradMode on(true);
    torch::optim::LBFGS opt({W, b}, torch::optim::LBFGSOptions(1.0)
                                        .max_iter(iterations)
                                        .max_eval(iterations * 5 / 4 + 1)
                                        .tolerance_grad(1e-9)
                                        .tolerance_change(1e-12)
                                        .history_size(20)
                                        .line_search_fn("strong_wolfe"));
    auto closure = [&] {
      opt.zero_grad();
      torch::Tensor logits = at::addmm(b, xt, W);
      torch::Tensor loss = at::nll_loss(at::log_softmax(logits, 1), y) + 0.5 * l2 * W.pow(2).sum();
      loss.backward();
      return loss;
    };
    opt.step(closure);
  }
  linear_probe_fit r;
  torch::Tensor tp = at::addmm(b, xt, W).argmax(1);
  r.train_accuracy = tp.eq(y).to(torch::kFloat64).mean().item<double>();
  torch::Tensor pred = at::addmm(b, xs, W).argmax(1).contiguous();
  const int64_t* p = pred.data_ptr<int64_t>();
  for (int64_t i = 0; i < pred.size(0); ++i) r.predictions.push_back(int(p[i]));
  return r;
}

std::vector<double> mean_continuation_logprob(const alignment_llm& llm, const std::vector<torch::Tensor>& prefixes,
                                              const std::vector<std::vector<int32_t>>& continuations,
                                              const std::vector<int64_t>& scored, int64_t batch) {
  torch::NoGradGuard ng;
  std::vector<double> out;
  const size_t bs = size_t(std::max<int64_t>(1, batch));
  for (size_t b0 = 0; b0 < prefixes.size(); b0 += bs) {
    const size_t b1 = std::min(prefixes.size(), b0 + bs);
    std::vector<torch::Tensor> p(prefixes.begin() + long(b0), prefixes.begin() + long(b1));
    std::vector<std::vector<int32_t>> c(continuations.begin() + long(b0), continuations.begin() + long(b1));
    std::vector<int64_t> s(scored.begin() + long(b0), scored.begin() + long(b1));
    auto [sum, cnt] = row_log_likelihood(llm, continuation_batch(llm, p, c, s));
    for (int64_t i = 0; i < sum.size(0); ++i) {
      const double n = cnt[i].item<double>();
      out.push_back(n > 0 ? sum[i].item<double>() / n : NAN);
    }
  }
  return out;
}

torch::Tensor pooled_hidden_states(const alignment_llm& llm, const std::vector<std::vector<int32_t>>& seqs,
                                   int64_t batch) {
  torch::NoGradGuard ng;
  const auto dev = llm.model->device();
  const int64_t D = llm.model->d_model();
  torch::Tensor out = torch::zeros({int64_t(seqs.size()), D}, torch::kFloat32);
  const size_t bs = size_t(std::max<int64_t>(1, batch));
  for (size_t b0 = 0; b0 < seqs.size(); b0 += bs) {
    const size_t b1 = std::min(seqs.size(), b0 + bs);
    int64_t T = 0;
    for (size_t i = b0; i < b1; ++i) T = std::max<int64_t>(T, int64_t(seqs[i].size()));
    if (T == 0) continue;
    const int64_t B = int64_t(b1 - b0);
    std::vector<int64_t> ids(size_t(B * T), 0), mask(size_t(B * T), 0);
    for (int64_t i = 0; i < B; ++i)
      for (size_t p = 0; p < seqs[b0 + size_t(i)].size(); ++p) {
        ids[size_t(i * T) + p] = seqs[b0 + size_t(i)][p];
        mask[size_t(i * T) + p] = 1;
      }
    torch::Tensor id = torch::tensor(ids, torch::kLong).view({B, T}).to(dev);
    torch::Tensor m = torch::tensor(mask, torch::kLong).view({B, T}).to(dev);
    torch::Tensor h = llm.model->forward_embeddings(llm.model->embed_tokens(id), m, {}, true);  // [B, T, D]
    torch::Tensor mf = m.to(torch::kFloat32).unsqueeze(2);
    torch::Tensor pooled = (h * mf).sum(1) / mf.sum(1).clamp_min(1.0);
    out.narrow(0, int64_t(b0), B).copy_(pooled.to(torch::kCPU));
  }
  return out;
}

std::shared_ptr<projector> load_projector_any(const std::string& path_in, torch::Device device,
                                              std::string* resolved) {
  fs::path path(path_in);
  if (!fs::exists(path)) throw std::runtime_error("projector " + path_in + " does not exist");
  if (fs::is_directory(path)) {
    if (fs::exists(path / "projector.safetensors")) {
      path = path / "projector.safetensors";
    } else if (fs::exists(path / "latest")) {
      std::ifstream f(path / "latest");
      std::string rel;
      std::getline(f, rel);
      while (!rel.empty() && (rel.back() == ' ' || rel.back() == '\r')) rel.pop_back();
      path = path / rel / "trainables.safetensors";
      if (!fs::exists(path)) throw std::runtime_error(path_in + "/latest names " + rel + ", which has no trainables.safetensors");
    } else {
      throw std::runtime_error(path_in + " is a directory without projector.safetensors or latest (not a training run)");
    }
  }
  if (resolved) *resolved = path.string();
  std::map<std::string, std::string> md;
  bool encoder_tensors = false;
  {
    safetensors_file f(path.string());
    md = f.metadata();
    for (const auto& t : f.tensors()) encoder_tensors = encoder_tensors || t.name.rfind("encoder.", 0) == 0;
  }
  const std::string fmt = md.count("format") ? md.at("format") : "";
  if (fmt == "undertone.alignment-trainables") {
    if (encoder_tensors)
      throw std::runtime_error(path.string() +
                               " also tuned encoder layers; undertone eval uses the frozen encoder's cached outputs "
                               "and cannot evaluate it yet");
    projector_config pc;
    const std::string cs = md.count("projector") ? md.at("projector") : "";
    std::smatch m;
    static const std::regex re(R"(stack=(\d+) d_in=(\d+) d_hidden=(\d+) d_out=(\d+))");
    if (!std::regex_search(cs, m, re))
      throw std::runtime_error(path.string() + ": metadata \"projector\" is \"" + cs + "\", not a projector shape");
    pc.stack = std::stoll(m[1]);
    pc.d_in = std::stoll(m[2]);
    pc.d_hidden = std::stoll(m[3]);
    pc.d_out = std::stoll(m[4]);
    speech_model sm;
    sm.proj = std::make_shared<projector>(pc, device, torch::kFloat32);
    load_trainables(sm, path.string());
    return sm.proj;
  }
  return projector::load(path.string(), device, torch::kFloat32);
}

// ---------------------------------------------------------------- run_evaluation

namespace {

struct eval_context {
  eval_context(const eval_options& o, alignment_llm& l) : opt(o), llm(l) {}
  const eval_options& opt;
  alignment_llm& llm;
  std::vector<utterance> probe_utts, eval_utts;
  std::vector<int> probe_y, eval_y;
  feature_store* feats = nullptr;  ///< probe_utts first, then eval_utts
  std::vector<std::string> transcripts;  ///< unique transcripts of eval_utts
  std::vector<size_t> transcript_of;     ///< eval utt -> index into transcripts
  /// teacher answers per transcript: [4 emotion classes] and the semantic one
  std::vector<std::vector<teacher_response>> emo_answers;
  std::vector<teacher_response> sem_answers;
  torch::Tensor sem_hidden;  ///< [n_transcripts, D] pooled hidden states of the semantic teacher answers
  /// [transcript][emotion]: mean log-prob of the emotion's teacher answer given the transcript alone
  std::vector<std::vector<double>> prior;
  /// [transcript][stated emotion][answer's emotion]: the same given the teacher's emotion-stated prompt
  std::vector<std::vector<std::vector<double>>> oracle;
  std::function<void(const std::string&)> log;

  size_t eval_feat(size_t i) const { return probe_utts.size() + i; }
};

std::vector<int32_t> with_eot(const alignment_llm& llm, const teacher_response& r) {
  std::vector<int32_t> v = r.tokens;
  if (r.ended) v.push_back(llm.end_of_turn);
  return v;
}

void run_probe(eval_context& c, const torch::Tensor& pooled_probe, const torch::Tensor& pooled_eval,
               class_metric& m, std::vector<int>* preds) {
  if (c.probe_utts.empty()) return;
  auto fit = fit_linear_probe(pooled_probe, c.probe_y, pooled_eval, 4, c.opt.probe_l2, c.opt.probe_iterations);
  for (size_t i = 0; i < c.eval_utts.size(); ++i) m.add(c.eval_y[i], fit.predictions[i]);
  if (preds) *preds = fit.predictions;
}

/// Index of the largest non-NaN value; -1 if none.
int argmax_defined(const std::vector<double>& v) {
  int best = -1;
  for (size_t i = 0; i < v.size(); ++i)
    if (!std::isnan(v[i]) && (best < 0 || v[i] > v[size_t(best)])) best = int(i);
  return best;
}

json utt_json(const utterance& u) {
  return {{"audio", u.audio}, {"speaker", u.speaker}, {"emotion", to_string(u.emotion)}, {"transcript", u.transcript}};
}

/// A system's projector, loaded (or freshly initialized) before anything expensive runs.
struct loaded_projector {
  std::shared_ptr<projector> proj;
  std::string description;
};

loaded_projector load_system(const eval_options& opt, const eval_system_spec& spec, int64_t d_enc, int64_t d_llm) {
  const torch::Device edev(opt.encoder_device);
  loaded_projector r;
  if (spec.projector.empty()) {
    projector_config pc;
    pc.stack = opt.stack_frames;
    pc.d_in = d_enc;
    pc.d_hidden = opt.fresh_hidden;
    pc.d_out = d_llm;
    r.proj = std::make_shared<projector>(pc, edev, torch::kFloat32, opt.seed);
    r.description = "freshly initialized projector (" + pc.to_string() + ", seed " + std::to_string(opt.seed) + ")";
  } else {
    std::string file;
    r.proj = load_projector_any(spec.projector, edev, &file);
    r.description = "projector " + file + " (" + r.proj->config().to_string() + ")";
  }
  const auto& pc = r.proj->config();
  if (pc.d_in != d_enc || pc.d_out != d_llm)
    throw std::runtime_error("projector of system " + spec.name + " (" + pc.to_string() + ") does not fit encoder width " +
                             std::to_string(d_enc) + " -> LLM width " + std::to_string(d_llm));
  return r;
}

system_result eval_projector(eval_context& c, const eval_system_spec& spec, const loaded_projector& lp_) {
  const auto& opt = c.opt;
  auto t0 = std::chrono::steady_clock::now();
  system_result r;
  r.name = spec.name;
  r.description = lp_.description;
  std::shared_ptr<projector> proj = lp_.proj;
  const auto& pc = proj->config();
  speech_model sm;
  sm.proj = proj;
  torch::NoGradGuard ng;
  const auto dev = c.llm.model->device();
  auto tokens_of = [&](size_t feat_index) { return sm.speech_tokens(c.feats->get(feat_index), true).to(torch::kFloat32); };

  // (a) probe on mean-pooled speech tokens
  {
    const int64_t D = pc.d_out;
    torch::Tensor xp = torch::zeros({int64_t(c.probe_utts.size()), D}, torch::kFloat32);
    torch::Tensor xe = torch::zeros({int64_t(c.eval_utts.size()), D}, torch::kFloat32);
    for (size_t i = 0; i < c.probe_utts.size(); ++i) xp[int64_t(i)].copy_(tokens_of(i).mean(0).to(torch::kCPU));
    for (size_t i = 0; i < c.eval_utts.size(); ++i)
      xe[int64_t(i)].copy_(tokens_of(c.eval_feat(i)).mean(0).to(torch::kCPU));
    std::vector<int> preds;
    run_probe(c, xp, xe, r.probe, &preds);
    for (size_t i = 0; i < c.eval_utts.size(); ++i) {
      json u = utt_json(c.eval_utts[i]);
      if (!preds.empty()) u["probe"] = to_string(four_class_labels()[size_t(preds[i])]);
      r.utterances.push_back(u);
    }
  }

  const size_t N = c.eval_utts.size();
  const size_t bs = size_t(std::max<int64_t>(1, opt.batch));
  progress_bar bar("eval " + spec.name, opt.quiet ? 0 : opt.progress_tty, 30.0);
  // Work units for the bar: N answers + N rankings + N semantic answers.
  const int64_t units = int64_t(3 * N);
  int64_t done = 0;
  auto tick = [&](size_t n, const char* what) {
    done += int64_t(n);
    if (!opt.quiet) bar.update(done, units, 0, what);
  };

  // (b) the LLM's answer to the auxiliary question from speech only
  {
    auto [pre, suf] = c.llm.student_prompt(alignment_task::emotion_question);
    for (size_t b0 = 0; b0 < N; b0 += bs) {
      std::vector<prompt_input> ps;
      for (size_t i = b0; i < std::min(N, b0 + bs); ++i) ps.push_back({pre, tokens_of(c.eval_feat(i)), suf});
      auto ans = greedy_generate(c.llm, ps, opt.answer_tokens, opt.batch);
      for (size_t k = 0; k < ans.size(); ++k) {
        const size_t i = b0 + k;
        const int cls = answer_to_class(ans[k].text);
        r.answer.add(c.eval_y[i], cls);
        r.utterances[i]["answer"] = ans[k].text;
        r.utterances[i]["answer_class"] = cls < 0 ? "unknown" : to_string(four_class_labels()[size_t(cls)]);
      }
      tick(ans.size(), "answers");
    }
  }

  // (c) ranking of the 4 emotion-specific teacher answers
  {
    auto [pre, suf] = c.llm.student_prompt(alignment_task::emotion);
    torch::Tensor pre_e = c.llm.model->embed_tokens(ids_tensor(pre, dev));
    const size_t per = std::max<size_t>(1, bs / 4);  // utterances per forward (4 rows each)
    for (size_t b0 = 0; b0 < N; b0 += per) {
      std::vector<torch::Tensor> prefixes;
      std::vector<std::vector<int32_t>> conts;
      std::vector<int64_t> scored;
      const size_t b1 = std::min(N, b0 + per);
      for (size_t i = b0; i < b1; ++i) {
        torch::Tensor prefix = torch::cat({pre_e, tokens_of(c.eval_feat(i)).to(dev)}, 0);
        for (int e = 0; e < 4; ++e) {
          auto resp = with_eot(c.llm, c.emo_answers[c.transcript_of[i]][size_t(e)]);
          std::vector<int32_t> cont = suf;
          cont.insert(cont.end(), resp.begin(), resp.end());
          prefixes.push_back(prefix);
          conts.push_back(std::move(cont));
          scored.push_back(int64_t(resp.size()));
        }
      }
      auto lp = mean_continuation_logprob(c.llm, prefixes, conts, scored, int64_t(prefixes.size()));
      for (size_t i = b0; i < b1; ++i) {
        std::vector<double> raw(lp.begin() + long((i - b0) * 4), lp.begin() + long((i - b0) * 4 + 4));
        json sc = json::object();
        for (size_t e = 0; e < 4; ++e)
          sc[to_string(four_class_labels()[e])] = std::isnan(raw[e]) ? json(nullptr) : json(raw[e]);
        r.ranking.add(c.eval_y[i], argmax_defined(raw));
        r.utterances[i]["ranking_logprob"] = sc;
      }
      tick(b1 - b0, "ranking");
    }
  }

  // (d) semantic fidelity
  {
    auto [pre, suf] = c.llm.student_prompt(alignment_task::semantic);
    double rouge = 0, cosine = 0;
    for (size_t b0 = 0; b0 < N; b0 += bs) {
      std::vector<prompt_input> ps;
      for (size_t i = b0; i < std::min(N, b0 + bs); ++i) ps.push_back({pre, tokens_of(c.eval_feat(i)), suf});
      auto ans = greedy_generate(c.llm, ps, opt.max_response_tokens, opt.batch);
      std::vector<std::vector<int32_t>> seqs;
      for (const auto& a : ans) seqs.push_back(a.tokens);
      torch::Tensor h = pooled_hidden_states(c.llm, seqs, opt.batch);
      for (size_t k = 0; k < ans.size(); ++k) {
        const size_t i = b0 + k, t = c.transcript_of[i];
        const auto& ref = c.sem_answers[t];
        const double rl = rouge_l_f1(word_tokens(ans[k].text), word_tokens(ref.text));
        double cs = 0;
        if (!ans[k].tokens.empty() && !ref.tokens.empty())
          cs = at::cosine_similarity(h[int64_t(k)], c.sem_hidden[int64_t(t)], 0).item<double>();
        rouge += rl;
        cosine += cs;
        r.utterances[i]["semantic_answer"] = ans[k].text;
        r.utterances[i]["rouge_l_f1"] = rl;
        r.utterances[i]["hidden_cosine"] = cs;
      }
      tick(ans.size(), "semantic");
    }
    r.rouge_l = N ? rouge / double(N) : NAN;
    r.hidden_cosine = N ? cosine / double(N) : NAN;
  }
  bar.finish();
  r.seconds = seconds_since(t0);
  return r;
}

system_result eval_text(eval_context& c) {
  auto t0 = std::chrono::steady_clock::now();
  torch::NoGradGuard ng;
  const auto& opt = c.opt;
  system_result r;
  r.name = "text";
  r.description = "transcript-only text cascade: the same prompts with the transcript instead of speech tokens "
                  "(no emotion information; ranking measures the content prior)";
  r.fidelity_reference = true;
  const size_t T = c.transcripts.size();
  // Per transcript: answer to the question, ranking of the 4 answers.
  std::vector<prompt_input> ps;
  for (const auto& t : c.transcripts) ps.push_back({c.llm.text_prompt(t + "\n" + k_emotion_question), {}, {}});
  auto ans = greedy_generate(c.llm, ps, opt.answer_tokens, opt.batch);
  // Ranking: the content prior itself (computed once in run_evaluation).
  std::vector<int> best(T, -1);
  for (size_t t = 0; t < T; ++t) best[t] = argmax_defined(c.prior[t]);
  for (size_t i = 0; i < c.eval_utts.size(); ++i) {
    const size_t t = c.transcript_of[i];
    const int cls = answer_to_class(ans[t].text);
    r.answer.add(c.eval_y[i], cls);
    r.ranking.add(c.eval_y[i], best[t]);
    json u = utt_json(c.eval_utts[i]);
    u["answer"] = ans[t].text;
    u["answer_class"] = cls < 0 ? "unknown" : to_string(four_class_labels()[size_t(cls)]);
    json sc = json::object();
    for (int e = 0; e < 4; ++e) sc[to_string(four_class_labels()[size_t(e)])] = c.prior[t][size_t(e)];
    u["ranking_logprob"] = sc;
    r.utterances.push_back(u);
  }
  r.seconds = seconds_since(t0);
  return r;
}

/// The teacher's own input: transcript with the emotion stated in text. Answer
/// and ranking per (transcript, true emotion): what the LLM does when told the emotion.
system_result eval_oracle(eval_context& c) {
  auto t0 = std::chrono::steady_clock::now();
  torch::NoGradGuard ng;
  system_result r;
  r.name = "oracle";
  r.description = "the teacher's text prompt with the true emotion stated (\"[The speaker sounds sad.] T\"): what the LLM "
                  "does when it is told the emotion";
  r.fidelity_reference = false;
  std::vector<prompt_input> ps;
  for (const auto& t : c.transcripts)
    for (auto e : four_class_labels())
      ps.push_back({c.llm.teacher_prompt(alignment_task::emotion_question, t, e), {}, {}});
  auto ans = greedy_generate(c.llm, ps, c.opt.answer_tokens, c.opt.batch);
  for (size_t i = 0; i < c.eval_utts.size(); ++i) {
    const size_t t = c.transcript_of[i], y = size_t(c.eval_y[i]);
    const auto& a = ans[t * 4 + y];
    const int cls = answer_to_class(a.text);
    r.answer.add(int(y), cls);
    r.ranking.add(int(y), argmax_defined(c.oracle[t][y]));
    json u = utt_json(c.eval_utts[i]);
    u["answer"] = a.text;
    u["answer_class"] = cls < 0 ? "unknown" : to_string(four_class_labels()[size_t(cls)]);
    json sc = json::object();
    for (size_t e = 0; e < 4; ++e) sc[to_string(four_class_labels()[e])] = c.oracle[t][y][e];
    u["ranking_logprob"] = sc;
    r.utterances.push_back(u);
  }
  r.seconds = seconds_since(t0);
  return r;
}

std::vector<utterance> seeded_subset(std::vector<utterance> v, int64_t n, uint64_t seed, bool balanced) {
  if (n <= 0 || int64_t(v.size()) <= n) return v;
  std::mt19937_64 rng(seed ^ 0xe7a1ULL);
  for (size_t i = v.size() - 1; i > 0; --i) std::swap(v[i], v[size_t(rng() % (i + 1))]);
  if (!balanced) {
    v.resize(size_t(n));
    return v;
  }
  // Round-robin over the classes so that a small subset still has every class.
  std::vector<std::vector<utterance>> by(4);
  for (auto& u : v) by[size_t(four_class_index(u.emotion))].push_back(std::move(u));
  std::vector<utterance> out;
  for (size_t k = 0; int64_t(out.size()) < n; ++k)
    for (size_t c = 0; c < 4 && int64_t(out.size()) < n; ++c)
      if (k < by[c].size()) out.push_back(by[c][k]);
  return out;
}

}  // namespace

eval_report run_evaluation(const eval_options& opt) {
  auto t_all = std::chrono::steady_clock::now();
  std::function<void(const std::string&)> log = opt.log;
  if (!log)
    log = [q = opt.quiet](const std::string& s) {
      if (!q) std::cout << s << std::endl;
    };
  if (opt.systems.empty()) throw std::invalid_argument("run_evaluation: no system (projector) to evaluate");
  {
    std::set<std::string> names;
    static const std::regex ok("[A-Za-z0-9_-]+");
    for (const auto& s : opt.systems) {
      if (!std::regex_match(s.name, ok))
        throw std::invalid_argument("system name '" + s.name + "' must be letters, digits, '_' or '-'");
      if (s.name == "text" || s.name == "chance" || s.name == "encoder" || !names.insert(s.name).second)
        throw std::invalid_argument("system name '" + s.name + "' is used twice or reserved (text, chance, encoder)");
    }
  }
  const split_kind split = parse_split(opt.split), probe_split = parse_split(opt.probe_split);
  if (split == probe_split) throw std::invalid_argument("the evaluated split and the probe's training split must differ");

  // ---- data
  std::vector<utterance> all = opt.utterances;
  if (all.empty())
    for (const auto& m : opt.manifests) {
      auto rows = read_manifest(m);
      all.insert(all.end(), rows.begin(), rows.end());
    }
  if (all.empty()) throw std::runtime_error("no utterances (give a manifest)");
  check_speaker_disjoint(all);
  const auto policy = opt.calm_as_neutral ? four_class_policy::calm_as_neutral : four_class_policy::strict;
  std::vector<utterance> ev, pr;
  size_t no_transcript = 0;
  for (auto u : all) {
    auto fc = to_four_class(u.emotion, policy);
    if (!fc) continue;
    u.emotion = *fc;
    if (u.split == split) {
      if (u.transcript.empty()) {
        ++no_transcript;
        continue;
      }
      ev.push_back(std::move(u));
    } else if (u.split == probe_split) {
      pr.push_back(std::move(u));
    }
  }
  if (ev.empty())
    throw std::runtime_error("no utterance of split '" + opt.split +
                             "' with a 4-class label (neutral/happy/sad/angry) and a transcript in the manifest(s)");
  {
    std::set<std::string> es;
    for (const auto& u : ev) es.insert(u.speaker);
    for (const auto& u : pr)
      if (es.count(u.speaker))
        throw std::runtime_error("speaker " + u.speaker + " occurs in split '" + opt.split + "' and in the probe's split '" +
                                 opt.probe_split + "'; the probe must be speaker-independent (fix the manifest)");
  }
  ev = seeded_subset(std::move(ev), opt.max_eval, opt.seed, true);
  pr = seeded_subset(std::move(pr), opt.max_probe_train, opt.seed, false);

  // ---- LLM
  llama_options lo;
  lo.device = torch::Device(opt.llm_device);
  lo.dtype = llm_dtype_of(opt.llm_dtype, "LLM dtype");
  auto t0 = std::chrono::steady_clock::now();
  if (opt.llm_path.empty()) throw std::invalid_argument("run_evaluation: llm_path is empty");
  alignment_llm llm = alignment_llm::load(opt.llm_path, lo, opt.chat_template);
  {
    std::ostringstream o;
    o << "LLM: " << opt.llm_path << " (" << c10::toString(lo.dtype) << " on " << lo.device << ", "
      << seconds_since(t0) << " s)";
    log(o.str());
  }
  eval_context ctx(opt, llm);
  ctx.probe_utts = std::move(pr);
  ctx.eval_utts = std::move(ev);
  ctx.log = log;
  for (const auto& u : ctx.probe_utts) ctx.probe_y.push_back(four_class_index(u.emotion));
  for (const auto& u : ctx.eval_utts) ctx.eval_y.push_back(four_class_index(u.emotion));
  {
    std::map<std::string, size_t> idx;
    for (const auto& u : ctx.eval_utts) {
      auto it = idx.find(u.transcript);
      if (it == idx.end()) {
        it = idx.emplace(u.transcript, ctx.transcripts.size()).first;
        ctx.transcripts.push_back(u.transcript);
      }
      ctx.transcript_of.push_back(it->second);
    }
  }
  log("data: " + std::to_string(ctx.eval_utts.size()) + " utterances of split " + opt.split + " (" +
      std::to_string(ctx.transcripts.size()) + " distinct transcripts), probe trained on " +
      std::to_string(ctx.probe_utts.size()) + " of split " + opt.probe_split +
      (no_transcript ? "; " + std::to_string(no_transcript) + " without transcript skipped" : std::string()));

  // ---- projectors first: a wrong path fails before anything expensive
  std::vector<loaded_projector> projectors;
  // ---- encoder (frozen; outputs come from the trainer's feature cache)
  whisper_encoder_options eo;
  eo.device = torch::Device(opt.encoder_device);
  eo.dtype = torch::kFloat32;
  eo.chunk_ms = opt.chunk_ms;
  eo.context_blocks = opt.context_blocks;
  if (opt.encoder_path.empty()) throw std::invalid_argument("run_evaluation: encoder_path is empty");
  auto enc = whisper_encoder::load(opt.encoder_path, eo);
  for (const auto& s : opt.systems)
    projectors.push_back(load_system(opt, s, enc->output_dim(), llm.model->d_model()));

  // ---- teacher answers (the trainer's cache; generated only when missing)
  {
    const std::string cache_dir = opt.cache_dir;
    teacher_cache cache(cache_dir, llm.identity + "|" + opt.teacher_dtype, opt.max_response_tokens);
    std::vector<teacher_request> reqs;
    for (const auto& t : ctx.transcripts) {
      reqs.push_back({alignment_task::semantic, t, emotion_label::unlabeled});
      for (auto e : four_class_labels()) reqs.push_back({alignment_task::emotion, t, e});
    }
    teacher_options topt;
    topt.max_tokens = opt.max_response_tokens;
    topt.batch = opt.teacher_batch;
    teacher_stats st;
    progress_bar bar("teacher", opt.quiet ? 0 : opt.progress_tty, 30.0);
    auto resp = teacher_responses_in_dtype(llm, lo, opt.teacher_dtype, opt.chat_template, cache, reqs, topt, &st,
                                           [&](size_t d, size_t n) {
                                             if (!opt.quiet) bar.update(int64_t(d), int64_t(n), 0, "");
                                           });
    bar.finish();
    log("teacher: " + std::to_string(st.requests) + " answers, " + std::to_string(st.hits) + " cached, " +
        std::to_string(st.generated) + " generated (" + cache.file() + ")");
    for (size_t t = 0; t < ctx.transcripts.size(); ++t) {
      ctx.sem_answers.push_back(resp[t * 5]);
      ctx.emo_answers.emplace_back(resp.begin() + long(t * 5 + 1), resp.begin() + long(t * 5 + 5));
    }
    std::vector<std::vector<int32_t>> seqs;
    for (const auto& a : ctx.sem_answers) seqs.push_back(a.tokens);
    ctx.sem_hidden = pooled_hidden_states(llm, seqs, opt.batch);
    // Each emotion's answer given the transcript alone (the text cascade's ranking scores) and given each
    // emotion-stated teacher prompt (the oracle's).
    torch::NoGradGuard ng;
    std::vector<torch::Tensor> prefixes;
    std::vector<std::vector<int32_t>> conts;
    std::vector<int64_t> scored;
    for (size_t t = 0; t < ctx.transcripts.size(); ++t) {
      torch::Tensor prefix = llm.model->embed_tokens(ids_tensor(llm.text_prompt(ctx.transcripts[t]), lo.device));
      for (size_t e = 0; e < 4; ++e) {
        auto resp = with_eot(llm, ctx.emo_answers[t][e]);
        prefixes.push_back(prefix);
        conts.push_back(resp);
        scored.push_back(int64_t(resp.size()));
      }
    }
    auto lp = mean_continuation_logprob(llm, prefixes, conts, scored, opt.batch);
    for (size_t t = 0; t < ctx.transcripts.size(); ++t)
      ctx.prior.emplace_back(lp.begin() + long(t * 4), lp.begin() + long(t * 4 + 4));
    if (opt.oracle) {
      prefixes.clear();
      conts.clear();
      scored.clear();
      for (size_t t = 0; t < ctx.transcripts.size(); ++t)
        for (auto stated : four_class_labels()) {
          torch::Tensor prefix = llm.model->embed_tokens(
              ids_tensor(llm.teacher_prompt(alignment_task::emotion, ctx.transcripts[t], stated), lo.device));
          for (size_t e = 0; e < 4; ++e) {
            auto resp = with_eot(llm, ctx.emo_answers[t][e]);
            prefixes.push_back(prefix);
            conts.push_back(resp);
            scored.push_back(int64_t(resp.size()));
          }
        }
      auto lo_ = mean_continuation_logprob(llm, prefixes, conts, scored, opt.batch);
      for (size_t t = 0; t < ctx.transcripts.size(); ++t) {
        ctx.oracle.emplace_back();
        for (size_t s = 0; s < 4; ++s)
          ctx.oracle.back().emplace_back(lo_.begin() + long((t * 4 + s) * 4), lo_.begin() + long((t * 4 + s) * 4 + 4));
      }
    }
  }

  mel_config mc;
  mc.n_mels = int(enc->hparams().n_mels);
  mc.normalization = parse_mel_normalization(opt.mel_normalization);
  feature_store feats(opt.cache_dir, mc, enc, llm_identity(opt.encoder_path), true);
  {
    auto tf = std::chrono::steady_clock::now();
    std::vector<utterance> both = ctx.probe_utts;
    both.insert(both.end(), ctx.eval_utts.begin(), ctx.eval_utts.end());
    progress_bar bar("features", opt.quiet ? 0 : opt.progress_tty, 30.0);
    feats.prepare(both, [&](size_t d, size_t n) {
      if (!opt.quiet) bar.update(int64_t(d), int64_t(n), 0, "");
    });
    bar.finish();
    std::ostringstream o;
    o << "features: " << feats.cache_hits() << " of " << both.size() << " cached, " << seconds_since(tf) << " s";
    log(o.str());
  }
  ctx.feats = &feats;

  eval_report rep;
  for (int y : ctx.eval_y) ++rep.class_counts[size_t(y)];
  rep.probe_train = int64_t(ctx.probe_utts.size());

  // ---- systems
  for (size_t k = 0; k < opt.systems.size(); ++k) {
    const auto& s = opt.systems[k];
    log("system " + s.name + ": " + projectors[k].description);
    rep.systems.push_back(eval_projector(ctx, s, projectors[k]));
  }
  if (opt.encoder_probe && !ctx.probe_utts.empty()) {
    auto te = std::chrono::steady_clock::now();
    system_result r;
    r.name = "encoder";
    r.description = "frozen Whisper encoder outputs, mean-pooled (probe only: is the emotion in the encoder at all?)";
    const int64_t D = feats.get(0).size(1);
    torch::Tensor xp = torch::zeros({int64_t(ctx.probe_utts.size()), D}, torch::kFloat32);
    torch::Tensor xe = torch::zeros({int64_t(ctx.eval_utts.size()), D}, torch::kFloat32);
    for (size_t i = 0; i < ctx.probe_utts.size(); ++i) xp[int64_t(i)].copy_(feats.get(i).mean(0));
    for (size_t i = 0; i < ctx.eval_utts.size(); ++i) xe[int64_t(i)].copy_(feats.get(ctx.eval_feat(i)).mean(0));
    run_probe(ctx, xp, xe, r.probe, nullptr);
    r.seconds = seconds_since(te);
    rep.systems.push_back(std::move(r));
  }
  if (opt.text_baseline) {
    log("system text: transcript-only cascade");
    rep.systems.push_back(eval_text(ctx));
  }
  if (opt.oracle) {
    log("system oracle: the teacher's emotion-stated text prompt");
    rep.systems.push_back(eval_oracle(ctx));
  }
  {
    system_result r;
    r.name = "chance";
    r.description = "uniform guess over the 4 classes";
    for (auto* m : {&r.probe, &r.answer, &r.ranking}) {
      m->available = true;
      m->expected = 0.25;
    }
    rep.systems.push_back(std::move(r));
  }

  json systems = json::array();
  for (const auto& s : opt.systems) systems.push_back({{"name", s.name}, {"projector", s.projector}});
  rep.setup = {{"split", opt.split},
               {"probe_split", opt.probe_split},
               {"calm_as_neutral", opt.calm_as_neutral},
               {"manifests", opt.manifests},
               {"systems", systems},
               {"llm", opt.llm_path},
               {"llm_identity", llm.identity},
               {"llm_dtype", opt.llm_dtype},
               {"encoder", opt.encoder_path},
               {"chunk_ms", opt.chunk_ms},
               {"mel_normalization", opt.mel_normalization},
               {"template", k_alignment_template_version},
               {"question", k_emotion_question},
               {"max_response_tokens", opt.max_response_tokens},
               {"teacher_dtype", opt.teacher_dtype},
               {"answer_tokens", opt.answer_tokens},
               {"probe_l2", opt.probe_l2},
               {"probe_iterations", opt.probe_iterations},
               {"max_eval", opt.max_eval},
               {"seed", opt.seed},
               {"eval_speakers", [&] {
                  std::set<std::string> s;
                  for (const auto& u : ctx.eval_utts) s.insert(u.speaker);
                  return std::vector<std::string>(s.begin(), s.end());
                }()}};
  rep.seconds = seconds_since(t_all);
  return rep;
}

}  // namespace undertone::models
