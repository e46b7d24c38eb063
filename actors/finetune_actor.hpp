// The online fine-tuning actor (issue 7, docs/finetune.md): every
// finetune.interval_s, or on finetune_now, it asks its data source for the
// exported manifest of annotated logged turns and, when at least
// finetune.min_new_turns turns are new since the last round, runs one
// fine-tuning round (models/finetune.hpp: train from the serving projector,
// gate on held-out speakers, publish only if no regression). A published
// candidate is announced with encoder_published to the target actor (the
// supervisor swaps the encoders), and the next round starts from it.
//
// Rounds run on a worker thread of the actor (the round itself on a thread of
// its own at low priority), so the actor answers finetune_status_atom and
// finetune_now while one runs. Anything a data source or a round throws is
// caught: counted, logged and reported in the status; the actor keeps running
// and serving is untouched. At exit a running round is cancelled (polled
// between training steps and phases) and waited for.
#pragma once

#include <functional>
#include <string>

#include "actors/messages.hpp"
#include "config/config.hpp"
#include "models/finetune.hpp"

namespace undertone::actors {

/// What a data source reports: a manifest of the annotated logged turns (the
/// session store's export) and how many annotated turns it holds.
struct finetune_data {
  std::string manifest;
  int64_t annotated_turns = 0;
};

struct finetune_actor_options {
  /// Template of every round (data, models, training, gate, priority). Per
  /// round the actor sets session_manifests, projector, out_dir, publish and
  /// cancelled; log defaults to this actor's log.
  models::finetune_options round;
  std::string out_root;            ///< rounds go to out_root/round-<UTC time>/
  std::string projector;           ///< the projector serving at start
  double interval_s = 3600;        ///< seconds between automatic triggers; 0 = only finetune_now
  int64_t min_new_turns = 20;      ///< new annotated turns needed for a round (finetune_now{force} skips it)
  /// Exports the annotated turns (called on the worker thread; may throw).
  std::function<finetune_data()> data_source;
  /// Publishes a gated candidate and returns its version (e.g. the encoder
  /// registry); called on the round's thread. Null: candidates stay in their
  /// round directory and nothing is announced.
  models::publish_fn publish;
  caf::actor notify;               ///< receives encoder_published; may be null
  /// The round function; null = models::finetune_round. Injectable for tests.
  std::function<models::finetune_result(const models::finetune_options&)> run_round;
  /// Status lines; null = stderr with an "undertone finetune: " prefix.
  std::function<void(const std::string&)> log;
};

/// Spawns the actor (detached). Handles:
///   finetune_now{force}   -> bool (true: a trigger started; false: one is running)
///   finetune_status_atom  -> finetune_status
/// Sends encoder_published{version, projector_path} to opt.notify after a publish.
caf::actor spawn_finetune_actor(caf::actor_system& sys, finetune_actor_options opt);

/// The round template the configuration describes: [finetune] (steps, lr,
/// batch, replay, validation manifest, gate, threads, nice), [llm] and
/// [encoder] (models resolved in the cache, dtype "auto" resolved), cache dir.
models::finetune_options finetune_options_from(const config::undertone_config& cfg);

/// finetune.out_dir, or <model_home>/finetune when it is empty.
std::string finetune_out_root(const config::undertone_config& cfg);

}  // namespace undertone::actors
