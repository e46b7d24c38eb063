#include "models/audio.hpp"

#include <samplerate.h>
#include <sndfile.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <sstream>

namespace undertone::models {
namespace {

constexpr float k_clip_level = 32767.0f / 32768.0f;
constexpr size_t k_read_block = 8192;  // frames per sf_readf_float call

std::string sf_reason(SNDFILE* f) { return sf_strerror(f); }

// Memory source for sf_open_virtual.
struct mem_source {
  const unsigned char* data;
  sf_count_t size;
  sf_count_t pos;
};
sf_count_t mem_len(void* u) { return static_cast<mem_source*>(u)->size; }
sf_count_t mem_seek(sf_count_t off, int whence, void* u) {
  auto* m = static_cast<mem_source*>(u);
  sf_count_t p = whence == SEEK_SET ? off : whence == SEEK_CUR ? m->pos + off : m->size + off;
  m->pos = std::clamp<sf_count_t>(p, 0, m->size);
  return m->pos;
}
sf_count_t mem_read(void* ptr, sf_count_t n, void* u) {
  auto* m = static_cast<mem_source*>(u);
  sf_count_t k = std::min(n, m->size - m->pos);
  if (k > 0) std::memcpy(ptr, m->data + m->pos, size_t(k));
  m->pos += std::max<sf_count_t>(k, 0);
  return std::max<sf_count_t>(k, 0);
}
sf_count_t mem_write(const void*, sf_count_t, void*) { return 0; }
sf_count_t mem_tell(void* u) { return static_cast<mem_source*>(u)->pos; }

struct sndfile_closer {
  void operator()(SNDFILE* f) const { sf_close(f); }
};
using sndfile_ptr = std::unique_ptr<SNDFILE, sndfile_closer>;

std::string format_name(int format) {
  SF_FORMAT_INFO major{}, sub{};
  major.format = format & SF_FORMAT_TYPEMASK;
  sub.format = format & SF_FORMAT_SUBMASK;
  std::string s;
  if (sf_command(nullptr, SFC_GET_FORMAT_INFO, &major, sizeof(major)) == 0 && major.extension)
    s = major.extension;
  else
    s = "raw";
  for (auto& c : s) c = char(std::toupper(static_cast<unsigned char>(c)));
  if (sf_command(nullptr, SFC_GET_FORMAT_INFO, &sub, sizeof(sub)) == 0 && sub.name)
    s += std::string(" ") + sub.name;
  return s;
}

int raw_sf_format(const raw_pcm_format& fmt) {
  return SF_FORMAT_RAW | SF_ENDIAN_LITTLE |
         (fmt.type == pcm_sample_type::s16le ? SF_FORMAT_PCM_16 : SF_FORMAT_FLOAT);
}

size_t raw_bytes_per_frame(const raw_pcm_format& fmt) {
  return size_t(fmt.channels) * (fmt.type == pcm_sample_type::s16le ? 2 : 4);
}

void check_raw_format(const raw_pcm_format& fmt, const std::string& what) {
  if (fmt.sample_rate <= 0 || fmt.channels <= 0 || fmt.channels > 1024)
    throw audio_error("raw PCM " + what + ": sample_rate (" + std::to_string(fmt.sample_rate) +
                      ") and channels (" + std::to_string(fmt.channels) +
                      ") must be positive (channels <= 1024)");
}

void check_rates(int from, int to, const std::string& what) {
  if (from <= 0 || to <= 0)
    throw audio_error(what + ": sample rates must be positive (got " + std::to_string(from) +
                      " -> " + std::to_string(to) + " Hz)");
  if (from != to && !src_is_valid_ratio(double(to) / from))
    throw audio_error(what + ": cannot resample " + std::to_string(from) + " Hz to " +
                      std::to_string(to) + " Hz (ratio outside libsamplerate's 1/256..256)");
}

std::string too_long(const std::string& what, double seconds, double max_seconds) {
  std::ostringstream s;
  s << what << ": audio is " << seconds << " s long, more than max_seconds = " << max_seconds
    << " s; cut it or raise audio_options::max_seconds";
  return s.str();
}

// Reads everything from an open SNDFILE, downmixing block by block so that a long
// multi-channel file never exists in memory at full width.
audio read_all(SNDFILE* f, const SF_INFO& sfi, const audio_options& opt, const std::string& what) {
  if (sfi.channels <= 0 || sfi.samplerate <= 0)
    throw audio_error(what + ": invalid header (channels " + std::to_string(sfi.channels) +
                      ", rate " + std::to_string(sfi.samplerate) + ")");
  const int target = opt.target_rate > 0 ? opt.target_rate : sfi.samplerate;
  check_rates(sfi.samplerate, target, what);
  const bool limited = opt.max_seconds > 0;
  // Headers can lie or be unknown (SF_COUNT_MAX); the block loop checks again.
  if (limited && sfi.frames > 0 && sfi.frames < SF_COUNT_MAX &&
      double(sfi.frames) / sfi.samplerate > opt.max_seconds)
    throw audio_error(too_long(what, double(sfi.frames) / sfi.samplerate, opt.max_seconds));

  audio a;
  a.info.source_rate = sfi.samplerate;
  a.info.source_channels = sfi.channels;
  a.info.format = format_name(sfi.format);
  sf_command(f, SFC_SET_NORM_FLOAT, nullptr, SF_TRUE);

  const size_t ch = size_t(sfi.channels);
  std::vector<float> block(k_read_block * ch);
  std::vector<float> mono;
  if (sfi.frames > 0 && sfi.frames < SF_COUNT_MAX) mono.reserve(size_t(sfi.frames));
  int64_t frame0 = 0;
  for (;;) {
    sf_count_t got = sf_readf_float(f, block.data(), sf_count_t(k_read_block));
    if (got <= 0) break;
    for (size_t i = 0; i < size_t(got) * ch; ++i) {
      float& x = block[i];
      if (!std::isfinite(x)) {
        if (opt.nonfinite == nonfinite_policy::error)
          throw audio_error(what + ": non-finite sample (" + (std::isnan(x) ? "NaN" : "Inf") +
                            ") at frame " + std::to_string(frame0 + int64_t(i / ch)) +
                            ", channel " + std::to_string(i % ch) +
                            "; fix the source or use nonfinite_policy::replace_with_zero");
        x = 0.0f;
        ++a.info.nonfinite_replaced;
      }
      float ax = std::fabs(x);
      a.info.peak = std::max(a.info.peak, ax);
      if (ax >= k_clip_level) ++a.info.clipped_samples;
    }
    if (ch == 1) {
      mono.insert(mono.end(), block.begin(), block.begin() + got);
    } else {
      auto m = downmix(block.data(), size_t(got), sfi.channels);
      mono.insert(mono.end(), m.begin(), m.end());
    }
    frame0 += got;
    if (limited && double(frame0) / sfi.samplerate > opt.max_seconds)
      throw audio_error(too_long(what, double(frame0) / sfi.samplerate, opt.max_seconds) +
                        " (header did not state the length)");
  }
  if (sf_error(f) != SF_ERR_NO_ERROR)
    throw audio_error(what + ": decoding failed after " + std::to_string(frame0) +
                      " frames: " + sf_reason(f));
  a.info.source_frames = frame0;
  if (target == sfi.samplerate) {
    a.samples = std::move(mono);
  } else {
    a.samples = resample(mono.data(), mono.size(), sfi.samplerate, target);
  }
  a.sample_rate = target;
  return a;
}

audio open_and_read(const std::string& path, SF_INFO sfi, const audio_options& opt,
                    const std::string& what) {
  sndfile_ptr f(sf_open(path.c_str(), SFM_READ, &sfi));
  if (!f)
    throw audio_error(what + ": cannot open or decode (" + sf_reason(nullptr) +
                      "); supported: WAV, FLAC, OGG/Vorbis/Opus, AIFF and other libsndfile "
                      "formats, or raw PCM via load_raw_pcm");
  return read_all(f.get(), sfi, opt, what);
}

audio open_and_read_memory(const void* data, size_t bytes, SF_INFO sfi, const audio_options& opt,
                           const std::string& what) {
  mem_source src{static_cast<const unsigned char*>(data), sf_count_t(bytes), 0};
  SF_VIRTUAL_IO io{mem_len, mem_seek, mem_read, mem_write, mem_tell};
  sndfile_ptr f(sf_open_virtual(&io, SFM_READ, &sfi, &src));
  if (!f)
    throw audio_error(what + ": cannot decode (" + sf_reason(nullptr) + ")");
  return read_all(f.get(), sfi, opt, what);
}

}  // namespace

audio load_audio(const std::string& path, const audio_options& opt) {
  return open_and_read(path, SF_INFO{}, opt, "audio file '" + path + "'");
}

audio load_raw_pcm(const std::string& path, const raw_pcm_format& fmt, const audio_options& opt) {
  const std::string what = "raw PCM file '" + path + "'";
  check_raw_format(fmt, what);
  std::error_code ec;
  auto size = std::filesystem::file_size(path, ec);
  if (ec) throw audio_error(what + ": cannot read (" + ec.message() + ")");
  if (size % raw_bytes_per_frame(fmt) != 0)
    throw audio_error(what + ": " + std::to_string(size) + " bytes is not a whole number of " +
                      std::to_string(raw_bytes_per_frame(fmt)) + "-byte frames; check the sample "
                      "type and channel count");
  SF_INFO sfi{};
  sfi.format = raw_sf_format(fmt);
  sfi.samplerate = fmt.sample_rate;
  sfi.channels = fmt.channels;
  if (size == 0) {  // libsndfile refuses empty raw files; zero-length data is an empty audio
    audio a;
    a.sample_rate = opt.target_rate > 0 ? opt.target_rate : fmt.sample_rate;
    a.info.source_rate = fmt.sample_rate;
    a.info.source_channels = fmt.channels;
    a.info.format = format_name(sfi.format);
    return a;
  }
  return open_and_read(path, sfi, opt, what);
}

audio decode_audio(const void* data, size_t bytes, const audio_options& opt) {
  if (bytes == 0) throw audio_error("audio <memory>: 0 bytes; nothing to decode");
  return open_and_read_memory(data, bytes, SF_INFO{}, opt, "audio <memory>");
}

audio decode_raw_pcm(const void* data, size_t bytes, const raw_pcm_format& fmt,
                     const audio_options& opt) {
  const std::string what = "raw PCM <memory>";
  check_raw_format(fmt, what);
  if (bytes % raw_bytes_per_frame(fmt) != 0)
    throw audio_error(what + ": " + std::to_string(bytes) + " bytes is not a whole number of " +
                      std::to_string(raw_bytes_per_frame(fmt)) + "-byte frames");
  SF_INFO sfi{};
  sfi.format = raw_sf_format(fmt);
  sfi.samplerate = fmt.sample_rate;
  sfi.channels = fmt.channels;
  if (bytes == 0) {
    audio a;
    a.sample_rate = opt.target_rate > 0 ? opt.target_rate : fmt.sample_rate;
    a.info.source_rate = fmt.sample_rate;
    a.info.source_channels = fmt.channels;
    a.info.format = format_name(sfi.format);
    return a;
  }
  return open_and_read_memory(data, bytes, sfi, opt, what);
}

std::vector<float> downmix(const float* interleaved, size_t frames, int channels) {
  if (channels <= 0) throw audio_error("downmix: channels must be positive");
  std::vector<float> out(frames);
  if (channels == 1) {
    std::copy(interleaved, interleaved + frames, out.begin());
    return out;
  }
  const size_t ch = size_t(channels);
  const float inv = 1.0f / float(channels);
  for (size_t i = 0; i < frames; ++i) {
    float s = 0.0f;
    for (size_t c = 0; c < ch; ++c) s += interleaved[i * ch + c];
    out[i] = s * inv;
  }
  return out;
}

std::vector<float> resample(const float* mono, size_t n, int from_rate, int to_rate) {
  check_rates(from_rate, to_rate, "resample");
  if (from_rate == to_rate || n == 0) return std::vector<float>(mono, mono + n);
  const double ratio = double(to_rate) / from_rate;
  std::vector<float> out(size_t(std::ceil(double(n) * ratio)) + 64);
  SRC_DATA d{};
  d.data_in = mono;
  d.input_frames = long(n);
  d.data_out = out.data();
  d.output_frames = long(out.size());
  d.src_ratio = ratio;
  d.end_of_input = 1;
  if (int err = src_simple(&d, SRC_SINC_BEST_QUALITY, 1))
    throw audio_error(std::string("resample: libsamplerate failed: ") + src_strerror(err));
  out.resize(size_t(d.output_frames_gen));
  return out;
}

void save_audio(const std::string& path, const float* interleaved, size_t frames, int sample_rate,
                int channels) {
  std::string ext = std::filesystem::path(path).extension().string();
  for (auto& c : ext) c = char(std::tolower(static_cast<unsigned char>(c)));
  SF_INFO sfi{};
  sfi.samplerate = sample_rate;
  sfi.channels = channels;
  if (ext == ".wav")
    sfi.format = SF_FORMAT_WAV | SF_FORMAT_FLOAT;
  else if (ext == ".flac")
    sfi.format = SF_FORMAT_FLAC | SF_FORMAT_PCM_16;
  else
    throw audio_error("save_audio '" + path + "': unsupported extension (use .wav or .flac)");
  if (sample_rate <= 0 || channels <= 0 || !sf_format_check(&sfi))
    throw audio_error("save_audio '" + path + "': invalid rate/channels");
  sndfile_ptr f(sf_open(path.c_str(), SFM_WRITE, &sfi));
  if (!f) throw audio_error("save_audio '" + path + "': " + sf_reason(nullptr));
  sf_command(f.get(), SFC_SET_CLIPPING, nullptr, SF_TRUE);
  if (sf_writef_float(f.get(), interleaved, sf_count_t(frames)) != sf_count_t(frames))
    throw audio_error("save_audio '" + path + "': write failed: " + sf_reason(f.get()));
}

// ---------------------------------------------------------------------------

struct stream_resampler::src_state {
  SRC_STATE* s = nullptr;
  ~src_state() {
    if (s) src_delete(s);
  }
};

stream_resampler::stream_resampler(int from_rate, int channels, int to_rate,
                                   nonfinite_policy nonfinite)
    : from_rate_(from_rate), channels_(channels), to_rate_(to_rate), nonfinite_(nonfinite) {
  check_rates(from_rate, to_rate, "stream_resampler");
  if (channels <= 0) throw audio_error("stream_resampler: channels must be positive");
  reset();
}

stream_resampler::~stream_resampler() = default;
stream_resampler::stream_resampler(stream_resampler&&) noexcept = default;
stream_resampler& stream_resampler::operator=(stream_resampler&&) noexcept = default;

void stream_resampler::reset() {
  src_.reset();
  if (from_rate_ != to_rate_) {
    int err = 0;
    auto st = std::make_unique<src_state>();
    st->s = src_new(SRC_SINC_BEST_QUALITY, 1, &err);
    if (!st->s)
      throw audio_error(std::string("stream_resampler: libsamplerate failed: ") + src_strerror(err));
    src_ = std::move(st);
  }
  frames_in_ = samples_out_ = nonfinite_replaced_ = 0;
  finished_ = false;
}

void stream_resampler::accept(const float* interleaved, size_t frames, std::vector<float>& out) {
  if (finished_) throw audio_error("stream_resampler: accept() after finish(); call reset() first");
  const size_t ch = size_t(channels_);
  // Validate first so that an error leaves the state untouched.
  int64_t bad = 0;
  for (size_t i = 0; i < frames * ch; ++i) {
    if (!std::isfinite(interleaved[i])) {
      if (nonfinite_ == nonfinite_policy::error)
        throw audio_error("stream_resampler: non-finite sample at frame " +
                          std::to_string(frames_in_ + int64_t(i / ch)) + ", channel " +
                          std::to_string(i % ch) + " (counting from the stream start)");
      ++bad;
    }
  }
  if (bad) {
    std::vector<float> clean(interleaved, interleaved + frames * ch);
    for (auto& x : clean)
      if (!std::isfinite(x)) x = 0.0f;
    nonfinite_replaced_ += bad;
    mono_ = downmix(clean.data(), frames, channels_);
  } else {
    mono_ = downmix(interleaved, frames, channels_);
  }
  frames_in_ += int64_t(frames);
  process(mono_.data(), mono_.size(), false, out);
}

void stream_resampler::accept_s16(const int16_t* interleaved, size_t frames,
                                  std::vector<float>& out) {
  std::vector<float> f(frames * size_t(channels_));
  for (size_t i = 0; i < f.size(); ++i) f[i] = float(interleaved[i]) * (1.0f / 32768.0f);
  accept(f.data(), frames, out);
}

void stream_resampler::finish(std::vector<float>& out) {
  if (finished_) return;
  process(nullptr, 0, true, out);
  finished_ = true;
}

void stream_resampler::process(const float* mono, size_t n, bool end, std::vector<float>& out) {
  if (!src_) {  // equal rates: pass through
    out.insert(out.end(), mono, mono + n);
    samples_out_ += int64_t(n);
    return;
  }
  const double ratio = double(to_rate_) / from_rate_;
  float buf[4096];
  // libsamplerate ignores end_of_input when data_in is null: give it a valid pointer.
  static const float k_none = 0.0f;
  size_t used = 0;
  for (;;) {
    SRC_DATA d{};
    d.data_in = n ? mono + used : &k_none;
    d.input_frames = long(n - used);
    d.data_out = buf;
    d.output_frames = long(sizeof(buf) / sizeof(buf[0]));
    d.src_ratio = ratio;
    d.end_of_input = end ? 1 : 0;
    if (int err = src_process(src_->s, &d))
      throw audio_error(std::string("stream_resampler: libsamplerate failed: ") + src_strerror(err));
    used += size_t(d.input_frames_used);
    out.insert(out.end(), buf, buf + d.output_frames_gen);
    samples_out_ += d.output_frames_gen;
    // Done when all input is consumed and the converter has nothing more to give.
    if (used >= n && d.output_frames_gen == 0) break;
    if (used >= n && !end && d.output_frames_gen < d.output_frames) break;
  }
}

}  // namespace undertone::models
