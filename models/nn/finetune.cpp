// One online fine-tuning round (models/finetune.hpp, docs/finetune.md): the
// alignment trainer on logged sessions + replay, gated on held-out speakers.
#include "models/finetune.hpp"

#include <ATen/Parallel.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <map>
#include <optional>
#include <random>
#include <set>
#include <sstream>
#include <thread>

#include "models/manifest.hpp"
#include "models/nn/alignment.hpp"
#include "models/nn/evaluation.hpp"
#include "models/nn/finetune.hpp"

namespace undertone::models {

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

using clock_type = std::chrono::steady_clock;

double seconds_since(clock_type::time_point t0) {
  return std::chrono::duration<double>(clock_type::now() - t0).count();
}

template <class T>
void shuffle(std::vector<T>& v, uint64_t seed) {
  std::mt19937_64 rng(seed);
  for (size_t i = v.size(); i > 1; --i) std::swap(v[i - 1], v[size_t(rng() % i)]);
}

// ---------------------------------------------------------------- priority

/// Lowers the calling thread (must be the round's own thread): nice via
/// setpriority on its thread id, and its OpenMP team size via at::set_num_threads.
/// at::set_num_threads also stores the process-wide default that threads which
/// have not yet run a parallel torch op start with; that default is put back
/// at once from a short-lived helper thread, so only this thread (and the
/// OpenMP workers it creates, which inherit its nice) run with the round's settings.
std::string lower_this_thread(int nice, int threads, const std::function<void(const std::string&)>& log) {
  const pid_t tid = pid_t(::syscall(SYS_gettid));
  std::ostringstream d;
  if (nice > 0) {
    errno = 0;
    const int cur = ::getpriority(PRIO_PROCESS, id_t(tid));
    const int target = std::max(nice, errno == 0 ? cur : 0);  // never raise the priority
    if (::setpriority(PRIO_PROCESS, id_t(tid), target) != 0) {
      if (log) log(std::string("warning: cannot set nice ") + std::to_string(target) + " on the round's thread: " +
                   std::strerror(errno) + "; it runs at the process's priority");
      d << "nice unchanged";
    } else {
      d << "nice " << target;
    }
  } else {
    d << "nice unchanged";
  }
  const int prev = at::get_num_threads();  // initializes this thread from the process default first
  at::set_num_threads(std::max(1, threads));
  std::thread([prev] { at::set_num_threads(prev); }).join();
  d << ", " << at::get_num_threads() << " thread(s) (tid " << tid << ")";
  return d.str();
}

// ---------------------------------------------------------------- data

/// Applies the 4-class policy: returns false for rows a round does not use.
bool annotate(utterance& u, bool calm_as_neutral) {
  if (u.transcript.empty()) return false;
  if (u.emotion == emotion_label::unlabeled) return true;
  auto c = to_four_class(u.emotion, calm_as_neutral ? four_class_policy::calm_as_neutral : four_class_policy::strict);
  if (!c) return false;
  u.emotion = *c;
  return true;
}

std::vector<utterance> read_rows(const std::vector<std::string>& manifests, const char* what,
                                 const std::function<bool(const utterance&)>& keep, bool calm_as_neutral) {
  std::vector<utterance> out;
  for (const auto& m : manifests) {
    if (!fs::exists(m)) throw std::runtime_error(std::string(what) + " manifest " + m + " does not exist");
    for (auto u : read_manifest(m)) {
      if (!keep(u) || !annotate(u, calm_as_neutral)) continue;
      if (!fs::exists(u.audio))
        throw std::runtime_error(std::string(what) + " manifest " + m + ": audio file " + u.audio +
                                 " does not exist (moved or deleted? re-export the manifest)");
      u.extra["finetune_source"] = m;
      out.push_back(std::move(u));
    }
  }
  return out;
}

/// The teacher requests examples_for() makes (through build_examples) for `utts`:
/// the stage-2 tasks for a labeled row, the semantic task for an unlabeled one.
std::vector<teacher_request> requests_for(const std::vector<utterance>& utts) {
  std::vector<teacher_request> r;
  for (const auto& u : utts) {
    if (u.transcript.empty()) continue;
    if (u.emotion == emotion_label::unlabeled) {
      r.push_back({alignment_task::semantic, u.transcript, emotion_label::unlabeled});
    } else if (four_class_index(u.emotion) >= 0) {
      for (auto t : stage_tasks(alignment_stage::emotion)) r.push_back({t, u.transcript, u.emotion});
    }
  }
  return r;
}

/// Examples for the rows `idx` of `utts`: stage-2 tasks for labeled rows, the
/// semantic task for unlabeled ones; .utt indexes `utts`.
std::vector<alignment_example> examples_for(const alignment_llm& llm, teacher_cache& cache,
                                            const std::vector<utterance>& utts, const std::vector<size_t>& idx,
                                            const teacher_options& topt) {
  std::vector<utterance> lab, unl;
  std::vector<size_t> lab_i, unl_i;
  for (size_t i : idx) {
    if (utts[i].emotion == emotion_label::unlabeled) {
      unl.push_back(utts[i]);
      unl_i.push_back(i);
    } else {
      lab.push_back(utts[i]);
      lab_i.push_back(i);
    }
  }
  auto four = [](emotion_label e) { return four_class_index(e) >= 0; };
  std::vector<alignment_example> out;
  if (!lab.empty()) {
    auto ex = build_examples(llm, cache, lab, stage_tasks(alignment_stage::emotion), four, topt);
    for (auto& e : ex) e.utt = lab_i[e.utt];
    out.insert(out.end(), std::make_move_iterator(ex.begin()), std::make_move_iterator(ex.end()));
  }
  if (!unl.empty()) {
    auto ex = build_examples(llm, cache, unl, {alignment_task::semantic}, {}, topt);
    for (auto& e : ex) e.utt = unl_i[e.utt];
    out.insert(out.end(), std::make_move_iterator(ex.begin()), std::make_move_iterator(ex.end()));
  }
  return out;
}

// ---------------------------------------------------------------- gate metrics

/// Mean CE per answer token over `ex` (stage-2 val examples), teacher-forced; {ce, tokens}.
std::pair<double, int64_t> val_loss(const alignment_llm& llm, speech_model& sm, const feature_store& feats,
                                    const std::vector<alignment_example>& ex, int64_t batch,
                                    const std::function<void(int64_t, int64_t)>& tick) {
  torch::NoGradGuard ng;
  double ce = 0;
  int64_t tok = 0;
  const size_t bs = size_t(std::max<int64_t>(1, batch));
  for (size_t b0 = 0; b0 < ex.size(); b0 += bs) {
    std::vector<const alignment_example*> p;
    for (size_t i = b0; i < std::min(ex.size(), b0 + bs); ++i) p.push_back(&ex[i]);
    auto l = alignment_loss(llm, collate(llm, sm, feats, p, false), loss_options{});
    ce += l.ce * double(l.tokens);
    tok += l.tokens;
    if (tick) tick(int64_t(b0 + p.size()), int64_t(ex.size()));
  }
  return {tok ? ce / double(tok) : NAN, tok};
}

/// Ranking accuracy of the 4 emotion-specific teacher answers (docs/evaluation.md (c)):
/// answers[t][c] is the emotion-task answer for transcript t and class c.
double ranking_accuracy(const alignment_llm& llm, speech_model& sm, const feature_store& feats,
                        const std::vector<utterance>& utts, const std::vector<size_t>& transcript_of,
                        const std::vector<std::vector<teacher_response>>& answers, int64_t batch,
                        const std::function<void(int64_t, int64_t)>& tick) {
  torch::NoGradGuard ng;
  const auto dev = llm.model->device();
  auto [pre, suf] = llm.student_prompt(alignment_task::emotion);
  std::vector<int64_t> pre64(pre.begin(), pre.end());
  torch::Tensor pre_e = llm.model->embed_tokens(torch::tensor(pre64, torch::kLong).to(dev));
  const size_t per = size_t(std::max<int64_t>(1, batch / 4));  // utterances per forward, 4 rows each
  int64_t correct = 0;
  for (size_t b0 = 0; b0 < utts.size(); b0 += per) {
    const size_t b1 = std::min(utts.size(), b0 + per);
    std::vector<torch::Tensor> prefixes;
    std::vector<std::vector<int32_t>> conts;
    std::vector<int64_t> scored;
    for (size_t i = b0; i < b1; ++i) {
      torch::Tensor prefix = torch::cat(
          {pre_e.to(torch::kFloat32), sm.speech_tokens(feats.get(i), true).to(dev, torch::kFloat32)}, 0);
      for (size_t c = 0; c < 4; ++c) {
        const auto& a = answers[transcript_of[i]][c];
        std::vector<int32_t> resp = a.tokens;
        if (a.ended) resp.push_back(llm.end_of_turn);
        std::vector<int32_t> cont = suf;
        cont.insert(cont.end(), resp.begin(), resp.end());
        prefixes.push_back(prefix);
        conts.push_back(std::move(cont));
        scored.push_back(int64_t(resp.size()));
      }
    }
    auto lp = mean_continuation_logprob(llm, prefixes, conts, scored, int64_t(prefixes.size()));
    for (size_t i = b0; i < b1; ++i) {
      int best = -1;
      for (size_t c = 0; c < 4; ++c) {
        const double v = lp[(i - b0) * 4 + c];
        if (!std::isnan(v) && (best < 0 || v > lp[(i - b0) * 4 + size_t(best)])) best = int(c);
      }
      correct += best == four_class_index(utts[i].emotion);
    }
    if (tick) tick(int64_t(b1), int64_t(utts.size()));
  }
  return utts.empty() ? NAN : double(correct) / double(utts.size());
}

// ---------------------------------------------------------------- the round

void check_options(const finetune_options& o) {
  auto need = [](bool ok, const std::string& what) {
    if (!ok) throw std::invalid_argument("finetune: " + what);
  };
  need(!o.session_manifests.empty(), "no sessions manifest (the session store's export of annotated turns)");
  need(!o.val_manifests.empty(), "no validation manifest (held-out speakers; finetune.val_manifest)");
  need(!o.projector.empty(), "no current projector to start from");
  need(!o.llm_path.empty() && !o.encoder_path.empty(), "LLM and encoder paths are required");
  need(!o.out_dir.empty(), "out_dir is empty");
  need(!o.cache_dir.empty(), "cache_dir is empty");
  need(o.replay_ratio >= 0 && o.replay_ratio < 1, "replay_ratio must be in [0, 1)");
  need(o.steps >= 1 && o.batch >= 1, "steps and batch must be >= 1");
  need(o.lr > 0, "lr must be > 0");
  need(o.gate_margin >= 0, "gate_margin must be >= 0");
  need(o.threads >= 1, "threads must be >= 1");
  need(o.nice >= 0 && o.nice <= 19, "nice must be in 0..19");
  if (fs::exists(o.out_dir) && !fs::is_empty(o.out_dir))
    throw std::invalid_argument("finetune: out_dir " + o.out_dir + " is not empty (one directory per round)");
}

finetune_result run_round(const finetune_options& o, const std::string& priority) {
  const auto t_round = clock_type::now();
  auto log = [&](const std::string& s) {
    if (o.log) o.log(s);
  };
  auto progress = [&](const std::string& phase, int64_t d, int64_t n, const std::string& info) {
    if (o.progress) o.progress(phase, d, n, info);
  };
  auto check_cancel = [&](const char* where) {
    if (o.cancelled && o.cancelled()) throw finetune_cancelled(std::string("fine-tune round cancelled ") + where);
  };
  finetune_result res;
  res.priority = priority;
  res.base_projector = o.projector;
  res.out_dir = o.out_dir;
  fs::create_directories(o.out_dir);

  // ---- data
  const int64_t k = std::llround(o.replay_ratio * double(o.batch));
  std::vector<utterance> train = read_rows(o.session_manifests, "sessions", [](const utterance&) { return true; },
                                           o.calm_as_neutral);
  const size_t n_session = train.size();
  if (n_session == 0)
    throw std::runtime_error("finetune: the sessions manifest(s) hold no annotated turn (a transcript, and an "
                             "emotion of the 4 classes or none); nothing to train on");
  if (k > 0) {
    if (o.replay_manifests.empty())
      throw std::invalid_argument("finetune: replay_ratio > 0 but no replay manifest (the original training "
                                  "data, finetune.replay_manifests); name one or set replay_ratio = 0");
    auto rep = read_rows(o.replay_manifests, "replay",
                         [](const utterance& u) { return u.split == split_kind::train; }, o.calm_as_neutral);
    if (rep.empty()) throw std::runtime_error("finetune: the replay manifest(s) have no usable split=train row");
    // Enough replay utterances for the round (a labeled one gives 2 examples).
    shuffle(rep, o.seed ^ 0x7e91a7u);
    rep.resize(std::min(rep.size(), size_t((o.steps * k + 1) / 2)));
    train.insert(train.end(), rep.begin(), rep.end());
  }
  std::vector<utterance> val = read_rows(o.val_manifests, "validation",
                                         [](const utterance& u) { return u.split != split_kind::train; },
                                         o.calm_as_neutral);
  val.erase(std::remove_if(val.begin(), val.end(), [](const utterance& u) { return four_class_index(u.emotion) < 0; }),
            val.end());
  if (val.empty())
    throw std::runtime_error("finetune: the validation manifest(s) have no split=val/test row with a 4-class "
                             "emotion and a transcript");
  if (o.max_val > 0 && int64_t(val.size()) > o.max_val) {
    shuffle(val, 12345);  // the same subset every round
    val.resize(size_t(o.max_val));
  }
  {
    std::vector<std::pair<std::string, std::string>> ts, vs;
    for (const auto& u : train) ts.emplace_back(u.speaker, u.extra.value("finetune_source", "") + ": " + u.audio);
    for (const auto& u : val) vs.emplace_back(u.speaker, u.extra.value("finetune_source", "") + ": " + u.audio);
    check_held_out(ts, vs);
  }
  res.session_turns = int64_t(n_session);
  res.val_utterances = int64_t(val.size());
  {
    std::set<std::string> spk;
    for (const auto& u : val) spk.insert(u.speaker);
    std::string s;
    for (const auto& x : spk) s += (s.empty() ? "" : ", ") + x;
    log("data: " + std::to_string(n_session) + " annotated session turns, " + std::to_string(train.size() - n_session) +
        " replay utterances (" + std::to_string(k) + " of every " + std::to_string(o.batch) + " examples), " +
        std::to_string(val.size()) + " held-out utterances (speakers " + s + ")");
  }
  check_cancel("after reading the data");

  // ---- frozen LLM
  llama_options lo;
  lo.device = torch::Device(o.llm_device);
  lo.dtype = llm_dtype_of(o.llm_dtype, "finetune: llm dtype");
  auto t0 = clock_type::now();
  auto llm = alignment_llm::load(o.llm_path, lo, o.chat_template);
  log("LLM: " + o.llm_path + " (" + o.llm_dtype + ", " + std::to_string(seconds_since(t0)) + " s)");

  // ---- teacher answers (generated only when missing, in the teacher's dtype)
  teacher_options topt;
  topt.max_tokens = o.max_response_tokens;
  topt.batch = o.teacher_batch;
  teacher_cache tcache(o.cache_dir, llm.identity + "|" + o.teacher_dtype, topt.max_tokens);
  std::vector<std::string> transcripts;
  std::vector<size_t> transcript_of;
  {
    std::map<std::string, size_t> idx;
    for (const auto& u : val) {
      auto it = idx.emplace(u.transcript, transcripts.size()).first;
      if (it->second == transcripts.size()) transcripts.push_back(u.transcript);
      transcript_of.push_back(it->second);
    }
  }
  std::vector<teacher_request> rank_reqs;
  for (const auto& t : transcripts)
    for (auto e : four_class_labels()) rank_reqs.push_back({alignment_task::emotion, t, e});
  std::vector<std::vector<teacher_response>> rank_answers;
  {
    auto reqs = requests_for(train);
    auto vr = requests_for(val);
    reqs.insert(reqs.end(), vr.begin(), vr.end());
    reqs.insert(reqs.end(), rank_reqs.begin(), rank_reqs.end());
    teacher_stats st;
    auto resp = teacher_responses_in_dtype(
        llm, lo, o.teacher_dtype, o.chat_template, tcache, reqs, topt, &st,
        [&](size_t d, size_t n) { progress("teacher", int64_t(d), int64_t(n), ""); }, "finetune: ");
    for (size_t t = 0; t < transcripts.size(); ++t)
      rank_answers.emplace_back(resp.end() - long(rank_reqs.size()) + long(t * 4),
                                resp.end() - long(rank_reqs.size()) + long(t * 4 + 4));
    log("teacher: " + std::to_string(st.requests) + " answers, " + std::to_string(st.hits) + " cached, " +
        std::to_string(st.generated) + " generated (" + tcache.file() + ")");
  }
  // Every answer is in the cache now: building the examples generates nothing.
  std::vector<size_t> sess_idx(n_session), rep_idx(train.size() - n_session), val_idx(val.size());
  for (size_t i = 0; i < sess_idx.size(); ++i) sess_idx[i] = i;
  for (size_t i = 0; i < rep_idx.size(); ++i) rep_idx[i] = n_session + i;
  for (size_t i = 0; i < val_idx.size(); ++i) val_idx[i] = i;
  auto sess_ex = examples_for(llm, tcache, train, sess_idx, topt);
  auto rep_ex = examples_for(llm, tcache, train, rep_idx, topt);
  auto val_ex = examples_for(llm, tcache, val, val_idx, topt);
  if (sess_ex.empty()) throw std::runtime_error("finetune: no training example from the session turns");
  if (k > 0 && rep_ex.empty()) throw std::runtime_error("finetune: no training example from the replay buffer");
  res.session_examples = int64_t(sess_ex.size());
  res.replay_examples = int64_t(rep_ex.size());
  res.val_examples = int64_t(val_ex.size());
  check_cancel("after the teacher answers");

  // ---- encoder outputs (cached) and the current projector
  whisper_encoder_options eo;
  eo.device = torch::Device(o.encoder_device);
  eo.dtype = torch::kFloat32;
  eo.chunk_ms = o.chunk_ms;
  eo.context_blocks = o.context_blocks;
  auto enc = whisper_encoder::load(o.encoder_path, eo);
  enc->set_trainable_layers(0);
  mel_config mc;
  mc.n_mels = int(enc->hparams().n_mels);
  mc.normalization = parse_mel_normalization(o.mel_normalization);
  const std::string enc_id = llm_identity(o.encoder_path);
  feature_store ftrain(o.cache_dir, mc, enc, enc_id, true), fval(o.cache_dir, mc, enc, enc_id, true);
  {
    const size_t n = train.size() + val.size();
    ftrain.prepare(train, [&](size_t d, size_t) { progress("features", int64_t(d), int64_t(n), ""); });
    fval.prepare(val, [&](size_t d, size_t) { progress("features", int64_t(train.size() + d), int64_t(n), ""); });
    log("features: " + std::to_string(ftrain.cache_hits() + fval.cache_hits()) + " of " + std::to_string(n) +
        " cached");
  }
  std::string proj_file;
  auto proj = load_projector_any(o.projector, eo.device, &proj_file);
  {
    const auto& pc = proj->config();
    if (pc.d_in != enc->output_dim() || pc.d_out != llm.model->d_model())
      throw std::runtime_error("finetune: projector " + proj_file + " (" + pc.to_string() +
                               ") does not fit encoder width " + std::to_string(enc->output_dim()) +
                               " -> LLM width " + std::to_string(llm.model->d_model()));
  }
  speech_model sm;
  sm.encoder = enc;
  sm.proj = proj;
  check_cancel("before the gate");

  // ---- gate metrics of the current projector
  const bool want_loss = o.gate_metric != gate_metric_kind::ranking;
  const bool want_rank = o.gate_metric != gate_metric_kind::val_loss;
  const int64_t eval_batch = std::max<int64_t>(o.batch, 8);
  auto measure = [&](const std::string& phase, double* loss, int64_t* tokens, double* rank) {
    auto t = clock_type::now();
    const int64_t units = (want_loss ? int64_t(val_ex.size()) : 0) + (want_rank ? int64_t(val.size()) : 0);
    if (want_loss) {
      auto [ce, tok] = val_loss(llm, sm, fval, val_ex, eval_batch,
                                [&](int64_t d, int64_t) { progress(phase, d, units, "val loss"); });
      *loss = ce;
      *tokens = tok;
    }
    check_cancel("during the gate");
    if (want_rank)
      *rank = ranking_accuracy(llm, sm, fval, val, transcript_of, rank_answers, eval_batch, [&](int64_t d, int64_t) {
        progress(phase, (want_loss ? int64_t(val_ex.size()) : 0) + d, units, "ranking");
      });
    res.gate_seconds += seconds_since(t);
  };
  double cur_loss = NAN, cand_loss = NAN, cur_rank = NAN, cand_rank = NAN;
  int64_t loss_tokens = 0;
  measure("gate current", &cur_loss, &loss_tokens, &cur_rank);
  log("current projector " + proj_file + ":" + (want_loss ? " val_loss " + std::to_string(cur_loss) : "") +
      (want_rank ? " ranking " + std::to_string(cur_rank) : ""));
  check_cancel("before training");

  // ---- train
  train_options to;
  to.stage = alignment_stage::emotion;  // one pool (phase 1); semantic examples in it keep their task
  to.steps = o.steps;
  to.batch = o.batch;
  to.lr = o.lr;
  to.warmup = o.warmup >= 0 ? o.warmup : std::min<int64_t>(10, o.steps / 10);
  to.val_every = 0;
  to.ckpt_every = 0;
  to.keep_checkpoints = 1;
  to.seed = o.seed;
  to.out_dir = o.out_dir;
  to.plot = false;
  to.quiet = true;
  auto pool = mixed_pool(sess_ex, rep_ex, o.steps, o.batch, k, o.seed);
  alignment_trainer tr(llm, sm, ftrain, nullptr, {}, std::move(pool), {}, to);
  auto t_train = clock_type::now();
  bool stopped = false;
  tr.on_step = [&](int64_t step, double loss) {
    if (step == 1) res.first_loss = loss;
    res.last_loss = loss;
    char info[48];
    std::snprintf(info, sizeof info, "loss %.3f", loss);
    progress("train", step, o.steps, info);
    if (o.cancelled && o.cancelled()) stopped = true;
    // Serving first: wait while the server is busy.
    if (!stopped && o.paused) {
      const auto t0 = clock_type::now();
      bool said = false;
      while (o.paused()) {
        if (!said) progress("train", step, o.steps, "paused: serving");
        said = true;
        if (o.cancelled && o.cancelled()) {
          stopped = true;
          break;
        }
        std::this_thread::sleep_for(std::chrono::milliseconds(250));
      }
      res.paused_seconds += seconds_since(t0);
    }
    return !stopped;
  };
  log("training: " + to.to_string() + ", replay " + std::to_string(k) + "/" + std::to_string(o.batch));
  tr.train();
  res.train_seconds = seconds_since(t_train);
  res.steps = tr.step();
  if (stopped || tr.step() != o.steps) throw finetune_cancelled("fine-tune round cancelled during training");
  res.candidate = (fs::path(o.out_dir) / "projector.safetensors").string();
  std::error_code ec;
  fs::remove_all(fs::path(o.out_dir) / "checkpoints", ec);  // optimizer state: not needed after the round
  fs::remove(fs::path(o.out_dir) / "latest", ec);

  // ---- gate metrics of the candidate, decision
  measure("gate candidate", &cand_loss, &loss_tokens, &cand_rank);
  auto row = [&](const char* name, double cur, double cand, bool higher, bool gating, int64_t n) {
    gate_row g;
    g.metric = name;
    g.current = cur;
    g.candidate = cand;
    g.margin = o.gate_margin;
    g.higher_is_better = higher;
    g.gating = gating;
    g.n = n;
    // NaN (nothing measured) never passes.
    g.passed = higher ? cand >= cur - o.gate_margin : cand <= cur + o.gate_margin;
    return g;
  };
  if (want_loss) res.metrics.push_back(row("val_loss", cur_loss, cand_loss, false, true, loss_tokens));
  if (want_rank) res.metrics.push_back(row("ranking", cur_rank, cand_rank, true, true, int64_t(val.size())));
  res.passed = !res.metrics.empty();
  std::string failed;
  for (const auto& g : res.metrics)
    if (g.gating && !g.passed) {
      res.passed = false;
      failed += (failed.empty() ? "" : ", ") + g.metric;
    }
  std::ostringstream why;
  why.precision(4);
  for (const auto& g : res.metrics)
    why << (&g == &res.metrics.front() ? "" : "; ") << g.metric << " " << g.current << " -> " << g.candidate;
  if (res.passed) {
    res.reason = "no regression beyond the margin " + std::to_string(o.gate_margin) + " (" + why.str() + ")";
  } else {
    res.reason = "regressed on " + failed + " beyond the margin " + std::to_string(o.gate_margin) + " (" + why.str() +
                 "); not published";
  }
  log("gate: " + std::string(res.passed ? "pass" : "FAIL") + " - " + res.reason);
  check_cancel("before publishing");

  // ---- publish
  if (res.passed && o.publish) {
    json meta = res.to_json();
    meta["llm"] = o.llm_path;
    meta["llm_identity"] = llm.identity;
    meta["encoder"] = o.encoder_path;
    meta["sessions"] = o.session_manifests;
    meta["replay"] = o.replay_manifests;
    meta["validation"] = o.val_manifests;
    meta["lr"] = o.lr;
    meta["batch"] = o.batch;
    meta["replay_ratio"] = o.replay_ratio;
    meta["gate_metric"] = to_string(o.gate_metric);
    meta["template"] = k_alignment_template_version;
    meta["max_response_tokens"] = o.max_response_tokens;
    try {
      res.published_version = o.publish(res.candidate, meta);
    } catch (const std::exception& e) {
      throw std::runtime_error("the gate passed but publishing " + res.candidate + " failed: " + e.what());
    }
    res.published = true;
    res.reason = "published as " + res.published_version + ": " + res.reason;
    log("published " + res.candidate + " as " + res.published_version);
  } else if (res.passed) {
    res.reason += " (no publish callback: candidate kept in " + o.out_dir + ")";
  }
  res.seconds = seconds_since(t_round);
  return res;
}

}  // namespace

// The pool is one epoch of the trainer's sampler (data_sampler with the same
// seed, stage 2 = phase 1, epoch 0) long, and its slot perm[j] holds draw j.
std::vector<alignment_example> mixed_pool(const std::vector<alignment_example>& session,
                                          const std::vector<alignment_example>& replay, int64_t steps, int64_t batch,
                                          int64_t k, uint64_t seed) {
  if (steps < 1 || batch < 1 || k < 0 || k > batch) throw std::invalid_argument("mixed_pool: bad steps/batch/k");
  if ((k < batch && session.empty()) || (k > 0 && replay.empty()))
    throw std::invalid_argument("mixed_pool: no examples for one of the streams");
  const size_t total = size_t(steps * batch);
  std::vector<size_t> so(session.size()), ro(replay.size());
  for (size_t i = 0; i < so.size(); ++i) so[i] = i;
  for (size_t i = 0; i < ro.size(); ++i) ro[i] = i;
  shuffle(so, seed ^ 0x5e55u);
  shuffle(ro, seed ^ 0x4e91u);
  std::vector<const alignment_example*> order;
  order.reserve(total);
  size_t si = 0, ri = 0;
  for (int64_t b = 0; b < steps; ++b)
    for (int64_t j = 0; j < batch; ++j) {
      if (j < k) order.push_back(&replay[ro[ri++ % ro.size()]]);
      else order.push_back(&session[so[si++ % so.size()]]);
    }
  data_sampler probe;
  probe.seed = seed;
  const auto perm = probe.next(1, total, total);
  std::vector<alignment_example> pool(total);
  for (size_t j = 0; j < total; ++j) pool[perm[j]] = *order[j];
  return pool;
}

finetune_result finetune_round(const finetune_options& opt) {
  check_options(opt);
  parse_mel_normalization(opt.mel_normalization);
  finetune_result res;
  std::exception_ptr err;
  // Own thread: its nice and OpenMP team size are the round's, the caller's are untouched.
  std::thread worker([&] {
    try {
      const std::string prio = lower_this_thread(opt.nice, opt.threads, opt.log);
      if (opt.log) opt.log("priority: " + prio);
      res = run_round(opt, prio);
    } catch (...) {
      err = std::current_exception();
    }
  });
  worker.join();
  if (err) std::rethrow_exception(err);
  return res;
}

}  // namespace undertone::models
