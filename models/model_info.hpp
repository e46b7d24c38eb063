// Human-readable summaries of model checkpoints (architecture, sizes,
// vocabulary), torch-free. Used by `undertone models info` and `undertone run`.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace undertone::models {

/// Key facts of a checkpoint, in display order.
struct model_summary {
  std::string path;
  std::string format;  ///< "gguf v3", "ctranslate2 v6", ...
  std::vector<std::pair<std::string, std::string>> facts;
  int64_t parameters = 0;
  uint64_t file_bytes = 0;
  std::string to_string() const;
};

/// Summarizes a GGUF LLM checkpoint (llama-family metadata keys).
model_summary summarize_gguf(const std::string& path);

/// Summarizes a CTranslate2 Whisper directory.
model_summary summarize_ct2_whisper(const std::string& dir);

/// Picks the right summarizer by looking at the path (file .gguf, dir with
/// model.bin, dir with config.json + safetensors).
model_summary summarize_any(const std::string& path);

}  // namespace undertone::models
