// Every message that crosses an actor boundary in the engine, in one header
// (CAF convention: one place for all message types). Plain structs with
// `inspect` overloads so CAF can copy, print and (for the remote worker)
// serialize them; register them all with register_message_types().
//
// Flow (docs/engine.md):
//   gateway --client_*--> session --encode_*--> encoder --speech_rows--> session
//   session --llm_*--> llm worker --llm_delta/llm_done/llm_failed--> session
//   session --to_client_*--> gateway (-> client)      session --turn_record--> logger
//   session --session_event--> subscribers (custom actors)
//   finetune actor --encoder_published--> its target (supervisor: encoder swap)
//
// Torch-free and ZeroMQ-free: transport/ includes this header to translate
// frames into these messages and back.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <caf/all.hpp>

namespace undertone::actors {

using session_id = uint64_t;

// ---------------------------------------------------------------- errors ----
/// Error codes shared by the engine and the wire protocol (docs/protocol.md).
enum class error_code : uint16_t {
  none = 0,
  bad_frame = 1,          ///< undecodable header, wrong types, missing fields
  unsupported_version = 2,
  unknown_type = 3,
  frame_too_large = 4,
  out_of_order = 5,       ///< audio sequence number gap or repeat
  rate_limited = 6,
  server_full = 7,        ///< max sessions reached
  no_session = 8,         ///< message before hello, or after bye
  bad_config = 9,         ///< a session setting is out of range
  turn_too_long = 10,     ///< max turn seconds reached; the turn was ended
  context_full = 11,      ///< conversation no longer fits; see the context policy
  busy = 12,              ///< e.g. a text turn while an answer is running (cancel first)
  worker_lost = 13,       ///< the LLM worker died; the answer is lost
  unauthorized = 14,      ///< hello without the server's auth token (or a wrong one)
  internal = 100,
};
/// The code's name ("bad_frame", ...), also sent on the wire (docs/protocol.md).
/// Inline so transport/ can use it without linking the actors library.
inline const char* to_string(error_code c) {
  switch (c) {
    case error_code::none: return "none";
    case error_code::bad_frame: return "bad_frame";
    case error_code::unsupported_version: return "unsupported_version";
    case error_code::unknown_type: return "unknown_type";
    case error_code::frame_too_large: return "frame_too_large";
    case error_code::out_of_order: return "out_of_order";
    case error_code::rate_limited: return "rate_limited";
    case error_code::server_full: return "server_full";
    case error_code::no_session: return "no_session";
    case error_code::bad_config: return "bad_config";
    case error_code::turn_too_long: return "turn_too_long";
    case error_code::context_full: return "context_full";
    case error_code::busy: return "busy";
    case error_code::worker_lost: return "worker_lost";
    case error_code::unauthorized: return "unauthorized";
    case error_code::internal: return "internal";
  }
  return "unknown";
}

// ------------------------------------------------------ session settings ----
/// Voice activity and endpointing rules (sherpa-onnx style: rules as data).
struct vad_settings {
  bool enabled = true;                ///< false: only the client's end_turn ends a turn
  double threshold_db = -50.0;        ///< frame energy (dBFS) above this counts as speech ...
  double snr_db = 12.0;               ///< ... and this far above the tracked noise floor
  int32_t frame_ms = 20;
  int32_t min_speech_ms = 100;        ///< voiced run that starts a turn (speech_start event)
  int32_t trailing_silence_ms = 600;  ///< silence after speech that ends the turn
  int32_t max_turn_ms = 30000;        ///< hard cap: the turn is ended (turn_too_long warning)
};

struct sampling_settings {
  double temperature = 0.0;
  int64_t top_k = 40;
  double top_p = 0.95;
  double repetition_penalty = 1.0;
  uint64_t seed = 42;
  int64_t max_tokens = 128;
};

/// Per-session configuration (client `config` frame; defaults from [session]).
struct session_settings {
  std::string system_prompt;          ///< "" = the model's default
  sampling_settings sampling;
  vad_settings vad;
  bool log = true;                    ///< false: nothing of this session is stored (privacy opt-out)
};

// ------------------------------------------------ gateway -> engine/session ----
/// A client said hello; the engine spawns a session and answers with
/// session_opened (or client_error with server_full).
struct open_session {
  std::string client_identity;  ///< ZeroMQ routing id (opaque bytes)
  std::string client_name;
  session_settings settings;
};
struct session_opened {
  std::string client_identity;
  session_id id = 0;
  caf::actor session;
  std::string models;  ///< "llm=...; encoder=..." for the welcome frame
};

/// 16-bit or float PCM already converted to float [-1, 1], interleaved channels.
struct client_audio {
  uint64_t seq = 0;               ///< per session, starts at 0, +1 per chunk (checked by the gateway)
  int32_t sample_rate = 16000;
  int32_t channels = 1;
  std::vector<float> samples;     ///< frames * channels
};
struct client_end_turn {};        ///< the client says the user finished speaking
struct client_text_turn { std::string text; };
struct client_cancel {};          ///< barge-in / stop the running answer
struct client_config { session_settings settings; };
/// Labels for the current (or a finished) turn, stored with it (issue 7).
struct client_annotation {
  int64_t turn = -1;              ///< -1 = the current/last turn
  std::string transcript;
  std::string emotion;
};
struct client_gone {};            ///< bye, or the connection timed out

// ----------------------------------------------- session -> gateway (client) ----
struct to_client_delta {
  std::string client_identity;
  int64_t turn = 0;
  std::string text;
};
struct turn_timings {
  double end_of_turn_to_first_token_ms = -1;  ///< client end_turn / endpoint -> first token
  double last_voice_to_first_token_ms = -1;   ///< last voiced sample -> first token (server VAD)
  double audio_ms = 0;                        ///< user speech in this turn
  double encode_ms = 0;                       ///< encoder time spent on this turn
  double flush_ms = -1;                       ///< end of turn -> the turn's last speech rows reached the
                                              ///< session (final chunk encoded, queueing included)
  double prefill_ms = 0;
  double decode_ms = 0;
  int64_t speech_tokens = 0;
  int64_t answer_tokens = 0;
};
struct to_client_turn_end {
  std::string client_identity;
  int64_t turn = 0;
  std::string text;                  ///< the whole answer
  std::string stop_reason;           ///< stop_token | stop_string | max_tokens | context | cancelled
  turn_timings timings;
  std::string llm_version;
  std::string encoder_version;
};
/// speech_start, speech_end, turn_start, endpoint, emotion (label + score), ...
struct to_client_event {
  std::string client_identity;
  int64_t turn = 0;
  std::string name;
  std::string label;
  double value = 0;
};
struct to_client_error {
  std::string client_identity;
  error_code code = error_code::internal;
  std::string message;
  bool fatal = false;                ///< the session is closed after this
};
/// Sent to the gateway when a session ended for any reason (free the identity).
struct session_closed {
  std::string client_identity;
  session_id id = 0;
};

// -------------------------------------------------- session <-> encoder ----
struct encode_open { session_id id = 0; };
struct encode_audio { session_id id = 0; std::vector<float> samples_16k; };
struct encode_finish { session_id id = 0; };   ///< end of this turn's audio: flush
struct encode_close { session_id id = 0; };
/// Speech tokens, [n_rows, d_model] row-major; last = the turn's audio is fully encoded.
struct speech_rows {
  session_id id = 0;
  std::vector<float> rows;
  int64_t n_rows = 0;
  bool last = false;
  std::string encoder_version;
  double encode_ms = 0;
};

// ---------------------------------------------------- session <-> llm worker ----
struct llm_open { session_id id = 0; caf::actor session; };
/// Prompt rows to append: text, or speech rows (n_rows > 0).
struct llm_append {
  session_id id = 0;
  std::string text;
  std::vector<float> rows;
  int64_t n_rows = 0;
};
struct llm_generate {
  session_id id = 0;
  int64_t turn = 0;
  sampling_settings sampling;
  std::vector<std::string> stop_strings;
};
struct llm_cancel { session_id id = 0; bool keep_answer = false; };
struct llm_truncate { session_id id = 0; int64_t n_rows = 0; };
struct llm_close { session_id id = 0; };
struct llm_delta { session_id id = 0; int64_t turn = 0; std::string text; };
struct llm_done {
  session_id id = 0;
  int64_t turn = 0;
  std::string text;
  std::string stop_reason;
  int64_t tokens = 0;
  int64_t context_rows = 0;          ///< slot rows after the answer
  double prefill_ms = 0;
  double decode_ms = 0;
  std::string llm_version;
};
struct llm_failed { session_id id = 0; int64_t turn = 0; error_code code = error_code::internal; std::string message; };

// -------------------------------------------------------- session -> logger ----
/// One finished turn, everything the session store keeps (issue 7).
struct turn_record {
  session_id id = 0;
  std::string client_name;
  int64_t turn = 0;
  double started_unix_s = 0;
  std::vector<float> audio_16k;       ///< the user's audio of this turn (empty for text turns)
  std::string user_text;              ///< text turns
  std::string answer;
  std::string stop_reason;
  turn_timings timings;
  std::string llm_version;
  std::string encoder_version;
  std::vector<std::string> events;    ///< "t_ms name label value" lines
  std::string transcript;             ///< annotation, if any
  std::string emotion;
};

// --------------------------------------------------- events for custom actors ----
/// Published by sessions to every subscriber (docs/extending.md).
struct session_event {
  session_id id = 0;
  int64_t turn = 0;
  std::string kind;    ///< turn_start | speech_tokens | speech_end | answer_delta | answer | emotion | error
  std::string text;    ///< answer text, error message, emotion label
  double value = 0;    ///< token count, score
};
/// Subscribe / unsubscribe an actor to all sessions' events.
struct subscribe_events { caf::actor subscriber; };
struct unsubscribe_events { caf::actor subscriber; };
/// A custom actor may inject a message into a session: it is spoken to the
/// client as an event ("inject") or, with as_system = true, added to the LLM
/// context as a system line before the next answer.
struct inject_message { session_id id = 0; std::string text; bool as_system = false; };

// ------------------------------------------------------ engine internals ----
/// Supervisor -> sessions: a component was respawned after it died; `which` is
/// "encoder", "llm" or "logger". Sessions re-open their state on the new actor
/// and fail the turn that was in flight there (worker_lost / internal).
struct component_restarted { std::string which; caf::actor actor; };

/// Session -> llm worker: remember the slot's current context length as mark
/// `mark` (0..3); llm_rewind truncates the slot back to it. Marks are how a
/// session undoes an assistant header after a barge-in (docs/engine.md).
struct llm_mark { session_id id = 0; int32_t mark = 0; };
struct llm_rewind { session_id id = 0; int32_t mark = 0; };

// ------------------------------------------- online fine-tuning (issue 7) ----
/// Any actor -> finetune actor (actors/finetune_actor.hpp): run a round now;
/// force = even with fewer than finetune.min_new_turns new annotated turns.
/// Replies true if a round started, false if one is already running.
struct finetune_now { bool force = false; };
/// Finetune actor -> its target (the supervisor, which swaps the encoders): a
/// gated candidate was published as `version`; `projector_path` is its file.
struct encoder_published {
  std::string version;
  std::string projector_path;
};
/// Reply to finetune_status_atom: what the finetune actor did last.
struct finetune_status {
  bool running = false;            ///< a round (or the data-source call) is in progress
  int64_t rounds = 0;              ///< rounds that ran to a gate decision
  int64_t published = 0;
  int64_t rejected = 0;            ///< gate failed: candidate not published
  int64_t skipped = 0;             ///< too few new annotated turns
  int64_t errors = 0;              ///< data source or round threw
  int64_t turns_at_last_round = 0; ///< annotated turns the last attempted round saw
  std::string last_outcome;        ///< published | rejected | passed | skipped | error | "" (nothing yet)
  std::string last_error;          ///< message of the last error ("" after a later success)
  std::string last_result;         ///< JSON of the last round that ran (finetune_result::to_json), or ""
  std::string current_projector;   ///< where the next round starts
};
/// Finetune actor's worker thread -> the actor: one trigger is finished.
struct finetune_round_done {
  std::string outcome;             ///< as finetune_status::last_outcome
  std::string error;
  std::string result;              ///< finetune_result JSON ("" when no round ran)
  std::string version;             ///< published version
  std::string projector;           ///< candidate file
  int64_t turns = -1;              ///< annotated turns reported by the data source (-1: it threw)
};
// ------------------------------------------------ encoder hot swap (issue 7) ----
/// To the encoder actor (or the supervisor, which delegates it there): switch
/// the weights new turns are encoded with (docs/hot-swap.md). Turns in flight
/// finish on the old weights. Replies swap_result.
struct swap_encoder {
  std::string version;              ///< registry version name (any label when projector_path is set)
  std::string projector_path;       ///< "" = the registry's files of `version`, verified first
  std::string encoder_layers_path;  ///< with projector_path: optional trained encoder layers
  bool make_current = true;         ///< registry swap: also make `version` the registry's current
};
/// To the encoder actor (or the supervisor): the registry's rollback (to the
/// previous current version, or `to`), then a swap to it. Replies swap_result.
struct rollback_encoder { std::string to; };
struct swap_result {
  bool ok = false;
  std::string version;   ///< the version new turns are encoded with now
  std::string previous;  ///< the version before the request
  std::string message;   ///< what happened, or why it was refused (the old version keeps serving)
};
/// Status query (to the supervisor -> engine_status; to the encoder -> encoder_status).
struct status_request {};
struct encoder_status {
  std::string version;          ///< weights new turns get
  int64_t generation = 0;       ///< 1 + successful swaps
  int64_t streams = 0;          ///< sessions with an encoder stream
  std::string registry;         ///< registry directory ("" = none)
  std::string registry_current; ///< its `current` ("" = none)
};
struct engine_status {
  std::string models;    ///< as in the welcome frame (versions at start)
  std::string llm_version;
  encoder_status encoder;
  int64_t sessions = 0;
};

/// Atoms of the engine's internal loops.
using tick_atom = caf::atom_constant<caf::atom("tick")>;          ///< llm worker: run one step
using flush_atom = caf::atom_constant<caf::atom("flush")>;        ///< encoder: max_wait_ms elapsed
using finish_atom = caf::atom_constant<caf::atom("finish")>;      ///< encoder: flush the turns that just ended
using idle_check_atom = caf::atom_constant<caf::atom("idlechk")>;  ///< session: idle timeout check
using stats_atom = caf::atom_constant<caf::atom("stats")>;        ///< supervisor: ask for counters
using finetune_status_atom = caf::atom_constant<caf::atom("ftstatus")>;  ///< finetune actor: -> finetune_status

/// Registers every type above with CAF (call once on the actor_system_config).
void register_message_types(caf::actor_system_config& cfg);


// ------------------------------------------------------------- inspect ----
// CAF 0.17 inspectors (copy, print, serialize). Every field, in declaration
// order; the wire codec does not use these (it has its own msgpack mapping).
#define UT_INSPECT(T, ...)                                              \
  template <class Inspector>                                            \
  typename Inspector::result_type inspect(Inspector& f, T& x) {         \
    return f(caf::meta::type_name(#T), __VA_ARGS__);                    \
  }
#define UT_INSPECT_EMPTY(T)                                             \
  template <class Inspector>                                            \
  typename Inspector::result_type inspect(Inspector& f, T&) {           \
    return f(caf::meta::type_name(#T));                                 \
  }

UT_INSPECT(vad_settings, x.enabled, x.threshold_db, x.snr_db, x.frame_ms, x.min_speech_ms,
           x.trailing_silence_ms, x.max_turn_ms)
UT_INSPECT(sampling_settings, x.temperature, x.top_k, x.top_p, x.repetition_penalty, x.seed, x.max_tokens)
UT_INSPECT(session_settings, x.system_prompt, x.sampling, x.vad, x.log)
UT_INSPECT(open_session, x.client_identity, x.client_name, x.settings)
UT_INSPECT(session_opened, x.client_identity, x.id, x.session, x.models)
UT_INSPECT(client_audio, x.seq, x.sample_rate, x.channels, x.samples)
UT_INSPECT_EMPTY(client_end_turn)
UT_INSPECT(client_text_turn, x.text)
UT_INSPECT_EMPTY(client_cancel)
UT_INSPECT(client_config, x.settings)
UT_INSPECT(client_annotation, x.turn, x.transcript, x.emotion)
UT_INSPECT_EMPTY(client_gone)
UT_INSPECT(to_client_delta, x.client_identity, x.turn, x.text)
UT_INSPECT(turn_timings, x.end_of_turn_to_first_token_ms, x.last_voice_to_first_token_ms, x.audio_ms,
           x.encode_ms, x.prefill_ms, x.decode_ms, x.speech_tokens, x.answer_tokens)
UT_INSPECT(to_client_turn_end, x.client_identity, x.turn, x.text, x.stop_reason, x.timings, x.llm_version,
           x.encoder_version)
UT_INSPECT(to_client_event, x.client_identity, x.turn, x.name, x.label, x.value)
UT_INSPECT(to_client_error, x.client_identity, x.code, x.message, x.fatal)
UT_INSPECT(session_closed, x.client_identity, x.id)
UT_INSPECT(encode_open, x.id)
UT_INSPECT(encode_audio, x.id, x.samples_16k)
UT_INSPECT(encode_finish, x.id)
UT_INSPECT(encode_close, x.id)
UT_INSPECT(speech_rows, x.id, x.rows, x.n_rows, x.last, x.encoder_version, x.encode_ms)
UT_INSPECT(llm_open, x.id, x.session)
UT_INSPECT(llm_append, x.id, x.text, x.rows, x.n_rows)
UT_INSPECT(llm_generate, x.id, x.turn, x.sampling, x.stop_strings)
UT_INSPECT(llm_cancel, x.id, x.keep_answer)
UT_INSPECT(llm_truncate, x.id, x.n_rows)
UT_INSPECT(llm_close, x.id)
UT_INSPECT(llm_delta, x.id, x.turn, x.text)
UT_INSPECT(llm_done, x.id, x.turn, x.text, x.stop_reason, x.tokens, x.context_rows, x.prefill_ms, x.decode_ms,
           x.llm_version)
UT_INSPECT(llm_failed, x.id, x.turn, x.code, x.message)
UT_INSPECT(turn_record, x.id, x.client_name, x.turn, x.started_unix_s, x.audio_16k, x.user_text, x.answer,
           x.stop_reason, x.timings, x.llm_version, x.encoder_version, x.events, x.transcript, x.emotion)
UT_INSPECT(session_event, x.id, x.turn, x.kind, x.text, x.value)
UT_INSPECT(subscribe_events, x.subscriber)
UT_INSPECT(unsubscribe_events, x.subscriber)
UT_INSPECT(inject_message, x.id, x.text, x.as_system)
UT_INSPECT(component_restarted, x.which, x.actor)
UT_INSPECT(llm_mark, x.id, x.mark)
UT_INSPECT(llm_rewind, x.id, x.mark)
UT_INSPECT(finetune_now, x.force)
UT_INSPECT(encoder_published, x.version, x.projector_path)
UT_INSPECT(finetune_status, x.running, x.rounds, x.published, x.rejected, x.skipped, x.errors,
           x.turns_at_last_round, x.last_outcome, x.last_error, x.last_result, x.current_projector)
UT_INSPECT(finetune_round_done, x.outcome, x.error, x.result, x.version, x.projector, x.turns)
UT_INSPECT(swap_encoder, x.version, x.projector_path, x.encoder_layers_path, x.make_current)
UT_INSPECT(rollback_encoder, x.to)
UT_INSPECT(swap_result, x.ok, x.version, x.previous, x.message)
UT_INSPECT_EMPTY(status_request)
UT_INSPECT(encoder_status, x.version, x.generation, x.streams, x.registry, x.registry_current)
UT_INSPECT(engine_status, x.models, x.llm_version, x.encoder, x.sessions)

#undef UT_INSPECT
#undef UT_INSPECT_EMPTY

}  // namespace undertone::actors
