// The pure part of a session (no actors, no models): energy VAD with a tracked
// noise floor, the turn state machine with its endpoint rules, barge-in, the
// 200 ms pre-roll, the prompt pieces cut from the model's chat template, and the
// context policy. actors/session.cpp drives it with messages; the unit tests
// (tests/test_session_logic.cpp) drive it with synthetic audio.
//
// Time is counted in 16 kHz samples of the audio fed so far; the caller maps
// events to wall-clock time (it knows when each piece arrived).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "actors/messages.hpp"
#include "models/chat_template.hpp"

namespace undertone::actors {

/// Audio before the first voiced frame that is sent along when a turn starts,
/// ms (covers the VAD's decision delay so the first syllable is not cut).
inline constexpr int32_t k_pre_roll_ms = 200;

// ------------------------------------------------------------------ VAD ----
/// Frame-energy voice activity detector. A frame (vad_settings::frame_ms) is
/// voiced when its energy (dBFS, 10 log10 mean x^2) is above threshold_db AND at
/// least snr_db above the noise floor. The floor starts at the first frame's
/// energy, follows any lower frame at once, rises towards unvoiced frames with a
/// time constant of ~0.4 s and towards voiced frames with ~10 s (so steady
/// noise is learned quickly, while a long vowel does not become "noise").
/// Consequence: a sudden loud noise looks like speech (an energy VAD's limit).
class energy_vad {
 public:
  explicit energy_vad(int32_t frame_samples = 320);
  /// Classifies one frame of `frame_samples` samples and updates the floor.
  bool classify(const float* frame, double threshold_db, double snr_db);
  double noise_floor_db() const { return floor_db_; }
  double last_energy_db() const { return last_db_; }
  int32_t frame_samples() const { return frame_samples_; }
  void reset();

 private:
  int32_t frame_samples_;
  bool have_floor_ = false;
  double floor_db_ = -100.0;
  double last_db_ = -100.0;
};

// ------------------------------------------------------- turn state machine ----
enum class turn_state { idle, listening, thinking, answering };
const char* to_string(turn_state s);

enum class turn_end_reason { none, endpoint, max_turn, client };
const char* to_string(turn_end_reason r);

/// What one piece of audio caused, in order: (barge_in) -> turn_start -> ... -> end.
struct audio_step {
  bool barge_in = false;        ///< the user spoke while an answer ran: cancel it (state is now listening)
  bool turn_start = false;      ///< a turn began; to_encoder starts with its pre-roll
  bool speech_start = false;    ///< VAD: a voiced run of min_speech_ms (with VAD off: never)
  bool voiced = false;          ///< at least one voiced frame in this piece
  turn_end_reason end = turn_end_reason::none;  ///< endpoint or max_turn: the turn ended (state thinking)
  std::vector<float> to_encoder;  ///< 16 kHz samples of the current turn, to send to the encoder
};

/// The turn state machine of docs/engine.md ("A turn"). Audio is 16 kHz mono.
///  idle      --voiced run >= min_speech_ms (VAD) | any audio (VAD off)--> listening
///  listening --trailing silence >= trailing_silence_ms | max_turn_ms | end_turn()--> thinking
///  thinking  --answer_started()--> answering --answer_finished()--> idle
///  answering --voiced run (VAD) | any audio (VAD off)--> listening (barge_in)
///  thinking/answering --cancel()--> idle
/// Audio is passed to the encoder only while listening. Outside a turn the last
/// k_pre_roll_ms + min_speech_ms of audio are kept, so a turn's audio starts
/// k_pre_roll_ms before its first voiced frame (or at the start of the stream).
/// While thinking the VAD keeps running (so a barge-in right after the answer
/// starts is caught) but nothing starts a turn. max_turn_ms applies with VAD off too.
class turn_logic {
 public:
  explicit turn_logic(const vad_settings& s = {});
  /// New rules (client config); a running turn continues under them.
  void set_settings(const vad_settings& s);
  const vad_settings& settings() const { return s_; }

  turn_state state() const { return state_; }
  audio_step accept_audio(const float* x, size_t n);
  audio_step accept_audio(const std::vector<float>& x) { return accept_audio(x.data(), x.size()); }

  /// The client ended the turn. Listening: returns true and the samples not yet
  /// handed out (a partial VAD frame) in `tail`; state thinking. Otherwise false.
  bool end_turn(std::vector<float>& tail);
  /// A text turn: idle -> thinking (true); false (busy) in any other state.
  bool text_turn();
  /// The answer was requested (thinking -> answering).
  void answer_started();
  /// The answer finished or failed (-> idle).
  void answer_finished();
  /// Client cancel: stops thinking/answering (-> idle; true), or drops a turn being
  /// listened to (-> idle; true). Idle: false.
  bool cancel();

  int64_t samples_seen() const { return samples_seen_; }
  /// First sample of the current/last turn's audio (pre-roll included).
  int64_t turn_first_sample() const { return turn_first_sample_; }
  /// Samples of the current/last turn handed to the encoder.
  int64_t turn_samples() const { return turn_samples_; }
  /// One past the last voiced sample seen (-1: none yet).
  int64_t last_voice_sample() const { return last_voice_end_; }
  double noise_floor_db() const { return vad_.noise_floor_db(); }

 private:
  void process_frame(const float* f, audio_step& out);
  void start_turn(audio_step& out, int64_t run_first_sample);
  void end_turn_internal(turn_end_reason r, audio_step& out);
  void keep_history(const float* f, size_t n);

  vad_settings s_;
  energy_vad vad_;
  turn_state state_ = turn_state::idle;
  std::vector<float> partial_;   // samples of an incomplete frame
  std::vector<float> history_;   // recent audio outside a turn (pre-roll source)
  int64_t history_first_ = 0;    // absolute index of history_[0]
  int64_t samples_seen_ = 0;     // samples fully processed (whole frames)
  int32_t voiced_run_ = 0;       // consecutive voiced frames
  int64_t run_first_ = 0;        // first sample of the voiced run
  int64_t last_voice_end_ = -1;
  int64_t turn_first_sample_ = 0;
  int64_t turn_samples_ = 0;
};

// ------------------------------------------------------------- prompt ----
/// The text pieces a session appends around speech rows, cut from the model's
/// own chat template by rendering conversations with marker contents:
///   open            system block (empty if there is no system prompt at all)
///   first_user_head user header of the first turn (llama3 without system: BOS + header)
///   user_head       user header of later turns
///   user_tail       end of the user message + assistant header (generation prompt)
///   assistant_tail  end of the assistant message
///   system_head/system_tail  around an injected system line between turns
/// First turn = open + first_user_head + [speech rows] + user_tail, which is the
/// student prompt of training (docs/training.md step 3) when `system` is "".
struct prompt_pieces {
  std::string system;  ///< the effective system prompt ("" = none)
  std::string open, first_user_head, user_head, user_tail, assistant_tail, system_head, system_tail;
};
/// `system_prompt` "" = the template's default system prompt (if any). Throws
/// std::logic_error if the template drops a marker (it cannot be cut).
prompt_pieces make_prompt_pieces(const models::chat_template& t, const std::string& system_prompt);

// ------------------------------------------------------- context policy ----
/// Which earlier turns to keep when the conversation must be rebuilt
/// (docs/engine.md "Context policy"). `turn_rows`: estimated rows of each
/// finished turn (oldest first); `fixed_rows`: system block + the current turn +
/// the answer cap. Returns the index of the oldest turn to keep (turn_rows.size()
/// = none); the most recent turns that fit in `budget` are kept.
size_t first_turn_to_keep(const std::vector<int64_t>& turn_rows, int64_t fixed_rows, int64_t budget);

}  // namespace undertone::actors
