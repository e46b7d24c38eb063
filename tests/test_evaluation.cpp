// `undertone eval` (models/evaluation.hpp, models/nn/evaluation.hpp): label
// mapping, ROUGE-L, the linear probe on synthetic features, the teacher-forced
// ranking on the real frozen SmolLM2-135M, and a whole evaluation of a fresh
// projector on 8 RAVDESS clips.
#include <boost/test/unit_test.hpp>

#include <ATen/ATen.h>
#include <torch/csrc/autograd/generated/variable_factories.h>

#include <filesystem>
#include <fstream>
#include <random>

#include "models/evaluation.hpp"
#include "models/manifest.hpp"
#include "models/nn/alignment.hpp"
#include "models/nn/evaluation.hpp"
#include "models/train_metrics.hpp"
#include "tests/support.hpp"

namespace fs = std::filesystem;
using namespace undertone::models;
using undertone::testing::temp_dir;

namespace {

int cls(const char* name) { return four_class_index(parse_emotion(name)); }

alignment_llm& LLM() {
  static alignment_llm llm = alignment_llm::load(undertone::testing::llm_gguf_path());
  return llm;
}

torch::Tensor ids(const std::vector<int32_t>& v) {
  std::vector<int64_t> w(v.begin(), v.end());
  return torch::tensor(w, torch::kLong);
}

}  // namespace

BOOST_AUTO_TEST_CASE(answers_map_to_labels_with_negation_and_ambiguity) {
  BOOST_TEST(answer_to_class("The speaker sounds sad.") == cls("sad"));
  BOOST_TEST(answer_to_class("They feel happy and excited!") == cls("happy"));
  BOOST_TEST(answer_to_class("The speaker is furious about the delay.") == cls("angry"));
  BOOST_TEST(answer_to_class("The speaker seems calm and neutral.") == cls("neutral"));
  BOOST_TEST(answer_to_class("Unhappy, I think.") == cls("sad"));               // whole words: not "happy"
  BOOST_TEST(answer_to_class("The speaker\xE2\x80\x99s tone is sad") == cls("sad"));  // curly apostrophe
  BOOST_TEST(answer_to_class("Honestly, I am fed up with this.") == cls("angry"));  // phrase keyword
  BOOST_TEST(answer_to_class("The speaker is not happy.") == -1);               // negated: nothing left
  BOOST_TEST(answer_to_class("The speaker is not happy, they are sad.") == cls("sad"));
  BOOST_TEST(answer_to_class("The speaker doesn't sound angry; rather sad") == cls("sad"));
  BOOST_TEST(answer_to_class("Either happy or sad.") == -1);                    // two classes: unknown
  BOOST_TEST(answer_to_class("A mix of emotions, and I'm happy to help.") == -1);  // willingness, not emotion
  BOOST_TEST(answer_to_class("They sound sad. I'm glad to help.") == cls("sad"));
  BOOST_TEST(answer_to_class("I'm sorry, I cannot determine that from text.") == -1);
  BOOST_TEST(answer_to_class("") == -1);
  for (const auto& k : answer_keywords())  // every keyword maps to its own class
    for (const auto& w : k.words) {
      BOOST_TEST_INFO(w);
      BOOST_TEST(answer_to_class("The speaker feels " + w + ".") == four_class_index(k.label));
    }
}

BOOST_AUTO_TEST_CASE(word_tokens_and_rouge_l_match_hand_computed_values) {
  BOOST_TEST((word_tokens("Hello, World! It's 5 o'clock.") ==
              std::vector<std::string>{"hello", "world", "it's", "5", "o'clock"}));
  BOOST_TEST((word_tokens("'quoted'") == std::vector<std::string>{"quoted"}));
  auto w = [](const char* s) { return word_tokens(s); };
  // LCS "the cat on the mat" = 5 of 6 and 6: F1 = 5/6.
  BOOST_TEST(rouge_l_f1(w("the cat sat on the mat"), w("the cat is on the mat")) == 5.0 / 6.0,
             boost::test_tools::tolerance(1e-12));
  // LCS 1 of 4 and 4: 0.25.
  BOOST_TEST(rouge_l_f1(w("a b c d"), w("d c b a")) == 0.25, boost::test_tools::tolerance(1e-12));
  // P = 1, R = 1/2: F1 = 2/3.
  BOOST_TEST(rouge_l_f1(w("a b"), w("a x b y")) == 2.0 / 3.0, boost::test_tools::tolerance(1e-12));
  BOOST_TEST(rouge_l_f1(w("a b"), w("c d")) == 0.0);
  BOOST_TEST(rouge_l_f1({}, {}) == 1.0);
  BOOST_TEST(rouge_l_f1(w("a"), {}) == 0.0);
  BOOST_TEST(rouge_l_f1(w("Same words."), w("same WORDS")) == 1.0);
}

BOOST_AUTO_TEST_CASE(class_metric_counts_unknown_as_wrong) {
  class_metric m;
  m.add(0, 0);
  m.add(1, -1);
  m.add(2, 2);
  m.add(2, 3);
  BOOST_TEST(m.n() == 4);
  BOOST_TEST(m.correct() == 2);
  BOOST_TEST(m.accuracy() == 0.5);
  BOOST_TEST(m.unknown_rate() == 0.25);
  BOOST_TEST(m.recall(2) == 0.5);
  BOOST_TEST(std::isnan(m.recall(3)));
  BOOST_TEST(m.confusion[1][4] == 1);
}

BOOST_AUTO_TEST_CASE(probe_separates_separable_features_and_not_shuffled_labels) {
  std::mt19937 rng(7);
  const int64_t D = 16, n_train = 200, n_test = 400;
  torch::manual_seed(3);
  torch::Tensor means = torch::randn({4, D}) * 3.0;
  auto make = [&](int64_t n, std::vector<int>& y) {
    torch::Tensor x = torch::randn({n, D});
    for (int64_t i = 0; i < n; ++i) {
      y.push_back(int(i % 4));
      x[i] += means[i % 4];
    }
    return x;
  };
  std::vector<int> ytr, yte;
  torch::Tensor xtr = make(n_train, ytr), xte = make(n_test, yte);
  auto acc = [&](const std::vector<int>& pred) {
    int ok = 0;
    for (size_t i = 0; i < pred.size(); ++i) ok += pred[i] == yte[i];
    return double(ok) / double(pred.size());
  };
  auto fit = fit_linear_probe(xtr, ytr, xte, 4);
  BOOST_TEST(fit.train_accuracy >= 0.99);
  BOOST_TEST(acc(fit.predictions) >= 0.98);
  std::vector<int> shuffled = ytr;
  std::shuffle(shuffled.begin(), shuffled.end(), rng);
  auto bad = fit_linear_probe(xtr, shuffled, xte, 4);
  BOOST_TEST(acc(bad.predictions) < 0.40);  // chance is 0.25
  BOOST_CHECK_THROW(fit_linear_probe(xtr, std::vector<int>(3, 0), xte, 4), std::invalid_argument);
}

BOOST_AUTO_TEST_CASE(ranking_with_the_emotion_stated_text_as_speech_ranks_the_right_emotion_first) {
  auto& llm = LLM();
  torch::NoGradGuard ng;
  const std::string transcript = "Kids are talking by the door";
  std::vector<teacher_request> reqs;
  for (auto e : four_class_labels()) reqs.push_back({alignment_task::emotion, transcript, e});
  teacher_options topt;
  topt.max_tokens = 16;
  auto answers = generate_teacher(llm, reqs, topt);
  auto [pre, suf] = llm.student_prompt(alignment_task::emotion);
  torch::Tensor pre_e = llm.model->embed_tokens(ids(pre));
  size_t correct = 0;
  for (size_t truth = 0; truth < 4; ++truth) {
    // "Speech" rows = the token embeddings of the text that the teacher saw in their place.
    std::string user = teacher_user_text(alignment_task::emotion, transcript, four_class_labels()[truth]);
    torch::Tensor prefix = torch::cat({pre_e, llm.model->embed_tokens(ids(llm.tok->encode(user, true)))}, 0);
    std::vector<torch::Tensor> prefixes;
    std::vector<std::vector<int32_t>> conts;
    std::vector<int64_t> scored;
    for (const auto& a : answers) {
      std::vector<int32_t> resp = a.tokens;
      if (a.ended) resp.push_back(llm.end_of_turn);
      std::vector<int32_t> c = suf;
      c.insert(c.end(), resp.begin(), resp.end());
      prefixes.push_back(prefix);
      conts.push_back(c);
      scored.push_back(int64_t(resp.size()));
    }
    auto lp = mean_continuation_logprob(llm, prefixes, conts, scored, 3);  // 3: batches of unequal lengths
    // The same scores as with the teacher's own text prompt (the rows are exactly its tokens).
    std::vector<torch::Tensor> tp(4, llm.model->embed_tokens(ids(llm.teacher_prompt(
                                         alignment_task::emotion, transcript, four_class_labels()[truth]))));
    std::vector<std::vector<int32_t>> resps;
    for (const auto& c : conts) resps.emplace_back(c.begin() + long(suf.size()), c.end());
    auto lt = mean_continuation_logprob(llm, tp, resps, scored, 4);
    BOOST_TEST_INFO("true " << to_string(four_class_labels()[truth]) << ": mean log-prob " << lp[0] << " " << lp[1]
                            << " " << lp[2] << " " << lp[3]);
    for (size_t e = 0; e < 4; ++e) BOOST_TEST(lp[e] == lt[e], boost::test_tools::tolerance(1e-4));
    correct += size_t(std::max_element(lp.begin(), lp.end()) - lp.begin()) == truth;
  }
  // SmolLM2-135M's sad and angry answers to this sentence are nearly the same text, and a generic answer
  // can outscore the greedy one on average per token: 3 of 4 (happy loses to angry by 0.1 nats/token).
  // This is the metric's ceiling with this teacher (the `oracle` row of undertone eval), not a code error.
  BOOST_TEST(correct >= 3u);
  // The batched teacher-forced score equals the KV-cache path (model->step), token by token.
  const auto& a = answers[2];
  std::vector<int32_t> prompt = llm.teacher_prompt(alignment_task::emotion, transcript, four_class_labels()[2]);
  std::vector<int32_t> resp = a.tokens;
  if (a.ended) resp.push_back(llm.end_of_turn);
  kv_cache cache = llm.model->make_cache(int64_t(prompt.size() + resp.size()) + 4);
  llm_batch b;
  std::vector<int32_t> all = prompt;
  all.insert(all.end(), resp.begin(), resp.end());
  for (size_t p = 0; p + 1 < all.size(); ++p) b.add_token(all[p], 0, int64_t(p), p + 1 >= prompt.size());
  torch::Tensor logp = at::log_softmax(llm.model->step(b, cache), -1);
  double ref = 0;
  for (size_t j = 0; j < resp.size(); ++j) ref += logp[int64_t(j)][resp[j]].item<double>();
  ref /= double(resp.size());
  auto lp = mean_continuation_logprob(llm, {llm.model->embed_tokens(ids(prompt))}, {resp}, {int64_t(resp.size())});
  BOOST_TEST(lp[0] == ref, boost::test_tools::tolerance(1e-4));
}

BOOST_AUTO_TEST_CASE(speaker_in_both_splits_is_refused) {
  utterance a, b;
  a.audio = b.audio = "/nonexistent.wav";
  a.transcript = b.transcript = "x";
  a.speaker = b.speaker = "spk";
  a.corpus = b.corpus = "t";
  a.split = split_kind::train;
  b.split = split_kind::val;
  eval_options o;
  o.utterances = {a, b};
  o.systems = {{"speech", ""}};
  BOOST_CHECK_THROW(run_evaluation(o), std::exception);
}

BOOST_AUTO_TEST_CASE(whole_eval_on_eight_ravdess_clips_writes_the_report) {
  ravdess_options ro;
  ro.with_duration = false;
  auto all = load_ravdess(undertone::testing::ravdess_dir(), ro);
  std::vector<utterance> pick;
  for (auto sp : {split_kind::train, split_kind::val})
    for (auto lab : four_class_labels())
      for (const auto& u : all)
        if (u.split == sp && u.emotion == lab) {
          pick.push_back(u);
          break;
        }
  BOOST_REQUIRE_EQUAL(pick.size(), 8u);
  temp_dir cache, out;
  eval_options o;
  o.utterances = pick;
  o.systems = {{"speech", ""}};
  o.fresh_hidden = 128;
  o.llm_path = undertone::testing::llm_gguf_path();
  o.encoder_path = undertone::testing::whisper_ct2_dir();
  o.cache_dir = cache.str();
  o.max_response_tokens = 8;
  o.answer_tokens = 6;
  o.probe_iterations = 30;
  o.quiet = true;
  auto rep = run_evaluation(o);
  BOOST_REQUIRE_EQUAL(rep.systems.size(), 5u);
  BOOST_TEST(rep.systems[0].name == "speech");
  BOOST_TEST(rep.systems[1].name == "encoder");
  BOOST_TEST(rep.systems[2].name == "text");
  BOOST_TEST(rep.systems[3].name == "oracle");
  BOOST_TEST(rep.systems[4].name == "chance");
  BOOST_TEST(rep.probe_train == 4);
  BOOST_TEST((rep.class_counts == std::vector<int64_t>{1, 1, 1, 1}));
  const auto& s = rep.systems[0];
  BOOST_TEST(s.probe.n() == 4);
  BOOST_TEST(s.answer.n() == 4);
  BOOST_TEST(s.ranking.n() == 4);
  BOOST_TEST(s.ranking.unknown() == 0);
  BOOST_TEST(rep.systems[3].ranking.n() == 4);
  BOOST_TEST(s.rouge_l >= 0.0);
  BOOST_TEST(s.rouge_l <= 1.0);
  BOOST_TEST(s.hidden_cosine >= -1.0);
  BOOST_TEST(s.hidden_cosine <= 1.0);
  BOOST_TEST(rep.systems[2].fidelity_reference);
  BOOST_TEST(rep.systems[4].ranking.accuracy() == 0.25);
  auto problems = write_eval_outputs(rep, out.str());
  for (const auto& p : problems) BOOST_TEST_MESSAGE("plot: " << p);
  BOOST_TEST(fs::exists(out.path / "eval.md"));
  BOOST_TEST(fs::exists(out.path / "eval.json"));
  if (!find_in_path("gnuplot").empty()) {
    BOOST_TEST(problems.empty());
    for (const char* f : {"confusion_speech_probe.png", "confusion_speech_answer.png", "confusion_speech_ranking.png",
                          "confusion_encoder_probe.png", "confusion_text_ranking.png",
                          "confusion_oracle_ranking.png"})
    {
      BOOST_TEST_INFO(f);
      BOOST_TEST(fs::exists(out.path / f));
    }
  }
  std::ifstream jf(out.path / "eval.json");
  auto j = nlohmann::json::parse(jf);
  BOOST_TEST(j["format"] == "undertone.eval");
  BOOST_TEST(j["systems"].size() == 5u);
  BOOST_TEST(j["systems"][0]["utterances"].size() == 4u);
  BOOST_TEST(j["systems"][0]["utterances"][0].contains("answer"));
  std::string md = eval_markdown(rep);
  BOOST_TEST(md.find("| speech |") != std::string::npos);
  BOOST_TEST(md.find("| chance | 25.0 |") != std::string::npos);
  // A second run hits both caches (teacher answers and features).
  auto rep2 = run_evaluation(o);
  BOOST_TEST((rep2.systems[0].ranking.confusion == s.ranking.confusion));
}
