// Test helpers for engine tests that talk to a server through the client
// library: the small real-model engine config and an answer reader.
#pragma once

#include <chrono>
#include <string>
#include <vector>

#include "config/config.hpp"
#include "support.hpp"
#include "transport/client.hpp"

namespace undertone::testing {

/// The engine config the end-to-end tests start from: the cached real models
/// (an untrained projector: llm.model is a path, not the default name), a
/// 1024-token context, a free loopback port. Tests set their own extras.
inline config::undertone_config small_engine_config() {
  config::undertone_config cfg;
  cfg.general.model_home = model_home();
  cfg.llm.model = llm_gguf_path();
  cfg.encoder.model = whisper_ct2_dir();
  cfg.llm.context_tokens = 1024;
  cfg.server.bind = "tcp://127.0.0.1:*";
  return cfg;
}

/// One answer as a test client saw it.
struct answer {
  std::string deltas;                       ///< the deltas concatenated
  transport::turn_end_msg end;
  bool ended = false;                       ///< a turn_end arrived
  std::vector<transport::error_msg> errors;
  std::vector<std::string> notes;           ///< "event NAME LABEL" / "error MESSAGE", in arrival order
};

/// Reads frames until a turn_end, a fatal error (or any error with
/// `stop_on_error`), or `timeout` without any frame.
inline answer read_answer(transport::client& c, std::chrono::milliseconds timeout = std::chrono::seconds(120),
                          bool stop_on_error = false) {
  answer a;
  while (auto m = c.receive(timeout)) {
    if (auto* d = std::get_if<transport::delta_msg>(&*m)) {
      a.deltas += d->text;
    } else if (auto* e = std::get_if<transport::turn_end_msg>(&*m)) {
      a.end = *e;
      a.ended = true;
      break;
    } else if (auto* ev = std::get_if<transport::event_msg>(&*m)) {
      a.notes.push_back("event " + ev->name + " " + ev->label);
    } else if (auto* er = std::get_if<transport::error_msg>(&*m)) {
      a.errors.push_back(*er);
      a.notes.push_back("error " + er->message);
      if (stop_on_error || er->fatal) break;
    }
  }
  return a;
}

inline bool has_error(const answer& a, transport::error_code c) {
  for (const auto& e : a.errors)
    if (e.code == c) return true;
  return false;
}

}  // namespace undertone::testing
