// `undertone encode FILE...`: streams audio files through the speech encoder
// (models/speech_encoder.hpp) chunk by chunk and reports speed and latency.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <iostream>

#include <nlohmann/json.hpp>

#include "apps/common.hpp"
#include "models/audio.hpp"
#include "models/model_store.hpp"
#include "models/runtime.hpp"
#include "models/speech_encoder.hpp"

namespace undertone::apps {

namespace {

struct encode_flags {
  std::vector<std::string> files;
  int64_t chunk_ms = 0;  // 0 = encoder.chunk_ms
  int64_t d_llm = 576;
  bool json = false;
};

nlohmann::json encode_file(const models::speech_encoder& enc, const std::string& path) {
  using clk = std::chrono::steady_clock;
  const auto audio = models::load_audio(path);  // throws audio_error naming the file
  const auto& x = audio.samples;
  const size_t piece = size_t(enc.chunk_samples());
  auto s = enc.create_stream();
  std::vector<double> chunk_ms;  // compute time of each decode call that encoded a chunk
  std::vector<float> tokens;
  const auto t0 = clk::now();
  auto decode_ready = [&] {
    while (enc.is_ready(*s)) {
      const auto a = clk::now();
      enc.decode_streams({s.get()});
      chunk_ms.push_back(std::chrono::duration<double, std::milli>(clk::now() - a).count());
    }
    enc.pop_tokens(*s, tokens);
  };
  // Natural chunking: the audio arrives chunk_ms at a time, as a live stream would.
  for (size_t off = 0; off < x.size(); off += piece) {
    enc.accept_waveform(*s, x.data() + off, std::min(piece, x.size() - off));
    decode_ready();
  }
  enc.input_finished(*s);
  decode_ready();
  const double total_s = std::chrono::duration<double>(clk::now() - t0).count();
  const double dur = audio.seconds();
  const auto n_tok = int64_t(tokens.size()) / enc.d_llm();
  nlohmann::json j;
  j["file"] = path;
  j["duration_s"] = dur;
  j["speech_tokens"] = n_tok;
  j["tokens_per_s"] = dur > 0 ? double(n_tok) / dur : 0.0;
  j["chunks"] = chunk_ms.size();
  j["compute_s"] = total_s;
  j["rtf"] = dur > 0 ? total_s / dur : 0.0;
  j["chunk_latency_ms"] = {{"p50", percentile(chunk_ms, 50)}, {"p95", percentile(chunk_ms, 95)},
                           {"max", chunk_ms.empty() ? 0.0 : *std::max_element(chunk_ms.begin(), chunk_ms.end())}};
  return j;
}

}  // namespace

void add_encode_command(CLI::App& app, global_options& g) {
  static encode_flags fl;
  auto* cmd = app.add_subcommand(
      "encode",
      "Stream audio files through the speech encoder (log-mel -> block-causal Whisper encoder -> projector)\n"
      "and print, per file: duration, speech tokens, tokens/s, real-time factor (compute time / audio time)\n"
      "and per-chunk latency p50/p95/max (compute time of each encoder call).\n"
      "Each file is fed chunk_ms of audio at a time, as a live stream; a chunk is encoded as soon as its\n"
      "audio and one more 10 ms frame exist. Reads any format libsndfile reads (WAV, FLAC, OGG, ...),\n"
      "any rate/channels (resampled to 16 kHz mono). Settings come from the [encoder] config section\n"
      "(model, projector, device, dtype, chunk_ms, stack_frames, window_blocks, normalization), e.g.\n"
      "--set encoder.dtype=bf16; compute threads from general.threads. Without a trained projector\n"
      "(encoder.projector = \"\") an untrained one is used: token values are placeholders, counts and\n"
      "timings are representative.");
  cmd->add_option("FILE", fl.files, "audio files")->required();
  cmd->add_option("--chunk-ms", fl.chunk_ms, "block-causal chunk in ms (multiple of 20, >= 40; default encoder.chunk_ms)");
  cmd->add_option("--d-llm", fl.d_llm, "LLM hidden size for an untrained projector")->capture_default_str();
  cmd->add_flag("--json", fl.json, "one JSON object per file per line instead of text");
  cmd->callback([&g] {
    auto cfg = effective_config(g);
    models::set_compute_threads(int(cfg.general.threads));
    models::speech_encoder_options o;
    const std::string home = config::resolve_model_home(cfg);
    o.model = models::resolve_model_path(home, cfg.encoder.model);
    o.projector = cfg.encoder.projector;
    o.d_llm = o.projector.empty() ? fl.d_llm : 0;
    o.device = cfg.encoder.device;
    o.dtype = cfg.encoder.dtype;
    o.chunk_ms = fl.chunk_ms > 0 ? fl.chunk_ms : cfg.encoder.chunk_ms;
    o.stack_frames = cfg.encoder.stack_frames;
    o.window_blocks = cfg.encoder.window_blocks;
    o.normalization = cfg.encoder.normalization;
    models::speech_encoder enc(o);
    if (!fl.json) {
      std::cout << enc.describe() << "\n";
      if (o.projector.empty())
        std::cout << "note: untrained projector (no encoder.projector set): token values are placeholders\n";
    }
    for (const auto& f : fl.files) {
      try {
        auto j = encode_file(enc, f);
        if (fl.json) {
          std::cout << j.dump() << "\n";
        } else {
          char line[512];
          std::snprintf(line, sizeof line,
                        "%s: %.2f s audio, %lld speech tokens (%.2f tokens/s), RTF %.4f, %zu chunks, "
                        "latency p50 %.1f ms, p95 %.1f ms, max %.1f ms\n",
                        f.c_str(), j["duration_s"].get<double>(), (long long)j["speech_tokens"].get<int64_t>(),
                        j["tokens_per_s"].get<double>(), j["rtf"].get<double>(), j["chunks"].get<size_t>(),
                        j["chunk_latency_ms"]["p50"].get<double>(), j["chunk_latency_ms"]["p95"].get<double>(),
                        j["chunk_latency_ms"]["max"].get<double>());
          std::cout << line;
        }
      } catch (const std::exception& e) {
        if (fl.json)
          std::cout << nlohmann::json{{"file", f}, {"error", e.what()}}.dump() << "\n";
        std::cerr << "error: " << f << ": " << e.what() << "\n";
        exit_code() = 1;
      }
    }
  });
}

}  // namespace undertone::apps
