// chat_llm: the text-generation facade (template, tokenizer, KV reuse, sampler,
// streaming, stops) on the pinned SmolLM2, against llama.cpp's golden greedy
// continuation (tests/golden/llm_golden.json, fp32 weights).
#include <boost/test/unit_test.hpp>

#include <fstream>

#include <nlohmann/json.hpp>

#include "models/chat_llm.hpp"
#include "models/runtime.hpp"
#include "support.hpp"

using namespace undertone;
using models::chat_message;
using models::prompt_part;

namespace {
models::chat_llm& llm() {
  static std::unique_ptr<models::chat_llm> m = [] {
    models::set_compute_threads(2);
    models::chat_llm_options o;
    o.path = testing::llm_gguf_path();
    o.context_tokens = 512;
    o.kv_cells = 4096;
    return std::make_unique<models::chat_llm>(o);
  }();
  return *m;
}
const nlohmann::json& golden_chat() {
  static nlohmann::json g = [] {
    nlohmann::json j = testing::read_golden_json("llm_golden.json");
    for (auto& p : j["f32"])
      if (p["text"].get<std::string>().rfind("<|im_start|>system", 0) == 0) return p;
    throw std::runtime_error("no chatml prompt in llm_golden.json");
  }();
  return g;
}
models::generation_request greedy(int64_t max_tokens) {
  models::generation_request r;
  r.sampling.temperature = 0;
  r.max_tokens = max_tokens;
  return r;
}
const std::string question = "What is the boiling point of water at sea level?";
}  // namespace

BOOST_AUTO_TEST_CASE(chat_template_reproduces_the_reference_prompt) {
  BOOST_CHECK_EQUAL(llm().format_chat({{"user", question}}), golden_chat()["text"].get<std::string>());
  auto ids = llm().tokenize(golden_chat()["text"].get<std::string>());
  BOOST_CHECK(ids == golden_chat()["tokens"].get<std::vector<int32_t>>());
}

BOOST_AUTO_TEST_CASE(greedy_answer_matches_llama_cpp_and_streams_the_same_text) {
  std::string streamed;
  auto res = llm().generate(0, {prompt_part::from_text(llm().format_chat({{"user", question}}))}, greedy(64),
                            [&](const std::string& d) {
                              streamed += d;
                              return true;
                            });
  // llama.cpp's continuation runs past the end of turn; ours stops there.
  auto want = golden_chat()["greedy"].get<std::vector<int32_t>>();
  size_t stop = 0;
  while (stop < want.size() && want[stop] != 2) ++stop;  // 2 = <|im_end|>
  want.resize(stop);
  BOOST_CHECK(res.tokens == want);
  BOOST_CHECK_EQUAL(res.stop_reason, stop < 64 ? "stop_token" : "max_tokens");
  BOOST_CHECK_EQUAL(streamed, res.text);
  BOOST_CHECK(!res.text.empty());
  BOOST_CHECK_EQUAL(res.prompt_tokens, int64_t(golden_chat()["tokens"].size()));
  llm().reset(0);
}

BOOST_AUTO_TEST_CASE(second_turn_reuses_the_cache_and_answers_like_a_fresh_sequence) {
  std::vector<chat_message> conv{{"user", question}};
  auto first = llm().generate(3, {prompt_part::from_text(llm().format_chat(conv))}, greedy(24));
  conv.push_back({"assistant", first.text});
  conv.push_back({"user", "And in Fahrenheit?"});
  auto again = llm().generate(3, {prompt_part::from_text(llm().format_chat(conv))}, greedy(24));
  BOOST_CHECK_GT(again.reused_tokens, first.prompt_tokens);  // the whole first turn came from the cache
  auto fresh = llm().generate(4, {prompt_part::from_text(llm().format_chat(conv))}, greedy(24));
  BOOST_CHECK_EQUAL(fresh.reused_tokens, 0);
  BOOST_CHECK(again.tokens == fresh.tokens);
  llm().reset(3);
  llm().reset(4);
}

BOOST_AUTO_TEST_CASE(embedding_rows_stand_in_for_tokens) {
  // The user text as embedding rows (what speech tokens will be) gives the same answer.
  std::string prompt = llm().format_chat({{"user", question}});
  auto cut = prompt.find(question);
  auto ids = llm().tokenize(question);
  prompt_part emb;
  emb.embeddings = llm().embed_tokens(ids);
  emb.n_embeddings = int64_t(ids.size());
  BOOST_CHECK_EQUAL(emb.embeddings.size(), ids.size() * size_t(llm().d_model()));
  auto by_text = llm().generate(5, {prompt_part::from_text(prompt)}, greedy(16));
  auto by_embd = llm().generate(6,
                                {prompt_part::from_text(prompt.substr(0, cut)), emb,
                                 prompt_part::from_text(prompt.substr(cut + question.size()))},
                                greedy(16));
  BOOST_CHECK(by_text.tokens == by_embd.tokens);
  llm().reset(5);
  llm().reset(6);
}

BOOST_AUTO_TEST_CASE(cancel_and_stop_strings) {
  std::string prompt = llm().format_chat({{"user", question}});
  int calls = 0;
  auto cancelled = llm().generate(7, {prompt_part::from_text(prompt)}, greedy(32), [&](const std::string&) {
    return ++calls < 2;
  });
  BOOST_CHECK_EQUAL(cancelled.stop_reason, "cancelled");
  BOOST_CHECK_EQUAL(calls, 2);

  auto full = llm().generate(8, {prompt_part::from_text(prompt)}, greedy(32));
  BOOST_REQUIRE_GT(full.text.size(), 12u);
  std::string stop = full.text.substr(8, 4);
  auto req = greedy(32);
  req.stop_strings = {stop};
  auto stopped = llm().generate(9, {prompt_part::from_text(prompt)}, req);
  BOOST_CHECK_EQUAL(stopped.stop_reason, "stop_string");
  BOOST_CHECK_EQUAL(stopped.text, full.text.substr(0, full.text.find(stop)));
  for (int s : {7, 8, 9}) llm().reset(s);
}

BOOST_AUTO_TEST_CASE(too_long_prompt_is_a_clear_error) {
  std::string longtext;
  for (int i = 0; i < 400; ++i) longtext += "many words here ";
  try {
    llm().generate(10, {prompt_part::from_text(longtext)}, greedy(8));
    BOOST_FAIL("expected an error");
  } catch (const std::runtime_error& e) {
    BOOST_CHECK(std::string(e.what()).find("llm.context_tokens") != std::string::npos);
  }
}

BOOST_AUTO_TEST_CASE(wrong_embedding_size_is_a_clear_error) {
  prompt_part bad;
  bad.embeddings.assign(10, 0.f);
  bad.n_embeddings = 1;
  BOOST_CHECK_THROW(llm().generate(11, {bad}, greedy(4)), std::runtime_error);
}
