// The encoder actor (docs/engine.md): the speech encoder's weights and one
// speech_stream per session; batches ready chunks across sessions; switches
// weights between turns on swap_encoder (docs/hot-swap.md).
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
  /// The loaded encoder (weights generations; replace_weights() on swaps). Null:
  /// made by `factory` when the actor starts (a respawn after a crash).
  std::shared_ptr<models::speech_encoder> encoder;
  std::function<std::shared_ptr<models::speech_encoder>()> factory;
  /// Encoder registry (models/encoder_registry.hpp) for swaps by version name
  /// and rollbacks; "" = none (only swaps with an explicit projector_path).
  /// When the actor starts and the registry's current version is not the one
  /// the encoder serves (a respawn after `undertone model rollback` without
  /// --server, say), it switches to it first (a corrupt one is refused: the
  /// loaded weights keep serving, and a line goes to stderr).
  std::string registry;
  int64_t max_batch = 32;    ///< run a batch as soon as this many streams have a ready chunk ...
  int64_t max_wait_ms = 10;  ///< ... or this long after the first became ready
};

/// Spawns the encoder as a detached actor (its handlers run LibTorch for
/// milliseconds). Messages: encode_open / encode_audio / encode_finish /
/// encode_close from sessions (the sender of encode_open receives speech_rows).
/// One turn = one stream: the stream is created with the turn's first audio (on
/// the weights generation current then), encode_finish flushes it at once (the
/// latency-critical path: no batching wait) and sends the last rows with
/// last = true; the next turn gets a new stream. Every speech_rows carries the
/// version of the generation its stream was created with, so all rows of a
/// turn carry one version.
/// Hot swap: swap_encoder -> swap_result (verify + load in this actor's thread,
/// blocking it for the load, ~0.1 s for a projector; refused: the current
/// weights keep serving); rollback_encoder -> swap_result; status_request ->
/// encoder_status.
caf::actor spawn_encoder_actor(caf::actor_system& sys, encoder_actor_options opt);

}  // namespace undertone::actors
