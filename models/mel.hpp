// Whisper-compatible log-mel features, computed incrementally, torch-free (FFTW).
//
// Definition (identical to openai-whisper's log_mel_spectrogram and HF's
// WhisperFeatureExtractor without the 30 s padding):
//   16 kHz mono input x[0..N); n_fft 400 (25 ms), hop 160 (10 ms); periodic Hann
//   window w[k] = 0.5 - 0.5 cos(2 pi k / 400); frame t is centred on sample 160 t:
//   it uses x[160 t - 200 .. 160 t + 200) where indices outside [0, N) are
//   reflected (x[-j] = x[j], x[N-1+j] = x[N-1-j], repeatedly for very short input);
//   power spectrum |FFT|^2 (201 bins); Slaney mel filterbank (librosa default:
//   htk=False, norm="slaney", fmin 0, fmax 8000); log10(max(mel, 1e-10)).
//   Frames: t = 0 .. floor(N / 160) - 1 (Whisper's STFT has one more frame and
//   drops it), so 100 frames per second; fewer than 160 samples give 0 frames.
// Normalization (mel_normalization), applied after the log:
//   offline: Whisper's: x = max(x, M - 8) with M the max over the whole
//     utterance; then (x + 4) / 4. Not causal: no frame can leave before finish().
//   causal (the streaming default): the same clamp with a running reference,
//     M_t = max(causal_initial_max, max of all raw values in frames 0..t), so frame
//     t depends only on audio up to its own right edge. Why a running max (default
//     causal_initial_max = -inf, i.e. no prior): it is parameter-free; like offline
//     it is gain-equivariant (scaling the audio shifts every feature by the same
//     constant); and once the utterance's loudest frame has passed, causal ==
//     offline exactly. Before that frame only bins below M_t - 8 (80 dB under the
//     loudest bin so far, i.e. near-silence) can differ. Measured on all 960
//     RAVDESS training clips (normalized units): mean |causal - offline| 0.038,
//     max 1.02 (leading digital silence / onsets), 28% of frames touched. A fixed
//     prior (causal_initial_max = -1, tuned on the same clips) lowers the mean only
//     to 0.035 and breaks gain equivariance, so it is opt-in. Numbers come from
//     compare_normalizations(); tests/test_mel.cpp prints them for a subset.
//   none: raw log10 mel (for tests and research).
// Streaming framing: a frame is computed as soon as its right edge exists
// (160 t + 200 <= samples received, and at least 201 samples so the start
// reflection is available); the only frames that need the end of the input (the
// last one when N mod 160 < 40, or any frame of input shorter than 201 samples)
// are computed by finish(), with end reflection, exactly as offline does. So the
// frames of a stream fed in any pieces and then finish()ed are bit-identical to
// log_mel_spectrogram() of the whole input (same code path per frame).
#pragma once

#include <cstddef>
#include <cstdint>
#include <limits>
#include <memory>
#include <string>
#include <vector>

namespace undertone::models {

enum class mel_normalization {
  causal,   ///< running-max clamp; frames leave as soon as they are computed
  offline,  ///< Whisper's utterance-max clamp; frames leave only after finish()
  none      ///< raw log10 mel power, no clamp, no scaling
};

/// "causal" | "offline" | "none" (the config key encoder.normalization). Throws std::invalid_argument.
mel_normalization parse_mel_normalization(const std::string& s);
std::string to_string(mel_normalization n);

struct mel_config {
  int n_mels = 80;  ///< 80 (Whisper tiny..large-v2) or 128 (large-v3); any 1..201 works
  mel_normalization normalization = mel_normalization::causal;
  /// causal only: initial running reference, log10 power units; -inf = pure running max.
  float causal_initial_max = -std::numeric_limits<float>::infinity();
  /// Throws std::invalid_argument naming the bad field.
  void validate() const;
  std::string to_string() const;
};

/// Fixed Whisper framing constants.
inline constexpr int k_mel_sample_rate = 16000;  ///< Hz
inline constexpr int k_mel_n_fft = 400;          ///< samples (25 ms)
inline constexpr int k_mel_hop = 160;            ///< samples (10 ms)
inline constexpr int k_mel_bins = k_mel_n_fft / 2 + 1;  ///< 201 FFT bins

/// Slaney-style mel filterbank as librosa.filters.mel(sr=16000, n_fft=400, n_mels,
/// fmin=0, fmax=8000, htk=False, norm="slaney"): [n_mels, 201] row-major, float.
std::vector<float> mel_filterbank(int n_mels);

/// Incremental log-mel front end (sherpa-style stream: state only; the filterbank
/// and FFT plan are shared and immutable). Not thread-safe per object; separate
/// objects may be used from different threads.
class mel_stream {
 public:
  explicit mel_stream(const mel_config& cfg = {});
  ~mel_stream();
  mel_stream(const mel_stream&) = delete;
  mel_stream& operator=(const mel_stream&) = delete;
  mel_stream(mel_stream&&) noexcept;
  mel_stream& operator=(mel_stream&&) noexcept;

  /// Appends 16 kHz mono samples (any count, including 0) and computes every frame
  /// that became complete. NaN/Inf: std::invalid_argument naming the absolute sample
  /// index, with the stream unchanged (sanitise with models/audio.hpp first).
  /// After finish(): std::logic_error.
  void accept_waveform(const float* samples, size_t n);
  void accept_waveform(const std::vector<float>& samples) {
    accept_waveform(samples.data(), samples.size());
  }
  /// End of input: computes the remaining frames (end reflection) and, for offline
  /// normalization, normalizes all frames with the utterance max. Idempotent.
  void finish();
  bool finished() const { return finished_; }

  /// Frames that pop_frames() can return now (always 0 before finish() when
  /// normalization is offline).
  size_t frames_ready() const;
  /// Appends up to `max_frames` ready frames to `out` as [frames, n_mels] row-major;
  /// returns how many.
  size_t pop_frames(std::vector<float>& out, size_t max_frames = std::numeric_limits<size_t>::max());

  int64_t samples_accepted() const { return n_in_; }      ///< samples since construction/reset
  int64_t frames_computed() const { return t_next_; }     ///< frames computed so far
  int64_t frames_popped() const { return t_popped_; }     ///< frames returned so far
  /// Current causal reference M_t (log10 units), or the utterance max after an offline finish().
  float reference_max() const { return ref_max_; }
  const mel_config& config() const { return cfg_; }
  /// Back to the state after construction (same config).
  void reset();

 private:
  void compute_frame(int64_t t, bool at_end);
  float sample_at(int64_t j, bool at_end) const;
  void trim();

  mel_config cfg_;
  struct impl;
  std::unique_ptr<impl> d_;  // FFT buffers; shared plan and filterbank
  std::vector<float> buf_;  // samples [buf_start_, buf_start_ + buf_.size())
  int64_t buf_start_ = 0;
  int64_t n_in_ = 0;
  std::vector<float> start_;  // x[0..200]: the start reflection survives trimming
  std::vector<float> frames_;  // computed, not yet popped: [frames, n_mels]
  size_t frames_head_ = 0;     // first unpopped frame in frames_ (in frames)
  int64_t t_next_ = 0, t_popped_ = 0;
  float ref_max_;
  bool finished_ = false;
};

/// Offline convenience: feeds `samples` (16 kHz mono) whole and finish()es.
/// Returns [floor(n / 160), n_mels] row-major.
std::vector<float> log_mel_spectrogram(const float* samples, size_t n, const mel_config& cfg = {});
inline std::vector<float> log_mel_spectrogram(const std::vector<float>& s, const mel_config& cfg = {}) {
  return log_mel_spectrogram(s.data(), s.size(), cfg);
}

/// Normalizes raw log10 mel frames [frames, n_mels] in place with Whisper's offline rule.
void normalize_offline(std::vector<float>& raw, int n_mels);
/// Normalizes raw log10 mel frames [frames, n_mels] in place with the causal rule.
void normalize_causal(std::vector<float>& raw, int n_mels, float initial_max);

/// Difference between causal and offline normalization of the same raw frames
/// (normalized units, i.e. after (x + 4) / 4).
struct normalization_diff {
  double max_abs = 0;          ///< max |causal - offline| over all values
  double mean_abs = 0;         ///< mean |causal - offline| over all values
  double frames_differing = 0; ///< fraction of frames with any difference
  int64_t frames = 0;
};
/// `raw`: [frames, n_mels] from normalization none. Use it (or normalize_* on the same
/// raw frames) to feed the encoder both variants and compare its outputs.
normalization_diff compare_normalizations(const std::vector<float>& raw, int n_mels,
                                          float causal_initial_max);

}  // namespace undertone::models
