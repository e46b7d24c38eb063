// SentencePiece tokenizer (tokenizer.model of Llama 2 / TinyLlama), wrapping
// libsentencepiece behind the tokenizer interface.
//
// libsentencepiece is reached through models/sp_shim (a C interface loaded with
// dlopen(RTLD_LOCAL | RTLD_DEEPBIND)), never linked directly: its embedded
// protobuf-lite clashes with the libprotobuf LibTorch loads (see the shim).
#include <dlfcn.h>

#include <cstdlib>
#include <filesystem>
#include <mutex>

#include "models/tokenizer.hpp"

#ifndef UNDERTONE_SP_SHIM_PATH
#define UNDERTONE_SP_SHIM_PATH "libundertone_sp_shim.so"
#endif

namespace undertone::models {

namespace {

const std::string k_space_symbol = "\xE2\x96\x81";  // U+2581 "▁"

// The shim's functions, resolved once per process.
struct sp_api {
  void* (*load)(const char*, char*, size_t) = nullptr;
  void (*free)(void*) = nullptr;
  int (*piece_size)(void*) = nullptr;
  const char* (*piece)(void*, int, size_t*) = nullptr;
  int (*kind)(void*, int) = nullptr;
  void (*special)(void*, int*, int*, int*) = nullptr;
  int (*encode)(void*, const char*, size_t, int32_t*, size_t, size_t*) = nullptr;
  const char* (*error)(void*) = nullptr;
};

// Candidate locations: $UNDERTONE_SP_SHIM, next to the executable (bin/../lib),
// the build tree's path, then the loader's search path.
const sp_api& shim() {
  static sp_api api;
  static std::string failure;
  static std::once_flag once;
  std::call_once(once, [] {
    std::vector<std::string> candidates;
    if (const char* e = std::getenv("UNDERTONE_SP_SHIM"); e && *e) candidates.push_back(e);
    std::error_code ec;
    auto exe = std::filesystem::read_symlink("/proc/self/exe", ec);
    if (!ec) candidates.push_back((exe.parent_path().parent_path() / "lib" / "libundertone_sp_shim.so").string());
    candidates.push_back(UNDERTONE_SP_SHIM_PATH);
    candidates.push_back("libundertone_sp_shim.so");
    void* h = nullptr;
    std::string errors;
    for (const auto& c : candidates) {
      h = ::dlopen(c.c_str(), RTLD_NOW | RTLD_LOCAL | RTLD_DEEPBIND);
      if (h) break;
      const char* e = ::dlerror();
      errors += "\n  " + c + ": " + (e ? e : "?");
    }
    if (!h) {
      failure = "SentencePiece support module libundertone_sp_shim.so not found (set UNDERTONE_SP_SHIM):" + errors;
      return;
    }
    auto sym = [&](const char* name) {
      void* p = ::dlsym(h, name);
      if (!p) failure = std::string("libundertone_sp_shim.so lacks ") + name;
      return p;
    };
    api.load = reinterpret_cast<decltype(api.load)>(sym("ut_sp_load"));
    api.free = reinterpret_cast<decltype(api.free)>(sym("ut_sp_free"));
    api.piece_size = reinterpret_cast<decltype(api.piece_size)>(sym("ut_sp_piece_size"));
    api.piece = reinterpret_cast<decltype(api.piece)>(sym("ut_sp_piece"));
    api.kind = reinterpret_cast<decltype(api.kind)>(sym("ut_sp_kind"));
    api.special = reinterpret_cast<decltype(api.special)>(sym("ut_sp_special"));
    api.encode = reinterpret_cast<decltype(api.encode)>(sym("ut_sp_encode"));
    api.error = reinterpret_cast<decltype(api.error)>(sym("ut_sp_error"));
  });
  if (!failure.empty()) throw tokenizer_error("tokenizer: " + failure);
  return api;
}

// Owns one loaded SentencePiece model inside the shim.
class sp_model {
 public:
  explicit sp_model(const std::string& path) : api_(shim()) {
    char err[512] = {0};
    h_ = api_.load(path.c_str(), err, sizeof err);
    if (!h_) throw tokenizer_error("tokenizer: cannot load SentencePiece model " + path + ": " + err);
  }
  ~sp_model() {
    if (h_) api_.free(h_);
  }
  sp_model(const sp_model&) = delete;
  sp_model& operator=(const sp_model&) = delete;
  int size() const { return api_.piece_size(h_); }
  std::string piece(int id) const {
    size_t n = 0;
    const char* p = api_.piece(h_, id, &n);
    return std::string(p, n);
  }
  int kind(int id) const { return api_.kind(h_, id); }
  void special(int& bos, int& eos, int& unk) const { api_.special(h_, &bos, &eos, &unk); }
  std::vector<int32_t> encode(std::string_view text) const {
    std::vector<int32_t> ids(text.size() + 8);
    size_t n = 0;
    if (api_.encode(h_, text.data(), text.size(), ids.data(), ids.size(), &n) != 0)
      throw tokenizer_error(std::string("tokenizer: SentencePiece encode failed: ") + api_.error(h_));
    if (n > ids.size()) {
      ids.resize(n);
      if (api_.encode(h_, text.data(), text.size(), ids.data(), ids.size(), &n) != 0)
        throw tokenizer_error(std::string("tokenizer: SentencePiece encode failed: ") + api_.error(h_));
    }
    ids.resize(n);
    return ids;
  }

 private:
  const sp_api& api_;
  void* h_ = nullptr;
};

class sp_tokenizer final : public tokenizer {
 public:
  explicit sp_tokenizer(const std::string& path) : sp_(path) {
    const int n = sp_.size();
    pieces_.resize(size_t(n));
    kinds_.resize(size_t(n));
    bytes_.resize(size_t(n));
    for (int i = 0; i < n; ++i) {
      const std::string p = sp_.piece(i);
      pieces_[size_t(i)] = p;
      token_kind k = token_kind::normal;
      switch (sp_.kind(i)) {
        case 1: k = token_kind::control; break;
        case 2: k = token_kind::unknown; break;
        case 3: k = token_kind::byte; break;
        case 4: k = token_kind::unused; break;
        default: break;
      }
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
    sp_.special(bos_id_, eos_id_, unk_id_);
    add_bos_ = bos_id_ >= 0;  // the Llama 2 convention
    // SentencePiece prepends "▁" (the dummy prefix) to every encoded text when
    // normalizer_spec.add_dummy_prefix is set; decoding drops it again.
    auto probe = sp_.encode("a");
    dummy_prefix_ = !probe.empty() && sp_.piece(probe[0]).rfind(k_space_symbol, 0) == 0;
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
    // Each text fragment between special tokens is encoded on its own (so gets its own
    // dummy prefix), as llama.cpp does for SentencePiece vocabularies.
    for (const fragment& fr : split_special(text, parse_special)) {
      if (fr.id >= 0) {
        out.push_back(fr.id);
        continue;
      }
      auto ids = sp_.encode(fr.text);
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
  sp_model sp_;
  bool dummy_prefix_ = false;
};

}  // namespace

std::unique_ptr<tokenizer> tokenizer::from_sentencepiece(const std::string& path) {
  return std::make_unique<sp_tokenizer>(path);
}

}  // namespace undertone::models
