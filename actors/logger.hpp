// The logger actor: durable record of every finished turn (docs/engine.md).
//
// Layout under `dir` (simple on purpose; issue 7 replaces it by an
// SQLite-indexed session store and keeps this data):
//   dir/turns.jsonl                          one JSON object per turn (all of
//                                            turn_record except the audio)
//   dir/audio/run-<unix>-<pid>/session-<id>/turn-<n>.flac
//                                            the user's 16 kHz audio of the turn
// Durability: the FLAC file is written and fsync'ed first, then the JSONL line is
// appended and fsync'ed, so a line never names audio that is not on disk. A
// failed write is reported on stderr and the record dropped (the server stays up).
#pragma once

#include <string>

#include "actors/messages.hpp"

namespace undertone::actors {

/// Spawns the logger (detached: fsync blocks). Handles turn_record.
caf::actor spawn_logger(caf::actor_system& sys, std::string dir);

}  // namespace undertone::actors
