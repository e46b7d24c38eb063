// `undertone run`: the main job on the embedded default. One process, real
// models: the whole engine (gateway, supervisor, sessions, batching encoder,
// LLM worker, logger) starts on a loopback port, and a few speech clips are
// streamed to it at real time by concurrent clients through the real wire
// protocol, as `undertone serve` + `undertone send` would. Prints each answer
// as it streams, the endpoint -> first-token latency and, for RAVDESS clips,
// the emotion the actor was asked to express (the words are the same in every
// clip: only the voice differs).
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <iomanip>
#include <iostream>
#include <mutex>
#include <thread>
#include <vector>

#include <spdlog/spdlog.h>

#include "actors/engine.hpp"
#include "apps/common.hpp"
#include "models/audio.hpp"
#include "models/runtime.hpp"
#include "transport/client.hpp"
#include "transport/gateway.hpp"

namespace undertone::apps {

namespace fs = std::filesystem;
using namespace std::chrono_literals;

namespace {

struct run_flags {
  std::vector<std::string> files;
  std::string ravdess = "../shared/data/ravdess-train";
  double speed = 1.0;
};

/// Four clips of one validation speaker (actor 16), one per emotion, when the
/// RAVDESS folder is there; else Debian's pocketsphinx test speech.
std::vector<std::string> default_clips(const std::string& ravdess) {
  std::vector<std::string> out;
  for (const char* e : {"01", "03", "04", "05"}) {  // neutral, happy, sad, angry
    fs::path p = fs::path(ravdess) / (std::string("03-01-") + e + (std::string(e) == "01" ? "-01" : "-02") +
                                      "-01-01-16.flac");
    if (fs::exists(p)) out.push_back(p.string());
  }
  if (out.size() == 4) return out;
  out.clear();
  for (const char* f : {"goforward.raw", "numbers.raw", "something.raw"}) {
    fs::path p = fs::path("/usr/share/pocketsphinx/test/data") / f;
    if (fs::exists(p)) out.push_back(p.string());
  }
  return out;
}

/// "03-01-EE-II-SS-RR-AA.flac" -> " [actor AA, acted EMOTION]" (docs/data.md); else "".
std::string ravdess_label(const std::string& name) {
  static const char* const emotions[] = {"neutral", "calm", "happy", "sad", "angry", "fearful", "disgust", "surprised"};
  int mod, ch, e, in, st, rep, actor;
  if (std::sscanf(name.c_str(), "%2d-%2d-%2d-%2d-%2d-%2d-%2d", &mod, &ch, &e, &in, &st, &rep, &actor) != 7 || e < 1 ||
      e > 8)
    return "";
  return " [actor " + std::to_string(actor) + ", acted " + emotions[e - 1] + "]";
}

models::audio load_any(const std::string& path) {
  if (path.size() > 4 && path.substr(path.size() - 4) == ".raw")
    return models::load_raw_pcm(path, models::raw_pcm_format{});  // pocketsphinx: 16 kHz s16le mono
  return models::load_audio(path);
}

}  // namespace

void add_run_command(CLI::App& app, global_options& g) {
  static run_flags f;
  auto* cmd = app.add_subcommand(
      "run",
      "The main job on the embedded default: start the whole engine in this process (real models), stream\n"
      "speech clips to it through the wire protocol as concurrent users, print the streamed answers and\n"
      "latencies. Default clips: four emotions of a RAVDESS validation speaker (or Debian's pocketsphinx\n"
      "test speech). For a long-running server use `undertone serve`; for clients `undertone send|talk`.");
  cmd->add_option("FILE", f.files, "speech files (WAV/FLAC/..., or .raw 16 kHz s16le); default: see above")
      ->check(CLI::ExistingFile);
  cmd->add_option("--ravdess", f.ravdess, "RAVDESS folder for the default clips")->capture_default_str();
  cmd->add_option("--speed", f.speed, "1 = stream at real time, 0 = as fast as possible")->capture_default_str();
  cmd->callback([&g] {
    auto cfg = effective_config(g);
    int threads = models::set_compute_threads(int(cfg.general.threads));
    cfg.server.bind = "tcp://127.0.0.1:*";  // a free loopback port: nothing is exposed
    cfg.store.enabled = false;               // a demo: nothing is logged
    auto clips = f.files.empty() ? default_clips(f.ravdess) : f.files;
    if (clips.empty()) {
      std::cerr << "error: no clips given and neither " << f.ravdess
                << " nor /usr/share/pocketsphinx/test/data exists (scripts/setup installs the latter)\n";
      exit_code() = 1;
      return;
    }
    spdlog::info("undertone run: {} compute threads, torch {}", threads, models::torch_version());
    auto gw_opt = transport::gateway_options::from(cfg.server);
    gw_opt.default_settings = actors::session_settings_from(cfg);
    gw_opt.auth_token.clear();  // a private loopback port for this process's own clients
    std::string endpoint;
    try {
      auto t0 = std::chrono::steady_clock::now();
      actors::engine eng(
          cfg, [&](caf::actor_system& sys, caf::actor sup) { return transport::spawn_gateway(sys, gw_opt, sup, &endpoint); },
          [](const std::string& line) {
            if (line.rfind("WARNING", 0) == 0)
              spdlog::warn("{}", line);
            else
              spdlog::info("{}", line);
          });
      spdlog::info("engine ready on {} in {:.1f} s", endpoint,
                   std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
      std::cout << "== models ==\n" << eng.models() << "\n\n== " << clips.size()
                << " users speak at once (streamed at " << (f.speed > 0 ? "real time" : "full speed") << ") ==\n"
                << std::flush;

      struct result {
        std::string text, stop, error;
        double first_ms = -1, audio_s = 0;
        int64_t speech_tokens = 0;
      };
      std::vector<result> res(clips.size());
      std::mutex out_mu;
      std::vector<std::thread> th;
      for (size_t i = 0; i < clips.size(); ++i) {
        th.emplace_back([&, i] {
          try {
            auto x = load_any(clips[i]).samples;
            res[i].audio_s = double(x.size()) / 16000.0;
            transport::client c;
            c.connect(endpoint, "run-" + std::to_string(i), 30s);
            std::vector<float> lead(8000, 0.0f), tail(16000, 0.0f);  // 0.5 s before, 1 s after (endpointing)
            x.insert(x.begin(), lead.begin(), lead.end());
            x.insert(x.end(), tail.begin(), tail.end());
            const size_t piece = 320;  // 20 ms
            auto start = std::chrono::steady_clock::now();
            for (size_t off = 0; off < x.size(); off += piece) {
              c.send_audio(x.data() + off, std::min(piece, x.size() - off), 16000, 1);
              if (f.speed > 0)
                std::this_thread::sleep_until(start + std::chrono::microseconds(int64_t(
                                                          1e6 * double(off + piece) / 16000.0 / f.speed)));
            }
            c.end_turn();  // a no-op when the server's endpointing already ended the turn
            while (auto m = c.receive(120s)) {
              if (auto* e = std::get_if<transport::turn_end_msg>(&*m)) {
                res[i].text = e->text;
                res[i].stop = e->stop_reason;
                res[i].first_ms = e->timings.end_of_turn_to_first_token_ms;
                res[i].speech_tokens = e->timings.speech_tokens;
                break;
              }
              if (auto* er = std::get_if<transport::error_msg>(&*m)) {
                res[i].error = er->message;
                if (er->fatal) break;
              }
            }
            c.bye();
          } catch (const std::exception& e) {
            res[i].error = e.what();
          }
          std::lock_guard<std::mutex> lk(out_mu);
          std::cout << "  [" << i << "] answered (" << fs::path(clips[i]).filename().string() << ")\n" << std::flush;
        });
      }
      for (auto& t : th) t.join();
      std::cout << "\n== answers ==\n";
      int failed = 0;
      for (size_t i = 0; i < clips.size(); ++i) {
        const auto& r = res[i];
        const std::string label = ravdess_label(fs::path(clips[i]).filename().string());
        std::cout << fs::path(clips[i]).filename().string() << label << " (" << std::fixed << std::setprecision(1)
                  << r.audio_s << " s speech, " << r.speech_tokens << " speech tokens)\n";
        if (!r.error.empty()) {
          std::cout << "  ERROR: " << r.error << "\n";
          ++failed;
        } else {
          std::cout << "  assistant: " << r.text << "\n  (" << r.stop << "; end of speech -> first token "
                    << std::setprecision(0) << r.first_ms << " ms)\n";
        }
      }
      std::cout << "\nRun your own: `undertone serve` and `undertone send FILE...` (or `undertone talk`).\n";
      eng.shutdown();
      if (failed) exit_code() = 1;
    } catch (const std::exception& e) {
      spdlog::error("{}", e.what());
      exit_code() = 1;
    }
  });
}

}  // namespace undertone::apps
