// The server <-> remote LLM worker wire format ("worker frames",
// docs/protocol.md). The same framing as the client protocol: part 0 is a
// msgpack map with "v" (worker_protocol_version) and "t" (type); llm_append
// with speech rows has exactly one more part, the rows as raw little-endian
// float32 ([n_rows, d] row-major). The llm_* frames carry the llm_* messages of
// actors/messages.hpp field for field (llm_open without the session actor: the
// worker answers to its link, the server routes by session id).
//
// Thread safety: pure functions of their arguments.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

#include "actors/messages.hpp"
#include "transport/protocol.hpp"

namespace undertone::transport {

/// Version of the worker frames ("v"); bumped on incompatible changes.
inline constexpr uint32_t worker_protocol_version = 1;

/// Worker -> server, first frame on a connection: who it is and what it runs.
struct worker_hello {
  uint32_t version = worker_protocol_version;  ///< what the peer sent (decode only)
  std::string name;           ///< --name, for logs and stats
  std::string llm_version;    ///< llm_engine::model_version(): must equal the server's
  std::string chat_template;  ///< "chatml" / "llama3": must equal the server's
  int64_t d_model = 0;        ///< width of a speech row: must equal the server's
  int64_t max_slots = 0;      ///< sessions it accepts (llm.max_slots)
  std::string token;          ///< the server's auth token ("" = none; optional key "token")
};
/// Server -> worker: hello accepted.
struct worker_welcome { std::string server; };
/// Server -> worker: hello refused (version, model or template mismatch); the
/// worker should exit, retrying cannot help.
struct worker_refused { std::string message; };
/// Server -> worker: "I do not know you" (e.g. the server restarted): drop
/// every slot and say hello again.
struct worker_reset { std::string message; };
/// Both ways, every server.worker_timeout_s / 5 seconds.
struct worker_heartbeat {};
/// Both ways: the peer is going away (worker: its sessions move now).
struct worker_bye { std::string reason; };

using worker_frame =
    std::variant<worker_hello, worker_welcome, worker_refused, worker_reset, worker_heartbeat, worker_bye,
                 actors::llm_open, actors::llm_append, actors::llm_generate, actors::llm_cancel, actors::llm_truncate,
                 actors::llm_mark, actors::llm_rewind, actors::llm_close, actors::llm_delta, actors::llm_done,
                 actors::llm_failed>;

/// Frame parts for a message (llm_append with rows: header + rows; others: header).
std::vector<std::string> encode_worker(const worker_frame& m);

/// Parses a frame; throws protocol_error (bad_frame, frame_too_large,
/// unsupported_version, unknown_type) naming what is wrong. Checks shapes
/// (row bytes = n_rows x a whole number of floats, NaN-free is NOT checked:
/// rows come from the server's own encoder).
worker_frame decode_worker(const std::vector<std::string_view>& parts, size_t max_frame_bytes = 64u << 20);

/// "hello", "llm_delta", ... for logs.
const char* worker_type_name(const worker_frame& m);

}  // namespace undertone::transport
