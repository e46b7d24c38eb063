#include "models/mel.hpp"

#include <fftw3.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <mutex>
#include <sstream>
#include <stdexcept>

namespace undertone::models {
namespace {

constexpr int k_half = k_mel_n_fft / 2;       // 200: centring offset, samples
constexpr float k_log_floor = 1e-10f;         // Whisper's clamp before log10
constexpr float k_dynamic_range = 8.0f;       // log10 units kept below the reference
constexpr float k_inv_ln10 = 0.43429448190325176f;
constexpr double k_pi = 3.14159265358979323846;

// Slaney mel scale (librosa htk=False): linear below 1 kHz, logarithmic above.
double hz_to_mel(double f) {
  const double f_sp = 200.0 / 3.0, min_log_hz = 1000.0, min_log_mel = min_log_hz / f_sp;
  const double logstep = std::log(6.4) / 27.0;
  return f >= min_log_hz ? min_log_mel + std::log(f / min_log_hz) / logstep : f / f_sp;
}
double mel_to_hz(double m) {
  const double f_sp = 200.0 / 3.0, min_log_hz = 1000.0, min_log_mel = min_log_hz / f_sp;
  const double logstep = std::log(6.4) / 27.0;
  return m >= min_log_mel ? min_log_hz * std::exp(logstep * (m - min_log_mel)) : f_sp * m;
}

// Immutable per-n_mels resources shared by all streams.
struct shared_front_end {
  fftwf_plan plan = nullptr;
  std::vector<float> window;            // [400] periodic Hann
  std::vector<int> first_bin;           // [n_mels] first non-zero FFT bin of each filter
  std::vector<std::vector<float>> taps; // [n_mels][k] filter weights from first_bin
};

std::mutex g_fftw_mutex;  // FFTW's planner is not thread-safe; execution is

const shared_front_end& front_end(int n_mels) {
  static std::map<int, shared_front_end> cache;
  std::lock_guard<std::mutex> lock(g_fftw_mutex);
  auto it = cache.find(n_mels);
  if (it != cache.end()) return it->second;
  shared_front_end fe;
  // FFTW_ESTIMATE: deterministic plan (MEASURE may pick different algorithms per
  // run, which would break run-to-run bit reproducibility); new-array execution
  // needs the same alignment, which fftwf_alloc_* guarantees.
  float* in = fftwf_alloc_real(k_mel_n_fft);
  fftwf_complex* out = fftwf_alloc_complex(k_mel_bins);
  fe.plan = fftwf_plan_dft_r2c_1d(k_mel_n_fft, in, out, FFTW_ESTIMATE);
  fftwf_free(in);
  fftwf_free(out);
  if (!fe.plan) throw std::runtime_error("mel: FFTW could not plan a 400-point real FFT");
  fe.window.resize(k_mel_n_fft);
  for (int k = 0; k < k_mel_n_fft; ++k)
    fe.window[size_t(k)] = float(0.5 - 0.5 * std::cos(2.0 * k_pi * k / k_mel_n_fft));
  auto fb = mel_filterbank(n_mels);
  fe.first_bin.resize(size_t(n_mels));
  fe.taps.resize(size_t(n_mels));
  for (int m = 0; m < n_mels; ++m) {
    const float* row = fb.data() + size_t(m) * k_mel_bins;
    int lo = 0, hi = k_mel_bins;
    while (lo < hi && row[lo] == 0.0f) ++lo;
    while (hi > lo && row[hi - 1] == 0.0f) --hi;
    fe.first_bin[size_t(m)] = lo;
    fe.taps[size_t(m)].assign(row + lo, row + hi);
  }
  return cache.emplace(n_mels, std::move(fe)).first->second;
}

}  // namespace

mel_normalization parse_mel_normalization(const std::string& s) {
  if (s == "causal") return mel_normalization::causal;
  if (s == "offline") return mel_normalization::offline;
  if (s == "none") return mel_normalization::none;
  throw std::invalid_argument("mel normalization '" + s +
                              "' is not one of causal | offline | none (config key "
                              "encoder.normalization)");
}

std::string to_string(mel_normalization n) {
  switch (n) {
    case mel_normalization::causal: return "causal";
    case mel_normalization::offline: return "offline";
    case mel_normalization::none: return "none";
  }
  return "?";
}

void mel_config::validate() const {
  if (n_mels < 1 || n_mels > k_mel_bins)
    throw std::invalid_argument("mel_config.n_mels = " + std::to_string(n_mels) +
                                " must be in 1..201 (Whisper uses 80, large-v3 128)");
  if (std::isnan(causal_initial_max) || causal_initial_max == std::numeric_limits<float>::infinity())
    throw std::invalid_argument("mel_config.causal_initial_max must be finite or -inf");
}

std::string mel_config::to_string() const {
  std::ostringstream s;
  s << "mel_config{n_mels=" << n_mels << ", normalization=" << models::to_string(normalization)
    << ", causal_initial_max=" << causal_initial_max << ", n_fft=" << k_mel_n_fft
    << ", hop=" << k_mel_hop << ", rate=" << k_mel_sample_rate << "}";
  return s.str();
}

std::vector<float> mel_filterbank(int n_mels) {
  if (n_mels < 1 || n_mels > k_mel_bins)
    throw std::invalid_argument("mel_filterbank: n_mels = " + std::to_string(n_mels) +
                                " must be in 1..201");
  const double fmin = 0.0, fmax = k_mel_sample_rate / 2.0;
  const double mmin = hz_to_mel(fmin), mmax = hz_to_mel(fmax);
  std::vector<double> hz(size_t(n_mels) + 2);
  for (size_t i = 0; i < hz.size(); ++i)
    hz[i] = mel_to_hz(mmin + (mmax - mmin) * double(i) / double(n_mels + 1));
  std::vector<float> w(size_t(n_mels) * k_mel_bins, 0.0f);
  for (int m = 0; m < n_mels; ++m) {
    const double lo = hz[size_t(m)], c = hz[size_t(m) + 1], hi = hz[size_t(m) + 2];
    const double enorm = 2.0 / (hi - lo);
    for (int k = 0; k < k_mel_bins; ++k) {
      const double f = double(k) * k_mel_sample_rate / k_mel_n_fft;
      const double lower = (f - lo) / (c - lo), upper = (hi - f) / (hi - c);
      w[size_t(m) * k_mel_bins + size_t(k)] = float(std::max(0.0, std::min(lower, upper)) * enorm);
    }
  }
  return w;
}

// ---------------------------------------------------------------------------

struct mel_stream::impl {
  const shared_front_end* fe;
  float* in;
  fftwf_complex* out;
  std::vector<double> power;  // [201]
  explicit impl(int n_mels)
      : fe(&front_end(n_mels)),
        in(fftwf_alloc_real(k_mel_n_fft)),
        out(fftwf_alloc_complex(k_mel_bins)),
        power(k_mel_bins) {
    if (!in || !out) {
      fftwf_free(in);
      fftwf_free(out);
      throw std::bad_alloc();
    }
  }
  ~impl() {
    fftwf_free(in);
    fftwf_free(out);
  }
  impl(const impl&) = delete;
  impl& operator=(const impl&) = delete;
};

mel_stream::mel_stream(const mel_config& cfg) : cfg_(cfg) {
  cfg_.validate();
  d_ = std::make_unique<impl>(cfg_.n_mels);
  reset();
}

mel_stream::~mel_stream() = default;
mel_stream::mel_stream(mel_stream&&) noexcept = default;
mel_stream& mel_stream::operator=(mel_stream&&) noexcept = default;

void mel_stream::reset() {
  buf_.clear();
  buf_start_ = 0;
  n_in_ = 0;
  start_.clear();
  frames_.clear();
  frames_head_ = 0;
  t_next_ = t_popped_ = 0;
  ref_max_ = cfg_.normalization == mel_normalization::causal
                 ? cfg_.causal_initial_max
                 : -std::numeric_limits<float>::infinity();
  finished_ = false;
}

void mel_stream::accept_waveform(const float* samples, size_t n) {
  if (finished_)
    throw std::logic_error("mel_stream: accept_waveform() after finish(); call reset() first");
  for (size_t i = 0; i < n; ++i)
    if (!std::isfinite(samples[i]))
      throw std::invalid_argument("mel_stream: non-finite sample at index " +
                                  std::to_string(n_in_ + int64_t(i)) +
                                  " (from the stream start); sanitise audio before the front end");
  for (size_t i = 0; i < n && start_.size() <= size_t(k_half); ++i) start_.push_back(samples[i]);
  buf_.insert(buf_.end(), samples, samples + n);
  n_in_ += int64_t(n);
  // Frame t needs x up to 160 t + 199, and x[1..200] for the start reflection.
  while (n_in_ > k_half && t_next_ * k_mel_hop + k_half <= n_in_) compute_frame(t_next_, false);
  trim();
}

float mel_stream::sample_at(int64_t j, bool at_end) const {
  if (at_end) {
    // numpy/torch "reflect" (edge not repeated), repeated for input shorter than the window.
    const int64_t n = n_in_;
    if (n == 1) return start_[0];
    const int64_t period = 2 * (n - 1);
    j %= period;
    if (j < 0) j += period;
    if (j >= n) j = period - j;
  } else if (j < 0) {
    j = -j;
  }
  if (j < int64_t(start_.size())) return start_[size_t(j)];
  return buf_[size_t(j - buf_start_)];
}

void mel_stream::compute_frame(int64_t t, bool at_end) {
  const shared_front_end& fe = *d_->fe;
  const int64_t left = t * k_mel_hop - k_half;
  float* in = d_->in;
  if (left >= 0 && left + k_mel_n_fft <= n_in_) {
    const float* x = buf_.data() + (left - buf_start_);
    for (int k = 0; k < k_mel_n_fft; ++k) in[k] = x[k] * fe.window[size_t(k)];
  } else {
    for (int k = 0; k < k_mel_n_fft; ++k) in[k] = sample_at(left + k, at_end) * fe.window[size_t(k)];
  }
  fftwf_execute_dft_r2c(fe.plan, in, d_->out);
  double* p = d_->power.data();
  for (int k = 0; k < k_mel_bins; ++k) {
    const double re = d_->out[k][0], im = d_->out[k][1];
    p[k] = re * re + im * im;
  }
  const size_t nm = size_t(cfg_.n_mels);
  const size_t base = frames_.size();
  frames_.resize(base + nm);
  float* y = frames_.data() + base;
  float fmax = -std::numeric_limits<float>::infinity();
  for (size_t m = 0; m < nm; ++m) {
    const auto& taps = fe.taps[m];
    const double* pp = p + fe.first_bin[m];
    double s = 0.0;
    for (size_t k = 0; k < taps.size(); ++k) s += double(taps[k]) * pp[k];
    // ln * 1/ln(10): glibc's logf is ~2x faster than log10f (which wraps it).
    const float v = std::log(std::max(float(s), k_log_floor)) * k_inv_ln10;
    y[m] = v;
    fmax = std::max(fmax, v);
  }
  if (cfg_.normalization == mel_normalization::causal) {
    ref_max_ = std::max(ref_max_, fmax);
    const float floor = ref_max_ - k_dynamic_range;
    for (size_t m = 0; m < nm; ++m) y[m] = (std::max(y[m], floor) + 4.0f) / 4.0f;
  } else if (cfg_.normalization == mel_normalization::offline) {
    ref_max_ = std::max(ref_max_, fmax);
  }
  ++t_next_;
}

void mel_stream::trim() {
  // Keep from the left edge of the next frame; the start reflection lives in start_.
  const int64_t keep_from = std::max<int64_t>(0, t_next_ * k_mel_hop - k_half);
  const int64_t dead = keep_from - buf_start_;
  // Amortised O(1): only erase once the dead prefix is at least half the buffer.
  if (dead > 0 && size_t(dead) * 2 >= buf_.size()) {
    buf_.erase(buf_.begin(), buf_.begin() + dead);
    buf_start_ = keep_from;
  }
  const size_t nm = size_t(cfg_.n_mels);
  if (frames_head_ > 0 && frames_head_ * nm * 2 >= frames_.size()) {
    frames_.erase(frames_.begin(), frames_.begin() + std::ptrdiff_t(frames_head_ * nm));
    frames_head_ = 0;
  }
}

void mel_stream::finish() {
  if (finished_) return;
  const int64_t total = n_in_ / k_mel_hop;
  while (t_next_ < total) compute_frame(t_next_, true);
  if (cfg_.normalization == mel_normalization::offline) {
    // Nothing was popped yet (frames_ready() was 0), so frames_ holds all frames.
    const float floor = ref_max_ - k_dynamic_range;
    for (size_t i = frames_head_ * size_t(cfg_.n_mels); i < frames_.size(); ++i)
      frames_[i] = (std::max(frames_[i], floor) + 4.0f) / 4.0f;
  }
  finished_ = true;
}

size_t mel_stream::frames_ready() const {
  if (cfg_.normalization == mel_normalization::offline && !finished_) return 0;
  return frames_.size() / size_t(cfg_.n_mels) - frames_head_;
}

size_t mel_stream::pop_frames(std::vector<float>& out, size_t max_frames) {
  const size_t k = std::min(max_frames, frames_ready());
  if (k == 0) return 0;
  const size_t nm = size_t(cfg_.n_mels);
  if (out.empty() && frames_head_ == 0 && k * nm == frames_.size()) {  // hand over, no copy
    out.swap(frames_);
    frames_.clear();
    t_popped_ += int64_t(k);
    return k;
  }
  auto b = frames_.begin() + std::ptrdiff_t(frames_head_ * nm);
  out.insert(out.end(), b, b + std::ptrdiff_t(k * nm));
  frames_head_ += k;
  t_popped_ += int64_t(k);
  trim();
  return k;
}

// ---------------------------------------------------------------------------

std::vector<float> log_mel_spectrogram(const float* samples, size_t n, const mel_config& cfg) {
  mel_stream s(cfg);
  s.accept_waveform(samples, n);
  s.finish();
  std::vector<float> out;
  s.pop_frames(out);
  return out;
}

void normalize_offline(std::vector<float>& raw, int n_mels) {
  if (n_mels <= 0 || raw.size() % size_t(n_mels) != 0)
    throw std::invalid_argument("normalize_offline: size is not a multiple of n_mels");
  if (raw.empty()) return;
  const float floor = *std::max_element(raw.begin(), raw.end()) - k_dynamic_range;
  for (auto& x : raw) x = (std::max(x, floor) + 4.0f) / 4.0f;
}

void normalize_causal(std::vector<float>& raw, int n_mels, float initial_max) {
  if (n_mels <= 0 || raw.size() % size_t(n_mels) != 0)
    throw std::invalid_argument("normalize_causal: size is not a multiple of n_mels");
  float ref = initial_max;
  for (size_t f = 0; f < raw.size(); f += size_t(n_mels)) {
    float* y = raw.data() + f;
    ref = std::max(ref, *std::max_element(y, y + n_mels));
    const float floor = ref - k_dynamic_range;
    for (int m = 0; m < n_mels; ++m) y[m] = (std::max(y[m], floor) + 4.0f) / 4.0f;
  }
}

normalization_diff compare_normalizations(const std::vector<float>& raw, int n_mels,
                                          float causal_initial_max) {
  auto off = raw, cau = raw;
  normalize_offline(off, n_mels);
  normalize_causal(cau, n_mels, causal_initial_max);
  normalization_diff d;
  d.frames = int64_t(raw.size() / size_t(n_mels));
  if (raw.empty()) return d;
  double sum = 0.0;
  int64_t differing = 0;
  for (size_t f = 0; f < raw.size(); f += size_t(n_mels)) {
    bool any = false;
    for (size_t m = 0; m < size_t(n_mels); ++m) {
      const double e = std::fabs(double(cau[f + m]) - double(off[f + m]));
      sum += e;
      d.max_abs = std::max(d.max_abs, e);
      any = any || e > 0.0;
    }
    differing += any ? 1 : 0;
  }
  d.mean_abs = sum / double(raw.size());
  d.frames_differing = double(differing) / double(d.frames);
  return d;
}

}  // namespace undertone::models
