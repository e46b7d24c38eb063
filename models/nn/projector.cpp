#include "models/nn/projector.hpp"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <torch/csrc/autograd/generated/variable_factories.h>
#include <torch/version.h>

#include <cmath>
#include <cstring>
#include <map>
#include <sstream>
#include <stdexcept>

#include "models/safetensors.hpp"

namespace undertone::models {
namespace {

const char* const k_format = "undertone.projector";

st_dtype to_st(torch::Dtype t) {
  switch (t) {
    case torch::kFloat32: return st_dtype::f32;
    case torch::kBFloat16: return st_dtype::bf16;
    case torch::kFloat16: return st_dtype::f16;
    default: throw std::invalid_argument("projector: dtype must be float32, bfloat16 or float16");
  }
}

std::string shape_str(const std::vector<int64_t>& s) {
  std::ostringstream o;
  o << '[';
  for (size_t i = 0; i < s.size(); ++i) o << (i ? ", " : "") << s[i];
  o << ']';
  return o.str();
}

[[noreturn]] void fail(const std::string& path, const std::string& what) {
  throw std::runtime_error("projector checkpoint " + path + ": " + what);
}

// The three weights of a checkpoint, validated against its metadata.
struct loaded {
  projector_config cfg;
  torch::Tensor gate, up, down;
};

loaded read_checkpoint(const std::string& path, torch::Dtype dtype) {
  safetensors_file f(path);
  const auto& md = f.metadata();
  auto key = [&](const std::string& k) -> const std::string& {
    auto it = md.find(k);
    if (it == md.end()) fail(path, "metadata lacks \"" + k + "\" (not written by projector::save?)");
    return it->second;
  };
  if (key("format") != k_format) fail(path, "metadata format is \"" + key("format") + "\", not " + k_format);
  if (key("version") != "1") fail(path, "unsupported version " + key("version"));
  if (md.count("activation") && md.at("activation") != "swiglu")
    fail(path, "unsupported activation " + md.at("activation"));
  auto num = [&](const std::string& k) {
    const std::string& v = key(k);
    try {
      size_t used = 0;
      const long long x = std::stoll(v, &used);
      if (used != v.size() || x <= 0) throw std::invalid_argument(v);
      return int64_t(x);
    } catch (const std::exception&) {
      fail(path, "metadata \"" + k + "\" = \"" + v + "\" is not a positive integer");
    }
  };
  loaded r;
  r.cfg.stack = num("stack");
  r.cfg.d_in = num("d_in");
  r.cfg.d_hidden = num("d_hidden");
  r.cfg.d_out = num("d_out");
  const int64_t in = r.cfg.stack * r.cfg.d_in;
  auto tensor = [&](const std::string& name, std::vector<int64_t> shape) {
    const auto* t = f.find(name);
    if (!t) fail(path, "missing tensor " + name);
    if (t->shape != shape)
      fail(path, "tensor " + name + " has shape " + shape_str(t->shape) + " but the metadata (" +
                     r.cfg.to_string() + ") needs " + shape_str(shape));
    torch::Tensor out;
    bool same = false;
    try {
      same = to_st(dtype) == t->dtype;
    } catch (const std::invalid_argument&) {
    }
    if (same) {  // bit-exact copy of the stored values
      out = at::empty(shape, at::TensorOptions().dtype(dtype));
      std::memcpy(out.data_ptr(), f.data(*t), size_t(t->n_bytes()));
    } else {
      out = at::empty(shape, at::kFloat);
      f.to_float32(*t, out.data_ptr<float>());
      out = out.to(dtype);
    }
    return out;
  };
  r.gate = tensor("gate.weight", {r.cfg.d_hidden, in});
  r.up = tensor("up.weight", {r.cfg.d_hidden, in});
  r.down = tensor("down.weight", {r.cfg.d_out, r.cfg.d_hidden});
  return r;
}

}  // namespace

std::string projector_config::to_string() const {
  std::ostringstream o;
  o << "stack=" << stack << " d_in=" << d_in << " d_hidden=" << d_hidden << " d_out=" << d_out;
  return o.str();
}

projector::projector(const projector_config& cfg, torch::Device device, torch::Dtype dtype, uint64_t seed)
    : cfg_(cfg) {
  if (cfg.stack <= 0 || cfg.d_in <= 0 || cfg.d_hidden <= 0 || cfg.d_out <= 0)
    throw std::invalid_argument("projector: all dimensions must be positive (" + cfg.to_string() + ")");
  to_st(dtype);  // validates dtype
#if TORCH_VERSION_MAJOR < 2
  if (dtype == torch::kFloat16 && device.is_cpu())  // LibTorch 1.x has no fp16 CPU GEMM kernels
    throw std::invalid_argument("projector: float16 needs a CUDA device with this LibTorch; use bfloat16 on CPU");
#endif
  auto gen = at::detail::createCPUGenerator(seed);
  const int64_t in = cfg.stack * cfg.d_in;
  const auto to = torch::TensorOptions().dtype(dtype).device(device);
  auto init = [&](int64_t out, int64_t fan_in) {
    return (at::randn({out, fan_in}, gen, at::kFloat) / std::sqrt(double(fan_in))).to(to);
  };
  gate_ = register_parameter("gate_weight", init(cfg.d_hidden, in));
  up_ = register_parameter("up_weight", init(cfg.d_hidden, in));
  down_ = register_parameter("down_weight", init(cfg.d_out, cfg.d_hidden));
}

std::shared_ptr<projector> projector::load(const std::string& path, torch::Device device, torch::Dtype dtype) {
  to_st(dtype);
  auto r = read_checkpoint(path, dtype);
  auto p = std::make_shared<projector>(r.cfg, device, dtype);
  torch::NoGradGuard ng;
  p->gate_.copy_(r.gate);
  p->up_.copy_(r.up);
  p->down_.copy_(r.down);
  return p;
}

void projector::load_weights(const std::string& path) {
  auto r = read_checkpoint(path, dtype());
  if (!(r.cfg == cfg_))
    fail(path, "holds a projector with " + r.cfg.to_string() + ", this one has " + cfg_.to_string());
  torch::NoGradGuard ng;
  gate_.copy_(r.gate);
  up_.copy_(r.up);
  down_.copy_(r.down);
}

void projector::save(const std::string& path) const {
  const st_dtype dt = to_st(dtype());
  auto g = gate_.detach().to(torch::kCPU).contiguous(), u = up_.detach().to(torch::kCPU).contiguous(),
       d = down_.detach().to(torch::kCPU).contiguous();
  std::vector<st_tensor_view> views{
      {"gate.weight", dt, g.sizes().vec(), g.data_ptr()},
      {"up.weight", dt, u.sizes().vec(), u.data_ptr()},
      {"down.weight", dt, d.sizes().vec(), d.data_ptr()},
  };
  std::map<std::string, std::string> md{{"format", k_format},
                                        {"version", "1"},
                                        {"activation", "swiglu"},
                                        {"stack", std::to_string(cfg_.stack)},
                                        {"d_in", std::to_string(cfg_.d_in)},
                                        {"d_hidden", std::to_string(cfg_.d_hidden)},
                                        {"d_out", std::to_string(cfg_.d_out)}};
  write_safetensors(path, views, md);
}

torch::Tensor projector::forward_stacked(const torch::Tensor& stacked) {
  if (!stacked.defined() || stacked.dim() < 1 || stacked.size(-1) != cfg_.stack * cfg_.d_in)
    throw std::invalid_argument("projector::forward_stacked: last dimension must be stack * d_in = " +
                                std::to_string(cfg_.stack * cfg_.d_in));
  auto x = stacked.to(gate_.options());
  return at::linear(at::silu(at::linear(x, gate_)) * at::linear(x, up_), down_);
}

torch::Tensor projector::forward(const torch::Tensor& frames, bool pad_last) {
  if (!frames.defined() || frames.dim() != 3 || frames.size(2) != cfg_.d_in)
    throw std::invalid_argument("projector::forward: frames must be [N, T, " + std::to_string(cfg_.d_in) + "]");
  const int64_t n = frames.size(0), t = frames.size(1), k = cfg_.stack;
  auto x = frames.to(gate_.options());
  int64_t groups = t / k;
  if (pad_last && t % k) {
    x = at::cat({x, at::zeros({n, k - t % k, cfg_.d_in}, x.options())}, 1);
    ++groups;
  }
  x = x.narrow(1, 0, groups * k).reshape({n, groups, k * cfg_.d_in});
  return forward_stacked(x);
}

projector_state projector::init_state() const { return projector_state{}; }

std::vector<torch::Tensor> projector::forward_stream(const std::vector<torch::Tensor>& frames,
                                                     const std::vector<projector_state*>& states) {
  if (frames.size() != states.size())
    throw std::invalid_argument("projector::forward_stream: " + std::to_string(frames.size()) +
                                " frame tensors but " + std::to_string(states.size()) + " states");
  torch::NoGradGuard ng;
  const int64_t k = cfg_.stack, din = cfg_.d_in;
  std::vector<torch::Tensor> groups;
  std::vector<int64_t> counts;
  for (size_t i = 0; i < frames.size(); ++i) {
    const auto& fr = frames[i];
    if (!states[i]) throw std::invalid_argument("projector::forward_stream: null state");
    if (!fr.defined() || fr.dim() != 2 || fr.size(1) != din)
      throw std::invalid_argument("projector::forward_stream: frames[" + std::to_string(i) + "] must be [n, " +
                                  std::to_string(din) + "]");
    auto& s = *states[i];
    auto all = s.pending_.defined() ? at::cat({s.pending_, fr.to(gate_.options())}, 0) : fr.to(gate_.options());
    const int64_t m = all.size(0) / k;
    counts.push_back(m);
    if (m > 0) groups.push_back(all.narrow(0, 0, m * k).reshape({m, k * din}));
    const int64_t rest = all.size(0) - m * k;
    s.pending_ = rest > 0 ? all.narrow(0, m * k, rest).clone() : torch::Tensor();
    s.frames_in_ += fr.size(0);
    s.tokens_out_ += m;
  }
  std::vector<torch::Tensor> out;
  torch::Tensor y = groups.empty() ? torch::Tensor() : forward_stacked(at::cat(groups, 0));
  int64_t off = 0;
  for (int64_t m : counts) {
    out.push_back(m > 0 ? y.narrow(0, off, m) : at::zeros({0, cfg_.d_out}, gate_.options()));
    off += m;
  }
  return out;
}

torch::Tensor projector::flush(projector_state& state) {
  torch::NoGradGuard ng;
  if (state.pending() == 0) return at::zeros({0, cfg_.d_out}, gate_.options());
  auto x = at::cat({state.pending_, at::zeros({cfg_.stack - state.pending(), cfg_.d_in}, gate_.options())}, 0);
  state.pending_ = torch::Tensor();
  state.tokens_out_ += 1;
  return forward_stacked(x.reshape({1, cfg_.stack * cfg_.d_in}));
}

}  // namespace undertone::models
