// The logger actor: writes every finished turn into the session store
// (models/session_store.hpp, docs/store.md) and applies its retention limits.
//
// Messages:
//   turn_record (request) -> int64_t: the turn's store id once it is durable
//       (FLAC + row committed), or an error (disk full, ...). The session sends
//       the client's turn_end only after this reply (docs/store.md, "Durability").
//       A turn_record with stop_reason "annotation" is a late label for a stored
//       turn (client annotate frame): annotate(..., source "client"), reply 0.
//   stats_atom -> int64_t: turns stored by this logger.
// One run name per logger start ("run-<unix>-<pid>"): session ids restart at 1
// with the server, the run keeps them apart. Retention (prune) runs at start and
// every `prune_every`.
#pragma once

#include <chrono>
#include <string>

#include "actors/messages.hpp"

namespace undertone::actors {

struct logger_options {
  std::string dir;                        ///< the store directory (created if missing)
  double retention_days = 0;              ///< store.retention_days (0 = keep forever)
  int64_t max_bytes = 0;                  ///< store.max_megabytes * 2^20 (0 = unlimited)
  std::chrono::seconds prune_every{3600}; ///< how often retention runs after the start
};

/// Opens the store (in the caller's thread: a corrupt index throws
/// models::store_error naming the file, so the server does not start) and spawns
/// the logger, detached (fsync blocks).
caf::actor spawn_logger(caf::actor_system& sys, const logger_options& opt);

}  // namespace undertone::actors
