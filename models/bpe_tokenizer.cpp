// Byte-level BPE tokenizer (GPT-2 family: SmolLM2, Llama 3, Qwen2, Whisper), loaded
// from GGUF metadata or an HF tokenizer.json; and tokenizer::from_hf_dir.
#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <algorithm>
#include <array>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <nlohmann/json.hpp>
#include <queue>
#include <sstream>
#include <unordered_map>

#include "models/gguf.hpp"
#include "models/tokenizer.hpp"

namespace undertone::models {

namespace {

// ---- GPT-2's byte <-> unicode alphabet ----
// Printable bytes map to themselves; the other 68 map to U+0100.. in byte order, so
// every byte has a visible, non-space character in the vocabulary.
struct byte_alphabet {
  std::array<uint32_t, 256> cp{};
  std::unordered_map<uint32_t, uint8_t> back;
  byte_alphabet() {
    uint32_t next = 256;
    for (uint32_t b = 0; b < 256; ++b) {
      const bool printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255);
      cp[b] = printable ? b : next++;
      back[cp[b]] = uint8_t(b);
    }
  }
};
const byte_alphabet& alphabet() {
  static const byte_alphabet a;
  return a;
}

void append_utf8(std::string& s, uint32_t cp) {
  if (cp < 0x80) {
    s += char(cp);
  } else if (cp < 0x800) {
    s += char(0xC0 | (cp >> 6));
    s += char(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    s += char(0xE0 | (cp >> 12));
    s += char(0x80 | ((cp >> 6) & 0x3F));
    s += char(0x80 | (cp & 0x3F));
  } else {
    s += char(0xF0 | (cp >> 18));
    s += char(0x80 | ((cp >> 12) & 0x3F));
    s += char(0x80 | ((cp >> 6) & 0x3F));
    s += char(0x80 | (cp & 0x3F));
  }
}

// Decodes one code point of valid UTF-8 at s[i]; advances i.
uint32_t next_cp(std::string_view s, size_t& i) {
  const auto c = static_cast<unsigned char>(s[i]);
  int len = c < 0x80 ? 1 : c < 0xE0 ? 2 : c < 0xF0 ? 3 : 4;
  if (i + size_t(len) > s.size()) len = int(s.size() - i);
  uint32_t cp = len == 1 ? c : len == 2 ? (c & 0x1F) : len == 3 ? (c & 0x0F) : (c & 0x07);
  for (int k = 1; k < len; ++k) cp = (cp << 6) | (static_cast<unsigned char>(s[i + size_t(k)]) & 0x3F);
  i += size_t(len);
  return cp;
}

// Byte-level piece ("Ġthe") -> raw bytes (" the").
std::string piece_to_bytes(const std::string& piece) {
  const auto& a = alphabet();
  std::string out;
  size_t i = 0;
  while (i < piece.size()) {
    const size_t at = i;
    const uint32_t cp = next_cp(piece, i);
    auto it = a.back.find(cp);
    if (it != a.back.end()) {
      out += char(it->second);
    } else {
      out.append(piece, at, i - at);  // not in the alphabet: keep the character
    }
  }
  return out;
}

// ---- PCRE2 ----

struct pcre2_state {
  pcre2_match_data* md = nullptr;
  pcre2_match_context* mc = nullptr;
  pcre2_jit_stack* js = nullptr;
  pcre2_state() {
    md = pcre2_match_data_create(1, nullptr);
    mc = pcre2_match_context_create(nullptr);
    js = pcre2_jit_stack_create(32 * 1024, 8 * 1024 * 1024, nullptr);
    if (mc && js) pcre2_jit_stack_assign(mc, nullptr, js);
  }
  ~pcre2_state() {
    if (js) pcre2_jit_stack_free(js);
    if (mc) pcre2_match_context_free(mc);
    if (md) pcre2_match_data_free(md);
  }
};
pcre2_state& thread_pcre2() {
  thread_local pcre2_state st;
  return st;
}

/// A compiled pre-tokenizer regex (UTF + Unicode properties, JIT when available).
class regex {
 public:
  explicit regex(const std::string& pattern) : pattern_(pattern) {
    int err = 0;
    PCRE2_SIZE off = 0;
    code_ = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(), PCRE2_UTF | PCRE2_UCP, &err,
                          &off, nullptr);
    if (!code_) {
      PCRE2_UCHAR buf[256];
      pcre2_get_error_message(err, buf, sizeof buf);
      throw tokenizer_error("tokenizer: cannot compile pre-tokenizer regex '" + pattern + "' at offset " +
                            std::to_string(off) + ": " + reinterpret_cast<const char*>(buf));
    }
    pcre2_jit_compile(code_, PCRE2_JIT_COMPLETE);  // falls back to the interpreter if JIT is unavailable
  }
  ~regex() { pcre2_code_free(code_); }
  regex(const regex&) = delete;
  regex& operator=(const regex&) = delete;

  /// Calls f(begin, end) for each successive non-empty match in s (valid UTF-8).
  template <class F>
  void for_each_match(std::string_view s, F&& f) const {
    auto& st = thread_pcre2();
    if (!st.md || !st.mc) throw tokenizer_error("tokenizer: out of memory for PCRE2 match data");
    size_t pos = 0;
    const auto* subject = reinterpret_cast<PCRE2_SPTR>(s.data());
    while (pos < s.size()) {
      const int rc = pcre2_match(code_, subject, s.size(), pos, PCRE2_NO_UTF_CHECK, st.md, st.mc);
      if (rc == PCRE2_ERROR_NOMATCH) break;
      if (rc < 0) {
        PCRE2_UCHAR buf[256];
        pcre2_get_error_message(rc, buf, sizeof buf);
        throw tokenizer_error("tokenizer: regex '" + pattern_ + "' failed: " + reinterpret_cast<const char*>(buf));
      }
      const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(st.md);
      const size_t b = ov[0], e = ov[1];
      if (e > b) {
        f(b, e);
        pos = e;
      } else {  // empty match: step over one character
        pos = b + 1;
        while (pos < s.size() && (static_cast<unsigned char>(s[pos]) & 0xC0) == 0x80) ++pos;
      }
    }
  }

 private:
  std::string pattern_;
  pcre2_code* code_ = nullptr;
};

enum class split_behavior { isolated, removed, merged_with_previous, merged_with_next, contiguous };

struct split_step {
  std::unique_ptr<regex> re;
  split_behavior behavior = split_behavior::isolated;
  bool invert = false;
};

// Regex sets of llama.cpp's pre-tokenizer types (llama-vocab.cpp); each set is
// applied in order, every regex splitting the pieces left by the previous one.
const char* const k_gpt2_re = R"re('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)re";
const char* const k_llama3_re =
    R"re((?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)re";
const char* const k_qwen2_re =
    R"re((?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)re";

struct pre_spec {
  std::vector<std::string> regexes;
  bool ignore_merges = false;
};

pre_spec gguf_pre_spec(const std::string& pre, const std::string& where) {
  auto is = [&](std::initializer_list<const char*> names) {
    for (const char* n : names)
      if (pre == n) return true;
    return false;
  };
  if (is({"llama3", "llama-v3", "llama-bpe", "falcon3", "dbrx", "smaug-bpe"})) return {{k_llama3_re}, true};
  if (is({"qwen2", "stablelm2", "megrez", "deepseek-r1-qwen"})) return {{k_qwen2_re}, false};
  if (is({"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"}))
    return {{R"re(\p{N})re", k_gpt2_re}, false};
  if (is({"gpt-2", "mpt", "olmo", "jais", "phi-2", "roberta-bpe", "jina-es", "jina-de", "jina-v1-en", "jina-v2-es",
          "jina-v2-de", "jina-v2-code", "gigachat"}))
    return {{k_gpt2_re}, false};
  if (pre.empty() || pre == "default")
    return {{R"re([\p{P}\$\+<=>\^~\|]+)re", k_gpt2_re, R"re(\p{N}+)re", "[0-9][0-9][0-9]"}, false};
  throw tokenizer_error("tokenizer: " + where + ": unsupported tokenizer.ggml.pre '" + pre +
                        "' (supported: smollm, llama-bpe/llama3, qwen2, gpt-2, default and their aliases)");
}

// A word of the pre-tokenizer output: a span of the fragment.
struct word_span {
  size_t begin, end;
};

// ---- the tokenizer ----

class bpe_tokenizer final : public tokenizer {
 public:
  struct merge_info {
    int32_t rank;
    int32_t id;
  };

  std::string type_name() const override { return "bpe"; }

  std::vector<int32_t> encode(std::string_view text, bool parse_special) const override {
    std::string cleaned;
    if (!utf8_valid(text)) {
      cleaned = utf8_sanitize(text);
      text = cleaned;
    }
    std::vector<int32_t> out;
    out.reserve(text.size() / 3 + 4);
    std::vector<word_span> words;
    std::string buf;
    for (const fragment& fr : split_special(text, parse_special)) {
      if (fr.id >= 0) {
        out.push_back(fr.id);
        continue;
      }
      if (!add_prefix_space_) {
        pre_tokenize(fr.text, steps_.size(), words);
        for (const word_span& w : words) bpe_word(fr.text.substr(w.begin, w.end - w.begin), out);
        continue;
      }
      // HF ByteLevel(add_prefix_space): each piece reaching the ByteLevel step gets a
      // space prepended (unless it starts with one) before its regex runs.
      const size_t bl = byte_level_regex_ ? steps_.size() - 1 : steps_.size();
      std::vector<word_span> spans;
      pre_tokenize(fr.text, bl, spans);
      for (const word_span& sp : spans) {
        const std::string_view piece = fr.text.substr(sp.begin, sp.end - sp.begin);
        buf.assign(piece[0] == ' ' ? "" : " ");
        buf.append(piece);
        if (!byte_level_regex_) {
          bpe_word(buf, out);
          continue;
        }
        steps_.back().re->for_each_match(buf, [&](size_t b, size_t e) { words.push_back({b, e}); });
        // the GPT-2 regex matches every character, so the matches tile the piece
        for (const word_span& w : words) bpe_word(std::string_view(buf).substr(w.begin, w.end - w.begin), out);
        words.clear();
      }
    }
    return out;
  }

  // Splits `text` with the pre-tokenizer steps into word spans (relative to text).
  // (Only the first n_steps steps.)
  void pre_tokenize(std::string_view text, size_t n_steps, std::vector<word_span>& words) const {
    words.clear();
    words.push_back({0, text.size()});
    std::vector<word_span> next;
    std::vector<std::pair<std::pair<size_t, size_t>, bool>> parts;
    for (size_t si = 0; si < n_steps; ++si) {
      const split_step& step = steps_[si];
      next.clear();
      for (const word_span& w : words) {
        const std::string_view sub = text.substr(w.begin, w.end - w.begin);
        parts.clear();
        size_t prev = 0;
        step.re->for_each_match(sub, [&](size_t b, size_t e) {
          if (b > prev) parts.push_back({{prev, b}, false});
          parts.push_back({{b, e}, true});
          prev = e;
        });
        if (prev < sub.size()) parts.push_back({{prev, sub.size()}, false});
        if (step.invert)
          for (auto& p : parts) p.second = !p.second;
        apply_behavior(step.behavior, parts);
        for (const auto& p : parts) {
          if (p.first.second > p.first.first) next.push_back({w.begin + p.first.first, w.begin + p.first.second});
        }
      }
      words.swap(next);
    }
  }

  // HF tokenizers' SplitDelimiterBehavior on a list of (span, is_match) covering a word.
  static void apply_behavior(split_behavior b, std::vector<std::pair<std::pair<size_t, size_t>, bool>>& parts) {
    using part = std::pair<std::pair<size_t, size_t>, bool>;
    std::vector<part> acc;
    bool prev_match = false;
    switch (b) {
      case split_behavior::isolated:
        return;
      case split_behavior::removed:
        parts.erase(std::remove_if(parts.begin(), parts.end(), [](const part& p) { return p.second; }), parts.end());
        return;
      case split_behavior::merged_with_previous:
        for (const part& p : parts) {
          if (p.second && !prev_match && !acc.empty()) acc.back().first.second = p.first.second;
          else acc.push_back({p.first, false});
          prev_match = p.second;
        }
        break;
      case split_behavior::merged_with_next:
        for (auto it = parts.rbegin(); it != parts.rend(); ++it) {
          if (it->second && !prev_match && !acc.empty()) acc.back().first.first = it->first.first;
          else acc.push_back({it->first, false});
          prev_match = it->second;
        }
        std::reverse(acc.begin(), acc.end());
        break;
      case split_behavior::contiguous:
        for (const part& p : parts) {
          if (p.second == prev_match && !acc.empty()) acc.back().first.second = p.first.second;
          else acc.push_back({p.first, false});
          prev_match = p.second;
        }
        break;
    }
    parts.swap(acc);
  }

  // Byte-pair merges of one pre-tokenized word, by rank (lowest first, leftmost on
  // ties), as llama.cpp and HF tokenizers do.
  void bpe_word(std::string_view word, std::vector<int32_t>& out) const {
    if (word.empty()) return;
    if (ignore_merges_) {
      std::string mapped;
      for (unsigned char c : word) append_utf8(mapped, alphabet().cp[c]);
      auto it = piece_to_id_.find(mapped);
      if (it != piece_to_id_.end()) {
        out.push_back(it->second);
        return;
      }
    }
    if (word.size() == 1) {
      push_byte(static_cast<unsigned char>(word[0]), out);
      return;
    }
    {
      std::lock_guard<std::mutex> lock(cache_mutex_);
      auto it = cache_.find(std::string(word));
      if (it != cache_.end()) {
        out.insert(out.end(), it->second.begin(), it->second.end());
        return;
      }
    }
    struct symbol {
      int32_t id;
      int32_t prev, next;
    };
    struct bigram {
      int32_t rank, left, right, left_id, right_id, merged;
      bool operator<(const bigram& o) const {  // priority_queue pops the largest
        return rank != o.rank ? rank > o.rank : left > o.left;
      }
    };
    const size_t n = word.size();
    std::vector<symbol> sym(n);
    for (size_t i = 0; i < n; ++i) {
      sym[i] = {byte_id_[static_cast<unsigned char>(word[i])], int32_t(i) - 1, i + 1 < n ? int32_t(i + 1) : -1};
    }
    std::priority_queue<bigram> heap;
    auto try_add = [&](int32_t l, int32_t r) {
      if (l < 0 || r < 0) return;
      const int32_t a = sym[size_t(l)].id, b = sym[size_t(r)].id;
      if (a < 0 || b < 0) return;
      auto it = merges_.find((uint64_t(uint32_t(a)) << 32) | uint32_t(b));
      if (it == merges_.end()) return;
      heap.push({it->second.rank, l, r, a, b, it->second.id});
    };
    for (size_t i = 0; i + 1 < n; ++i) try_add(int32_t(i), int32_t(i + 1));
    while (!heap.empty()) {
      const bigram bg = heap.top();
      heap.pop();
      symbol& L = sym[size_t(bg.left)];
      symbol& R = sym[size_t(bg.right)];
      if (L.id != bg.left_id || R.id != bg.right_id || L.next != bg.right) continue;  // stale
      L.id = bg.merged;
      L.next = R.next;
      if (R.next >= 0) sym[size_t(R.next)].prev = bg.left;
      R.id = -2;  // dead
      R.next = R.prev = -1;
      try_add(L.prev, bg.left);
      try_add(bg.left, L.next);
    }
    std::vector<int32_t> result;
    for (int32_t i = 0; i >= 0; i = sym[size_t(i)].next) {
      if (sym[size_t(i)].id >= 0) result.push_back(sym[size_t(i)].id);
      else if (unk_id_ >= 0) result.push_back(unk_id_);  // a byte missing from the vocabulary
    }
    out.insert(out.end(), result.begin(), result.end());
    std::lock_guard<std::mutex> lock(cache_mutex_);
    if (cache_.size() >= k_cache_limit) cache_.clear();
    cache_.emplace(std::string(word), std::move(result));
  }

  void push_byte(unsigned char c, std::vector<int32_t>& out) const {
    if (byte_id_[c] >= 0) out.push_back(byte_id_[c]);
    else if (unk_id_ >= 0) out.push_back(unk_id_);
  }

  // Builds merge and byte tables once pieces_ and kinds_ are set.
  void build(const std::vector<std::pair<std::string, std::string>>& merges, const std::string& where) {
    // Model pieces only: added tokens never take part in merges.
    std::unordered_map<std::string, int32_t> model_ids;
    model_ids.reserve(pieces_.size());
    for (size_t i = 0; i < pieces_.size(); ++i) {
      if (kinds_[i] == token_kind::normal && !pieces_[i].empty()) model_ids.emplace(pieces_[i], int32_t(i));
    }
    for (int b = 0; b < 256; ++b) {
      std::string s;
      append_utf8(s, alphabet().cp[size_t(b)]);
      auto it = model_ids.find(s);
      byte_id_[size_t(b)] = it == model_ids.end() ? -1 : it->second;
    }
    merges_.reserve(merges.size());
    size_t skipped = 0;
    for (size_t r = 0; r < merges.size(); ++r) {
      auto a = model_ids.find(merges[r].first), b = model_ids.find(merges[r].second),
           m = model_ids.find(merges[r].first + merges[r].second);
      if (a == model_ids.end() || b == model_ids.end() || m == model_ids.end()) {
        ++skipped;
        continue;
      }
      merges_.emplace((uint64_t(uint32_t(a->second)) << 32) | uint32_t(b->second),
                      merge_info{int32_t(r), m->second});
    }
    if (skipped * 10 > merges.size() + 10) {
      throw tokenizer_error("tokenizer: " + where + ": " + std::to_string(skipped) + " of " +
                            std::to_string(merges.size()) + " merges name pieces missing from the vocabulary");
    }
    bytes_.resize(pieces_.size());
    for (size_t i = 0; i < pieces_.size(); ++i) {
      switch (kinds_[i]) {
        case token_kind::normal: bytes_[i] = piece_to_bytes(pieces_[i]); break;
        case token_kind::control:
        case token_kind::user_defined:
        case token_kind::unknown: bytes_[i] = pieces_[i]; break;
        default: bytes_[i].clear(); break;
      }
    }
  }

  static std::unique_ptr<bpe_tokenizer> from_json(const nlohmann::json& j, const std::string& where);
  static void parse_pre(const nlohmann::json& j, bpe_tokenizer& t, const std::string& where, bool& byte_level_seen);

  std::vector<split_step> steps_;
  bool add_prefix_space_ = false;
  bool byte_level_regex_ = false;  ///< the last step is HF ByteLevel's GPT-2 regex
  bool ignore_merges_ = false;
  std::array<int32_t, 256> byte_id_{};
  std::unordered_map<uint64_t, merge_info> merges_;

  static constexpr size_t k_cache_limit = 1 << 16;
  mutable std::mutex cache_mutex_;
  mutable std::unordered_map<std::string, std::vector<int32_t>> cache_;
};

}  // namespace

// ---- GGUF ----

std::unique_ptr<tokenizer> tokenizer::from_gguf(const gguf_file& f, const std::string& pre_override) {
  const std::string where = f.path();
  const std::string model = f.get_string_or("tokenizer.ggml.model", "");
  if (model != "gpt2") {
    throw tokenizer_error("tokenizer: " + where + ": tokenizer.ggml.model is '" + model +
                          "'; only 'gpt2' (byte-level BPE) is read from GGUF. For SentencePiece models load "
                          "the HF tokenizer.model with tokenizer::from_hf_dir");
  }
  auto t = std::make_unique<bpe_tokenizer>();
  if (!f.has("tokenizer.ggml.tokens") || !f.has("tokenizer.ggml.merges")) {
    throw tokenizer_error("tokenizer: " + where + ": missing tokenizer.ggml.tokens or tokenizer.ggml.merges");
  }
  t->pieces_ = f.get_strings("tokenizer.ggml.tokens");
  const size_t n = t->pieces_.size();
  t->kinds_.assign(n, token_kind::normal);
  if (f.has("tokenizer.ggml.token_type")) {
    const auto types = f.get_ints("tokenizer.ggml.token_type");
    if (types.size() != n) {
      throw tokenizer_error("tokenizer: " + where + ": tokenizer.ggml.token_type has " + std::to_string(types.size()) +
                            " entries for " + std::to_string(n) + " tokens");
    }
    for (size_t i = 0; i < n; ++i) {
      switch (types[i]) {
        case 1: t->kinds_[i] = token_kind::normal; break;
        case 2: t->kinds_[i] = token_kind::unknown; break;
        case 3: t->kinds_[i] = token_kind::control; break;
        case 4: t->kinds_[i] = token_kind::user_defined; break;
        case 6: t->kinds_[i] = token_kind::byte; break;
        default: t->kinds_[i] = token_kind::unused; break;
      }
    }
  }
  std::vector<std::pair<std::string, std::string>> merges;
  const auto& ms = f.get_strings("tokenizer.ggml.merges");
  merges.reserve(ms.size());
  for (const std::string& m : ms) {
    const size_t sp = m.find(' ', 1);
    if (sp == std::string::npos) {
      throw tokenizer_error("tokenizer: " + where + ": malformed merge '" + m + "' in tokenizer.ggml.merges");
    }
    merges.emplace_back(m.substr(0, sp), m.substr(sp + 1));
  }
  const pre_spec spec = gguf_pre_spec(pre_override.empty() ? f.get_string_or("tokenizer.ggml.pre", "") : pre_override,
                                      where);
  for (const std::string& re : spec.regexes) t->steps_.push_back({std::make_unique<regex>(re)});
  t->ignore_merges_ = spec.ignore_merges;

  auto id_or = [&](const char* key) -> int32_t {
    const int64_t v = f.get_int_or(key, -1);
    return v >= 0 && v < int64_t(n) ? int32_t(v) : -1;
  };
  t->bos_id_ = id_or("tokenizer.ggml.bos_token_id");
  t->eos_id_ = id_or("tokenizer.ggml.eos_token_id");
  t->unk_id_ = id_or("tokenizer.ggml.unknown_token_id");
  for (const char* k : {"tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"}) {
    if (id_or(k) >= 0) t->extra_stop_ids_.push_back(id_or(k));
  }
  t->add_bos_ = spec.ignore_merges;  // llama.cpp's default for the llama3 family
  if (auto it = f.metadata().find("tokenizer.ggml.add_bos_token"); it != f.metadata().end()) {
    if (const bool* b = std::get_if<bool>(&it->second)) t->add_bos_ = *b;
  }
  if (t->bos_id_ < 0) t->add_bos_ = false;
  t->chat_template_ = f.get_string_or("tokenizer.chat_template", "");
  t->build(merges, where);
  t->finish_setup(true);
  return t;
}

// ---- HF tokenizer.json ----

namespace {

using json = nlohmann::json;

bool json_has_type(const json& j, const char* type) {
  if (!j.is_object()) return false;
  if (j.value("type", "") == type) return true;
  for (const char* k : {"pretokenizers", "decoders", "normalizers"}) {
    if (j.contains(k) && j[k].is_array())
      for (const auto& c : j[k])
        if (json_has_type(c, type)) return true;
  }
  return false;
}

// Whether a tokenizer.json describes a byte-level BPE this file can run.
bool is_byte_level_bpe(const json& j) {
  return j.contains("model") && j["model"].value("type", "") == "BPE" &&
         (json_has_type(j.value("pre_tokenizer", json()), "ByteLevel") ||
          json_has_type(j.value("decoder", json()), "ByteLevel"));
}

std::string regex_quote(const std::string& s) {
  std::string out;
  for (char c : s) {
    if (std::string_view("\\^$.|?*+()[]{}").find(c) != std::string_view::npos) out += '\\';
    out += c;
  }
  return out;
}

}  // namespace

void bpe_tokenizer::parse_pre(const json& j, bpe_tokenizer& t, const std::string& where, bool& byte_level_seen) {
  if (j.is_null()) return;
  const std::string type = j.value("type", "");
  if (byte_level_seen) {
    throw tokenizer_error("tokenizer: " + where + ": pre-tokenizer step '" + type +
                          "' after ByteLevel is not supported");
  }
  if (type == "Sequence") {
    for (const auto& c : j.at("pretokenizers")) parse_pre(c, t, where, byte_level_seen);
  } else if (type == "ByteLevel") {
    byte_level_seen = true;
    t.add_prefix_space_ = j.value("add_prefix_space", false);
    if (j.value("use_regex", true)) {
      t.steps_.push_back({std::make_unique<regex>(k_gpt2_re)});
      t.byte_level_regex_ = true;
    }
  } else if (type == "Split") {
    const json& pat = j.at("pattern");
    std::string re;
    if (pat.contains("Regex")) re = pat["Regex"].get<std::string>();
    else if (pat.contains("String")) re = regex_quote(pat["String"].get<std::string>());
    else throw tokenizer_error("tokenizer: " + where + ": Split pre-tokenizer without Regex or String pattern");
    split_step s{std::make_unique<regex>(re)};
    const std::string b = j.value("behavior", "Isolated");
    if (b == "Isolated") s.behavior = split_behavior::isolated;
    else if (b == "Removed") s.behavior = split_behavior::removed;
    else if (b == "MergedWithPrevious") s.behavior = split_behavior::merged_with_previous;
    else if (b == "MergedWithNext") s.behavior = split_behavior::merged_with_next;
    else if (b == "Contiguous") s.behavior = split_behavior::contiguous;
    else throw tokenizer_error("tokenizer: " + where + ": unknown Split behavior '" + b + "'");
    s.invert = j.value("invert", false);
    t.steps_.push_back(std::move(s));
  } else if (type == "Digits") {
    // HF's Digits splits on Rust's char::is_numeric, i.e. \p{N}.
    t.steps_.push_back({std::make_unique<regex>(j.value("individual_digits", false) ? "\\p{N}" : "\\p{N}+")});
  } else {
    throw tokenizer_error("tokenizer: " + where + ": unsupported pre-tokenizer type '" + type +
                          "' (supported: Sequence, Split, ByteLevel, Digits)");
  }
}

namespace {

void check_normalizer(const json& j, const std::string& where) {
  if (j.is_null()) return;
  const std::string type = j.value("type", "");
  if (type == "Sequence") {
    for (const auto& c : j.at("normalizers")) check_normalizer(c, where);
    return;
  }
  // NFC is accepted without being applied: input is expected in NFC already (as
  // llama.cpp, which never normalizes, also assumes for the same models).
  if (type == "NFC") return;
  throw tokenizer_error("tokenizer: " + where + ": unsupported normalizer '" + type + "' for a byte-level BPE");
}

}  // namespace

std::unique_ptr<bpe_tokenizer> bpe_tokenizer::from_json(const json& j, const std::string& where) {
  if (!is_byte_level_bpe(j)) {
    throw tokenizer_error("tokenizer: " + where + ": not a byte-level BPE tokenizer.json (model.type '" +
                          (j.contains("model") ? j["model"].value("type", "") : std::string()) +
                          "', no ByteLevel pre-tokenizer or decoder)");
  }
  auto t = std::make_unique<bpe_tokenizer>();
  const json& m = j.at("model");
  if (!m.value("continuing_subword_prefix", json()).is_null() &&
      !m["continuing_subword_prefix"].get<std::string>().empty()) {
    throw tokenizer_error("tokenizer: " + where + ": BPE continuing_subword_prefix is not supported");
  }
  if (!m.value("end_of_word_suffix", json()).is_null() && !m["end_of_word_suffix"].get<std::string>().empty()) {
    throw tokenizer_error("tokenizer: " + where + ": BPE end_of_word_suffix is not supported");
  }
  if (m.contains("dropout") && m["dropout"].is_number() && m["dropout"].get<double>() > 0.0) {
    throw tokenizer_error("tokenizer: " + where + ": BPE dropout is not supported");
  }
  check_normalizer(j.value("normalizer", json()), where);

  const json& vocab = m.at("vocab");
  int64_t max_id = -1;
  for (auto it = vocab.begin(); it != vocab.end(); ++it) max_id = std::max<int64_t>(max_id, it.value().get<int64_t>());
  const json added = j.value("added_tokens", json::array());
  for (const auto& a : added) max_id = std::max<int64_t>(max_id, a.at("id").get<int64_t>());
  if (max_id < 0 || max_id > (int64_t(1) << 24)) {
    throw tokenizer_error("tokenizer: " + where + ": empty or implausible vocabulary (max id " +
                          std::to_string(max_id) + ")");
  }
  const size_t n = size_t(max_id + 1);
  t->pieces_.assign(n, std::string());
  t->kinds_.assign(n, token_kind::unused);
  for (auto it = vocab.begin(); it != vocab.end(); ++it) {
    const int64_t id = it.value().get<int64_t>();
    if (id < 0) throw tokenizer_error("tokenizer: " + where + ": negative id for '" + it.key() + "'");
    t->pieces_[size_t(id)] = it.key();
    t->kinds_[size_t(id)] = token_kind::normal;
  }
  t->lstrip_.assign(n, 0);
  t->rstrip_.assign(n, 0);
  for (const auto& a : added) {
    const size_t id = a.at("id").get<size_t>();
    t->pieces_[id] = a.at("content").get<std::string>();
    t->kinds_[id] = a.value("special", false) ? token_kind::control : token_kind::user_defined;
    t->lstrip_[id] = a.value("lstrip", false);
    t->rstrip_[id] = a.value("rstrip", false);
  }

  std::vector<std::pair<std::string, std::string>> merges;
  for (const auto& mg : m.value("merges", json::array())) {
    if (mg.is_string()) {
      const std::string s = mg.get<std::string>();
      const size_t sp = s.find(' ');
      if (sp == std::string::npos || s.find(' ', sp + 1) != std::string::npos) {
        throw tokenizer_error("tokenizer: " + where + ": malformed merge '" + s + "'");
      }
      merges.emplace_back(s.substr(0, sp), s.substr(sp + 1));
    } else if (mg.is_array() && mg.size() == 2) {
      merges.emplace_back(mg[0].get<std::string>(), mg[1].get<std::string>());
    } else {
      throw tokenizer_error("tokenizer: " + where + ": malformed merge entry " + mg.dump());
    }
  }
  t->ignore_merges_ = m.value("ignore_merges", false);
  bool byte_level_seen = false;
  parse_pre(j.value("pre_tokenizer", json()), *t, where, byte_level_seen);

  auto find = [&](std::initializer_list<const char*> names) -> int32_t {
    for (const char* nm : names)
      for (size_t i = 0; i < n; ++i)
        if (t->pieces_[i] == nm && t->kinds_[i] != token_kind::normal) return int32_t(i);
    return -1;
  };
  if (m.contains("unk_token") && m["unk_token"].is_string()) {
    const std::string u = m["unk_token"].get<std::string>();
    for (size_t i = 0; i < n; ++i)
      if (t->pieces_[i] == u) t->unk_id_ = int32_t(i);
  }
  t->bos_id_ = find({"<|begin_of_text|>", "<s>", "<|startoftext|>"});
  t->eos_id_ = find({"<|end_of_text|>", "</s>", "<|endoftext|>"});
  // Prompts start with BOS when the post-processor template does.
  const json pp = j.value("post_processor", json());
  if (t->bos_id_ >= 0 && pp.is_object() && pp.value("type", "") == "TemplateProcessing" && pp.contains("single") &&
      !pp["single"].empty() && pp["single"][0].contains("SpecialToken")) {
    t->add_bos_ = pp["single"][0]["SpecialToken"].value("id", "") == t->pieces_[size_t(t->bos_id_)];
  }
  t->build(merges, where);
  return t;
}

namespace {

json read_json(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw tokenizer_error("tokenizer: cannot open " + path);
  std::stringstream ss;
  ss << in.rdbuf();
  try {
    return json::parse(ss.str());
  } catch (const std::exception& e) {
    throw tokenizer_error("tokenizer: " + path + " is not valid JSON: " + e.what());
  }
}

// A token given in tokenizer_config.json as "text" or {"content": "text", ...}.
std::string token_text(const json& j) {
  if (j.is_string()) return j.get<std::string>();
  if (j.is_object() && j.contains("content") && j["content"].is_string()) return j["content"].get<std::string>();
  return {};
}

}  // namespace

std::unique_ptr<tokenizer> tokenizer::from_tokenizer_json(const std::string& path) {
  try {
    auto t = bpe_tokenizer::from_json(read_json(path), path);
    t->finish_setup(true);
    return t;
  } catch (const json::exception& e) {
    throw tokenizer_error("tokenizer: " + path + ": unexpected structure: " + e.what());
  }
}

std::unique_ptr<tokenizer> tokenizer::from_hf_dir(const std::string& dir) {
  namespace fs = std::filesystem;
  const fs::path d(dir);
  std::unique_ptr<tokenizer> t;
  try {
    if (fs::exists(d / "tokenizer.json")) {
      const json j = read_json((d / "tokenizer.json").string());
      if (is_byte_level_bpe(j) || !fs::exists(d / "tokenizer.model")) {
        auto b = bpe_tokenizer::from_json(j, (d / "tokenizer.json").string());
        b->finish_setup(true);
        t = std::move(b);
      }
    }
    if (!t) {
      if (!fs::exists(d / "tokenizer.model")) {
        throw tokenizer_error("tokenizer: " + dir + " has neither tokenizer.json nor tokenizer.model");
      }
      t = from_sentencepiece((d / "tokenizer.model").string());
    }

    if (fs::exists(d / "tokenizer_config.json")) {
      const json c = read_json((d / "tokenizer_config.json").string());
      auto lookup = [&](const json& tok) -> int32_t {
        const std::string s = token_text(tok);
        if (s.empty()) return -1;
        auto id = t->token_id(s);
        return id ? *id : -1;
      };
      if (c.contains("bos_token")) t->bos_id_ = c["bos_token"].is_null() ? -1 : lookup(c["bos_token"]);
      if (c.contains("eos_token") && lookup(c["eos_token"]) >= 0) t->eos_id_ = lookup(c["eos_token"]);
      if (c.contains("add_bos_token") && c["add_bos_token"].is_boolean()) t->add_bos_ = c["add_bos_token"].get<bool>();
      if (c.contains("chat_template")) {
        const json& ct = c["chat_template"];
        if (ct.is_string()) {
          t->chat_template_ = ct.get<std::string>();
        } else if (ct.is_array()) {  // [{"name": ..., "template": ...}]
          for (const auto& e : ct) {
            if (e.value("name", "") == "default" || t->chat_template_.empty()) {
              t->chat_template_ = e.value("template", "");
            }
          }
        }
      }
    }
    for (const char* cfg : {"config.json", "generation_config.json"}) {
      if (!fs::exists(d / cfg)) continue;
      const json c = read_json((d / cfg).string());
      if (!c.contains("eos_token_id")) continue;
      const json& e = c["eos_token_id"];
      if (e.is_number_integer()) t->extra_stop_ids_.push_back(e.get<int32_t>());
      else if (e.is_array())
        for (const auto& x : e)
          if (x.is_number_integer()) t->extra_stop_ids_.push_back(x.get<int32_t>());
    }
    if (t->bos_id_ < 0) t->add_bos_ = false;
    t->rebuild_stop_ids();
  } catch (const json::exception& e) {
    throw tokenizer_error("tokenizer: " + dir + ": unexpected JSON structure: " + e.what());
  }
  return t;
}

}  // namespace undertone::models
