// Behavioral alignment training (models/nn/alignment.hpp) on the real frozen
// SmolLM2-135M and Whisper tiny.en with a handful of RAVDESS clips: teacher
// cache, loss masking, overfitting, frozen LLM, exact resume, atomic checkpoints.
#include <boost/test/unit_test.hpp>

#include <ATen/ATen.h>
#include <torch/csrc/autograd/generated/variable_factories.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>

#include "models/manifest.hpp"
#include "models/nn/alignment.hpp"
#include "models/train_metrics.hpp"
#include "tests/support.hpp"

namespace fs = std::filesystem;
using namespace undertone::models;
using undertone::testing::temp_dir;

namespace {

const std::string k_ravdess = undertone::testing::ravdess_dir();

/// Everything expensive, loaded once for all test cases.
struct world {
  alignment_llm llm;
  std::shared_ptr<whisper_encoder> enc;
  std::vector<utterance> train, val;  ///< 4 train clips (one per class), 2 val clips
  temp_dir cache;
  std::unique_ptr<feature_store> ftrain, fval;
  teacher_options topt;
  std::unique_ptr<teacher_cache> tcache;
  std::vector<alignment_example> emo, val_ex;

  world() {
    llm = alignment_llm::load(undertone::testing::llm_gguf_path());
    enc = whisper_encoder::from_ct2(undertone::testing::whisper_ct2_dir());
    ravdess_options ro;
    ro.with_duration = false;
    auto all = load_ravdess(k_ravdess, ro);
    for (auto lab : four_class_labels()) {
      for (const auto& u : all)
        if (u.emotion == lab && u.speaker == "ravdess-01" && u.intensity != intensity_level::normal) {
          train.push_back(u);
          break;
        }
      if (lab == emotion_label::neutral) {  // neutral has only normal intensity
        for (const auto& u : all)
          if (u.emotion == lab && u.speaker == "ravdess-01") {
            train.push_back(u);
            break;
          }
      }
    }
    for (const auto& u : all)
      if (u.split == split_kind::val && (u.emotion == emotion_label::sad || u.emotion == emotion_label::angry) &&
          val.size() < 2 && (val.empty() || val[0].emotion != u.emotion))
        val.push_back(u);
    BOOST_REQUIRE_EQUAL(train.size(), 4u);
    BOOST_REQUIRE_EQUAL(val.size(), 2u);
    mel_config mc;
    ftrain = std::make_unique<feature_store>(cache.str(), mc, enc, "whisper-tiny.en", true);
    fval = std::make_unique<feature_store>(cache.str(), mc, enc, "whisper-tiny.en", true);
    ftrain->prepare(train);
    fval->prepare(val);
    topt.max_tokens = 12;
    topt.batch = 8;
    tcache = std::make_unique<teacher_cache>(cache.str(), llm.identity, topt.max_tokens);
    auto four = [](emotion_label e) { return four_class_index(e) >= 0; };
    emo = build_examples(llm, *tcache, train, stage_tasks(alignment_stage::emotion), four, topt);
    val_ex = build_examples(llm, *tcache, val, stage_tasks(alignment_stage::emotion), four, topt);
  }

  speech_model fresh(uint64_t seed, int64_t encoder_layers = 0) {
    speech_model sm;
    sm.encoder = enc;
    enc->set_trainable_layers(encoder_layers);
    projector_config pc;
    pc.d_in = enc->output_dim();
    pc.d_out = llm.model->d_model();
    pc.d_hidden = 256;  // small: fast tests
    sm.proj = std::make_shared<projector>(pc, torch::kCPU, torch::kFloat32, seed);
    sm.trainable_encoder_layers = encoder_layers;
    return sm;
  }

  train_options opts(const std::string& out, int64_t steps, int64_t batch) const {
    train_options o;
    o.stage = alignment_stage::emotion;
    o.steps = steps;
    o.batch = batch;
    o.lr = 3e-3;
    o.warmup = 2;
    o.val_every = 0;
    o.ckpt_every = 0;
    o.out_dir = out;
    o.plot = false;
    o.quiet = true;
    return o;
  }
};

world& W() {
  static world w;
  return w;
}

uint64_t fnv(const torch::Tensor& t) {
  torch::Tensor c = t.contiguous();
  const auto* p = static_cast<const unsigned char*>(c.data_ptr());
  uint64_t h = 1469598103934665603ull;
  for (size_t i = 0, n = size_t(c.numel()) * c.element_size(); i < n; ++i) h = (h ^ p[i]) * 1099511628211ull;
  return h;
}

bool same_bits(const torch::Tensor& a, const torch::Tensor& b) {
  return a.sizes().equals(b.sizes()) && a.scalar_type() == b.scalar_type() &&
         std::memcmp(a.contiguous().data_ptr(), b.contiguous().data_ptr(), size_t(a.numel()) * a.element_size()) == 0;
}

}  // namespace

BOOST_AUTO_TEST_CASE(prompts_place_speech_where_the_user_text_was) {
  auto& w = W();
  BOOST_TEST(teacher_user_text(alignment_task::semantic, "Hi there", emotion_label::sad) == "Hi there");
  BOOST_TEST(teacher_user_text(alignment_task::emotion, "Hi there", emotion_label::sad) ==
             "[The speaker sounds sad.] Hi there");
  BOOST_TEST(teacher_user_text(alignment_task::emotion_question, "Hi", emotion_label::angry) ==
             "[The speaker sounds angry.] Hi\nHow does the speaker feel?");
  BOOST_CHECK_THROW(emotion_cue(emotion_label::unlabeled), std::invalid_argument);
  auto [pre, suf] = w.llm.student_prompt(alignment_task::emotion_question);
  std::string full = w.llm.templ.apply({{"user", "X\nHow does the speaker feel?"}}, true);
  BOOST_TEST(w.llm.tok->decode(pre) + "X" + w.llm.tok->decode(suf) == full);
  BOOST_TEST(w.llm.tok->decode(pre).find("<|im_start|>system\n") == 0u);  // the model's default system prompt
  const std::string ps = w.llm.tok->decode(pre), tail = "<|im_end|>\n<|im_start|>user\n";
  BOOST_TEST(ps.compare(ps.size() - tail.size(), tail.size(), tail) == 0);
  BOOST_TEST(w.llm.tok->decode(suf) == "\nHow does the speaker feel?<|im_end|>\n<|im_start|>assistant\n");
  BOOST_TEST(w.llm.tok->piece(w.llm.end_of_turn) == "<|im_end|>");
}

BOOST_AUTO_TEST_CASE(teacher_cache_hits_and_misses) {
  auto& w = W();
  temp_dir d;
  std::vector<teacher_request> reqs = {{alignment_task::emotion, "Kids are talking by the door", emotion_label::sad},
                                       {alignment_task::semantic, "Dogs are sitting by the door", emotion_label::unlabeled},
                                       {alignment_task::emotion, "Kids are talking by the door", emotion_label::sad},
                                       {alignment_task::emotion, "Kids are talking by the door", emotion_label::happy}};
  teacher_cache c1(d.str(), w.llm.identity, w.topt.max_tokens);
  teacher_stats st;
  auto r1 = teacher_responses(w.llm, c1, reqs, w.topt, &st);
  BOOST_TEST(st.generated == 3u);  // the duplicate is generated once
  BOOST_TEST(st.hits == 0u);
  BOOST_TEST(r1[0].tokens == r1[2].tokens);
  BOOST_TEST(!r1[0].tokens.empty());
  BOOST_TEST(r1[0].tokens != r1[3].tokens);  // the stated emotion changes the answer
  BOOST_TEST_MESSAGE("sad: " << r1[0].text << " | happy: " << r1[3].text << " | semantic: " << r1[1].text);
  // Batched greedy decoding equals one sequence at a time.
  teacher_options one = w.topt;
  one.batch = 1;
  auto solo = generate_teacher(w.llm, {reqs[0], reqs[1], reqs[3]}, one);
  BOOST_TEST(solo[0].tokens == r1[0].tokens);
  BOOST_TEST(solo[1].tokens == r1[1].tokens);
  BOOST_TEST(solo[2].tokens == r1[3].tokens);
  BOOST_TEST(w.llm.tok->decode(r1[0].tokens) == r1[0].text);

  // A new cache object over the same directory: all hits, same answers.
  {
    std::ofstream(c1.file(), std::ios::app) << "{\"key\": \"torn";  // a crash mid-append
  }
  teacher_cache c2(d.str(), w.llm.identity, w.topt.max_tokens);
  BOOST_TEST(c2.size() == 3u);
  auto r2 = teacher_responses(w.llm, c2, reqs, w.topt, &st);
  BOOST_TEST(st.generated == 0u);
  BOOST_TEST(st.hits == 4u);
  for (size_t i = 0; i < reqs.size(); ++i) {
    BOOST_TEST(r2[i].tokens == r1[i].tokens);
    BOOST_TEST(r2[i].ended == r1[i].ended);
  }
  // Another model identity or answer cap: misses.
  teacher_cache c3(d.str(), w.llm.identity + "x", w.topt.max_tokens);
  BOOST_TEST(!c3.find(reqs[0]).has_value());
  teacher_cache c4(d.str(), w.llm.identity, w.topt.max_tokens + 1);
  BOOST_TEST(!c4.find(reqs[0]).has_value());
  BOOST_TEST(c2.find(reqs[0]).has_value());

  // An answer cut inside a multi-byte character (token cap) is stored (text with
  // U+FFFD, ids intact) instead of failing the whole run.
  teacher_request cut{alignment_task::semantic, "Say something in Japanese", emotion_label::unlabeled};
  teacher_response partial{{42, 43}, std::string("ok \xe3\x81"), false};
  c2.put(cut, partial);
  teacher_cache c5(d.str(), w.llm.identity, w.topt.max_tokens);
  auto back = c5.find(cut);
  BOOST_REQUIRE(back.has_value());
  BOOST_TEST(back->tokens == partial.tokens);
  BOOST_TEST(back->text == "ok \xef\xbf\xbd");
}

BOOST_AUTO_TEST_CASE(teacher_answers_in_the_teacher_dtype) {
  // The serving LLM runs in fp32 (W().llm); the answers are wanted in bf16: on a
  // cache miss a second, bf16 copy generates them.
  auto& w = W();
  temp_dir d;
  const std::vector<teacher_request> reqs = {
      {alignment_task::emotion, "Kids are talking by the door", emotion_label::angry},
      {alignment_task::semantic, "Dogs are sitting by the door", emotion_label::unlabeled}};
  const llama_options serving;  // fp32, as W().llm was loaded
  teacher_cache cache(d.str(), w.llm.identity + "|bf16", w.topt.max_tokens);
  teacher_stats st;
  auto got = teacher_responses_in_dtype(w.llm, serving, "bf16", "auto", cache, reqs, w.topt, &st);
  BOOST_TEST(st.generated == 2u);
  llama_options bf16 = serving;
  bf16.dtype = torch::kBFloat16;
  const auto direct = generate_teacher(alignment_llm::load(w.llm.path, bf16), reqs, w.topt);
  for (size_t i = 0; i < reqs.size(); ++i) BOOST_TEST(got[i].tokens == direct[i].tokens);
  // All cached now: nothing generated.
  got = teacher_responses_in_dtype(w.llm, serving, "bf16", "auto", cache, reqs, w.topt, &st);
  BOOST_TEST(st.generated == 0u);
  BOOST_TEST(st.hits == 2u);
  // The serving dtype itself: the serving LLM answers.
  teacher_cache same(d.str(), w.llm.identity + "|fp32", w.topt.max_tokens);
  got = teacher_responses_in_dtype(w.llm, serving, "fp32", "auto", same, reqs, w.topt, &st);
  const auto own = generate_teacher(w.llm, reqs, w.topt);
  for (size_t i = 0; i < reqs.size(); ++i) BOOST_TEST(got[i].tokens == own[i].tokens);
  // A dtype name that is neither, on a miss: a clear error.
  teacher_cache other(d.str(), w.llm.identity + "|fp8", w.topt.max_tokens);
  try {
    teacher_responses_in_dtype(w.llm, serving, "fp8", "auto", other, reqs, w.topt, &st, {}, "eval: ");
    BOOST_FAIL("teacher dtype fp8 was accepted");
  } catch (const std::invalid_argument& e) {
    BOOST_TEST(std::string(e.what()) == "eval: teacher dtype 'fp8' is not fp32 or bf16");
  }
}

BOOST_AUTO_TEST_CASE(feature_cache_hits) {
  auto& w = W();
  feature_store again(w.cache.str(), mel_config{}, w.enc, "whisper-tiny.en", true);
  again.prepare(w.train);
  BOOST_TEST(again.cache_hits() == w.train.size());
  for (size_t i = 0; i < w.train.size(); ++i) BOOST_TEST(same_bits(again.get(i), w.ftrain->get(i)));
  BOOST_TEST(w.ftrain->get(0).size(1) == 384);
}

BOOST_AUTO_TEST_CASE(loss_counts_only_response_tokens) {
  auto& w = W();
  auto sm = w.fresh(3);
  std::vector<const alignment_example*> ex = {&w.emo[0], &w.emo[1]};
  auto b = collate(w.llm, sm, *w.ftrain, ex, true);
  int64_t expect = 0;
  for (auto* e : ex) expect += int64_t(e->response.size()) + (e->ended ? 1 : 0);
  BOOST_TEST(b.n_tokens == expect);
  BOOST_TEST(b.loss_mask.sum().item<int64_t>() == expect);
  BOOST_TEST(b.teacher_loss_mask.sum().item<int64_t>() == expect);
  // Masked targets are exactly R (+ <|im_end|>), in order, for row 0.
  {
    auto idx = b.loss_mask[0].nonzero().squeeze(1);
    auto t = b.targets[0].index_select(0, idx);
    std::vector<int32_t> want = ex[0]->response;
    if (ex[0]->ended) want.push_back(w.llm.end_of_turn);
    BOOST_REQUIRE_EQUAL(t.size(0), int64_t(want.size()));
    for (size_t j = 0; j < want.size(); ++j) BOOST_TEST(t[int64_t(j)].item<int64_t>() == want[j]);
    // ... and they sit at the end of the row's real tokens.
    BOOST_TEST(idx[-1].item<int64_t>() == b.attention_mask[0].sum().item<int64_t>() - 2);
  }
  torch::NoGradGuard ng;
  loss_options lo;
  lo.kl_weight = 0.5;
  auto l0 = alignment_loss(w.llm, b, lo);
  BOOST_TEST(std::isfinite(l0.ce));
  BOOST_TEST(l0.kl > 0);
  // A prompt position's target: no effect at all.
  auto b1 = b;
  b1.targets = b.targets.clone();
  auto prompt_pos = b.loss_mask[0].logical_not().logical_and(b.attention_mask[0].to(torch::kBool)).nonzero();
  b1.targets.index_put_({0, prompt_pos[3][0].item<int64_t>()}, 1234);
  b1.targets.index_put_({1, 0}, 777);
  auto l1 = alignment_loss(w.llm, b1, lo);
  BOOST_TEST(l1.ce == l0.ce);
  BOOST_TEST(l1.kl == l0.kl);
  // A response position's target: changes the loss.
  auto b2 = b;
  b2.targets = b.targets.clone();
  auto resp_pos = b.loss_mask[0].nonzero();
  b2.targets.index_put_({0, resp_pos[0][0].item<int64_t>()}, 1234);
  auto l2 = alignment_loss(w.llm, b2, lo);
  BOOST_TEST(l2.ce != l0.ce);
  BOOST_TEST(l2.ce > l0.ce);  // 1234 is not what the LLM expects there
}

BOOST_AUTO_TEST_CASE(training_lowers_the_loss_and_leaves_the_llm_untouched) {
  auto& w = W();
  std::vector<std::pair<std::string, uint64_t>> before;
  for (const auto& [n, p] : w.llm.model->named_parameters()) {
    BOOST_TEST(!p.requires_grad());
    before.emplace_back(n, fnv(p));
  }
  temp_dir out;
  auto sm = w.fresh(7);
  auto o = w.opts(out.str(), 10, 4);
  o.lr = 5e-3;
  o.ckpt_every = 5;
  // Validation on the training examples themselves: the overfit check.
  alignment_trainer tr(w.llm, sm, *w.ftrain, w.ftrain.get(), {}, w.emo, w.emo, o);
  double start = tr.validate().ce;
  tr.train();
  double end = tr.validate().ce;
  BOOST_TEST_MESSAGE("overfit 4 clips x 2 tasks, 10 steps: loss " << start << " -> " << end);
  BOOST_TEST(end < 0.8 * start);
  // Metrics, checkpoints and exported weights exist and load.
  auto rows = read_metrics((out.path / "metrics.jsonl").string());
  size_t train_rows = 0, val_rows = 0;
  for (const auto& r : rows) (r["kind"] == "train" ? train_rows : val_rows)++;
  BOOST_TEST(train_rows == 10u);
  BOOST_TEST(val_rows == 1u);
  BOOST_TEST(fs::exists(out.path / "checkpoints" / "step-0000010" / "state.json"));
  BOOST_TEST(fs::exists(out.path / "checkpoints" / "step-0000005" / "trainables.safetensors"));
  auto p = projector::load((out.path / "projector.safetensors").string());
  BOOST_TEST(same_bits(p->named_parameters()["gate_weight"], sm.proj->named_parameters()["gate_weight"]));
  // The LLM is bit-identical.
  auto after = w.llm.model->named_parameters();
  BOOST_REQUIRE_EQUAL(after.size(), before.size());
  for (size_t i = 0; i < after.size(); ++i) {
    BOOST_TEST(!after[i].second.requires_grad());
    BOOST_TEST(fnv(after[i].second) == before[i].second, after[i].first);
  }
}

BOOST_AUTO_TEST_CASE(resume_is_exact_and_checkpoints_are_atomic) {
  auto& w = W();
  const int64_t N = 4;
  temp_dir a, b;
  // Straight run.
  auto sa = w.fresh(11);
  alignment_trainer ta(w.llm, sa, *w.ftrain, w.fval.get(), {}, w.emo, w.val_ex, w.opts(a.str(), N, 2));
  ta.train();
  // Half, then a crash while writing the next checkpoint, then resume in a new trainer.
  {
    auto sb = w.fresh(11);
    alignment_trainer tb(w.llm, sb, *w.ftrain, w.fval.get(), {}, w.emo, w.val_ex, w.opts(b.str(), N, 2));
    tb.train(N / 2);
    BOOST_TEST(tb.step() == N / 2);
    const std::string latest_before = [&] {
      std::ifstream f(b.path / "latest");
      std::string s;
      std::getline(f, s);
      return s;
    }();
    BOOST_TEST(latest_before == "checkpoints/step-0000002");
    const auto good = fs::file_size(b.path / "checkpoints" / "step-0000002" / "trainables.safetensors");
    tb.on_checkpoint_file = [](const std::string& f) {
      if (f == "optimizer.safetensors") throw std::runtime_error("simulated power cut");
    };
    // Perturb the weights so that a half-written checkpoint would differ.
    {
      torch::NoGradGuard ng;
      for (auto& [n, t] : sb.trainables()) t.add_(1.0);
    }
    BOOST_CHECK_THROW(tb.save_checkpoint(), std::runtime_error);
    std::ifstream f(b.path / "latest");
    std::string s;
    std::getline(f, s);
    BOOST_TEST(s == latest_before);
    BOOST_TEST(fs::file_size(b.path / "checkpoints" / "step-0000002" / "trainables.safetensors") == good);
    size_t step_dirs = 0;
    for (const auto& e : fs::directory_iterator(b.path / "checkpoints"))
      step_dirs += e.path().filename().string().rfind("step-", 0) == 0;
    BOOST_TEST(step_dirs == 1u);
  }
  auto sc = w.fresh(99);  // other init: everything must come from the checkpoint
  alignment_trainer tc(w.llm, sc, *w.ftrain, w.fval.get(), {}, w.emo, w.val_ex, w.opts(b.str(), N, 2));
  BOOST_TEST(tc.resume() == N / 2);
  tc.train();
  BOOST_TEST(tc.step() == N);
  auto pa = sa.trainables(), pc = sc.trainables();
  BOOST_REQUIRE_EQUAL(pa.size(), pc.size());
  for (size_t i = 0; i < pa.size(); ++i) BOOST_TEST(same_bits(pa[i].second, pc[i].second), pa[i].first);
  // The interrupted save's leftovers are gone; metrics hold each step once.
  for (const auto& e : fs::directory_iterator(b.path / "checkpoints"))
    BOOST_TEST(e.path().filename().string().rfind(".tmp-", 0) != 0);
  auto rows = read_metrics((b.path / "metrics.jsonl").string());
  std::vector<int64_t> steps;
  for (const auto& r : rows)
    if (r["kind"] == "train") steps.push_back(r["step"].get<int64_t>());
  BOOST_TEST(steps == std::vector<int64_t>({1, 2, 3, 4}), boost::test_tools::per_element());
  // Resuming with another batch size is refused.
  auto sd = w.fresh(1);
  alignment_trainer td(w.llm, sd, *w.ftrain, w.fval.get(), {}, w.emo, w.val_ex, w.opts(b.str(), N, 3));
  BOOST_CHECK_THROW(td.resume(), std::runtime_error);
}

BOOST_AUTO_TEST_CASE(top_encoder_layer_trains_from_log_mel) {
  auto& w = W();
  temp_dir cache, out;
  feature_store mel(cache.str(), mel_config{}, w.enc, "whisper-tiny.en", false);
  mel.prepare(w.train);
  BOOST_TEST(mel.get(0).size(1) == 80);
  auto sm = w.fresh(5, 1);
  auto names = sm.trainables();
  bool has_top = false, has_bottom = false;
  for (const auto& [n, t] : names) {
    has_top |= n.rfind("encoder.layers.3.", 0) == 0;
    has_bottom |= n.rfind("encoder.layers.0.", 0) == 0;
  }
  BOOST_TEST(has_top);
  BOOST_TEST(!has_bottom);
  std::map<std::string, torch::Tensor> before;
  for (const auto& p : w.enc->named_parameters()) before[p.key()] = p.value().detach().clone();
  alignment_trainer tr(w.llm, sm, mel, nullptr, {}, w.emo, {}, w.opts(out.str(), 1, 2));
  tr.train();
  for (const auto& p : w.enc->named_parameters()) {
    bool changed = !same_bits(before[p.key()], p.value().detach());
    BOOST_TEST(changed == p.value().requires_grad(), p.key());
  }
  BOOST_TEST(fs::exists(out.path / "encoder_layers.safetensors"));
  w.enc->set_trainable_layers(0);
  // Restore the shared encoder for any later case.
  torch::NoGradGuard ng;
  for (const auto& p : w.enc->named_parameters()) p.value().copy_(before[p.key()]);
}

BOOST_AUTO_TEST_CASE(schedule_and_metrics_plot) {
  train_options o;
  o.lr = 1e-3;
  o.warmup = 10;
  o.steps = 110;
  o.min_lr_ratio = 0.1;
  BOOST_TEST(lr_at(o, 0) == 1e-4, boost::test_tools::tolerance(1e-12));
  BOOST_TEST(lr_at(o, 9) == 1e-3, boost::test_tools::tolerance(1e-12));
  BOOST_TEST(lr_at(o, 60) == 0.55e-3, boost::test_tools::tolerance(1e-9));
  BOOST_TEST(lr_at(o, 110) == 1e-4, boost::test_tools::tolerance(1e-9));
  data_sampler s1, s2;
  s1.seed = s2.seed = 4;
  auto a = s1.next(1, 5, 7);  // crosses an epoch
  std::vector<size_t> first(a.begin(), a.begin() + 5);
  std::sort(first.begin(), first.end());
  BOOST_TEST(first == std::vector<size_t>({0, 1, 2, 3, 4}), boost::test_tools::per_element());
  auto b1 = s2.next(1, 5, 3);
  auto b2 = s2.next(1, 5, 4);
  b1.insert(b1.end(), b2.begin(), b2.end());
  BOOST_TEST(a == b1, boost::test_tools::per_element());
  temp_dir d;
  {
    metrics_log log((d.path / "m.jsonl").string());
    for (int i = 1; i <= 20; ++i) log.write({{"kind", "train"}, {"step", i}, {"loss", 3.0 / i}});
    log.write({{"kind", "val"}, {"step", 20}, {"val_loss", 0.5}});
  }
  {
    metrics_log log((d.path / "m.jsonl").string(), 10);  // resume at step 10 drops later rows
  }
  BOOST_TEST(read_metrics((d.path / "m.jsonl").string()).size() == 10u);
  std::string err = plot_loss_curves((d.path / "m.jsonl").string(), (d.path / "loss.png").string());
  if (find_in_path("gnuplot").empty()) {
    BOOST_TEST(err.find("gnuplot-nox") != std::string::npos);
  } else {
    BOOST_TEST(err == "");
    BOOST_TEST(fs::file_size(d.path / "loss.png") > 1000u);
  }
  BOOST_TEST(fs::exists(d.path / "loss.gp"));
}
