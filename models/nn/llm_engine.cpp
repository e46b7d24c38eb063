// Continuous batching over slots (see models/llm_engine.hpp for the contract).
//
// Per slot the context is `keys` (one entry per row: token id, or -1 for an
// embedding row): the first n_prefilled rows are in the KV cache (sequence id =
// slot id, positions 0..n_prefilled-1), the rest wait in `queue`. While an
// answer is generated its latest sampled token is the one queued row, so a
// decode row and a prefill row are built the same way.
#include "models/llm_engine.hpp"

#include <algorithm>
#include <deque>
#include <stdexcept>

#include "models/nn/llama.hpp"
#include "models/nn/llm_common.hpp"

namespace undertone::models {

namespace {

constexpr int32_t embedding_key = -1;

struct queued_row {
  int32_t token = embedding_key;  ///< token id, or -1: `embd` holds the row
  torch::Tensor embd;             ///< [d_model] float32 on the model's device (embedding rows)
};

enum class phase {
  idle,        ///< no answer
  waiting,     ///< generate() called, prompt rows still queued
  generating,  ///< answer in progress: the last sampled token is queued
};

struct slot_state {
  bool open = false;
  std::vector<int32_t> keys;  ///< every context row (prefilled, then queued)
  int64_t n_prefilled = 0;
  std::deque<queued_row> queue;
  /// The last appended embedding row and its row index: lets generate()
  /// recompute the context's last row when nothing is queued.
  torch::Tensor last_embd;
  int64_t last_embd_row = -1;
  /// Whether the first queued row is the context's last row, queued again by
  /// generate() (it was prefilled before; cancel() keeps it).
  bool requeued = false;

  phase ph = phase::idle;
  uint64_t answer_id = 0;
  std::unique_ptr<answer_stream> ans;
  int64_t answer_start = 0;  ///< context rows at generate()
  int64_t reused = 0;        ///< of those, prefilled at generate()
  llm_clock::time_point t_generate, t_first;
  bool sampled = false;  ///< the answer has its first token

  void drop_queue() {
    if (requeued && !queue.empty()) {
      queue.resize(1);  // the re-queued row was part of the context before generate()
    } else {
      queue.clear();
    }
    keys.resize(size_t(n_prefilled) + queue.size());
    requeued = false;
  }
  void push_row(queued_row r) {
    keys.push_back(r.token);
    queue.push_back(std::move(r));
  }
};

// Splits `budget` rows between slots wanting demand[i] rows each: equal shares,
// what a slot cannot use goes to the others; earlier slots get the remainder.
std::vector<int64_t> share_rows(const std::vector<int64_t>& demand, int64_t budget) {
  std::vector<int64_t> got(demand.size(), 0);
  for (;;) {
    int64_t hungry = 0;
    for (size_t i = 0; i < demand.size(); ++i) hungry += got[i] < demand[i];
    if (hungry == 0 || budget <= 0) break;
    const int64_t share = std::max<int64_t>(1, budget / hungry);
    for (size_t i = 0; i < demand.size() && budget > 0; ++i) {
      const int64_t give = std::min({share, demand[i] - got[i], budget});
      got[i] += give;
      budget -= give;
    }
  }
  return got;
}

}  // namespace

struct llm_engine::impl {
  llm_engine_options opt;
  loaded_llm m;
  kv_cache cache;
  std::vector<slot_state> slots;
  uint64_t next_answer_id = 1;
  size_t rr_decode = 0, rr_prefill = 0;  // round-robin start slots

  impl(const llm_engine_options& o, loaded_llm lm)
      : opt(o), m(std::move(lm)), cache(m.model->make_cache(o.llm.kv_cells)), slots(size_t(o.max_slots)) {}

  slot_state& get(int32_t slot, const char* who) {
    if (slot < 0 || slot >= int32_t(slots.size()) || !slots[size_t(slot)].open)
      throw std::invalid_argument(std::string("llm_engine::") + who + ": no open slot " + std::to_string(slot));
    return slots[size_t(slot)];
  }
  const slot_state& get(int32_t slot, const char* who) const { return const_cast<impl*>(this)->get(slot, who); }

  static llm_event event(llm_event::kind k, int32_t slot, uint64_t id, std::string text) {
    llm_event e;
    e.what = k;
    e.slot = slot;
    e.answer_id = id;
    e.text = std::move(text);
    return e;
  }

  // Stops the slot's answer (if any) and drops its queued rows, with an error event.
  void fail(int32_t slot, const std::string& msg, std::vector<llm_event>& events) {
    slot_state& S = slots[size_t(slot)];
    events.push_back(event(llm_event::kind::error, slot, S.ph == phase::idle ? 0 : S.answer_id, msg));
    S.drop_queue();
    S.ph = phase::idle;
    S.ans.reset();
  }

  std::string kv_full_message(int32_t slot) const {
    return "KV cache full: " + std::to_string(cache.used()) + " cells in use of " +
           std::to_string(cache.capacity()) + ", none left for slot " + std::to_string(slot) +
           "; raise llm.kv_cells or close idle slots";
  }

  // Consumes one row of logits for a generating slot.
  void sample(int32_t slot, const float* logits, int64_t n_vocab, std::vector<llm_event>& events) {
    slot_state& S = slots[size_t(slot)];
    answer_stream& a = *S.ans;
    std::string out = a.next(logits, n_vocab);
    if (!S.sampled) S.t_first = llm_clock::now(), S.sampled = true;
    if (!out.empty()) {
      if (a.result().first_token_s == 0) a.result().first_token_s = seconds_since(S.t_generate);
      events.push_back(event(llm_event::kind::delta, slot, S.answer_id, std::move(out)));
    }
    if (!a.last_was_stop()) S.push_row({a.last_token(), {}});  // fed to the next step / kept in the context
    if (!a.done()) return;

    std::string tail = a.finish();
    if (!tail.empty()) events.push_back(event(llm_event::kind::delta, slot, S.answer_id, std::move(tail)));
    generation_result res = std::move(a.result());
    res.prompt_tokens = S.answer_start;
    res.reused_tokens = S.reused;
    res.decode_s = seconds_since(S.t_first);
    if (res.first_token_s == 0) res.first_token_s = seconds_since(S.t_generate);
    llm_event done = event(llm_event::kind::finished, slot, S.answer_id, res.text);
    done.result = std::move(res);
    events.push_back(std::move(done));
    S.ph = phase::idle;
    S.ans.reset();
  }
};

llm_engine::llm_engine(const llm_engine_options& o) {
  if (o.max_slots < 1) throw std::runtime_error("llm_engine: llm.max_slots must be >= 1");
  if (o.max_rows_per_step < 1) throw std::runtime_error("llm_engine: max_rows_per_step must be >= 1");
  if (o.llm.context_tokens < 2) throw std::runtime_error("llm_engine: llm.context_tokens must be >= 2");
  if (o.llm.kv_cells < 1) throw std::runtime_error("llm_engine: llm.kv_cells must be >= 1");
  p_ = std::make_unique<impl>(o, load_llm(o.llm, "llm_engine"));
}

llm_engine::~llm_engine() = default;

std::string llm_engine::describe() const {
  return describe_llm(p_->m, p_->opt.llm) + ", " + std::to_string(p_->opt.max_slots) + " slots, " +
         std::to_string(p_->opt.max_rows_per_step) + " rows/step";
}
int64_t llm_engine::d_model() const { return p_->m.model->d_model(); }
const chat_template& llm_engine::templ() const { return p_->m.tmpl; }
std::vector<int32_t> llm_engine::tokenize(const std::string& text) const { return p_->m.tok->encode(text, true); }
std::string llm_engine::model_version() const { return p_->m.version; }

int32_t llm_engine::open_slot() {
  auto& P = *p_;
  for (size_t i = 0; i < P.slots.size(); ++i) {
    if (P.slots[i].open) continue;
    P.slots[i] = slot_state{};
    P.slots[i].open = true;
    P.cache.remove(int32_t(i));
    return int32_t(i);
  }
  throw std::runtime_error("llm_engine: all " + std::to_string(P.slots.size()) +
                           " slots are in use; raise llm.max_slots or close a slot");
}

void llm_engine::close_slot(int32_t slot) {
  auto& P = *p_;
  if (!has_slot(slot)) return;
  P.cache.remove(slot);
  P.slots[size_t(slot)] = slot_state{};
}

bool llm_engine::has_slot(int32_t slot) const {
  return slot >= 0 && slot < int32_t(p_->slots.size()) && p_->slots[size_t(slot)].open;
}

void llm_engine::append(int32_t slot, const prompt_part& part) {
  auto& P = *p_;
  slot_state& S = P.get(slot, "append");
  if (S.ph != phase::idle)
    throw std::logic_error("llm_engine::append: slot " + std::to_string(slot) +
                           " is answering; cancel the answer before appending");
  const int64_t d = P.m.model->d_model();
  const bool is_embd = !part.embeddings.empty() || part.n_embeddings != 0;
  if (is_embd && !part.text.empty())
    throw std::invalid_argument("llm_engine::append: a prompt part holds text or embeddings, not both");

  std::vector<queued_row> rows;
  torch::Tensor e;
  if (is_embd) {
    const int64_t n_floats = int64_t(part.embeddings.size());
    if (n_floats % d != 0 || n_floats == 0 || (part.n_embeddings != 0 && part.n_embeddings * d != n_floats))
      throw std::invalid_argument("llm_engine::append: " + std::to_string(n_floats) + " embedding floats for " +
                                  std::to_string(part.n_embeddings) + " rows; expected n_embeddings x d_model (" +
                                  std::to_string(d) + ")");
    const int64_t n = n_floats / d;
    // One copy onto the model's device; the rows are views of it.
    e = torch::from_blob(const_cast<float*>(part.embeddings.data()), {n, d}, torch::kFloat32)
            .to(P.m.model->device(), torch::kFloat32, /*non_blocking=*/false, /*copy=*/true);
    rows.reserve(size_t(n));
    for (int64_t r = 0; r < n; ++r) rows.push_back({embedding_key, e[r]});
  } else {
    for (int32_t id : prompt_text_tokens(*P.m.tok, part.text, S.keys.empty())) rows.push_back({id, {}});
  }
  if (rows.empty()) return;
  const int64_t total = int64_t(S.keys.size() + rows.size());
  if (total > P.opt.llm.context_tokens)
    throw std::runtime_error("llm_engine::append: slot " + std::to_string(slot) + " would hold " +
                             std::to_string(total) + " rows, more than llm.context_tokens = " +
                             std::to_string(P.opt.llm.context_tokens) + " (drop old turns and retry)");
  if (rows.back().token == embedding_key) {
    S.last_embd = rows.back().embd;
    S.last_embd_row = total - 1;
  }
  for (auto& r : rows) S.push_row(std::move(r));
}

uint64_t llm_engine::generate(int32_t slot, const generation_request& req) {
  auto& P = *p_;
  slot_state& S = P.get(slot, "generate");
  const std::string who = "llm_engine::generate: slot " + std::to_string(slot);
  if (S.ph != phase::idle) throw std::logic_error(who + " is already answering");
  if (req.max_tokens < 1) throw std::invalid_argument(who + ": max_tokens must be >= 1");
  if (S.keys.empty()) throw std::logic_error(who + " is empty; append a prompt first");
  const int64_t n_ctx = int64_t(S.keys.size());
  if (n_ctx >= P.opt.llm.context_tokens)
    throw std::runtime_error(who + " holds " + std::to_string(n_ctx) + " rows: no room for an answer in " +
                             "llm.context_tokens = " + std::to_string(P.opt.llm.context_tokens));
  if (S.queue.empty()) {
    // Everything is prefilled: compute the last row again, its logits start the answer.
    queued_row last{S.keys.back(), {}};
    if (last.token == embedding_key) {
      if (S.last_embd_row != n_ctx - 1)
        throw std::logic_error(who + ": the context ends with an embedding row that is already prefilled; append " +
                               "the next rows (e.g. the assistant header) before generate()");
      last.embd = S.last_embd;
    }
    S.keys.pop_back();
    --S.n_prefilled;
    P.cache.truncate(slot, S.n_prefilled);
    S.push_row(std::move(last));
    S.requeued = true;
  }
  S.ph = phase::waiting;
  S.answer_id = P.next_answer_id++;
  S.answer_start = n_ctx;
  S.reused = S.n_prefilled;
  S.t_generate = llm_clock::now();
  S.sampled = false;
  S.ans = std::make_unique<answer_stream>(*P.m.tok, req, std::min(req.max_tokens, P.opt.llm.context_tokens - n_ctx),
                                          S.keys);
  return S.answer_id;
}

void llm_engine::cancel(int32_t slot, bool keep_answer) {
  auto& P = *p_;
  slot_state& S = P.get(slot, "cancel");
  if (S.ph == phase::waiting) {
    S.drop_queue();
  } else if (S.ph == phase::generating && !keep_answer) {
    P.cache.truncate(slot, S.answer_start);
    S.n_prefilled = std::min(S.n_prefilled, S.answer_start);
    S.queue.clear();
    S.keys.resize(size_t(S.answer_start));
  }
  // generating && keep_answer: every sampled token stays, the last one queued.
  S.ph = phase::idle;
  S.ans.reset();
  S.requeued = false;
}

void llm_engine::truncate(int32_t slot, int64_t n_rows) {
  auto& P = *p_;
  slot_state& S = P.get(slot, "truncate");
  if (S.ph != phase::idle)
    throw std::logic_error("llm_engine::truncate: slot " + std::to_string(slot) + " is answering; cancel first");
  if (n_rows < 0) throw std::invalid_argument("llm_engine::truncate: negative row count");
  if (n_rows >= int64_t(S.keys.size())) return;
  if (n_rows >= S.n_prefilled) {
    S.queue.resize(size_t(n_rows - S.n_prefilled));
  } else {
    P.cache.truncate(slot, n_rows);
    S.n_prefilled = n_rows;
    S.queue.clear();
  }
  S.keys.resize(size_t(n_rows));
  if (S.last_embd_row >= n_rows) S.last_embd = torch::Tensor(), S.last_embd_row = -1;
}

int64_t llm_engine::context_rows(int32_t slot) const { return int64_t(p_->get(slot, "context_rows").keys.size()); }
int64_t llm_engine::prefilled_rows(int32_t slot) const { return p_->get(slot, "prefilled_rows").n_prefilled; }
bool llm_engine::is_generating(int32_t slot) const { return p_->get(slot, "is_generating").ph != phase::idle; }

bool llm_engine::has_work() const {
  for (const auto& S : p_->slots)
    if (S.open && !S.queue.empty()) return true;
  return false;
}

std::vector<llm_event> llm_engine::step() {
  auto& P = *p_;
  std::vector<llm_event> events;
  const size_t n_slots = P.slots.size();
  int64_t rows_left = P.opt.max_rows_per_step;
  int64_t cells_left = P.cache.capacity() - P.cache.used();

  struct take {
    int32_t slot;
    int64_t n;         // rows from the front of the slot's queue
    bool logits_last;  // the last of them starts / continues the answer
  };
  std::vector<take> takes;

  // 1. One decode row per generating slot (latency first).
  for (size_t k = 0; k < n_slots && rows_left > 0; ++k) {
    const int32_t s = int32_t((P.rr_decode + k) % n_slots);
    const slot_state& S = P.slots[size_t(s)];
    if (!S.open || S.ph != phase::generating) continue;
    if (cells_left == 0) {
      P.fail(s, P.kv_full_message(s), events);
      continue;
    }
    takes.push_back({s, 1, true});
    --rows_left;
    --cells_left;
  }
  P.rr_decode = (P.rr_decode + 1) % n_slots;

  // 2. Prefill: slots waiting for their answer first, then the others; rows
  // shared equally within each group.
  for (phase tier : {phase::waiting, phase::idle}) {
    std::vector<int32_t> cand;
    std::vector<int64_t> demand;
    for (size_t k = 0; k < n_slots; ++k) {
      const int32_t s = int32_t((P.rr_prefill + k) % n_slots);
      const slot_state& S = P.slots[size_t(s)];
      if (S.open && S.ph == tier && !S.queue.empty()) {
        cand.push_back(s);
        demand.push_back(int64_t(S.queue.size()));
      }
    }
    if (cand.empty()) continue;
    const auto got = share_rows(demand, std::min(rows_left, cells_left));
    for (size_t i = 0; i < cand.size(); ++i) {
      if (got[i] > 0) {
        takes.push_back({cand[i], got[i], tier == phase::waiting && got[i] == demand[i]});
        rows_left -= got[i];
        cells_left -= got[i];
      } else if (cells_left == 0 && rows_left > 0) {
        P.fail(cand[i], P.kv_full_message(cand[i]), events);  // starved by the cache, not by the step size
      }
    }
  }
  P.rr_prefill = (P.rr_prefill + 1) % n_slots;

  // 3. One forward over all rows.
  if (!takes.empty()) {
    llm_batch b;
    size_t n_rows = 0;
    for (const take& t : takes) n_rows += size_t(t.n);
    b.token.reserve(n_rows);
    b.embd.reserve(n_rows);
    b.seq.reserve(n_rows);
    b.pos.reserve(n_rows);
    b.logits.reserve(n_rows);
    for (const take& t : takes) {
      const slot_state& S = P.slots[size_t(t.slot)];
      for (int64_t i = 0; i < t.n; ++i) {
        const queued_row& r = S.queue[size_t(i)];
        const bool want = t.logits_last && i + 1 == t.n;
        if (r.token == embedding_key)
          b.add_embedding(r.embd, t.slot, S.n_prefilled + i, want);
        else
          b.add_token(r.token, t.slot, S.n_prefilled + i, want);
      }
    }
    torch::Tensor logits;
    try {
      logits = P.m.model->step(b, P.cache);
    } catch (const std::exception& ex) {
      // The cache is unchanged; every slot in the batch fails (retrying would fail again).
      for (const take& t : takes) P.fail(t.slot, std::string("LLM step failed: ") + ex.what(), events);
      takes.clear();
    }
    for (const take& t : takes) {
      slot_state& S = P.slots[size_t(t.slot)];
      S.queue.erase(S.queue.begin(), S.queue.begin() + t.n);
      S.n_prefilled += t.n;
      S.requeued = false;
    }
    if (logits.defined() && logits.size(0) > 0) {
      const torch::Tensor cpu = logits.to(torch::kCPU, torch::kFloat32).contiguous();
      const float* lp = cpu.data_ptr<float>();
      const int64_t n_vocab = cpu.size(1);
      int64_t k = 0;
      for (const take& t : takes) {
        if (!t.logits_last) continue;
        slot_state& S = P.slots[size_t(t.slot)];
        if (S.ph == phase::waiting) {
          S.ph = phase::generating;
          S.ans->result().prefill_s = seconds_since(S.t_generate);
        }
        P.sample(t.slot, lp + k * n_vocab, n_vocab, events);
        ++k;
      }
    }
  }
  std::stable_sort(events.begin(), events.end(), [](const llm_event& a, const llm_event& b) { return a.slot < b.slot; });
  return events;
}

}  // namespace undertone::models
