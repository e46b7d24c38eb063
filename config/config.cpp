#include "config/config.hpp"

#include <toml++/toml.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <limits>
#include <map>
#include <regex>
#include <sstream>

namespace undertone::config {
namespace {

enum class kind { boolean, integer, real, text };

// One configuration key: where it lives in the struct, its type and what values
// are allowed. Everything else (parsing, validation, printing) reads this table.
struct field {
  std::string section;
  std::string key;
  kind type;
  std::function<void*(undertone_config&)> ref;
  double lo = -std::numeric_limits<double>::infinity();
  double hi = std::numeric_limits<double>::infinity();
  std::vector<std::string> choices;                         // text: allowed values if non-empty
  std::function<std::string(const std::string&)> check;     // text: "" if ok, else what is allowed
  std::string name() const { return section + "." + key; }
};

#define UT_FIELD(sec, k) \
  [](undertone_config& c) -> void* { return &c.sec.k; }

std::string check_device(const std::string& v) {
  static const std::regex re("cpu|cuda(:[0-9]+)?");
  return std::regex_match(v, re) ? "" : "one of cpu, cuda, cuda:N";
}
std::string check_endpoint(const std::string& v) {
  static const std::regex re("(tcp://[^:]+:[0-9]+|ipc://.+|inproc://.+)");
  return std::regex_match(v, re) ? "" : "a ZeroMQ endpoint such as tcp://127.0.0.1:5555 or ipc:///tmp/x";
}

const std::vector<field>& fields() {
  static const std::vector<field> table = [] {
    std::vector<field> f;
    auto integer = [&](std::string s, std::string k, auto ref, double lo, double hi) {
      f.push_back({std::move(s), std::move(k), kind::integer, ref, lo, hi, {}, {}});
    };
    auto real = [&](std::string s, std::string k, auto ref, double lo, double hi) {
      f.push_back({std::move(s), std::move(k), kind::real, ref, lo, hi, {}, {}});
    };
    auto choice = [&](std::string s, std::string k, auto ref, std::vector<std::string> ch) {
      f.push_back({std::move(s), std::move(k), kind::text, ref, 0, 0, std::move(ch), {}});
    };
    auto text = [&](std::string s, std::string k, auto ref,
                    std::function<std::string(const std::string&)> chk = {}) {
      f.push_back({std::move(s), std::move(k), kind::text, ref, 0, 0, {}, std::move(chk)});
    };
    auto boolean = [&](std::string s, std::string k, auto ref) {
      f.push_back({std::move(s), std::move(k), kind::boolean, ref, 0, 0, {}, {}});
    };
    const std::vector<std::string> dtypes{"fp32", "bf16", "fp16"};

    choice("general", "log_level", UT_FIELD(general, log_level),
           {"trace", "debug", "info", "warn", "error", "off"});
    integer("general", "threads", UT_FIELD(general, threads), 0, 1024);
    text("general", "model_home", UT_FIELD(general, model_home));

    text("llm", "model", UT_FIELD(llm, model), [](const std::string& v) {
      return v.empty() ? "a model name from the cache, a .gguf file or an HF checkpoint directory" : "";
    });
    text("llm", "device", UT_FIELD(llm, device), check_device);
    choice("llm", "dtype", UT_FIELD(llm, dtype), {"auto", "fp32", "bf16", "fp16"});
    integer("llm", "context_tokens", UT_FIELD(llm, context_tokens), 64, 1 << 20);
    integer("llm", "kv_cells", UT_FIELD(llm, kv_cells), 64, 1 << 24);
    integer("llm", "max_batch_rows", UT_FIELD(llm, max_batch_rows), 1, 65536);
    choice("llm", "chat_template", UT_FIELD(llm, chat_template), {"auto", "chatml", "llama-3"});
    text("llm", "system_prompt", UT_FIELD(llm, system_prompt));
    integer("llm", "max_slots", UT_FIELD(llm, max_slots), 1, 4096);
    choice("llm", "cpu_decode", UT_FIELD(llm, cpu_decode), {"auto", "off"});

    real("sampling", "temperature", UT_FIELD(sampling, temperature), 0.0, 5.0);
    integer("sampling", "top_k", UT_FIELD(sampling, top_k), 0, 1000000);
    real("sampling", "top_p", UT_FIELD(sampling, top_p), 0.0, 1.0);
    real("sampling", "repetition_penalty", UT_FIELD(sampling, repetition_penalty), 0.5, 3.0);
    integer("sampling", "seed", UT_FIELD(sampling, seed), -1, 9.007199254740991e15);
    integer("sampling", "max_tokens", UT_FIELD(sampling, max_tokens), 1, 65536);

    text("encoder", "model", UT_FIELD(encoder, model), [](const std::string& v) {
      return v.empty() ? "a model name from the cache, a CTranslate2 or HF Whisper directory" : "";
    });
    text("encoder", "projector", UT_FIELD(encoder, projector));
    text("encoder", "device", UT_FIELD(encoder, device), check_device);
    choice("encoder", "dtype", UT_FIELD(encoder, dtype), dtypes);
    integer("encoder", "chunk_ms", UT_FIELD(encoder, chunk_ms), 80, 2000);
    integer("encoder", "stack_frames", UT_FIELD(encoder, stack_frames), 1, 64);
    integer("encoder", "max_batch", UT_FIELD(encoder, max_batch), 1, 1024);
    integer("encoder", "max_wait_ms", UT_FIELD(encoder, max_wait_ms), 0, 1000);
    integer("encoder", "window_blocks", UT_FIELD(encoder, window_blocks), 0, 10000);
    choice("encoder", "normalization", UT_FIELD(encoder, normalization), {"causal", "offline"});
    text("encoder", "registry", UT_FIELD(encoder, registry));

    real("vad", "threshold_db", UT_FIELD(vad, threshold_db), -100.0, 0.0);
    integer("vad", "min_speech_ms", UT_FIELD(vad, min_speech_ms), 10, 5000);
    integer("vad", "end_silence_ms", UT_FIELD(vad, end_silence_ms), 50, 10000);
    integer("vad", "max_turn_seconds", UT_FIELD(vad, max_turn_seconds), 1, 600);
    real("vad", "snr_db", UT_FIELD(vad, snr_db), 0.0, 60.0);
    boolean("vad", "enabled", UT_FIELD(vad, enabled));

    text("server", "bind", UT_FIELD(server, bind), check_endpoint);
    text("server", "worker_bind", UT_FIELD(server, worker_bind), check_endpoint);
    text("server", "control_bind", UT_FIELD(server, control_bind),
         [](const std::string& v) { return v.empty() ? std::string() : check_endpoint(v); });
    integer("server", "max_sessions", UT_FIELD(server, max_sessions), 1, 100000);
    integer("server", "max_frame_bytes", UT_FIELD(server, max_frame_bytes), 1024, 64 << 20);
    integer("server", "max_frames_per_second", UT_FIELD(server, max_frames_per_second), 1, 100000);
    integer("server", "remote_workers", UT_FIELD(server, remote_workers), 0, 1024);
    integer("server", "worker_wait_s", UT_FIELD(server, worker_wait_s), 0, 3600);
    integer("server", "worker_timeout_s", UT_FIELD(server, worker_timeout_s), 1, 600);
    integer("server", "idle_timeout_s", UT_FIELD(server, idle_timeout_s), 1, 86400);
    text("server", "auth_token", UT_FIELD(server, auth_token));
    text("server", "auth_token_file", UT_FIELD(server, auth_token_file));

    boolean("store", "enabled", UT_FIELD(store, enabled));
    text("store", "dir", UT_FIELD(store, dir));
    integer("store", "retention_days", UT_FIELD(store, retention_days), 0, 36500);
    integer("store", "max_megabytes", UT_FIELD(store, max_megabytes), 0, 1e12);

    boolean("finetune", "enabled", UT_FIELD(finetune, enabled));
    real("finetune", "learning_rate", UT_FIELD(finetune, learning_rate), 1e-8, 1.0);
    integer("finetune", "steps_per_round", UT_FIELD(finetune, steps_per_round), 1, 1000000);
    real("finetune", "gate_margin", UT_FIELD(finetune, gate_margin), 0.0, 1.0);
    choice("finetune", "gate_metric", UT_FIELD(finetune, gate_metric), {"val_loss", "ranking", "both"});
    integer("finetune", "batch", UT_FIELD(finetune, batch), 1, 1024);
    real("finetune", "replay_ratio", UT_FIELD(finetune, replay_ratio), 0.0, 0.95);
    text("finetune", "replay_manifests", UT_FIELD(finetune, replay_manifests));
    text("finetune", "val_manifest", UT_FIELD(finetune, val_manifest));
    integer("finetune", "max_val", UT_FIELD(finetune, max_val), 0, 1000000);
    integer("finetune", "max_response_tokens", UT_FIELD(finetune, max_response_tokens), 1, 4096);
    integer("finetune", "threads", UT_FIELD(finetune, threads), 1, 1024);
    integer("finetune", "nice", UT_FIELD(finetune, nice), 0, 19);
    integer("finetune", "interval_s", UT_FIELD(finetune, interval_s), 0, 31536000);
    integer("finetune", "min_new_turns", UT_FIELD(finetune, min_new_turns), 0, 100000000);
    integer("finetune", "pause_while_sessions", UT_FIELD(finetune, pause_while_sessions), 0, 1000000);
    text("finetune", "out_dir", UT_FIELD(finetune, out_dir));
    text("finetune", "cache_dir", UT_FIELD(finetune, cache_dir));
    return f;
  }();
  return table;
}
#undef UT_FIELD

std::string fmt_num(double v) {
  std::ostringstream os;
  os.precision(15);
  os << v;
  return os.str();
}

std::string range_text(const field& f) {
  auto bound = [&](double v) { return f.type == kind::integer ? fmt_num(std::floor(v)) : fmt_num(v); };
  return "[" + bound(f.lo) + ", " + bound(f.hi) + "]";
}

std::string value_text(const field& f, undertone_config& c) {
  void* p = f.ref(c);
  switch (f.type) {
    case kind::boolean: return *static_cast<bool*>(p) ? "true" : "false";
    case kind::integer: return std::to_string(*static_cast<int64_t*>(p));
    case kind::real: return fmt_num(*static_cast<double*>(p));
    case kind::text: return *static_cast<std::string*>(p);
  }
  return {};
}

std::string describe_node(const toml::node& n) {
  std::ostringstream os;
  n.visit([&os](auto&& v) {
    using T = std::decay_t<decltype(v)>;
    if constexpr (std::is_same_v<T, toml::value<std::string>>) os << '"' << v.get() << '"';
    else if constexpr (toml::is_value<T>) os << v.get();
    else if constexpr (std::is_same_v<T, toml::table>) os << "a table";
    else os << "an array";
  });
  return os.str();
}

std::string type_name(kind k) {
  switch (k) {
    case kind::boolean: return "a boolean (true/false)";
    case kind::integer: return "an integer";
    case kind::real: return "a number";
    case kind::text: return "a string";
  }
  return {};
}

// Stores a TOML node into the field; throws config_error on a type mismatch.
void assign(const field& f, undertone_config& c, const toml::node& n) {
  void* p = f.ref(c);
  auto bad = [&] {
    return config_error(f.name() + " must be " + type_name(f.type) + ", got " + describe_node(n));
  };
  switch (f.type) {
    case kind::boolean:
      if (!n.is_boolean()) throw bad();
      *static_cast<bool*>(p) = *n.value<bool>();
      break;
    case kind::integer:
      if (!n.is_integer()) throw bad();
      *static_cast<int64_t*>(p) = *n.value<int64_t>();
      break;
    case kind::real:
      if (!n.is_number()) throw bad();
      *static_cast<double*>(p) = *n.value<double>();
      break;
    case kind::text:
      if (!n.is_string()) throw bad();
      *static_cast<std::string*>(p) = *n.value<std::string>();
      break;
  }
}

const field* find_field(const std::string& section, const std::string& key) {
  for (const auto& f : fields())
    if (f.section == section && f.key == key) return &f;
  return nullptr;
}

std::string suggest(const std::string& name) {
  // Closest known key by edit distance, to help with typos.
  auto dist = [](const std::string& a, const std::string& b) {
    std::vector<size_t> prev(b.size() + 1), cur(b.size() + 1);
    for (size_t j = 0; j <= b.size(); ++j) prev[j] = j;
    for (size_t i = 1; i <= a.size(); ++i) {
      cur[0] = i;
      for (size_t j = 1; j <= b.size(); ++j)
        cur[j] = std::min({prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (a[i - 1] != b[j - 1])});
      std::swap(prev, cur);
    }
    return prev[b.size()];
  };
  std::string best;
  size_t best_d = 4;
  for (const auto& f : fields()) {
    size_t d = dist(name, f.name());
    if (d < best_d) best_d = d, best = f.name();
  }
  return best.empty() ? "" : " (did you mean " + best + "?)";
}

undertone_config from_table(const toml::table& root, const std::string& source) {
  undertone_config cfg;
  for (const auto& [sec_key, sec_node] : root) {
    std::string section(sec_key.str());
    const auto* sec = sec_node.as_table();
    bool known_section = false;
    for (const auto& f : fields()) known_section |= (f.section == section);
    if (!sec || !known_section)
      throw config_error(source + ": unknown section [" + section + "]" + suggest(section + ".x"));
    for (const auto& [k, node] : *sec) {
      std::string key(k.str());
      const field* f = find_field(section, key);
      if (!f) throw config_error(source + ": unknown key " + section + "." + key + suggest(section + "." + key));
      assign(*f, cfg, node);
    }
  }
  validate(cfg);
  return cfg;
}

}  // namespace

undertone_config load_string(const std::string& toml_text, const std::string& source) {
  toml::table root;
  try {
    root = toml::parse(toml_text, source);
  } catch (const toml::parse_error& e) {
    std::ostringstream os;
    os << source << ":" << e.source().begin.line << ":" << e.source().begin.column << ": " << e.description();
    throw config_error(os.str());
  }
  return from_table(root, source);
}

undertone_config load_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw config_error("cannot open config file " + path);
  std::stringstream ss;
  ss << in.rdbuf();
  return load_string(ss.str(), path);
}

void apply_override(undertone_config& cfg, const std::string& assignment) {
  auto eq = assignment.find('=');
  auto dot = assignment.find('.');
  if (eq == std::string::npos || dot == std::string::npos || dot > eq)
    throw config_error("override '" + assignment + "' must look like section.key=value");
  std::string section = assignment.substr(0, dot);
  std::string key = assignment.substr(dot + 1, eq - dot - 1);
  std::string value = assignment.substr(eq + 1);
  const field* f = find_field(section, key);
  if (!f) throw config_error("unknown key " + section + "." + key + suggest(section + "." + key));
  if (f->type == kind::text) {
    // Strings need no quotes on the command line; accept a quoted TOML string too.
    if (value.size() >= 2 && value.front() == '"' && value.back() == '"') value = value.substr(1, value.size() - 2);
    *static_cast<std::string*>(f->ref(cfg)) = value;
  } else {
    toml::table t;
    try {
      t = toml::parse("v = " + value);
    } catch (const toml::parse_error&) {
      throw config_error(f->name() + " must be " + type_name(f->type) + ", got '" + value + "'");
    }
    assign(*f, cfg, *t.get("v"));
  }
  validate(cfg);
}

void validate(const undertone_config& cfg_in) {
  auto& cfg = const_cast<undertone_config&>(cfg_in);  // the table's accessors are non-const; we only read
  for (const auto& f : fields()) {
    void* p = f.ref(cfg);
    if (f.type == kind::integer || f.type == kind::real) {
      double v = f.type == kind::integer ? double(*static_cast<int64_t*>(p)) : *static_cast<double*>(p);
      if (!(v >= f.lo && v <= f.hi))
        throw config_error(f.name() + " must be in " + range_text(f) + ", got " + value_text(f, cfg));
    } else if (f.type == kind::text) {
      const auto& v = *static_cast<std::string*>(p);
      if (!f.choices.empty()) {
        bool ok = false;
        std::string all;
        for (const auto& c : f.choices) ok |= (c == v), all += (all.empty() ? "" : ", ") + c;
        if (!ok) throw config_error(f.name() + " must be one of " + all + ", got \"" + v + "\"");
      }
      if (f.check) {
        std::string allowed = f.check(v);
        if (!allowed.empty()) throw config_error(f.name() + " must be " + allowed + ", got \"" + v + "\"");
      }
    }
  }
  // Cross-field rules.
  if (cfg.llm.kv_cells < cfg.llm.context_tokens)
    throw config_error("llm.kv_cells must be >= llm.context_tokens (" + std::to_string(cfg.llm.context_tokens) +
                       "), got " + std::to_string(cfg.llm.kv_cells));
}

std::string to_toml(const undertone_config& cfg_in) {
  auto cfg = cfg_in;
  toml::table root;
  for (const auto& f : fields()) {
    if (!root.contains(f.section)) root.insert(f.section, toml::table{});
    auto& sec = *root[f.section].as_table();
    void* p = f.ref(cfg);
    switch (f.type) {
      case kind::boolean: sec.insert(f.key, *static_cast<bool*>(p)); break;
      case kind::integer: sec.insert(f.key, *static_cast<int64_t*>(p)); break;
      case kind::real: sec.insert(f.key, *static_cast<double*>(p)); break;
      case kind::text: sec.insert(f.key, *static_cast<std::string*>(p)); break;
    }
  }
  std::ostringstream os;
  os << root << "\n";
  return os.str();
}

std::vector<std::string> known_keys() {
  std::vector<std::string> keys;
  for (const auto& f : fields()) keys.push_back(f.name());
  return keys;
}

std::string resolve_model_home(const undertone_config& cfg) {
  if (!cfg.general.model_home.empty()) return cfg.general.model_home;
  if (const char* e = std::getenv("UNDERTONE_HOME"); e && *e) return e;
  const char* home = std::getenv("HOME");
  return std::string(home && *home ? home : "/tmp") + "/.cache/undertone";
}

}  // namespace undertone::config
