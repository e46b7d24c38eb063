// bench/encoder: speed of the streaming speech encoder (models/speech_encoder.hpp:
// log-mel -> block-causal Whisper tiny.en encoder with KV cache -> projector) on
// real speech, for several concurrent streams, chunk sizes and dtypes.
//
// Audio: RAVDESS clips concatenated to --seconds (30) per stream; stream i starts
// at another clip so the streams differ.
//
// Modes (one JSON object per configuration and line on stdout):
//  throughput: all audio is there; each step feeds every stream one chunk and
//    calls decode_streams() once for all of them (one batched encoder call).
//    rtf_per_stream = compute time / audio seconds of one stream (< 1: the N
//    streams could be served in real time); rtf_aggregate = compute time / audio
//    seconds of all streams; chunk latency = time of one batched call (every
//    stream's chunk waits for the whole batch); first_5s / last_5s = mean call
//    time over the first/last 5 s of audio (attention cost grows with the cache).
//  realtime: audio arrives in --packet-ms packets at wall-clock pace (stream i
//    starts i * chunk_ms / N later unless --aligned, so chunks fall due evenly);
//    one loop delivers due packets and calls decode_streams() on all ready
//    streams (greedy continuous batching, no max_wait). Chunk latency = time from
//    the moment a chunk was due (its audio plus one 10 ms mel frame complete,
//    see the facade's hold-back) to its tokens. "Sustained" = the encoder keeps
//    up: the run finished without the backlog passing --max-lag-s, and the p95
//    latency of the chunks in the last quarter is <= chunk_ms (a growing queue
//    shows as latency growing without bound). busy = compute time / wall time.
//  profile (--profile): where a chunk's time goes: one batched whisper_encoder
//    forward_chunk call with the real weights (N streams, chunk_ms, cache context
//    E frames of real speech), its phases timed inside the call (conv stem,
//    LayerNorms, q/k/v + output projections, attention over [cache | block] with
//    the cache writes, MLP, other); the projector and the mel features of the
//    same amount of audio; and a what-if: the attention done the previous way
//    (per stream and layer with LibTorch ops), for comparison in the same run.
//
// Threads: --threads (default 2) LibTorch intra-op threads. Run with
// OMP_WAIT_POLICY=PASSIVE (bench/run_encoder.sh sets it): LibTorch's OpenMP
// workers otherwise spin-wait, and on a shared 2-core machine a 2-thread run
// becomes up to 30x slower when another process needs the cores.
#include <sys/resource.h>

#include <algorithm>
#include <cstdio>
#include <chrono>
#include <cmath>
#include <deque>
#include <filesystem>
#include <iostream>
#include <map>
#include <random>
#include <thread>

#include <ATen/ATen.h>
#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "models/audio.hpp"
#include "models/mel.hpp"
#include "models/nn/projector.hpp"
#include "models/nn/whisper_encoder.hpp"
#include "models/runtime.hpp"
#include "models/speech_encoder.hpp"

using namespace undertone::models;
using clk = std::chrono::steady_clock;
namespace fs = std::filesystem;

namespace {

double ms_since(clk::time_point a) { return std::chrono::duration<double, std::milli>(clk::now() - a).count(); }
double percentile(std::vector<double> v, double p) {
  if (v.empty()) return 0.0;
  std::sort(v.begin(), v.end());
  return v[std::min(v.size() - 1, size_t(p / 100.0 * double(v.size() - 1) + 0.5))];
}
double mean(const std::vector<double>& v) {
  double s = 0;
  for (double x : v) s += x;
  return v.empty() ? 0.0 : s / double(v.size());
}
double r3(double x) { return std::round(x * 1000.0) / 1000.0; }
double r4(double x) { return std::round(x * 10000.0) / 10000.0; }
double peak_rss_mb() {
  rusage ru{};
  getrusage(RUSAGE_SELF, &ru);
  return double(ru.ru_maxrss) / 1024.0;
}
double cpu_seconds() {
  rusage ru{};
  getrusage(RUSAGE_SELF, &ru);
  return double(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) + 1e-6 * double(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec);
}
// 1-minute load average (includes this benchmark's own running threads).
double load1() {
  FILE* f = std::fopen("/proc/loadavg", "r");
  double l = -1;
  if (f) {
    if (std::fscanf(f, "%lf", &l) != 1) l = -1;
    std::fclose(f);
  }
  return l;
}
std::string default_model() {
  const char* h = std::getenv("UNDERTONE_HOME");
  std::string home = h && *h ? h : std::string(std::getenv("HOME")) + "/.cache/undertone";
  return home + "/models/whisper-tiny.en";
}

// Distinct RAVDESS clips, loaded once; stream i = clips i*5, i*5+1, ... until `seconds`.
struct speech_corpus {
  std::vector<std::vector<float>> clips;
  speech_corpus(const std::string& dir, size_t max_clips) {
    std::vector<std::string> files;
    for (const auto& e : fs::directory_iterator(dir))
      if (e.path().extension() == ".flac") files.push_back(e.path().string());
    std::sort(files.begin(), files.end());
    if (files.empty()) throw std::runtime_error("no .flac clips in " + dir + " (set --ravdess)");
    // Spread over actors and emotions.
    for (size_t i = 0; i < files.size() && clips.size() < max_clips; i += std::max<size_t>(1, files.size() / max_clips))
      clips.push_back(load_audio(files[i]).samples);
  }
  std::vector<float> stream_audio(size_t i, double seconds) const {
    std::vector<float> x;
    const size_t n = size_t(seconds * 16000);
    for (size_t c = i * 5; x.size() < n; ++c) {
      const auto& a = clips[c % clips.size()];
      x.insert(x.end(), a.begin(), a.end());
    }
    x.resize(n);
    return x;
  }
};

speech_encoder_options make_opts(const std::string& model, const std::string& dtype, int64_t chunk_ms,
                                 int64_t window_blocks) {
  speech_encoder_options o;
  o.window_blocks = window_blocks;
  o.model = model;
  o.dtype = dtype;
  o.chunk_ms = chunk_ms;
  return o;
}

nlohmann::json run_throughput(const speech_encoder& enc, const std::vector<std::vector<float>>& audio) {
  const size_t n = audio.size(), piece = size_t(enc.chunk_samples());
  std::vector<std::unique_ptr<speech_stream>> ss;
  std::vector<speech_stream*> ptrs;
  for (size_t i = 0; i < n; ++i) {
    ss.push_back(enc.create_stream());
    ptrs.push_back(ss.back().get());
  }
  std::vector<double> calls, first, last;
  std::vector<float> sink;
  double total = 0, mel = 0;
  const size_t len = audio[0].size();
  const double audio_s = double(len) / 16000;
  for (size_t off = 0; off < len; off += piece) {
    auto t0 = clk::now();
    for (size_t i = 0; i < n; ++i) enc.accept_waveform(*ss[i], audio[i].data() + off, std::min(piece, len - off));
    const double m = ms_since(t0);
    mel += m;
    total += m;
    while (true) {
      auto t1 = clk::now();
      if (enc.decode_streams(ptrs) == 0) break;
      const double c = ms_since(t1);
      calls.push_back(c);
      total += c;
      const double at_s = double(off) / 16000;
      if (at_s < 5) first.push_back(c);
      if (at_s >= audio_s - 5) last.push_back(c);
    }
    auto t2 = clk::now();
    for (auto* s : ptrs) {
      sink.clear();
      enc.pop_tokens(*s, sink);
    }
    total += ms_since(t2);
  }
  auto t3 = clk::now();
  for (auto* s : ptrs) enc.input_finished(*s);
  while (enc.decode_streams(ptrs) > 0) {
  }
  total += ms_since(t3);
  int64_t tokens = 0;
  for (auto* s : ptrs) tokens += s->tokens_out();
  return {{"mode", "throughput"},
          {"audio_s_per_stream", r3(audio_s)},
          {"tokens_per_stream", tokens / int64_t(n)},
          {"rtf_per_stream", r4(total / 1000.0 / audio_s)},
          {"rtf_aggregate", r4(total / 1000.0 / audio_s / double(n))},
          {"chunk_latency_ms_p50", r3(percentile(calls, 50))},
          {"chunk_latency_ms_p95", r3(percentile(calls, 95))},
          {"call_ms_first_5s", r3(mean(first))},
          {"call_ms_last_5s", r3(mean(last))},
          {"mel_share", r3(mel / total)}};
}

nlohmann::json run_realtime(const speech_encoder& enc, const std::vector<std::vector<float>>& audio, int64_t packet_ms,
                            bool aligned, double max_lag_s) {
  const size_t n = audio.size();
  const int64_t chunk_ms = enc.options().chunk_ms, f = enc.chunk_frames();
  const size_t packet = size_t(packet_ms * 16);
  const size_t len = audio[0].size();
  const size_t packets = (len + packet - 1) / packet;
  struct st {
    std::unique_ptr<speech_stream> s;
    double start_ms;
    size_t next_packet = 0;
    int64_t chunks_due = 0;
    std::deque<double> due;  // due time (ms since t0) of each ready chunk not yet encoded
  };
  std::vector<st> ss(n);
  for (size_t i = 0; i < n; ++i) {
    ss[i].s = enc.create_stream();
    ss[i].start_ms = aligned ? 0.0 : double(chunk_ms) * double(i) / double(n);
  }
  std::vector<double> lat, lat_last_quarter;
  std::vector<size_t> batch_sizes;
  std::vector<float> sink;
  double busy = 0, worst_lag = 0;
  bool aborted = false;
  const double end_ms = double(packets * size_t(packet_ms)) + double(chunk_ms);
  const auto t0 = clk::now();
  auto now_ms = [&] { return ms_since(t0); };
  for (bool more = true; more && !aborted;) {
    const double now = now_ms();
    more = false;
    double next_due = 1e300;
    auto w0 = clk::now();
    for (auto& x : ss) {
      while (x.next_packet < packets) {
        const double due = x.start_ms + double((x.next_packet + 1) * size_t(packet_ms));
        if (due > now) {
          next_due = std::min(next_due, due);
          break;
        }
        const size_t off = x.next_packet * packet;
        enc.accept_waveform(*x.s, audio[&x - ss.data()].data() + off, std::min(packet, len - off));
        ++x.next_packet;
        // Chunks with one more mel frame after them are ready (the facade's rule).
        const int64_t ready_total = std::max<int64_t>(0, (x.s->mel_frames() - 1) / f);
        for (; x.chunks_due < ready_total; ++x.chunks_due) x.due.push_back(due);
        if (x.next_packet == packets) {  // end of input: the rest is due now (ceil(T / F) chunks in all)
          enc.input_finished(*x.s);
          for (; x.chunks_due < (x.s->mel_frames() + f - 1) / f; ++x.chunks_due) x.due.push_back(due);
        }
      }
      if (x.next_packet < packets || !x.due.empty()) more = true;
    }
    std::vector<speech_stream*> ready;
    std::vector<st*> which;
    for (auto& x : ss)
      if (enc.is_ready(*x.s)) {
        ready.push_back(x.s.get());
        which.push_back(&x);
      }
    if (!ready.empty()) {
      enc.decode_streams(ready);
      const double done = now_ms();
      batch_sizes.push_back(ready.size());
      for (auto* x : which) {
        if (x->due.empty()) continue;  // tail chunk of a finished stream already counted
        const double l = done - x->due.front();
        x->due.pop_front();
        lat.push_back(l);
        if (done > 0.75 * end_ms) lat_last_quarter.push_back(l);
        sink.clear();
        enc.pop_tokens(*x->s, sink);
      }
    }
    busy += ms_since(w0);
    double lag = 0;
    for (auto& x : ss)
      if (!x.due.empty()) lag = std::max(lag, now_ms() - x.due.front());
    worst_lag = std::max(worst_lag, lag);
    if (lag > max_lag_s * 1000) aborted = true;
    if (ready.empty() && more && next_due < 1e300) {
      const double wait = next_due - now_ms();
      if (wait > 0) std::this_thread::sleep_for(std::chrono::duration<double, std::milli>(wait));
    }
  }
  const double wall = now_ms();
  const bool sustained = !aborted && percentile(lat_last_quarter, 95) <= double(chunk_ms);
  std::vector<double> bs(batch_sizes.begin(), batch_sizes.end());
  return {{"mode", "realtime"},
          {"packet_ms", packet_ms},
          {"aligned", aligned},
          {"sustained", sustained},
          {"aborted_at_s", aborted ? r3(wall / 1000) : 0.0},
          {"chunk_latency_ms_p50", r3(percentile(lat, 50))},
          {"chunk_latency_ms_p95", r3(percentile(lat, 95))},
          {"chunk_latency_ms_max", r3(lat.empty() ? 0.0 : *std::max_element(lat.begin(), lat.end()))},
          {"last_quarter_p95_ms", r3(percentile(lat_last_quarter, 95))},
          {"worst_lag_ms", r3(worst_lag)},
          {"busy", r3(busy / wall)},
          {"mean_batch", r3(mean(bs))}};
}

// Times `fn` (median of `reps` after one warm-up), ms.
template <class F>
double time_ms(F&& fn, int reps = 7) {
  fn();
  std::vector<double> v;
  for (int r = 0; r < reps; ++r) {
    auto t = clk::now();
    fn();
    v.push_back(ms_since(t));
  }
  return percentile(v, 50);
}

nlohmann::json run_profile(const std::string& model, const std::string& dtype, int64_t chunk_ms, int64_t n,
                           int64_t context, int64_t window_blocks, const speech_corpus& corpus) {
  torch::NoGradGuard ng;
  whisper_encoder_options eo;
  eo.dtype = dtype == "bf16" ? torch::kBFloat16 : torch::kFloat32;
  eo.chunk_ms = chunk_ms;
  if (window_blocks > 0) eo.context_blocks = window_blocks;
  auto enc = whisper_encoder::load(model, eo);
  projector proj(projector_config{}, torch::kCPU, eo.dtype, 0);
  const auto& hp = enc->hparams();
  const int64_t f = enc->chunk_frames(), b = f / 2, d = hp.d_model, nh = hp.n_heads, hd = d / nh;
  const auto to = torch::TensorOptions().dtype(eo.dtype);
  // The measured call: N states advanced to `context` frames of real speech, then one chunk.
  std::vector<whisper_encoder_state> states;
  std::vector<torch::Tensor> feats;
  for (int64_t i = 0; i < n; ++i) {
    auto x = corpus.stream_audio(size_t(i), double(context + 2 * b) / 50.0 + 1.0);
    auto mel = log_mel_spectrogram(x);
    feats.push_back(torch::from_blob(mel.data(), {int64_t(mel.size()) / 80, 80}, at::kFloat).clone());
    states.push_back(enc->init_state());
  }
  std::vector<whisper_encoder_state*> sp;
  for (auto& s : states) sp.push_back(&s);
  int64_t off = 0;
  while (states[0].frames_out() + b <= context) {
    std::vector<torch::Tensor> c;
    for (auto& ft : feats) c.push_back(ft.narrow(0, off, f));
    enc->forward_chunk(at::stack(c), sp);
    off += f;
  }
  std::vector<torch::Tensor> c;
  for (auto& ft : feats) c.push_back(ft.narrow(0, off, f));
  auto chunk = at::stack(c);
  // The real call, on copies of the states (a call advances them; the copies
  // share the cache tensors, into which every repetition writes the same block),
  // with its phases timed inside forward_chunk (means over the repetitions).
  whisper_chunk_timings tm;
  bool warm = false;  // time_ms's first call is a warm-up: not in the phase means
  const double real = time_ms([&] {
    auto copy = states;
    std::vector<whisper_encoder_state*> cp;
    for (auto& s : copy) cp.push_back(&s);
    enc->forward_chunk(chunk, cp, false, warm ? &tm : nullptr);
    warm = true;
  });
  const double k = 1.0 / double(std::max<int64_t>(1, tm.calls));
  const int64_t e = states[0].cached_frames();
  // What-if: the attention as the previous implementation did it, per stream and
  // layer with LibTorch ops ([cache | block] scores, concatenation, fp32 softmax,
  // two matmuls), on random tensors of the call's shapes.
  double attn_libtorch = 0;
  for (int64_t l = 0; l < hp.n_layers; ++l) {
    auto q = at::randn({nh, b, hd}, to), kc = at::randn({nh, std::max<int64_t>(e, 1), hd}, to),
         kb = at::randn({nh, b, hd}, to);
    attn_libtorch += time_ms([&] {
      for (int64_t i = 0; i < n; ++i) {
        auto sc = at::matmul(q, kb.transpose(-2, -1));
        auto sp2 = at::matmul(q, kc.transpose(-2, -1));
        auto pr = at::softmax(at::cat({sp2, sc}, -1).to(at::kFloat), -1).to(eo.dtype);
        at::matmul(pr.narrow(-1, 0, kc.size(1)), kc);
        at::matmul(pr.narrow(-1, kc.size(1), b), kb);
      }
    });
  }
  auto groups = at::randn({n * b / 8, 8 * d}, to);
  const double projector_ms = time_ms([&] { proj.forward_stacked(groups); });
  std::vector<float> audio = corpus.stream_audio(0, double(chunk_ms) / 1000.0 * double(n));
  const double mel_ms = time_ms([&] { log_mel_spectrogram(audio); });
  return {{"mode", "profile"},
          {"context_frames", e},
          {"fused_attention", enc->fused_attention()},
          {"forward_chunk_ms", r3(real)},
          {"forward_chunk_mean_ms", r3(tm.total * k)},
          {"conv_stem_ms", r3(tm.stem * k)},
          {"layernorm_ms", r3(tm.layer_norm * k)},
          {"qkv_out_proj_ms", r3((tm.qkv_proj + tm.out_proj) * k)},
          {"attention_ms", r3(tm.attention * k)},
          {"mlp_ms", r3(tm.mlp * k)},
          {"other_ms", r3(tm.other() * k)},
          {"attention_libtorch_ms", r3(attn_libtorch)},
          {"projector_ms", r3(projector_ms)},
          {"mel_ms", r3(mel_ms)}};
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"undertone streaming speech-encoder benchmark (bench/run_encoder.sh runs the full grid)"};
  std::string model = default_model(), ravdess = "/work/shared/data/ravdess-train";
  std::vector<std::string> dtypes{"fp32", "bf16"}, modes{"throughput", "realtime"};
  std::vector<int64_t> streams{1, 8, 32}, chunks{160, 320, 640}, contexts{0, 736, 1472};
  int threads = 2;
  double seconds = 30, max_lag_s = 5;
  int64_t packet_ms = 20, window_blocks = 0;
  bool aligned = false, profile = false;
  app.add_option("--model", model, "Whisper CTranslate2 or HF path")->capture_default_str();
  app.add_option("--ravdess", ravdess, "folder of RAVDESS .flac clips")->capture_default_str();
  app.add_option("--dtype", dtypes, "fp32 bf16")->capture_default_str();
  app.add_option("--mode", modes, "throughput realtime")->capture_default_str();
  app.add_option("--streams", streams, "concurrent streams")->capture_default_str();
  app.add_option("--chunk-ms", chunks, "chunk sizes, ms")->capture_default_str();
  app.add_option("--threads", threads, "LibTorch intra-op threads")->capture_default_str();
  app.add_option("--seconds", seconds, "audio per stream, s")->capture_default_str();
  app.add_option("--packet-ms", packet_ms, "realtime: audio packet, ms (multiple of 10)")->capture_default_str();
  app.add_option("--max-lag-s", max_lag_s, "realtime: stop a configuration once its backlog exceeds this")
      ->capture_default_str();
  app.add_option("--window-blocks", window_blocks, "cached blocks attended to; 0 = as many as fit in 30 s")
      ->capture_default_str();
  app.add_flag("--aligned", aligned, "realtime: all streams start together (chunks fall due at once)");
  app.add_flag("--profile", profile, "time the components of one batched call instead");
  app.add_option("--context", contexts, "profile: cache context, encoder frames")->capture_default_str();
  CLI11_PARSE(app, argc, argv);

  set_compute_threads(threads);
  speech_corpus corpus(ravdess, 64);
  std::cerr << "bench/encoder: " << corpus.clips.size() << " clips, " << threads << " threads, OMP_WAIT_POLICY="
            << (std::getenv("OMP_WAIT_POLICY") ? std::getenv("OMP_WAIT_POLICY") : "(unset)") << "\n";
  for (const auto& dt : dtypes) {
    for (int64_t chunk : chunks) {
      for (int64_t n : streams) {
        nlohmann::json base{{"dtype", dt}, {"chunk_ms", chunk}, {"streams", n}, {"threads", threads},
                            {"window_blocks", window_blocks}};
        if (profile) {
          for (int64_t ctx : contexts) {
            auto j = run_profile(model, dt, chunk, n, ctx, window_blocks, corpus);
            j.update(base);
            std::cout << j.dump() << std::endl;
          }
          continue;
        }
        speech_encoder enc(make_opts(model, dt, chunk, window_blocks));
        std::vector<std::vector<float>> audio;
        for (int64_t i = 0; i < n; ++i) audio.push_back(corpus.stream_audio(size_t(i), seconds));
        for (const auto& m : modes) {
          const double l0 = load1(), c0 = cpu_seconds();
          const auto w0 = clk::now();
          nlohmann::json j = m == "throughput" ? run_throughput(enc, audio)
                                               : run_realtime(enc, audio, packet_ms, aligned, max_lag_s);
          j.update(base);
          // Cores this process got (user + system CPU / wall): ~threads when it ran
          // alone in throughput mode; less means other processes took the cores.
          j["cpu_cores_used"] = r3((cpu_seconds() - c0) / (ms_since(w0) / 1000.0));
          j["load1_start"] = l0;
          j["load1_end"] = load1();
          j["peak_rss_mb"] = r3(peak_rss_mb());
          std::cout << j.dump() << std::endl;
        }
      }
    }
  }
  return 0;
}
