// SentencePiece tokenizer (tokenizer.model of Llama 2 / TinyLlama), wrapping
// libsentencepiece behind the tokenizer interface.
#include <sentencepiece_processor.h>

#include "models/tokenizer.hpp"

namespace undertone::models {

namespace {

const std::string k_space_symbol = "\xE2\x96\x81";  // U+2581 "▁"

class sp_tokenizer final : public tokenizer {
 public:
  explicit sp_tokenizer(const std::string& path) {
    const auto st = sp_.Load(path);
    if (!st.ok()) {
      throw tokenizer_error("tokenizer: cannot load SentencePiece model " + path + ": " + st.ToString());
    }
    const int n = sp_.GetPieceSize();
    pieces_.resize(size_t(n));
    kinds_.resize(size_t(n));
    bytes_.resize(size_t(n));
    for (int i = 0; i < n; ++i) {
      const std::string& p = sp_.IdToPiece(i);
      pieces_[size_t(i)] = p;
      token_kind k = token_kind::normal;
      if (sp_.IsControl(i)) k = token_kind::control;
      else if (sp_.IsUnknown(i)) k = token_kind::unknown;
      else if (sp_.IsByte(i)) k = token_kind::byte;
      else if (sp_.IsUnused(i)) k = token_kind::unused;
      kinds_[size_t(i)] = k;
      std::string b;
      if (k == token_kind::byte) {
        // "<0xAB>"
        if (p.size() == 6 && p.compare(0, 3, "<0x") == 0) b.assign(1, char(std::stoi(p.substr(3, 2), nullptr, 16)));
      } else if (k == token_kind::normal) {
        size_t pos = 0;
        while (pos < p.size()) {
          if (p.compare(pos, k_space_symbol.size(), k_space_symbol) == 0) {
            b += ' ';
            pos += k_space_symbol.size();
          } else {
            b += p[pos++];
          }
        }
      } else if (k != token_kind::unused) {
        b = p;  // control / unknown: their text, as llama.cpp prints them
      }
      bytes_[size_t(i)] = std::move(b);
    }
    bos_id_ = sp_.bos_id();
    eos_id_ = sp_.eos_id();
    unk_id_ = sp_.unk_id();
    add_bos_ = bos_id_ >= 0;  // the Llama 2 convention
    // SentencePiece prepends "▁" (the dummy prefix) to every encoded text when
    // normalizer_spec.add_dummy_prefix is set; decoding drops it again.
    std::vector<std::string> probe;
    dummy_prefix_ = sp_.Encode("a", &probe).ok() && !probe.empty() && probe[0].rfind(k_space_symbol, 0) == 0;
    // User-defined pieces are matched by SentencePiece itself, inside one Encode call.
    finish_setup(false);
  }

  std::string type_name() const override { return "sentencepiece"; }

  std::vector<int32_t> encode(std::string_view text, bool parse_special) const override {
    std::string cleaned;
    if (!utf8_valid(text)) {
      cleaned = utf8_sanitize(text);
      text = cleaned;
    }
    std::vector<int32_t> out;
    std::vector<int> ids;
    // Each text fragment between special tokens is encoded on its own (so gets its own
    // dummy prefix), as llama.cpp does for SentencePiece vocabularies.
    for (const fragment& fr : split_special(text, parse_special)) {
      if (fr.id >= 0) {
        out.push_back(fr.id);
        continue;
      }
      ids.clear();
      const auto st = sp_.Encode(fr.text, &ids);
      if (!st.ok()) throw tokenizer_error("tokenizer: SentencePiece encode failed: " + st.ToString());
      out.insert(out.end(), ids.begin(), ids.end());
    }
    return out;
  }

  std::string token_bytes_at(int32_t id, bool first) const override {
    check_id(id);
    const std::string& b = bytes_[size_t(id)];
    if (first && dummy_prefix_ && kinds_[size_t(id)] == token_kind::normal && !b.empty() && b[0] == ' ') {
      return b.substr(1);
    }
    return b;
  }

 private:
  sentencepiece::SentencePieceProcessor sp_;
  bool dummy_prefix_ = false;
};

}  // namespace

std::unique_ptr<tokenizer> tokenizer::from_sentencepiece(const std::string& path) {
  return std::make_unique<sp_tokenizer>(path);
}

}  // namespace undertone::models
