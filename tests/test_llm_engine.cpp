// llm_engine: continuous batching over slots, on the pinned SmolLM2 (fp32),
// against chat_llm (one sequence at a time) in the same process as the
// reference: every answer must be the one chat_llm gives for the same context,
// however the engine interleaves, chunks and batches the rows.
#include <boost/test/unit_test.hpp>

#include <map>
#include <optional>

#include "models/chat_llm.hpp"
#include "models/llm_engine.hpp"
#include "models/runtime.hpp"
#include "support.hpp"

using namespace undertone;
using models::chat_message;
using models::llm_event;
using models::prompt_part;

namespace {
constexpr int64_t rows_per_step = 7;  // small: forces chunked prefill and sharing between slots
constexpr int64_t max_slots = 6;

models::chat_llm_options llm_options() {
  models::chat_llm_options o;
  o.path = testing::llm_gguf_path();
  o.context_tokens = 512;
  o.kv_cells = 4096;
  return o;
}
models::chat_llm& ref() {
  static std::unique_ptr<models::chat_llm> m = [] {
    models::set_compute_threads(2);
    return std::make_unique<models::chat_llm>(llm_options());
  }();
  return *m;
}
models::llm_engine& engine() {
  static std::unique_ptr<models::llm_engine> e = [] {
    models::set_compute_threads(2);
    models::llm_engine_options o;
    o.llm = llm_options();
    o.max_slots = max_slots;
    o.max_rows_per_step = rows_per_step;
    return std::make_unique<models::llm_engine>(o);
  }();
  return *e;
}
models::generation_request greedy(int64_t max_tokens) {
  models::generation_request r;
  r.sampling.temperature = 0;
  r.max_tokens = max_tokens;
  return r;
}
std::string chat(const std::string& user) { return ref().format_chat({{"user", user}}); }

// chat_llm's answer for the text prompt `prompt` on a fresh sequence (memoized).
const models::generation_result& reference(const std::string& prompt, int64_t max_tokens) {
  static std::map<std::pair<std::string, int64_t>, models::generation_result> done;
  auto it = done.find({prompt, max_tokens});
  if (it == done.end()) {
    it = done.emplace(std::make_pair(prompt, max_tokens),
                      ref().generate(99, {prompt_part::from_text(prompt)}, greedy(max_tokens)))
             .first;
    ref().reset(99);
  }
  return it->second;
}

// Steps the engine and files its events by answer id.
struct driver {
  std::map<uint64_t, std::string> deltas;
  std::map<uint64_t, llm_event> finished;
  std::vector<llm_event> errors;
  int steps = 0;

  void step() {
    auto events = engine().step();
    ++steps;
    for (size_t i = 0; i < events.size(); ++i) {
      const auto& ev = events[i];
      if (i > 0) BOOST_CHECK_LE(events[i - 1].slot, ev.slot);  // slot order
      BOOST_CHECK(!finished.count(ev.answer_id) || ev.what == llm_event::kind::error);  // nothing after finished
      if (ev.what == llm_event::kind::delta) {
        BOOST_CHECK(!ev.text.empty());
        deltas[ev.answer_id] += ev.text;
      } else if (ev.what == llm_event::kind::finished) {
        finished[ev.answer_id] = ev;
      } else {
        errors.push_back(ev);
      }
    }
  }
  void steps_n(int n) {
    for (int i = 0; i < n; ++i) step();
  }
  void drain() {
    for (int guard = 0; engine().has_work() && guard < 2000; ++guard) step();
    BOOST_REQUIRE(!engine().has_work());
  }
  // The finished answer `id`; checks that its deltas add up to its text.
  const models::generation_result& result(uint64_t id) {
    BOOST_REQUIRE(finished.count(id));
    const auto& ev = finished.at(id);
    BOOST_CHECK_EQUAL(deltas[id], ev.text);
    BOOST_CHECK_EQUAL(ev.result.text, ev.text);
    return ev.result;
  }
};

void check_same_answer(const models::generation_result& got, const models::generation_result& want) {
  BOOST_CHECK(got.tokens == want.tokens);
  BOOST_CHECK_EQUAL(got.text, want.text);
  BOOST_CHECK_EQUAL(got.stop_reason, want.stop_reason);
  BOOST_CHECK_EQUAL(got.prompt_tokens, want.prompt_tokens);
}

// The user text of `prompt` replaced by embedding rows: {head, rows, tail}.
struct speech_prompt {
  prompt_part head, rows, tail;
};
speech_prompt as_speech(const std::string& user) {
  std::string prompt = chat(user);
  const auto cut = prompt.find(user);
  auto ids = ref().tokenize(user);
  speech_prompt s;
  s.head = prompt_part::from_text(prompt.substr(0, cut));
  s.rows.embeddings = ref().embed_tokens(ids);
  s.rows.n_embeddings = int64_t(ids.size());
  s.tail = prompt_part::from_text(prompt.substr(cut + user.size()));
  return s;
}
// Rows [from, to) of an embedding part.
prompt_part rows_of(const prompt_part& p, int64_t from, int64_t to) {
  const int64_t d = engine().d_model();
  prompt_part r;
  r.embeddings.assign(p.embeddings.begin() + from * d, p.embeddings.begin() + to * d);
  r.n_embeddings = to - from;
  return r;
}

const std::string q_water = "What is the boiling point of water at sea level?";
const std::string q_colors = "Name three primary colors.";
const std::string q_haiku = "Write a haiku about the sea.";
const std::string q_math = "What is 12 times 7? Answer briefly.";
}  // namespace

BOOST_AUTO_TEST_CASE(one_slot_answers_like_chat_llm) {
  auto want = reference(chat(q_water), 16);
  auto& e = engine();
  BOOST_CHECK(!e.describe().empty());
  BOOST_CHECK_EQUAL(e.model_version(), "SmolLM2-135M-Instruct.Q4_1.gguf|98362432");
  const int32_t s = e.open_slot();
  e.append(s, prompt_part::from_text(chat(q_water)));
  const int64_t n_prompt = e.context_rows(s);
  BOOST_CHECK_EQUAL(n_prompt, want.prompt_tokens);
  BOOST_CHECK_EQUAL(e.prefilled_rows(s), 0);
  BOOST_CHECK(e.has_work());
  const uint64_t id = e.generate(s, greedy(16));
  BOOST_CHECK(e.is_generating(s));

  driver d;
  while (!d.finished.count(id) && d.steps < 500) d.step();
  const auto& got = d.result(id);
  check_same_answer(got, want);
  BOOST_CHECK_EQUAL(got.reused_tokens, 0);
  BOOST_CHECK(!e.is_generating(s));
  // The first token comes with the step that ends the prefill, then one per step.
  const int prefill_steps = int((n_prompt + rows_per_step - 1) / rows_per_step);
  const int sampled = int(got.tokens.size()) + (got.stop_reason == "stop_token" ? 1 : 0);
  BOOST_CHECK_EQUAL(d.steps, prefill_steps + sampled - 1);
  // The context: prompt + answer tokens (the last one still queued), no stop token.
  BOOST_CHECK_EQUAL(e.context_rows(s), n_prompt + int64_t(got.tokens.size()));
  BOOST_CHECK_EQUAL(e.prefilled_rows(s), n_prompt + int64_t(got.tokens.size()) - 1);
  d.drain();
  BOOST_CHECK_EQUAL(e.prefilled_rows(s), e.context_rows(s));
  e.close_slot(s);
}

BOOST_AUTO_TEST_CASE(interleaved_slots_answer_as_if_alone) {
  const std::vector<std::string> qs{q_water, q_colors, q_haiku, q_math};
  const std::vector<int64_t> caps{16, 16, 16, 12};
  std::vector<models::generation_result> want;
  for (size_t i = 0; i < qs.size(); ++i) want.push_back(reference(chat(qs[i]), caps[i]));

  auto& e = engine();
  driver d;
  std::vector<int32_t> slot(4);
  std::vector<uint64_t> id(4);
  slot[0] = e.open_slot();
  e.append(slot[0], prompt_part::from_text(chat(qs[0])));
  id[0] = e.generate(slot[0], greedy(caps[0]));
  d.steps_n(3);
  // D is prefilled while idle (generate() comes later).
  slot[3] = e.open_slot();
  e.append(slot[3], prompt_part::from_text(chat(qs[3])));
  // B arrives in two pieces while A prefills (the user is still speaking).
  slot[1] = e.open_slot();
  const std::string b = chat(qs[1]);
  const size_t b_cut = b.find(qs[1]);  // a token boundary: the pieces tokenize like the whole
  e.append(slot[1], prompt_part::from_text(b.substr(0, b_cut)));
  d.steps_n(5);  // A is generating by now; B and D prefill beside it
  BOOST_CHECK(d.deltas.count(id[0]));
  e.append(slot[1], prompt_part::from_text(b.substr(b_cut)));
  id[1] = e.generate(slot[1], greedy(caps[1]));
  d.steps_n(2);
  slot[2] = e.open_slot();
  e.append(slot[2], prompt_part::from_text(chat(qs[2])));
  id[2] = e.generate(slot[2], greedy(caps[2]));
  d.steps_n(4);
  BOOST_CHECK_GT(e.prefilled_rows(slot[3]), 0);
  id[3] = e.generate(slot[3], greedy(caps[3]));
  d.drain();

  BOOST_CHECK(d.errors.empty());
  for (size_t i = 0; i < qs.size(); ++i) {
    BOOST_TEST_CONTEXT("slot " << i) {
      const auto& got = d.result(id[i]);
      check_same_answer(got, want[i]);
      BOOST_CHECK_EQUAL(e.context_rows(slot[i]), got.prompt_tokens + int64_t(got.tokens.size()));
    }
  }
  BOOST_CHECK_GT(d.result(id[3]).reused_tokens, 0);
  for (int32_t s : slot) e.close_slot(s);
}

BOOST_AUTO_TEST_CASE(embedding_rows_stand_in_for_tokens_in_any_pieces) {
  auto want = reference(chat(q_water), 16);
  auto sp = as_speech(q_water);
  auto& e = engine();
  driver d;

  // All rows at once.
  const int32_t a = e.open_slot();
  e.append(a, sp.head);
  e.append(a, sp.rows);
  e.append(a, sp.tail);
  const uint64_t id_a = e.generate(a, greedy(16));
  d.drain();
  check_same_answer(d.result(id_a), want);

  // In pieces, while another slot generates.
  const int32_t other = e.open_slot();
  e.append(other, prompt_part::from_text(chat(q_colors)));
  const uint64_t id_other = e.generate(other, greedy(16));
  const int32_t b = e.open_slot();
  e.append(b, sp.head);
  d.steps_n(6);
  const int64_t n = sp.rows.n_embeddings;
  const std::vector<int64_t> cuts{0, 1, 4, n - 2, n};
  for (size_t i = 0; i + 1 < cuts.size(); ++i) {
    e.append(b, rows_of(sp.rows, cuts[i], cuts[i + 1]));
    d.steps_n(1);
  }
  e.append(b, sp.tail);
  const uint64_t id_b = e.generate(b, greedy(16));
  d.drain();
  check_same_answer(d.result(id_b), want);
  check_same_answer(d.result(id_other), reference(chat(q_colors), 16));

  // n_embeddings = 0: the row count is inferred from the size.
  prompt_part inferred = sp.rows;
  inferred.n_embeddings = 0;
  const int32_t c = e.open_slot();
  e.append(c, inferred);
  BOOST_CHECK_EQUAL(e.context_rows(c), n);
  for (int32_t s : {a, other, b, c}) e.close_slot(s);
}

BOOST_AUTO_TEST_CASE(cancel_drops_or_keeps_the_answer) {
  auto want = reference(chat(q_haiku), 16);
  BOOST_REQUIRE_GT(want.tokens.size(), 8u);
  auto& e = engine();
  driver d;

  // keep_answer = false: back to the prompt; the next answer is a fresh one.
  const int32_t s = e.open_slot();
  e.append(s, prompt_part::from_text(chat(q_haiku)));
  const int64_t n_prompt = e.context_rows(s);
  const uint64_t id = e.generate(s, greedy(16));
  while (e.context_rows(s) < n_prompt + 5 && d.steps < 200) d.step();
  BOOST_REQUIRE(e.is_generating(s));
  e.cancel(s, false);
  BOOST_CHECK(!e.is_generating(s));
  BOOST_CHECK_EQUAL(e.context_rows(s), n_prompt);
  BOOST_CHECK_EQUAL(e.prefilled_rows(s), n_prompt);
  BOOST_CHECK(!e.has_work());
  d.steps_n(1);
  BOOST_CHECK(!d.finished.count(id));
  e.cancel(s, false);  // no answer: no-op
  BOOST_CHECK_EQUAL(e.context_rows(s), n_prompt);
  const uint64_t again = e.generate(s, greedy(16));  // nothing queued: the last prompt row is computed again
  BOOST_CHECK_NE(again, id);
  d.drain();
  check_same_answer(d.result(again), want);

  // keep_answer = true: the sampled tokens stay; continuing gives the rest of the answer.
  const int32_t k = e.open_slot();
  e.append(k, prompt_part::from_text(chat(q_haiku)));
  e.generate(k, greedy(16));
  while (e.context_rows(k) < n_prompt + 6 && d.steps < 400) d.step();
  e.cancel(k, true);
  const int64_t kept = e.context_rows(k) - n_prompt;
  BOOST_REQUIRE_GE(kept, 6);
  BOOST_REQUIRE_LT(size_t(kept), want.tokens.size());
  const uint64_t rest = e.generate(k, greedy(16 - kept));
  d.drain();
  const auto& got = d.result(rest);
  BOOST_CHECK(got.tokens == std::vector<int32_t>(want.tokens.begin() + kept, want.tokens.end()));
  BOOST_CHECK_EQUAL(got.stop_reason, want.stop_reason);

  // A pending generate() is dropped with the queued prompt rows.
  const int32_t p = e.open_slot();
  e.append(p, prompt_part::from_text(chat(q_colors)));
  d.steps_n(1);
  e.generate(p, greedy(8));
  e.cancel(p, false);
  BOOST_CHECK_EQUAL(e.context_rows(p), rows_per_step);
  BOOST_CHECK(!e.has_work());
  for (int32_t x : {s, k, p}) e.close_slot(x);
}

BOOST_AUTO_TEST_CASE(second_turn_answers_like_chat_llm) {
  std::vector<chat_message> conv{{"user", q_water}};
  const std::string turn1 = ref().format_chat(conv);
  auto first = ref().generate(7, {prompt_part::from_text(turn1)}, greedy(16));
  conv.push_back({"assistant", first.text});
  conv.push_back({"user", "And in Fahrenheit?"});
  const std::string turn2 = ref().format_chat(conv);
  auto second = ref().generate(7, {prompt_part::from_text(turn2)}, greedy(16));
  ref().reset(7);

  auto& e = engine();
  driver d;
  const int32_t s = e.open_slot();
  e.append(s, prompt_part::from_text(turn1));
  const uint64_t id1 = e.generate(s, greedy(16));
  d.drain();
  check_same_answer(d.result(id1), first);
  // The assistant tail and the next user turn: the conversation's text after the answer.
  const std::string before = turn1 + first.text;
  BOOST_REQUIRE(turn2.compare(0, before.size(), before) == 0);
  e.append(s, prompt_part::from_text(turn2.substr(before.size())));
  const uint64_t id2 = e.generate(s, greedy(16));
  d.drain();
  const auto& got = d.result(id2);
  check_same_answer(got, second);
  BOOST_CHECK_GT(got.reused_tokens, first.prompt_tokens);
  e.close_slot(s);
}

BOOST_AUTO_TEST_CASE(misuse_and_limits_are_clear_errors) {
  auto& e = engine();
  driver d;
  const int32_t s = e.open_slot();
  e.append(s, prompt_part::from_text(chat(q_math)));
  const int64_t n_prompt = e.context_rows(s);

  // Wrong embedding sizes; text and embeddings together.
  prompt_part bad;
  bad.embeddings.assign(10, 0.f);
  bad.n_embeddings = 1;
  BOOST_CHECK_THROW(e.append(s, bad), std::invalid_argument);
  bad.embeddings.assign(size_t(e.d_model()) * 2, 0.f);
  BOOST_CHECK_THROW(e.append(s, bad), std::invalid_argument);  // 2 rows, n_embeddings says 1
  bad.n_embeddings = 2;
  bad.text = "x";
  BOOST_CHECK_THROW(e.append(s, bad), std::invalid_argument);
  BOOST_CHECK_EQUAL(e.context_rows(s), n_prompt);

  // A prompt beyond context_tokens: nothing is queued.
  std::string longtext;
  for (int i = 0; i < 400; ++i) longtext += "many words here ";
  try {
    e.append(s, prompt_part::from_text(longtext));
    BOOST_FAIL("expected an error");
  } catch (const std::runtime_error& ex) {
    BOOST_CHECK(std::string(ex.what()).find("llm.context_tokens") != std::string::npos);
  }
  BOOST_CHECK_EQUAL(e.context_rows(s), n_prompt);

  // While generating: no append, generate or truncate.
  e.generate(s, greedy(16));
  BOOST_CHECK_THROW(e.append(s, prompt_part::from_text("more")), std::logic_error);
  BOOST_CHECK_THROW(e.generate(s, greedy(4)), std::logic_error);
  BOOST_CHECK_THROW(e.truncate(s, 3), std::logic_error);
  d.steps_n(int(n_prompt / rows_per_step) + 3);
  BOOST_CHECK_THROW(e.append(s, prompt_part::from_text("more")), std::logic_error);

  // Closing a generating slot drops its answer silently.
  e.close_slot(s);
  BOOST_CHECK(!e.has_slot(s));
  BOOST_CHECK(!e.has_work());
  const size_t n_events = d.deltas.size() + d.finished.size() + d.errors.size();
  d.steps_n(1);
  BOOST_CHECK_EQUAL(d.deltas.size() + d.finished.size() + d.errors.size(), n_events);
  BOOST_CHECK_THROW(e.context_rows(s), std::invalid_argument);
  BOOST_CHECK_THROW(e.append(s, prompt_part::from_text("x")), std::invalid_argument);
  e.close_slot(s);  // not open: no-op

  // Empty slot; max_tokens; all slots in use.
  std::vector<int32_t> open;
  open.push_back(e.open_slot());
  BOOST_CHECK_EQUAL(e.context_rows(open[0]), 0);  // a reused slot starts empty
  BOOST_CHECK_THROW(e.generate(open[0], greedy(4)), std::logic_error);
  e.append(open[0], prompt_part::from_text("Hi"));
  BOOST_CHECK_THROW(e.generate(open[0], greedy(0)), std::invalid_argument);
  for (int64_t i = 1; i < max_slots; ++i) open.push_back(e.open_slot());
  BOOST_CHECK_THROW(e.open_slot(), std::runtime_error);
  for (int32_t x : open) e.close_slot(x);
  BOOST_CHECK(!e.has_work());
}

BOOST_AUTO_TEST_CASE(truncate_keeps_the_first_rows) {
  auto& e = engine();
  driver d;
  const int32_t s = e.open_slot();
  e.append(s, prompt_part::from_text(chat(q_water)));
  const int64_t n_prompt = e.context_rows(s);
  d.steps_n(2);
  e.truncate(s, 10);  // inside the prefilled rows
  BOOST_CHECK_EQUAL(e.context_rows(s), 10);
  BOOST_CHECK_EQUAL(e.prefilled_rows(s), 10);
  e.truncate(s, 50);  // beyond: no-op
  BOOST_CHECK_EQUAL(e.context_rows(s), 10);
  // Re-append the rest of the prompt as tokens: the answer is the usual one.
  const std::string text = chat(q_water);
  auto ids = e.tokenize(text);
  BOOST_REQUIRE_EQUAL(int64_t(ids.size()), n_prompt);
  prompt_part rest;
  rest.embeddings = ref().embed_tokens(std::vector<int32_t>(ids.begin() + 10, ids.end()));
  e.append(s, rest);
  BOOST_CHECK_EQUAL(e.context_rows(s), n_prompt);
  e.truncate(s, n_prompt - 3);  // inside the queued rows
  BOOST_CHECK_EQUAL(e.context_rows(s), n_prompt - 3);
  BOOST_CHECK_EQUAL(e.prefilled_rows(s), 10);
  e.truncate(s, 10);
  e.append(s, rest);
  const uint64_t id = e.generate(s, greedy(16));
  d.drain();
  check_same_answer(d.result(id), reference(text, 16));

  e.close_slot(s);
}

BOOST_AUTO_TEST_CASE(an_answer_stops_at_the_context_limit) {
  // A second engine with a short context: 58 prompt rows leave room for 6 tokens.
  models::llm_engine_options o;
  o.llm = llm_options();
  o.llm.context_tokens = 64;
  o.max_rows_per_step = 64;
  models::llm_engine e(o);
  const int32_t s = e.open_slot();
  std::string filler;
  for (int i = 0; i < 20; ++i) filler += "one two three four five six seven ";
  auto filler_ids = e.tokenize(filler);
  const int64_t room = 6;
  BOOST_REQUIRE_GT(int64_t(filler_ids.size()), o.llm.context_tokens);
  filler_ids.resize(size_t(o.llm.context_tokens - room));
  prompt_part fill;
  fill.embeddings = ref().embed_tokens(filler_ids);
  e.append(s, fill);
  const uint64_t id = e.generate(s, greedy(64));
  std::optional<llm_event> fin;
  for (int i = 0; i < 20 && !fin; ++i)
    for (auto& ev : e.step())
      if (ev.what == llm_event::kind::finished && ev.answer_id == id) fin = ev;
  BOOST_REQUIRE(fin);
  BOOST_TEST_MESSAGE("context-limited answer: " << fin->result.stop_reason << ", " << fin->result.tokens.size()
                                                 << " tokens");
  BOOST_CHECK_LE(int64_t(fin->result.tokens.size()), room);
  if (fin->result.stop_reason != "stop_token") {
    BOOST_CHECK_EQUAL(fin->result.stop_reason, "context");
    BOOST_CHECK_EQUAL(int64_t(fin->result.tokens.size()), room);
    BOOST_CHECK_EQUAL(e.context_rows(s), o.llm.context_tokens);
    BOOST_CHECK_THROW(e.generate(s, greedy(4)), std::runtime_error);  // no room left
  }
}

BOOST_AUTO_TEST_CASE(kv_cache_full_is_an_error_event_for_that_slot) {
  // A second, tiny engine: 64 KV cells for all slots.
  // A second, small engine: room for slot a's prompt and a few more rows.
  const int64_t n_a = int64_t(ref().tokenize(chat(q_water)).size());
  models::llm_engine_options o;
  o.llm = llm_options();
  o.llm.kv_cells = n_a + 4;
  o.max_slots = 2;
  o.max_rows_per_step = 64;
  models::llm_engine e(o);
  const int32_t a = e.open_slot(), b = e.open_slot();
  e.append(a, prompt_part::from_text(chat(q_water)));
  e.step();  // a's prompt fills all but 4 cells
  BOOST_REQUIRE_EQUAL(e.prefilled_rows(a), n_a);
  e.append(b, prompt_part::from_text(chat(q_colors)));
  auto events = e.step();  // b gets the last 4 cells
  BOOST_CHECK(events.empty());
  BOOST_CHECK_EQUAL(e.prefilled_rows(b), 4);
  e.append(a, prompt_part::from_text("Hi"));
  const uint64_t id_a = e.generate(a, greedy(8));
  events = e.step();  // nothing left for either
  BOOST_REQUIRE_EQUAL(events.size(), 2u);
  BOOST_CHECK(events[0].what == llm_event::kind::error && events[0].slot == a && events[0].answer_id == id_a);
  BOOST_CHECK(events[1].what == llm_event::kind::error && events[1].slot == b && events[1].answer_id == 0);
  for (const auto& ev : events) BOOST_CHECK(ev.text.find("KV cache full") != std::string::npos);
  BOOST_CHECK(!e.is_generating(a));
  BOOST_CHECK_EQUAL(e.context_rows(b), 4);  // b's queued rows were dropped
  BOOST_CHECK(!e.has_work());
  // Closing b frees its cells: a can answer again.
  e.close_slot(b);
  e.append(a, prompt_part::from_text("Hi"));
  const uint64_t again = e.generate(a, greedy(2));
  bool done = false;
  for (int i = 0; i < 10 && !done; ++i)
    for (auto& ev : e.step()) done |= ev.what == llm_event::kind::finished && ev.answer_id == again;
  BOOST_CHECK(done);
}
