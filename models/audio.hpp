// Audio input for the speech front end, torch-free: decode (libsndfile), downmix,
// resample to 16 kHz (libsamplerate), offline and streaming.
//
// Conventions: samples are float in [-1, 1] full scale (16-bit PCM is divided by
// 32768, as Whisper and soundfile do); multi-channel data is interleaved
// ([frames, channels] row-major); downmixing is the mean over channels.
//
// Edge cases (documented behaviour, never a crash):
//  - unreadable, garbage or truncated file, unsupported container/codec, 0-byte
//    file: audio_error naming the file and libsndfile's reason.
//  - a valid file with zero frames: an empty `audio` (0 samples), not an error;
//    log_mel_spectrogram() of it has 0 frames. Callers that need speech must check.
//  - all-silent input: fine, returns zeros.
//  - clipped input: kept unchanged (float files may exceed +-1 and are passed
//    through unscaled, as Whisper does); counted in audio_info::clipped_samples.
//  - NaN/Inf samples: by default audio_error naming the first bad sample's index
//    (frame and channel, in the source); with nonfinite_policy::replace_with_zero
//    they become 0 and are counted in audio_info::nonfinite_replaced (the caller
//    decides whether to warn: models/ has no logger).
//  - longer than audio_options::max_seconds (default 600 s): audio_error, raised
//    from the header's length before decoding where the format states it.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace undertone::models {

/// Whisper's (and the whole front end's) sample rate, Hz.
inline constexpr int k_speech_sample_rate = 16000;

/// Any audio input failure; the message names the file (or "<memory>") and what to do.
struct audio_error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

/// What to do with NaN or +-Inf samples.
enum class nonfinite_policy {
  error,             ///< throw audio_error naming the first bad sample's index (default)
  replace_with_zero  ///< replace by 0.0 and count them in audio_info::nonfinite_replaced
};

/// Sample encoding of headerless PCM.
enum class pcm_sample_type {
  s16le,  ///< signed 16-bit little endian
  f32le   ///< IEEE float 32-bit little endian
};

/// Layout of headerless (raw) PCM data.
struct raw_pcm_format {
  pcm_sample_type type = pcm_sample_type::s16le;
  int sample_rate = k_speech_sample_rate;  ///< Hz, > 0
  int channels = 1;                         ///< interleaved, > 0
};

/// Options shared by every loader.
struct audio_options {
  int target_rate = k_speech_sample_rate;  ///< output rate, Hz; 0 keeps the source rate
  double max_seconds = 600.0;              ///< longer input is an error; <= 0 means no limit
  nonfinite_policy nonfinite = nonfinite_policy::error;
};

/// What the loader found in the source (before downmix and resampling).
struct audio_info {
  int source_rate = 0;             ///< Hz
  int source_channels = 0;
  int64_t source_frames = 0;       ///< samples per channel actually decoded
  std::string format;              ///< libsndfile names, e.g. "FLAC Signed 16 bit PCM", "OGA Vorbis"
  int64_t clipped_samples = 0;     ///< source samples with |x| >= 32767/32768 (all channels)
  int64_t nonfinite_replaced = 0;  ///< NaN/Inf samples set to 0 (replace_with_zero only)
  float peak = 0.0f;               ///< max |x| over the finite source samples
};

/// Mono audio at `sample_rate`.
struct audio {
  std::vector<float> samples;  ///< [n] mono
  int sample_rate = k_speech_sample_rate;
  audio_info info;
  double seconds() const { return sample_rate > 0 ? double(samples.size()) / sample_rate : 0.0; }
};

/// Decodes any file libsndfile can read (WAV, FLAC, OGG/Vorbis, Opus, AIFF, ...),
/// downmixes to mono and resamples to `opt.target_rate` (SRC_SINC_BEST_QUALITY).
audio load_audio(const std::string& path, const audio_options& opt = {});

/// Same for headerless PCM in a file. The byte count must be a whole number of frames.
audio load_raw_pcm(const std::string& path, const raw_pcm_format& fmt, const audio_options& opt = {});

/// Same as load_audio for an encoded file held in memory (e.g. uploaded by a client).
audio decode_audio(const void* data, size_t bytes, const audio_options& opt = {});

/// Same as load_raw_pcm for headerless PCM held in memory.
audio decode_raw_pcm(const void* data, size_t bytes, const raw_pcm_format& fmt,
                     const audio_options& opt = {});

/// Mean over channels. `interleaved`: [frames, channels]; returns [frames].
std::vector<float> downmix(const float* interleaved, size_t frames, int channels);

/// Offline resampling of mono audio with libsamplerate's SRC_SINC_BEST_QUALITY.
/// Output length is round(n * to_rate / from_rate) (libsamplerate's count, +-1).
/// Equal rates return a copy.
std::vector<float> resample(const float* mono, size_t n, int from_rate, int to_rate);

/// Writes interleaved float audio: ".wav" as 32-bit float WAV (NaN/Inf kept, so tests
/// can build bad input), ".flac" as 16-bit FLAC (clipped to +-1). Throws audio_error.
void save_audio(const std::string& path, const float* interleaved, size_t frames, int sample_rate,
                int channels);

/// Downmix + resample for audio that arrives in pieces (microphone, network).
/// Input chunks of any size, float or 16-bit, interleaved with `channels`;
/// output mono at `to_rate`, appended to the caller's vector as soon as it is
/// available. libsamplerate's sinc filter has a delay: the last ~tens of ms only
/// come out on finish().
///
/// Equivalence with the offline path: the concatenated output of all accept()
/// calls plus finish() has the same length as resample(downmix(all input)) and,
/// as documented tolerance, equals it within 1e-5 absolute per sample (the
/// converter keeps its filter phase as a double that is re-based when its internal
/// buffer refills, which depends on chunking). Measured with libsamplerate 0.2.2:
/// bit-identical for 8/22.05/44.1/48 kHz, mono and stereo, pieces of 1, 441, 4410
/// and random sizes (tests/test_audio.cpp). Equal rates are exact by construction.
class stream_resampler {
 public:
  /// `from_rate`, `to_rate`: Hz, > 0; `channels` > 0.
  stream_resampler(int from_rate, int channels = 1, int to_rate = k_speech_sample_rate,
                   nonfinite_policy nonfinite = nonfinite_policy::error);
  ~stream_resampler();
  stream_resampler(stream_resampler&&) noexcept;
  stream_resampler& operator=(stream_resampler&&) noexcept;

  /// `interleaved`: [frames, channels] in [-1, 1]. NaN/Inf: audio_error naming the
  /// absolute frame index since construction/reset (state unchanged), or replaced
  /// by 0 per the policy. Throws audio_error after finish().
  void accept(const float* interleaved, size_t frames, std::vector<float>& out);
  /// `interleaved`: [frames, channels] signed 16-bit, scaled by 1/32768.
  void accept_s16(const int16_t* interleaved, size_t frames, std::vector<float>& out);
  /// Flushes the filter tail; no accept() afterwards until reset().
  void finish(std::vector<float>& out);
  /// Back to the state right after construction.
  void reset();

  int from_rate() const { return from_rate_; }
  int to_rate() const { return to_rate_; }
  int channels() const { return channels_; }
  int64_t frames_in() const { return frames_in_; }    ///< input frames accepted so far
  int64_t samples_out() const { return samples_out_; }  ///< output samples produced so far
  int64_t nonfinite_replaced() const { return nonfinite_replaced_; }

 private:
  void process(const float* mono, size_t n, bool end, std::vector<float>& out);

  struct src_state;
  int from_rate_, channels_, to_rate_;
  nonfinite_policy nonfinite_;
  std::unique_ptr<src_state> src_;
  std::vector<float> mono_;  // scratch
  int64_t frames_in_ = 0, samples_out_ = 0, nonfinite_replaced_ = 0;
  bool finished_ = false;
};

}  // namespace undertone::models
