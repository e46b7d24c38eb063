// The "speech tokens" pipeline behind a torch-free header (pimpl), so actors and
// apps can use it without LibTorch headers:
//
//   16 kHz float samples -> mel_stream (incremental Whisper log-mel, causal or
//   offline normalization) -> whisper_encoder (block-causal chunks of chunk_ms,
//   per-layer KV cache) -> projector (stack k encoder frames, SwiGLU) -> speech
//   tokens [n, d_llm] (rows of the LLM's input-embedding space, 6.25/s at the
//   defaults: 100 mel frames/s -> 50 encoder frames/s -> / stack 8).
//
// Weights vs state (sherpa-onnx style): speech_encoder holds the shared,
// immutable weights; each session has its own speech_stream (mel state, encoder
// conv history + KV cache, projector leftovers, tokens not yet popped):
//
//   auto s = enc.create_stream();
//   enc.accept_waveform(*s, samples, n);      // any piece size
//   while (enc.is_ready(*s)) enc.decode_streams({s.get()});
//   enc.pop_tokens(*s, rows);                 // [n, d_llm] row-major floats
//   enc.input_finished(*s);                   // end of input: flush the tail
//   while (enc.is_ready(*s)) enc.decode_streams({s.get()});
//   enc.pop_tokens(*s, rows);                 // the last tokens
//
// Chunking and equality with offline encoding. A stream is "ready" when it holds
// a whole chunk of F = chunk_ms/10 mel frames not yet encoded AND at least one
// mel frame after it, or after input_finished() until its final chunk (1..F
// frames) has been encoded. decode_streams() encodes ONE chunk per ready stream
// (call it again while is_ready()). The encoder's attention blocks are the
// chunks as they were encoded, so holding back a full chunk until the input is
// known to continue makes the blocks those of the offline reference for every
// length: the tokens of a stream equal the whole-file pipeline
// (log_mel_spectrogram, whisper_encoder::forward_block_causal,
// projector::forward(pad_last = true)) within fp rounding, however the audio
// was cut into pieces and whenever decode_streams() ran. Without the hold-back,
// an utterance whose mel frame count is a multiple of F would end with a
// one-frame block, and its last tokens would differ from the offline ones
// (measured on a RAVDESS clip: relative L2 0.23 on the last 3 tokens).
// Cost: 10 ms. Mel frame t needs samples up to 160 t + 200 (the 25 ms window
// is centred), so chunk c is ready once 160 (c+1) F + 200 samples have
// arrived, 12.5 ms after its end.
// (Audio delivered in pieces of exactly chunk_ms therefore makes each chunk
// ready with the next piece; deliver smaller pieces, e.g. 10-20 ms, for low
// latency.)
//
// Edge cases (documented behaviour):
//  - empty input, or fewer than 160 samples (0 mel frames), then input_finished():
//    the stream finishes at once with 0 tokens (is_ready() false, is_finished() true).
//  - input_finished() on a fresh stream: the same (0 tokens).
//  - silent input (all zeros): encoded like any audio (6.25 tokens/s of the
//    encoder's "silence" embedding); voice activity is the session's job.
//  - NaN/Inf samples: std::invalid_argument naming the absolute sample index, the
//    stream unchanged (sanitise with models/audio.hpp first).
//  - accept_waveform() after input_finished(): std::logic_error.
//  - offline normalization: no frame can be encoded before input_finished()
//    (Whisper's per-utterance max), so tokens only come at the end.
//  - audio past Whisper's 30 s: the encoder's sliding window of cached blocks
//    (window_blocks) and recycled positions; any length streams.
//
// Threads: the weights are read-only. One caller at a time per stream;
// decode_streams() calls on disjoint sets of streams may run concurrently.
// The number of compute threads is the process's (models/runtime.hpp).
//
// Hot swap (issue 7, docs/hot-swap.md). The weights live in immutable
// "weights generations": replace_weights() loads and validates new weights
// (projector, optionally trained top encoder layers) into a new generation and
// makes it the one create_stream() uses from then on. Each stream holds a
// shared pointer to the generation it was created with, so a stream in flight
// keeps its weights until it is destroyed (a turn never mixes versions), and
// an old generation is freed with its last stream. decode_streams() batches
// only streams of the same generation together. A failed replace_weights()
// (missing file, bad header, wrong shape, non-finite weights) throws naming the
// file and leaves the current generation in place.
// replace_weights() may run concurrently with every other member (a mutex
// guards the current generation; it takes seconds only while loading, and
// holds the mutex just to publish the result); two replace_weights() calls
// at once are serialized.
#pragma once

#include <cstddef>
#include <cstdint>
#include <limits>
#include <memory>
#include <string>
#include <vector>

namespace undertone::models {

/// Everything that defines a speech_encoder; the encoder.* config keys plus the
/// untrained-projector shape. Paths are already resolved by the caller
/// (models/model_store.hpp resolve_model_path).
struct speech_encoder_options {
  std::string model;       ///< CTranslate2 Whisper directory or HF Whisper directory / .safetensors
  /// Projector checkpoint (safetensors from projector::save); "" = a randomly
  /// initialized (untrained) projector from projector_seed, d_llm, projector_hidden.
  std::string projector;
  int64_t d_llm = 576;             ///< LLM hidden size; a loaded projector must match (0 = take the file's)
  int64_t projector_hidden = 1024; ///< untrained projector only: SwiGLU hidden width
  uint64_t projector_seed = 0;     ///< untrained projector only
  std::string device = "cpu";      ///< cpu, cuda or cuda:N
  std::string dtype = "fp32";      ///< fp32, bf16, fp16 (CUDA) or fp64 (verification)
  int64_t chunk_ms = 320;          ///< block-causal chunk, ms of audio; multiple of 20, >= 40
  int64_t stack_frames = 8;        ///< encoder frames (20 ms) per speech token; a loaded projector must match
  int64_t window_blocks = 0;       ///< cached blocks attended to; 0 = as many as fit in 30 s
  std::string normalization = "causal";  ///< log-mel clamp: causal | offline | none
  int64_t max_batch = 0;           ///< streams per encoder call in decode_streams(); 0 = unlimited
  /// Name of the initial weights generation (recorded with everything it
  /// encodes); "" = "<projector file name>" or "untrained-seed-<seed>".
  std::string version;
  /// Throws std::invalid_argument naming the bad field.
  void validate() const;
  std::string to_string() const;
};

/// One session's state. Opaque; made by speech_encoder::create_stream() and only
/// usable with the encoder that made it.
class speech_stream {
 public:
  ~speech_stream();
  speech_stream(const speech_stream&) = delete;
  speech_stream& operator=(const speech_stream&) = delete;

  int64_t samples_accepted() const;  ///< 16 kHz samples received so far
  int64_t mel_frames() const;        ///< mel frames computed so far (100/s)
  int64_t chunks_encoded() const;    ///< encoder calls that included this stream
  int64_t encoder_frames() const;    ///< encoder frames emitted so far (50/s)
  int64_t tokens_out() const;        ///< speech tokens produced so far (popped or not)
  int64_t tokens_ready() const;      ///< speech tokens waiting for pop_tokens()
  bool input_is_finished() const;    ///< input_finished() was called
  /// All input encoded and the projector flushed: no more tokens will come.
  bool is_finished() const;
  /// Version of the weights generation this stream encodes with (fixed at
  /// create_stream(); see "Hot swap" above).
  const std::string& version() const;

 private:
  friend class speech_encoder;
  struct impl;
  explicit speech_stream(std::unique_ptr<impl> d);
  std::unique_ptr<impl> d_;
};

/// Shared weights: Whisper encoder + projector, and the streaming machinery.
class speech_encoder {
 public:
  /// Loads the encoder (and the projector, or makes an untrained one). Throws
  /// std::invalid_argument for bad options, std::runtime_error (naming the file)
  /// for a missing/invalid checkpoint or a projector whose shape does not fit
  /// (d_in != encoder width, stack != stack_frames, d_out != d_llm).
  explicit speech_encoder(const speech_encoder_options& opt);
  ~speech_encoder();
  speech_encoder(const speech_encoder&) = delete;
  speech_encoder& operator=(const speech_encoder&) = delete;

  /// A fresh session state (position 0, empty caches) on the current weights
  /// generation.
  std::unique_ptr<speech_stream> create_stream() const;

  /// Loads `projector_path` (projector::save format) and, if not "",
  /// `encoder_layers_path` (encoder_layers.safetensors of the alignment
  /// trainer: named Whisper parameters replacing those of the base encoder;
  /// "" = the base encoder of encoder.model) into a new weights generation
  /// named `version`, and makes it current: streams created from now on use it,
  /// existing streams keep theirs. The projector must fit the encoder and LLM
  /// (d_in, stack, d_out = d_llm(); d_hidden may differ) and every weight must
  /// be finite. Throws std::runtime_error naming the file and what is wrong;
  /// the current generation is then unchanged. Thread rules: see the header.
  void replace_weights(const std::string& projector_path, const std::string& encoder_layers_path,
                       const std::string& version);
  void replace_weights(const std::string& projector_path, const std::string& version) {
    replace_weights(projector_path, "", version);
  }
  /// Version of the current weights generation (the one new streams get).
  std::string version() const;
  /// Number of generations made so far (1 + successful replace_weights()).
  int64_t generation() const;

  /// Appends 16 kHz mono samples (any count, including 0) to `s`.
  void accept_waveform(speech_stream& s, const float* samples, size_t n) const;
  void accept_waveform(speech_stream& s, const std::vector<float>& samples) const {
    accept_waveform(s, samples.data(), samples.size());
  }
  /// End of input: the remaining audio becomes the final (shorter) chunk, encoded
  /// by the next decode_streams(). Idempotent.
  void input_finished(speech_stream& s) const;

  /// True if decode_streams() would encode a chunk of `s`.
  bool is_ready(const speech_stream& s) const;

  /// Encodes the next chunk of every ready stream in `streams` (non-ready ones are
  /// skipped): all full chunks in ONE batched encoder call (split into calls of at
  /// most max_batch streams if set) and one projector call; final chunks of
  /// finished streams are batched by their length. Returns the number of chunks
  /// encoded. Throws std::invalid_argument for a null or repeated stream or one
  /// made by another encoder.
  size_t decode_streams(const std::vector<speech_stream*>& streams) const;

  /// Appends up to `max_tokens` ready tokens of `s` to `out` as [n, d_llm] floats,
  /// row-major; returns n.
  size_t pop_tokens(speech_stream& s, std::vector<float>& out,
                    size_t max_tokens = std::numeric_limits<size_t>::max()) const;
  /// All ready tokens of `s`, [n, d_llm] row-major.
  std::vector<float> pop_tokens(speech_stream& s) const;

  /// Width of a speech token (the LLM's hidden size).
  int64_t d_llm() const;
  /// Mel frames (10 ms) per chunk = chunk_ms / 10.
  int64_t chunk_frames() const;
  /// 16 kHz samples per chunk = chunk_ms * 16.
  int64_t chunk_samples() const;
  /// Speech tokens per second of audio: 50 / stack_frames.
  double tokens_per_second() const;
  const speech_encoder_options& options() const;
  /// One line: model, sizes, device, dtype, chunking, projector.
  std::string describe() const;

 private:
  struct impl;
  std::unique_ptr<impl> d_;
};

/// Rewrites a projector checkpoint (projector::save format) in another dtype:
/// fp32, bf16 or fp16; config metadata kept, written atomically. Used to ship
/// the default projector in bf16 (half the bytes; loading converts back).
/// Throws std::runtime_error naming the file.
void convert_projector(const std::string& in, const std::string& out, const std::string& dtype);

}  // namespace undertone::models
