// Pure session logic: VAD, turn state machine, prompt pieces, context policy
// (actors/session_logic.hpp).
#include "actors/session_logic.hpp"

#include <algorithm>
#include <cmath>
#include <stdexcept>

namespace undertone::actors {

namespace {
constexpr int k_rate = 16000;
int64_t ms_to_samples(int64_t ms) { return ms * k_rate / 1000; }
}  // namespace

// ---------------------------------------------------------------- energy_vad

energy_vad::energy_vad(int32_t frame_samples) : frame_samples_(std::max<int32_t>(1, frame_samples)) {}

void energy_vad::reset() {
  have_floor_ = false;
  floor_db_ = -100.0;
  last_db_ = -100.0;
}

bool energy_vad::classify(const float* frame, double threshold_db, double snr_db) {
  double sum = 0;
  for (int32_t i = 0; i < frame_samples_; ++i) sum += double(frame[i]) * double(frame[i]);
  const double e = 10.0 * std::log10(sum / frame_samples_ + 1e-10);
  last_db_ = e;
  if (!have_floor_) {
    floor_db_ = e;
    have_floor_ = true;
  }
  const bool voiced = e > threshold_db && e - floor_db_ >= snr_db;
  // Time constants: ~0.4 s towards unvoiced frames, ~10 s towards voiced ones.
  const double dt = double(frame_samples_) / k_rate;
  const double a = 1.0 - std::exp(-dt / (voiced ? 10.0 : 0.4));
  if (e < floor_db_)
    floor_db_ = e;
  else
    floor_db_ += (e - floor_db_) * a;
  return voiced;
}

// ---------------------------------------------------------------- turn_logic

const char* to_string(turn_state s) {
  switch (s) {
    case turn_state::idle: return "idle";
    case turn_state::listening: return "listening";
    case turn_state::thinking: return "thinking";
    case turn_state::answering: return "answering";
  }
  return "?";
}

const char* to_string(turn_end_reason r) {
  switch (r) {
    case turn_end_reason::none: return "none";
    case turn_end_reason::endpoint: return "endpoint";
    case turn_end_reason::max_turn: return "max_turn";
    case turn_end_reason::client: return "client";
  }
  return "?";
}

turn_logic::turn_logic(const vad_settings& s) : s_(s), vad_(int32_t(ms_to_samples(std::max(1, s.frame_ms)))) {}

void turn_logic::set_settings(const vad_settings& s) {
  const bool new_frame = s.frame_ms != s_.frame_ms;
  s_ = s;
  if (new_frame) {
    vad_ = energy_vad(int32_t(ms_to_samples(std::max(1, s.frame_ms))));
    voiced_run_ = 0;
  }
}

void turn_logic::keep_history(const float* f, size_t n) {
  history_.insert(history_.end(), f, f + n);
  const size_t cap = size_t(ms_to_samples(k_pre_roll_ms + s_.min_speech_ms) + 2 * vad_.frame_samples());
  if (history_.size() > 2 * cap) {
    const size_t drop = history_.size() - cap;
    history_.erase(history_.begin(), history_.begin() + ptrdiff_t(drop));
    history_first_ += int64_t(drop);
  }
}

void turn_logic::start_turn(audio_step& out, int64_t first_sample) {
  state_ = turn_state::listening;
  out.turn_start = true;
  const int64_t from = std::max(history_first_, first_sample);
  const int64_t end = history_first_ + int64_t(history_.size());
  if (from < end) out.to_encoder.insert(out.to_encoder.end(), history_.begin() + (from - history_first_), history_.end());
  turn_first_sample_ = from;
  turn_samples_ = std::max<int64_t>(0, end - from);
  history_.clear();
  history_first_ = end;
}

void turn_logic::end_turn_internal(turn_end_reason r, audio_step& out) {
  state_ = turn_state::thinking;
  out.end = r;
}

void turn_logic::process_frame(const float* f, audio_step& out) {
  const int64_t fs = vad_.frame_samples();
  const int64_t first = samples_seen_, end = samples_seen_ + fs;
  const bool voiced = vad_.classify(f, s_.threshold_db, s_.snr_db) && s_.enabled;
  if (voiced) {
    out.voiced = true;
    last_voice_end_ = end;
    if (voiced_run_ == 0) run_first_ = first;
    ++voiced_run_;
  } else {
    voiced_run_ = 0;
  }
  samples_seen_ = end;
  switch (state_) {
    case turn_state::idle:
    case turn_state::answering: {
      keep_history(f, size_t(fs));
      bool start = false;
      if (s_.enabled) {
        start = voiced && int64_t(voiced_run_) * fs >= ms_to_samples(s_.min_speech_ms);
      } else {
        start = true;  // VAD off: any audio starts (or barges into) a turn
      }
      if (!start) break;
      if (state_ == turn_state::answering) out.barge_in = true;
      out.speech_start = s_.enabled;
      start_turn(out, s_.enabled ? run_first_ - ms_to_samples(k_pre_roll_ms) : first);
      break;
    }
    case turn_state::thinking:
      keep_history(f, size_t(fs));
      break;
    case turn_state::listening: {
      out.to_encoder.insert(out.to_encoder.end(), f, f + fs);
      turn_samples_ += fs;
      if (s_.enabled && last_voice_end_ >= 0 && end - last_voice_end_ >= ms_to_samples(s_.trailing_silence_ms)) {
        end_turn_internal(turn_end_reason::endpoint, out);
      } else if (s_.max_turn_ms > 0 && turn_samples_ >= ms_to_samples(s_.max_turn_ms)) {
        end_turn_internal(turn_end_reason::max_turn, out);
      }
      break;
    }
  }
}

audio_step turn_logic::accept_audio(const float* x, size_t n) {
  audio_step out;
  partial_.insert(partial_.end(), x, x + n);
  const size_t fs = size_t(vad_.frame_samples());
  size_t off = 0;
  for (; off + fs <= partial_.size(); off += fs) process_frame(partial_.data() + off, out);
  partial_.erase(partial_.begin(), partial_.begin() + ptrdiff_t(off));
  return out;
}

bool turn_logic::end_turn(std::vector<float>& tail) {
  tail.clear();
  if (state_ != turn_state::listening) return false;
  tail.swap(partial_);
  samples_seen_ += int64_t(tail.size());
  turn_samples_ += int64_t(tail.size());
  state_ = turn_state::thinking;
  voiced_run_ = 0;
  return true;
}

bool turn_logic::text_turn() {
  if (state_ != turn_state::idle) return false;
  state_ = turn_state::thinking;
  return true;
}

void turn_logic::answer_started() {
  if (state_ == turn_state::thinking) state_ = turn_state::answering;
}

void turn_logic::answer_finished() {
  if (state_ == turn_state::thinking || state_ == turn_state::answering) state_ = turn_state::idle;
}

bool turn_logic::cancel() {
  if (state_ == turn_state::idle) return false;
  state_ = turn_state::idle;
  voiced_run_ = 0;
  return true;
}

// ---------------------------------------------------------------- prompt pieces

namespace {
size_t find_marker(const std::string& text, const std::string& m) {
  const size_t at = text.find(m);
  if (at == std::string::npos) throw std::logic_error("chat template dropped a marker; cannot cut prompt pieces");
  return at;
}
}  // namespace

prompt_pieces make_prompt_pieces(const models::chat_template& t, const std::string& system_prompt) {
  // Printable markers: llama3 trims message content, and its trim (like
  // Python's str.strip) also eats control characters such as \x1f.
  const std::string u1 = "[[ut-marker-u1]]", a1 = "[[ut-marker-a1]]", u2 = "[[ut-marker-u2]]", x = "[[ut-marker-x]]";
  prompt_pieces p;
  p.system = system_prompt.empty() ? t.default_system() : system_prompt;
  std::vector<models::chat_message> base;
  if (!p.system.empty()) base.push_back({"system", p.system});

  auto c1 = base;
  c1.push_back({"user", u1});
  const std::string first = t.apply(c1, true);
  const size_t iu = find_marker(first, u1);
  const std::string before = first.substr(0, iu);
  p.user_tail = first.substr(iu + u1.size());
  if (!p.system.empty()) {
    const std::string sys_only = t.apply(base, false);
    if (before.compare(0, sys_only.size(), sys_only) == 0) {
      p.open = sys_only;
      p.first_user_head = before.substr(sys_only.size());
    } else {
      p.open = before;  // cannot split: the first header goes with the system block
    }
  } else {
    p.first_user_head = before;
  }

  auto c2 = c1;
  c2.push_back({"assistant", a1});
  const std::string with_answer = t.apply(c2, false);
  p.assistant_tail = with_answer.substr(find_marker(with_answer, a1) + a1.size());

  auto c3 = c2;
  c3.push_back({"user", u2});
  const std::string second = t.apply(c3, true);
  const size_t ia = find_marker(second, a1) + a1.size(), iu2 = find_marker(second, u2);
  const std::string between = second.substr(ia, iu2 - ia);
  if (between.compare(0, p.assistant_tail.size(), p.assistant_tail) != 0)
    throw std::logic_error("chat template: the assistant tail differs between turns; cannot cut prompt pieces");
  p.user_head = between.substr(p.assistant_tail.size());

  auto c4 = c2;
  c4.push_back({"system", x});
  c4.push_back({"user", u2});
  const std::string injected = t.apply(c4, true);
  const size_t ja = find_marker(injected, a1) + a1.size() + p.assistant_tail.size();
  const size_t jx = find_marker(injected, x), ju = find_marker(injected, u2);
  p.system_head = injected.substr(ja, jx - ja);
  const size_t tail_end = ju >= p.user_head.size() ? ju - p.user_head.size() : ju;
  p.system_tail = injected.substr(jx + x.size(), tail_end - (jx + x.size()));
  return p;
}

// ---------------------------------------------------------------- context policy

size_t first_turn_to_keep(const std::vector<int64_t>& turn_rows, int64_t fixed_rows, int64_t budget) {
  const int64_t avail = budget - fixed_rows;
  size_t i = turn_rows.size();
  int64_t sum = 0;
  while (i > 0 && sum + turn_rows[i - 1] <= avail) sum += turn_rows[--i];
  return i;
}

}  // namespace undertone::actors
