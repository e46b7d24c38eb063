// The LLM worker actor (docs/engine.md): the frozen LLM behind
// models::llm_engine, one slot per session, one batched step per tick.
#pragma once

#include <functional>
#include <memory>
#include <string>

#include "actors/messages.hpp"

namespace undertone::models {
class llm_engine;
}

namespace undertone::actors {

struct llm_worker_options {
  /// The loaded engine; only this actor touches it (llm_engine is not
  /// thread-safe). Null: made by `factory` when the actor starts (a respawn).
  std::shared_ptr<models::llm_engine> engine;
  std::function<std::shared_ptr<models::llm_engine>()> factory;
};

/// Spawns the worker as a detached actor. Messages (all from sessions; replies go
/// to the session given in llm_open):
///   llm_open, llm_append, llm_generate, llm_cancel, llm_truncate, llm_mark,
///   llm_rewind, llm_close -> llm_delta*, llm_done | llm_failed.
/// llm_failed with turn = -1 concerns the slot, not an answer: code server_full
/// (no free slot), context_full (an append did not fit: apply the context
/// policy), busy (append while generating), internal.
/// It never loops inside a handler: after each step() it sends itself a tick
/// while the engine has work, so appends and cancels interleave with decoding.
caf::actor spawn_llm_worker(caf::actor_system& sys, llm_worker_options opt);

}  // namespace undertone::actors
