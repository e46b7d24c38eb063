// Logger actor: JSONL + FLAC per turn, fsync'ed (actors/logger.hpp).
#include "actors/logger.hpp"

#include <fcntl.h>
#include <unistd.h>

#include <cstdio>
#include <ctime>
#include <filesystem>
#include <iostream>

#include <nlohmann/json.hpp>

#include "models/audio.hpp"

namespace undertone::actors {

namespace {

namespace fs = std::filesystem;

void fsync_path(const fs::path& p, bool dir) {
  const int fd = ::open(p.c_str(), dir ? O_RDONLY | O_DIRECTORY : O_RDONLY);
  if (fd < 0) return;
  ::fsync(fd);
  ::close(fd);
}

struct logger_state {
  fs::path dir;
  std::string run;  // one per logger start: session ids restart at 1 with the server
  int64_t written = 0;
  static inline const char* name = "undertone.logger";

  void write(const turn_record& r) {
    nlohmann::json j;
    j["run"] = run;
    j["session"] = r.id;
    j["client"] = r.client_name;
    j["turn"] = r.turn;
    j["started_unix_s"] = r.started_unix_s;
    j["user_text"] = r.user_text;
    j["answer"] = r.answer;
    j["stop_reason"] = r.stop_reason;
    j["llm_version"] = r.llm_version;
    j["encoder_version"] = r.encoder_version;
    j["events"] = r.events;
    j["transcript"] = r.transcript;
    j["emotion"] = r.emotion;
    const auto& t = r.timings;
    j["timings"] = {{"end_of_turn_to_first_token_ms", t.end_of_turn_to_first_token_ms},
                    {"last_voice_to_first_token_ms", t.last_voice_to_first_token_ms},
                    {"audio_ms", t.audio_ms},
                    {"encode_ms", t.encode_ms},
                    {"prefill_ms", t.prefill_ms},
                    {"decode_ms", t.decode_ms},
                    {"speech_tokens", t.speech_tokens},
                    {"answer_tokens", t.answer_tokens}};
    if (!r.audio_16k.empty()) {
      const fs::path sub = fs::path("audio") / run / ("session-" + std::to_string(r.id));
      const fs::path file = sub / ("turn-" + std::to_string(r.turn) + ".flac");
      fs::create_directories(dir / sub);
      models::save_audio((dir / file).string(), r.audio_16k.data(), r.audio_16k.size(), 16000, 1);
      fsync_path(dir / file, false);
      fsync_path(dir / sub, true);
      j["audio"] = file.string();
      j["audio_samples"] = r.audio_16k.size();
    }
    const fs::path jl = dir / "turns.jsonl";
    const std::string line = j.dump() + "\n";
    const int fd = ::open(jl.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
    if (fd < 0) throw std::runtime_error("cannot open " + jl.string());
    const ssize_t n = ::write(fd, line.data(), line.size());
    ::fsync(fd);
    ::close(fd);
    if (n != ssize_t(line.size())) throw std::runtime_error("short write to " + jl.string() + " (disk full?)");
    ++written;
  }
};

caf::behavior logger_behavior(caf::stateful_actor<logger_state>* self, std::string dir) {
  self->state.dir = dir;
  self->state.run = "run-" + std::to_string(int64_t(std::time(nullptr))) + "-" + std::to_string(::getpid());
  return {
      [=](turn_record& r) {
        try {
          fs::create_directories(self->state.dir);
          self->state.write(r);
        } catch (const std::exception& e) {
          std::cerr << "undertone logger: turn " << r.id << "/" << r.turn << " not stored: " << e.what() << "\n";
        }
      },
      [=](stats_atom) { return self->state.written; },
  };
}

}  // namespace

caf::actor spawn_logger(caf::actor_system& sys, std::string dir) {
  return sys.spawn<caf::detached>(logger_behavior, std::move(dir));
}

}  // namespace undertone::actors
