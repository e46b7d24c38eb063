// Text tokenizers of the LLM families undertone serves, torch-free.
//
// Two implementations behind one interface:
//  * byte-level BPE (GPT-2 / SmolLM2 / Llama 3 / Qwen2), loaded from GGUF metadata
//    (tokenizer.ggml.model == "gpt2") or from an HF tokenizer.json (model.type BPE with
//    a ByteLevel pre-tokenizer or decoder). Pre-tokenizer regexes run on PCRE2 (UTF +
//    UCP, JIT when available). Token ids match llama.cpp for the GGUF path and HF
//    `tokenizers` for the tokenizer.json path (tests/test_tokenizer.cpp).
//  * SentencePiece (`tokenizer.model`, Llama 2 / TinyLlama), wrapping libsentencepiece.
//
// Conventions shared by both:
//  * encode() never adds BOS/EOS; callers prepend bos_id() when add_bos() says so.
//  * Special tokens: with parse_special, the text of control tokens (e.g. "<|im_start|>",
//    HF added tokens with special=true) found in the text becomes that token, never
//    split; without it the same text is tokenized as ordinary text. User-defined tokens
//    (HF added tokens with special=false, GGUF token_type 4) are always matched, as in
//    llama.cpp and HF tokenizers. Matching is leftmost-longest.
//  * Text is UTF-8. Invalid UTF-8 in encode() input is replaced by U+FFFD first (the
//    same as llama.cpp's codepoint decoder does).
//  * decode() is the raw inverse: the concatenation of token_bytes() (no
//    clean_up_tokenization_spaces), so decode(encode(x)) == x for byte-level BPE.
//    Control tokens decode to their text. SentencePiece drops the one space of the
//    dummy prefix at the very start of the sequence, as SentencePiece does.
//  * All methods are const and safe to call from several threads at once.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

namespace undertone::models {

class gguf_file;

class tokenizer_error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// What a vocabulary entry is (GGUF token_type numbering, minus one).
enum class token_kind : uint8_t {
  normal,        ///< ordinary piece
  unknown,       ///< the unk token
  control,       ///< special token (BOS/EOS, <|im_start|>, HF added token with special=true)
  user_defined,  ///< always-matched added token (HF added token with special=false)
  unused,        ///< placeholder, never produced by encode()
  byte,          ///< SentencePiece byte-fallback piece <0xNN>
};

/// A tokenizer: text <-> token ids. Create with one of the static factories.
class tokenizer {
 public:
  virtual ~tokenizer();

  /// From GGUF metadata (tokenizer.ggml.*). Supports tokenizer.ggml.model "gpt2"
  /// (byte-level BPE). tokenizer.ggml.pre selects the pre-tokenizer as in llama.cpp:
  /// "smollm" (and starcoder/refact/command-r/codeshell/exaone/minerva-7b),
  /// "llama-bpe"/"llama3"/"llama-v3"/"falcon3"/"dbrx"/"smaug-bpe" (Llama 3, with
  /// ignore_merges), "qwen2"/"stablelm2"/"megrez"/"deepseek-r1-qwen", "gpt-2" (and
  /// mpt/olmo/jais/phi-2/roberta-bpe), "default" or missing. `pre_override`, when
  /// not empty, replaces tokenizer.ggml.pre (used by tests to exercise the other
  /// pre-tokenizers on one vocabulary). Throws tokenizer_error naming the file and key.
  static std::unique_ptr<tokenizer> from_gguf(const gguf_file& file,
                                              const std::string& pre_override = "");

  /// From an HF model directory: tokenizer.json if it describes a byte-level BPE,
  /// otherwise tokenizer.model (SentencePiece). Also reads tokenizer_config.json
  /// (bos/eos tokens, add_bos_token, chat_template), config.json and
  /// generation_config.json (eos_token_id, int or list, added to the stop set).
  static std::unique_ptr<tokenizer> from_hf_dir(const std::string& dir);

  /// From one HF tokenizer.json file (byte-level BPE only); no config files read,
  /// BOS/EOS guessed from well-known token names.
  static std::unique_ptr<tokenizer> from_tokenizer_json(const std::string& path);

  /// From a SentencePiece model file (tokenizer.model).
  static std::unique_ptr<tokenizer> from_sentencepiece(const std::string& path);

  /// Token ids of `text` (no BOS/EOS added). See the conventions above.
  virtual std::vector<int32_t> encode(std::string_view text, bool parse_special) const = 0;

  /// Bytes of a sequence of tokens (may be invalid UTF-8 if the ids split a character).
  /// Ids outside [0, vocab_size()) throw tokenizer_error.
  std::string decode(const std::vector<int32_t>& ids) const;

  /// Raw bytes of one token as it appears in the middle of a decoded sequence
  /// (byte-level BPE: the byte-decoded piece; SentencePiece: "▁" -> " ", <0xNN> -> one
  /// byte; control tokens: their text). Throws tokenizer_error for bad ids.
  std::string token_bytes(int32_t id) const;

  /// Bytes of token `id` when it is the first token of a decoded sequence
  /// (`first`), else token_bytes(id). Differs only for SentencePiece's dummy prefix.
  virtual std::string token_bytes_at(int32_t id, bool first) const;

  /// Number of ids (model vocabulary plus added tokens).
  int32_t vocab_size() const { return int32_t(pieces_.size()); }
  /// BOS / EOS / UNK ids, or -1 if the model has none.
  int32_t bos_id() const { return bos_id_; }
  int32_t eos_id() const { return eos_id_; }
  int32_t unk_id() const { return unk_id_; }
  /// Whether prompts for this model should start with bos_id().
  bool add_bos() const { return add_bos_; }
  /// True for ids that end generation: eos, eot/eom (GGUF keys), eos_token_id lists of
  /// config.json / generation_config.json, and the tokens named <|eot_id|>,
  /// <|im_end|>, <|end|>, <end_of_turn>, <|endoftext|>, <|eom_id|>, <EOT>,
  /// <|end_of_text|> and llama.cpp's FIM pad/repo/file-separator names when present
  /// (for SmolLM2: <|endoftext|>, <|im_end|>, <reponame>, as llama.cpp's EOG set).
  bool is_stop(int32_t id) const;
  /// The stop ids, sorted.
  const std::vector<int32_t>& stop_ids() const { return stop_ids_; }

  /// Id of a vocabulary piece as stored in the vocabulary (byte-level BPE pieces use
  /// GPT-2's byte-to-unicode alphabet, e.g. "Ġthe"; SentencePiece pieces use "▁";
  /// special tokens are their text, e.g. "<|im_end|>"), or nullopt.
  std::optional<int32_t> token_id(const std::string& piece) const;
  /// The stored piece of an id (see token_id). Throws tokenizer_error for bad ids.
  const std::string& piece(int32_t id) const;
  token_kind kind(int32_t id) const;

  /// The chat template text shipped with the model (GGUF tokenizer.chat_template or
  /// tokenizer_config.json chat_template), empty if none.
  const std::string& chat_template_text() const { return chat_template_; }
  /// "bpe" or "sentencepiece".
  virtual std::string type_name() const = 0;

 protected:
  tokenizer() = default;
  void check_id(int32_t id) const;
  /// Fills piece_to_id_, the special-token matcher and stop_ids_ from pieces_/kinds_
  /// (call once the fields below are set). `match_user_defined`: whether encode's
  /// splitter matches user-defined tokens itself (false when the backend does).
  void finish_setup(bool match_user_defined);
  /// Recomputes stop_ids_ from eos_id_, extra_stop_ids_ and the well-known names.
  void rebuild_stop_ids();

  /// One piece of text after special-token splitting: either raw text or a token.
  struct fragment {
    std::string_view text;
    int32_t id = -1;  ///< >= 0: a special token; text is empty
  };
  /// Splits `text` on special tokens (leftmost-longest), honouring lstrip/rstrip.
  std::vector<fragment> split_special(std::string_view text, bool parse_special) const;

  std::vector<std::string> pieces_;
  std::vector<token_kind> kinds_;
  std::vector<std::string> bytes_;      ///< token_bytes per id
  std::vector<uint8_t> lstrip_, rstrip_;  ///< HF added-token flags (may be empty)
  std::unordered_map<std::string, int32_t> piece_to_id_;
  int32_t bos_id_ = -1, eos_id_ = -1, unk_id_ = -1;
  bool add_bos_ = false;
  std::vector<int32_t> extra_stop_ids_;  ///< set by loaders (eot, config eos lists)
  std::vector<int32_t> stop_ids_;
  std::string chat_template_;

 private:
  struct special_entry {
    std::string text;
    int32_t id;
    bool control;  ///< matched only with parse_special
  };
  std::vector<special_entry> specials_;      ///< sorted by first byte, then length desc
  std::vector<int32_t> special_first_[256];  ///< indices into specials_ by first byte
  bool match_user_defined_ = true;
};

/// Replaces every ill-formed UTF-8 subsequence by U+FFFD (one per maximal subpart,
/// as Python's bytes.decode("utf-8", "replace") and the Unicode standard do).
std::string utf8_sanitize(std::string_view bytes);
/// Whether `bytes` is well-formed UTF-8.
bool utf8_valid(std::string_view bytes);

/// Incremental detokenizer for streaming output: feed generated token ids one at a
/// time; each call returns only complete UTF-8 characters (a multi-byte character
/// split across tokens is held back until its last byte arrives). Ill-formed bytes
/// are emitted as U+FFFD, so the output is always valid UTF-8; for ids whose decode()
/// is valid UTF-8, the concatenated output equals decode(ids).
class token_stream_decoder {
 public:
  /// `tok` must outlive the decoder.
  explicit token_stream_decoder(const tokenizer& tok) : tok_(&tok) {}
  /// Appends one token; returns the text that became complete (may be empty).
  std::string push(int32_t id);
  /// Ends the stream: returns what is held back (an unfinished character becomes
  /// U+FFFD) and resets the decoder for a new sequence.
  std::string flush();
  /// Forgets held-back bytes; the next token is treated as the first of a sequence.
  void reset();
  /// Bytes held back waiting for the rest of a character (0..3).
  size_t pending_bytes() const { return pending_.size(); }

 private:
  const tokenizer* tok_;
  std::string pending_;
  bool first_ = true;
};

}  // namespace undertone::models
