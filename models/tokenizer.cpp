// Tokenizer interface: shared vocabulary bookkeeping, special-token splitting,
// UTF-8 helpers and the streaming detokenizer. The BPE and SentencePiece
// implementations live in bpe_tokenizer.cpp and sp_tokenizer.cpp.
#include "models/tokenizer.hpp"

#include <algorithm>

namespace undertone::models {

namespace {

enum class utf8_status { ok, bad, incomplete };

// Classifies the sequence starting at p[i]: a well-formed character (its length),
// an ill-formed maximal subpart (its length, replaced by one U+FFFD), or a prefix of
// a well-formed character cut by the end of the buffer.
utf8_status utf8_step(const unsigned char* p, size_t n, size_t i, size_t& len) {
  const unsigned c = p[i];
  if (c < 0x80) { len = 1; return utf8_status::ok; }
  size_t need = 0;
  unsigned lo = 0x80, hi = 0xBF;
  if (c >= 0xC2 && c <= 0xDF) need = 1;
  else if (c == 0xE0) { need = 2; lo = 0xA0; }
  else if (c >= 0xE1 && c <= 0xEC) need = 2;
  else if (c == 0xED) { need = 2; hi = 0x9F; }
  else if (c >= 0xEE && c <= 0xEF) need = 2;
  else if (c == 0xF0) { need = 3; lo = 0x90; }
  else if (c >= 0xF1 && c <= 0xF3) need = 3;
  else if (c == 0xF4) { need = 3; hi = 0x8F; }
  else { len = 1; return utf8_status::bad; }
  for (size_t j = 1; j <= need; ++j) {
    if (i + j >= n) { len = n - i; return utf8_status::incomplete; }
    const unsigned b = p[i + j];
    const unsigned l = j == 1 ? lo : 0x80, h = j == 1 ? hi : 0xBF;
    if (b < l || b > h) { len = j; return utf8_status::bad; }
  }
  len = need + 1;
  return utf8_status::ok;
}

const char k_replacement[] = "\xEF\xBF\xBD";

// Appends the decodable part of `in` to `out`; returns how many bytes at the end were
// left unconsumed because they may still become a character (only if !final).
size_t utf8_drain(std::string_view in, std::string& out, bool final) {
  const auto* p = reinterpret_cast<const unsigned char*>(in.data());
  const size_t n = in.size();
  size_t i = 0;
  while (i < n) {
    size_t len = 0;
    const utf8_status st = utf8_step(p, n, i, len);
    if (st == utf8_status::ok) {
      out.append(in.data() + i, len);
    } else if (st == utf8_status::bad || final) {
      out += k_replacement;
    } else {
      return n - i;
    }
    i += len;
  }
  return 0;
}

}  // namespace

std::string utf8_sanitize(std::string_view bytes) {
  std::string out;
  out.reserve(bytes.size());
  utf8_drain(bytes, out, true);
  return out;
}

bool utf8_valid(std::string_view bytes) {
  const auto* p = reinterpret_cast<const unsigned char*>(bytes.data());
  size_t i = 0;
  while (i < bytes.size()) {
    if (p[i] < 0x80) { ++i; continue; }
    size_t len = 0;
    if (utf8_step(p, bytes.size(), i, len) != utf8_status::ok) return false;
    i += len;
  }
  return true;
}

// ---- tokenizer base ----

tokenizer::~tokenizer() = default;

void tokenizer::check_id(int32_t id) const {
  if (id < 0 || id >= vocab_size()) {
    throw tokenizer_error("tokenizer: token id " + std::to_string(id) + " is outside the vocabulary [0, " +
                          std::to_string(vocab_size()) + ")");
  }
}

const std::string& tokenizer::piece(int32_t id) const {
  check_id(id);
  return pieces_[size_t(id)];
}

token_kind tokenizer::kind(int32_t id) const {
  check_id(id);
  return kinds_[size_t(id)];
}

std::optional<int32_t> tokenizer::token_id(const std::string& piece) const {
  auto it = piece_to_id_.find(piece);
  if (it == piece_to_id_.end()) return std::nullopt;
  return it->second;
}

std::string tokenizer::token_bytes(int32_t id) const {
  check_id(id);
  return bytes_[size_t(id)];
}

std::string tokenizer::token_bytes_at(int32_t id, bool /*first*/) const { return token_bytes(id); }

std::string tokenizer::decode(const std::vector<int32_t>& ids) const {
  std::string out;
  for (size_t i = 0; i < ids.size(); ++i) out += token_bytes_at(ids[i], i == 0);
  return out;
}

bool tokenizer::is_stop(int32_t id) const {
  return std::binary_search(stop_ids_.begin(), stop_ids_.end(), id);
}

void tokenizer::finish_setup(bool match_user_defined) {
  if (kinds_.size() != pieces_.size() || bytes_.size() != pieces_.size()) {
    throw tokenizer_error("tokenizer: internal error, vocabulary tables of different sizes");
  }
  match_user_defined_ = match_user_defined;
  piece_to_id_.clear();
  piece_to_id_.reserve(pieces_.size());
  for (size_t i = 0; i < pieces_.size(); ++i) piece_to_id_[pieces_[i]] = int32_t(i);

  specials_.clear();
  for (auto& v : special_first_) v.clear();
  for (size_t i = 0; i < pieces_.size(); ++i) {
    const token_kind k = kinds_[i];
    if (pieces_[i].empty()) continue;
    if (k == token_kind::control || k == token_kind::unknown) {
      specials_.push_back({pieces_[i], int32_t(i), true});
    } else if (k == token_kind::user_defined) {
      specials_.push_back({pieces_[i], int32_t(i), false});
    }
  }
  std::stable_sort(specials_.begin(), specials_.end(), [](const special_entry& a, const special_entry& b) {
    return a.text.size() > b.text.size();
  });
  for (size_t i = 0; i < specials_.size(); ++i) {
    special_first_[static_cast<unsigned char>(specials_[i].text[0])].push_back(int32_t(i));
  }

  rebuild_stop_ids();
}

void tokenizer::rebuild_stop_ids() {
  std::vector<int32_t> stops = extra_stop_ids_;
  if (eos_id_ >= 0) stops.push_back(eos_id_);
  // The end-of-generation names llama.cpp recognises (llama-vocab.cpp), FIM
  // pad/repo/separator tokens included, plus Llama 3's <|end_of_text|>.
  for (const char* name : {"<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|eom_id|>",
                           "<EOT>", "<|end_of_text|>", "<|fim_pad|>", "<fim-pad>", "<PAD>", "<|fim_repo|>",
                           "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>", "<|file_sep|>"}) {
    if (auto id = token_id(name)) stops.push_back(*id);
  }
  stops.erase(std::remove_if(stops.begin(), stops.end(), [&](int32_t id) { return id < 0 || id >= vocab_size(); }),
              stops.end());
  std::sort(stops.begin(), stops.end());
  stops.erase(std::unique(stops.begin(), stops.end()), stops.end());
  stop_ids_ = std::move(stops);
}

std::vector<tokenizer::fragment> tokenizer::split_special(std::string_view text, bool parse_special) const {
  std::vector<fragment> out;
  if (specials_.empty() || (!parse_special && !match_user_defined_)) {
    if (!text.empty()) out.push_back({text, -1});
    return out;
  }
  auto is_space = [](char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f'; };
  const size_t n = text.size();
  size_t start = 0, pos = 0;
  while (pos < n) {
    const auto& cands = special_first_[static_cast<unsigned char>(text[pos])];
    const special_entry* hit = nullptr;
    for (int32_t ci : cands) {
      const special_entry& e = specials_[size_t(ci)];
      if (e.control ? !parse_special : !match_user_defined_) continue;
      if (e.text.size() <= n - pos && text.compare(pos, e.text.size(), e.text) == 0) {
        hit = &e;
        break;  // candidates are sorted longest first
      }
    }
    if (!hit) { ++pos; continue; }
    size_t end = pos;
    if (!lstrip_.empty() && lstrip_[size_t(hit->id)]) {
      while (end > start && is_space(text[end - 1])) --end;
    }
    if (end > start) out.push_back({text.substr(start, end - start), -1});
    out.push_back({std::string_view(), hit->id});
    pos += hit->text.size();
    if (!rstrip_.empty() && rstrip_[size_t(hit->id)]) {
      while (pos < n && is_space(text[pos])) ++pos;
    }
    start = pos;
  }
  if (start < n) out.push_back({text.substr(start), -1});
  return out;
}

// ---- streaming decoder ----

std::string token_stream_decoder::push(int32_t id) {
  pending_ += tok_->token_bytes_at(id, first_);
  first_ = false;
  std::string out;
  const size_t keep = utf8_drain(pending_, out, false);
  pending_.erase(0, pending_.size() - keep);
  return out;
}

std::string token_stream_decoder::flush() {
  std::string out;
  utf8_drain(pending_, out, true);
  reset();
  return out;
}

void token_stream_decoder::reset() {
  pending_.clear();
  first_ = true;
}

}  // namespace undertone::models
