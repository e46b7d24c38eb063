// The encoder actor (docs/engine.md): the speech encoder's weights and one
// speech_stream per session; batches ready chunks across sessions.
#pragma once

#include <functional>
#include <memory>
#include <string>

#include "actors/messages.hpp"

namespace undertone::models {
class speech_encoder;
}

namespace undertone::actors {

struct encoder_actor_options {
  /// The loaded encoder (shared, read-only weights). Null: made by `factory` when
  /// the actor starts (a respawn after a crash).
  std::shared_ptr<const models::speech_encoder> encoder;
  std::function<std::shared_ptr<const models::speech_encoder>()> factory;
  std::string version;       ///< recorded with every turn ("model|projector")
  int64_t max_batch = 32;    ///< run a batch as soon as this many streams have a ready chunk ...
  int64_t max_wait_ms = 10;  ///< ... or this long after the first became ready
};

/// Spawns the encoder as a detached actor (its handlers run LibTorch for
/// milliseconds). Messages: encode_open / encode_audio / encode_finish /
/// encode_close from sessions (the sender of encode_open receives speech_rows).
/// One turn = one stream: encode_finish flushes the stream at once (the
/// latency-critical path: no batching wait), sends the last rows with
/// last = true, and replaces it by a fresh stream for the next turn.
caf::actor spawn_encoder_actor(caf::actor_system& sys, encoder_actor_options opt);

}  // namespace undertone::actors
