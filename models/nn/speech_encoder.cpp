// The torch side of models/speech_encoder.hpp.
#include "models/speech_encoder.hpp"

#include <ATen/ATen.h>
#include <torch/csrc/autograd/generated/variable_factories.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <map>
#include <mutex>
#include <set>
#include <sstream>
#include <stdexcept>

#include "models/mel.hpp"
#include "models/safetensors.hpp"
#include "models/nn/projector.hpp"
#include "models/nn/whisper_encoder.hpp"

namespace undertone::models {
namespace {

torch::Dtype parse_dtype(const std::string& s) {
  if (s == "fp32" || s == "float32") return torch::kFloat32;
  if (s == "bf16" || s == "bfloat16") return torch::kBFloat16;
  if (s == "fp16" || s == "float16") return torch::kFloat16;
  if (s == "fp64" || s == "float64") return torch::kFloat64;
  throw std::invalid_argument("speech_encoder: dtype \"" + s + "\" is not fp32, bf16, fp16 or fp64");
}

torch::Device parse_device(const std::string& s) {
  try {
    return torch::Device(s);
  } catch (const std::exception&) {
    throw std::invalid_argument("speech_encoder: device \"" + s + "\" is not cpu, cuda or cuda:N");
  }
}

// Appends a [rows, cols] tensor (any float dtype/device) to `out` as float32.
void append_rows(const torch::Tensor& t, std::vector<float>& out) {
  if (!t.defined() || t.numel() == 0) return;
  auto c = t.to(torch::kCPU).to(at::kFloat).contiguous();
  const float* p = c.data_ptr<float>();
  out.insert(out.end(), p, p + c.numel());
}

}  // namespace

void speech_encoder_options::validate() const {
  auto bad = [](const std::string& what) { throw std::invalid_argument("speech_encoder_options: " + what); };
  if (model.empty()) bad("model is empty (a CTranslate2 or HF Whisper path, resolved by the caller)");
  if (chunk_ms < 40 || chunk_ms % 20 != 0)
    bad("chunk_ms = " + std::to_string(chunk_ms) + " must be a multiple of 20 and >= 40");
  if (stack_frames < 1) bad("stack_frames must be >= 1");
  if (window_blocks < 0) bad("window_blocks must be >= 0 (0 = as many as fit in 30 s)");
  if (max_batch < 0) bad("max_batch must be >= 0 (0 = unlimited)");
  if (d_llm < 0 || (projector.empty() && d_llm == 0)) bad("d_llm must be > 0 for an untrained projector");
  if (projector_hidden < 1) bad("projector_hidden must be >= 1");
  parse_dtype(dtype);
  parse_device(device);
  parse_mel_normalization(normalization);
}

std::string speech_encoder_options::to_string() const {
  std::ostringstream o;
  o << "model=" << model << " projector=" << (projector.empty() ? "<untrained seed " + std::to_string(projector_seed) + ">" : projector)
    << " d_llm=" << d_llm << " device=" << device << " dtype=" << dtype << " chunk_ms=" << chunk_ms
    << " stack_frames=" << stack_frames << " window_blocks=" << window_blocks << " normalization=" << normalization
    << " max_batch=" << max_batch;
  return o.str();
}

// One immutable set of weights. Streams keep the generation they were made with
// (the hot-swap design of the header).
struct weights_generation {
  std::shared_ptr<whisper_encoder> encoder;
  std::shared_ptr<projector> proj;
  std::string version;
  std::string projector_desc;
};

struct speech_encoder::impl {
  speech_encoder_options opt;
  torch::Device device = torch::kCPU;
  torch::Dtype dtype = torch::kFloat32;
  mel_config mel_cfg;
  std::shared_ptr<whisper_encoder> base_encoder;  // encoder.model as loaded
  mutable std::mutex mu;                          // guards `current` and `generations`
  std::mutex replace_mu;                          // one replace_weights() at a time
  std::shared_ptr<const weights_generation> current;
  int64_t generations = 0;

  std::shared_ptr<const weights_generation> get() const {
    std::lock_guard<std::mutex> lk(mu);
    return current;
  }
  // The projector has no fp64 kernels; fp64 verification runs project in fp32.
  torch::Dtype proj_dtype() const { return dtype == torch::kFloat64 ? torch::kFloat32 : dtype; }

  // Loads a projector checkpoint and checks it fits the encoder and the LLM.
  std::shared_ptr<projector> load_projector(const std::string& path, int64_t d_in, int64_t d_llm) const {
    auto p = projector::load(path, device, proj_dtype());
    const auto& pc = p->config();
    auto bad = [&](const std::string& what) {
      throw std::runtime_error("speech_encoder: projector " + path + " " + what);
    };
    if (pc.d_in != d_in)
      bad("expects encoder width d_in = " + std::to_string(pc.d_in) + " but " + opt.model + " has " +
          std::to_string(d_in) + " (trained for another encoder?)");
    if (pc.stack != opt.stack_frames)
      bad("stacks " + std::to_string(pc.stack) + " frames but encoder.stack_frames = " +
          std::to_string(opt.stack_frames) + " (set it to " + std::to_string(pc.stack) + ")");
    if (d_llm > 0 && pc.d_out != d_llm)
      bad("outputs d_out = " + std::to_string(pc.d_out) + " but the LLM's hidden size is " +
          std::to_string(d_llm) + " (trained for another LLM?)");
    for (const auto& t : p->parameters())
      if (!at::isfinite(t).all().item<bool>()) bad("has non-finite (NaN/Inf) weights (corrupt checkpoint?)");
    return p;
  }

  // A fresh copy of the base encoder with the tensors of `path` (named
  // parameters, as alignment_trainer::export_weights writes them) replaced.
  std::shared_ptr<whisper_encoder> load_encoder_layers(const std::string& path) const {
    whisper_encoder_options eo = base_encoder->options();
    auto enc = whisper_encoder::load(opt.model, eo);
    safetensors_file f(path);  // throws safetensors_error naming the file
    auto params = enc->named_parameters();
    torch::NoGradGuard ng;
    if (f.tensors().empty()) throw std::runtime_error("speech_encoder: encoder layers " + path + " holds no tensor");
    for (const auto& t : f.tensors()) {
      auto* p = params.find(t.name);
      if (!p)
        throw std::runtime_error("speech_encoder: encoder layers " + path + ": " + t.name + " is not a parameter of " +
                                 opt.model + " (trained for another encoder?)");
      if (std::vector<int64_t>(p->sizes().begin(), p->sizes().end()) != t.shape)
        throw std::runtime_error("speech_encoder: encoder layers " + path + ": tensor " + t.name +
                                 " has the wrong shape for " + opt.model);
      auto v = at::empty(t.shape, at::kFloat);
      f.to_float32(t, v.data_ptr<float>());
      if (!at::isfinite(v).all().item<bool>())
        throw std::runtime_error("speech_encoder: encoder layers " + path + ": tensor " + t.name +
                                 " has non-finite values (corrupt checkpoint?)");
      p->copy_(v.to(p->device(), p->scalar_type()));
    }
    return enc;
  }
};

struct speech_stream::impl {
  const void* owner = nullptr;  // the speech_encoder::impl that made it
  std::shared_ptr<const weights_generation> gen;
  mel_stream mel;
  int64_t n_mels = 80, d_llm = 0;
  std::vector<float> frames;  // mel frames not yet encoded, [n, n_mels]
  whisper_encoder_state enc_state;
  projector_state proj_state;
  std::vector<float> tokens;  // ready speech tokens, [n, d_llm]
  size_t tokens_head = 0;     // rows of `tokens` already popped
  int64_t chunks = 0, enc_frames = 0, tokens_out = 0;
  bool input_finished = false, finished = false;

  impl(const mel_config& mc) : mel(mc) {}
  int64_t buffered() const { return int64_t(frames.size()) / n_mels; }
  void pull_frames() { mel.pop_frames(frames); }
  int64_t tokens_ready() const { return int64_t(tokens.size() / size_t(d_llm)) - int64_t(tokens_head); }
  void add_tokens(const torch::Tensor& t) {
    if (!t.defined() || t.size(0) == 0) return;
    if (tokens_head > 0 && tokens_head * size_t(d_llm) == tokens.size()) {  // all popped: reuse the buffer
      tokens.clear();
      tokens_head = 0;
    }
    append_rows(t, tokens);
    tokens_out += t.size(0);
  }
};

speech_stream::speech_stream(std::unique_ptr<impl> d) : d_(std::move(d)) {}
speech_stream::~speech_stream() = default;
int64_t speech_stream::samples_accepted() const { return d_->mel.samples_accepted(); }
int64_t speech_stream::mel_frames() const { return d_->mel.frames_computed(); }
int64_t speech_stream::chunks_encoded() const { return d_->chunks; }
int64_t speech_stream::encoder_frames() const { return d_->enc_frames; }
int64_t speech_stream::tokens_out() const { return d_->tokens_out; }
int64_t speech_stream::tokens_ready() const { return d_->tokens_ready(); }
const std::string& speech_stream::version() const { return d_->gen->version; }
bool speech_stream::input_is_finished() const { return d_->input_finished; }
bool speech_stream::is_finished() const { return d_->finished; }

speech_encoder::speech_encoder(const speech_encoder_options& opt) : d_(std::make_unique<impl>()) {
  opt.validate();
  d_->opt = opt;
  d_->device = parse_device(opt.device);
  d_->dtype = parse_dtype(opt.dtype);

  whisper_encoder_options eo;
  eo.device = d_->device;
  eo.dtype = d_->dtype;
  eo.chunk_ms = opt.chunk_ms;
  eo.context_blocks = opt.window_blocks > 0 ? opt.window_blocks : -1;
  auto gen = std::make_shared<weights_generation>();
  d_->base_encoder = whisper_encoder::load(opt.model, eo);
  gen->encoder = d_->base_encoder;
  const int64_t d_in = gen->encoder->output_dim();

  if (opt.projector.empty()) {
    projector_config pc;
    pc.stack = opt.stack_frames;
    pc.d_in = d_in;
    pc.d_hidden = opt.projector_hidden;
    pc.d_out = opt.d_llm;
    gen->proj = std::make_shared<projector>(pc, d_->device, d_->proj_dtype(), opt.projector_seed);
    gen->projector_desc = "untrained (seed " + std::to_string(opt.projector_seed) + ")";
    gen->version = "untrained-seed-" + std::to_string(opt.projector_seed);
  } else {
    gen->proj = d_->load_projector(opt.projector, d_in, opt.d_llm);
    gen->projector_desc = opt.projector;
    gen->version = std::filesystem::path(opt.projector).filename().string();
  }
  if (!opt.version.empty()) gen->version = opt.version;
  d_->opt.d_llm = gen->proj->config().d_out;
  d_->opt.version = gen->version;
  d_->mel_cfg.n_mels = int(gen->encoder->hparams().n_mels);
  d_->mel_cfg.normalization = parse_mel_normalization(opt.normalization);
  d_->current = std::move(gen);
  d_->generations = 1;
}

void speech_encoder::replace_weights(const std::string& projector_path, const std::string& encoder_layers_path,
                                     const std::string& version) {
  if (projector_path.empty()) throw std::invalid_argument("speech_encoder::replace_weights: projector path is empty");
  if (version.empty()) throw std::invalid_argument("speech_encoder::replace_weights: version is empty");
  std::lock_guard<std::mutex> one(d_->replace_mu);
  // Everything is loaded and checked before the switch: any throw leaves the
  // current generation serving.
  auto gen = std::make_shared<weights_generation>();
  gen->encoder = encoder_layers_path.empty() ? d_->base_encoder : d_->load_encoder_layers(encoder_layers_path);
  gen->proj = d_->load_projector(projector_path, d_->base_encoder->output_dim(), d_->opt.d_llm);
  gen->version = version;
  gen->projector_desc = projector_path + (encoder_layers_path.empty() ? "" : " + encoder layers " + encoder_layers_path);
  std::lock_guard<std::mutex> lk(d_->mu);
  d_->current = std::move(gen);
  d_->generations += 1;
}

std::string speech_encoder::version() const { return d_->get()->version; }

int64_t speech_encoder::generation() const {
  std::lock_guard<std::mutex> lk(d_->mu);
  return d_->generations;
}

speech_encoder::~speech_encoder() = default;

std::unique_ptr<speech_stream> speech_encoder::create_stream() const {
  auto s = std::make_unique<speech_stream::impl>(d_->mel_cfg);
  s->owner = d_.get();
  s->gen = d_->get();
  s->n_mels = d_->mel_cfg.n_mels;
  s->d_llm = s->gen->proj->config().d_out;
  s->enc_state = s->gen->encoder->init_state();
  s->proj_state = s->gen->proj->init_state();
  return std::unique_ptr<speech_stream>(new speech_stream(std::move(s)));
}

void speech_encoder::accept_waveform(speech_stream& s, const float* samples, size_t n) const {
  auto& st = *s.d_;
  if (st.owner != d_.get()) throw std::invalid_argument("speech_encoder::accept_waveform: stream made by another encoder");
  if (st.input_finished)
    throw std::logic_error("speech_encoder::accept_waveform: input_finished() was called; create a new stream");
  st.mel.accept_waveform(samples, n);
  st.pull_frames();
}

void speech_encoder::input_finished(speech_stream& s) const {
  auto& st = *s.d_;
  if (st.owner != d_.get()) throw std::invalid_argument("speech_encoder::input_finished: stream made by another encoder");
  if (st.input_finished) return;
  st.mel.finish();
  st.pull_frames();
  st.input_finished = true;
  // Nothing was ever heard: no chunk to encode, no tokens (documented).
  if (st.mel.frames_computed() == 0) st.finished = true;
}

bool speech_encoder::is_ready(const speech_stream& s) const {
  const auto& st = *s.d_;
  if (st.finished) return false;
  if (st.input_finished) return true;
  // One frame beyond the chunk: the input continues, so it is not the last block (see the header).
  return st.buffered() > d_->opt.chunk_ms / 10;
}

size_t speech_encoder::decode_streams(const std::vector<speech_stream*>& streams) const {
  const int64_t f = d_->opt.chunk_ms / 10;
  std::set<const speech_stream*> seen;
  // Batches: (generation, last chunk length or -1 for a full chunk) -> streams.
  std::map<std::pair<const weights_generation*, int64_t>, std::vector<speech_stream::impl*>> groups;
  for (auto* s : streams) {
    if (!s) throw std::invalid_argument("speech_encoder::decode_streams: null stream");
    if (!seen.insert(s).second) throw std::invalid_argument("speech_encoder::decode_streams: a stream appears twice");
    if (s->d_->owner != d_.get())
      throw std::invalid_argument("speech_encoder::decode_streams: stream made by another encoder");
    if (!is_ready(*s)) continue;
    auto& st = *s->d_;
    const int64_t buf = st.buffered();
    const bool last = st.input_finished && buf <= f;
    groups[{st.gen.get(), last ? buf : -1}].push_back(&st);
  }
  size_t done = 0;
  const size_t max_batch = d_->opt.max_batch > 0 ? size_t(d_->opt.max_batch) : std::numeric_limits<size_t>::max();
  for (auto& [key, all] : groups) {
    const bool last = key.second >= 0;
    const int64_t t = last ? key.second : f;
    for (size_t b0 = 0; b0 < all.size(); b0 += max_batch) {
      const size_t nb = std::min(max_batch, all.size() - b0);
      const auto& gen = *all[b0]->gen;
      const int64_t n_mels = all[b0]->n_mels;
      // Features [N, t, n_mels] in float32; the encoder converts to its dtype/device.
      std::vector<float> feat(size_t(nb) * size_t(t * n_mels));
      std::vector<whisper_encoder_state*> es;
      std::vector<projector_state*> ps;
      for (size_t i = 0; i < nb; ++i) {
        auto& st = *all[b0 + i];
        const size_t cnt = size_t(t * n_mels);
        std::memcpy(feat.data() + i * cnt, st.frames.data(), cnt * sizeof(float));
        es.push_back(&st.enc_state);
        ps.push_back(&st.proj_state);
      }
      auto features = torch::from_blob(feat.data(), {int64_t(nb), t, n_mels}, at::kFloat);
      auto frames = gen.encoder->forward_chunk(features, es, last);
      auto toks = gen.proj->forward_stream(frames, ps);
      // Consumed only now, so that an exception above leaves the frames in place.
      for (size_t i = 0; i < nb; ++i) {
        auto& st = *all[b0 + i];
        st.frames.erase(st.frames.begin(), st.frames.begin() + std::ptrdiff_t(t * n_mels));
        st.chunks += 1;
        st.enc_frames += frames[i].size(0);
        st.add_tokens(toks[i]);
        if (last) {
          st.add_tokens(gen.proj->flush(st.proj_state));
          st.finished = true;
        }
      }
      done += nb;
    }
  }
  return done;
}

size_t speech_encoder::pop_tokens(speech_stream& s, std::vector<float>& out, size_t max_tokens) const {
  auto& st = *s.d_;
  const size_t n = std::min(max_tokens, size_t(st.tokens_ready()));
  const size_t d = size_t(st.d_llm);
  out.insert(out.end(), st.tokens.begin() + std::ptrdiff_t(st.tokens_head * d),
             st.tokens.begin() + std::ptrdiff_t((st.tokens_head + n) * d));
  st.tokens_head += n;
  if (st.tokens_head * d == st.tokens.size()) {
    st.tokens.clear();
    st.tokens_head = 0;
  }
  return n;
}

std::vector<float> speech_encoder::pop_tokens(speech_stream& s) const {
  std::vector<float> out;
  pop_tokens(s, out);
  return out;
}

int64_t speech_encoder::d_llm() const { return d_->opt.d_llm; }
int64_t speech_encoder::chunk_frames() const { return d_->opt.chunk_ms / 10; }
int64_t speech_encoder::chunk_samples() const { return d_->opt.chunk_ms * 16; }
double speech_encoder::tokens_per_second() const { return 50.0 / double(d_->opt.stack_frames); }
const speech_encoder_options& speech_encoder::options() const { return d_->opt; }

std::string speech_encoder::describe() const {
  const auto gen = d_->get();
  const auto& hp = gen->encoder->hparams();
  const auto& pc = gen->proj->config();
  std::ostringstream o;
  o << "whisper encoder " << d_->opt.model << " (d " << hp.d_model << ", " << hp.n_layers << " layers, " << hp.n_heads
    << " heads, " << hp.n_mels << " mels); " << d_->opt.device << " " << d_->opt.dtype << "; chunk "
    << d_->opt.chunk_ms << " ms (" << chunk_frames() << " mel frames), window "
    << gen->encoder->context_blocks() << " blocks; normalization " << d_->opt.normalization
    << "; projector " << gen->projector_desc << " [version " << gen->version << "] (stack " << pc.stack << ", hidden " << pc.d_hidden << ", d_llm "
    << pc.d_out << ", " << tokens_per_second() << " tokens/s)";
  return o.str();
}

void convert_projector(const std::string& in, const std::string& out, const std::string& dtype) {
  auto p = projector::load(in, torch::kCPU, parse_dtype(dtype));
  p->save(out);
}

}  // namespace undertone::models
