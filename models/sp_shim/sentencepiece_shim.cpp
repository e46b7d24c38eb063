// A C interface over libsentencepiece, built as a separate module that
// models/sp_tokenizer.cpp loads with dlopen(RTLD_LOCAL | RTLD_DEEPBIND).
//
// Why: Debian's libsentencepiece exports its own embedded copy of protobuf-lite,
// and LibTorch loads the system libprotobuf; with both in one symbol namespace
// the process crashes during static initialisation. Loading sentencepiece only
// through this module, with deep binding, keeps its protobuf private.
#include <sentencepiece_processor.h>

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

namespace {
struct handle {
  sentencepiece::SentencePieceProcessor sp;
  std::string error;
};
}  // namespace

extern "C" {

/// Loads a model; returns nullptr and writes a message to err (cap bytes) on failure.
void* ut_sp_load(const char* path, char* err, size_t cap) {
  auto* h = new handle;
  auto st = h->sp.Load(path);
  if (!st.ok()) {
    std::snprintf(err, cap, "%s", st.ToString().c_str());
    delete h;
    return nullptr;
  }
  return h;
}

void ut_sp_free(void* h) { delete static_cast<handle*>(h); }

int ut_sp_piece_size(void* h) { return static_cast<handle*>(h)->sp.GetPieceSize(); }

/// The piece of `id` (pointer valid while the model lives), its length in *len.
const char* ut_sp_piece(void* h, int id, size_t* len) {
  const std::string& p = static_cast<handle*>(h)->sp.IdToPiece(id);
  *len = p.size();
  return p.data();
}

/// 0 normal, 1 control, 2 unknown, 3 byte, 4 unused.
int ut_sp_kind(void* h, int id) {
  auto& sp = static_cast<handle*>(h)->sp;
  if (sp.IsControl(id)) return 1;
  if (sp.IsUnknown(id)) return 2;
  if (sp.IsByte(id)) return 3;
  if (sp.IsUnused(id)) return 4;
  return 0;
}

/// bos, eos, unk ids (-1 if none).
void ut_sp_special(void* h, int* bos, int* eos, int* unk) {
  auto& sp = static_cast<handle*>(h)->sp;
  *bos = sp.bos_id();
  *eos = sp.eos_id();
  *unk = sp.unk_id();
}

/// Encodes text into ids. Writes up to `cap` ids to `out` and the full count to
/// *n (call again with a larger buffer if *n > cap). Returns 0, or -1 with the
/// message available from ut_sp_error.
int ut_sp_encode(void* h, const char* text, size_t len, int32_t* out, size_t cap, size_t* n) {
  auto* hh = static_cast<handle*>(h);
  std::vector<int> ids;
  auto st = hh->sp.Encode(std::string(text, len), &ids);
  if (!st.ok()) {
    hh->error = st.ToString();
    return -1;
  }
  *n = ids.size();
  for (size_t i = 0; i < ids.size() && i < cap; ++i) out[i] = ids[i];
  return 0;
}

const char* ut_sp_error(void* h) { return static_cast<handle*>(h)->error.c_str(); }

}  // extern "C"
