// `undertone model list|verify|publish|use|rollback|status`: the encoder
// registry (models/encoder_registry.hpp) and hot swap of a running server
// (docs/hot-swap.md). `undertone models` (plural) is the model cache.
#include <iomanip>
#include <iostream>

#include "actors/engine.hpp"
#include "apps/common.hpp"
#include "models/encoder_registry.hpp"
#include "transport/auth.hpp"
#include "transport/control.hpp"

namespace undertone::apps {

namespace {

struct model_flags {
  std::string registry;   // --registry
  std::string server;     // --server ENDPOINT
  std::string token;      // --token (the server's auth token)
  std::string file, layers, source, metrics, version;
  std::vector<std::string> versions;
  bool no_current = false;
  bool json = false;
  int timeout_s = 120;
};

std::string registry_dir(const global_options& g, const model_flags& f) {
  if (!f.registry.empty()) return f.registry;
  return actors::resolve_encoder_registry(effective_config(g));
}

// Prints a control reply; returns true if it says ok.
bool report_swap(const nlohmann::json& r) {
  const bool ok = r.value("ok", false);
  std::cout << "server: " << r.value("message", r.dump()) << "\n";
  return ok;
}

void add_server_flag(CLI::App* c, model_flags& f) {
  c->add_option("--server", f.server,
                "control endpoint of a running `undertone serve` (server.control_bind, e.g. tcp://127.0.0.1:5557):\n"
                "it switches its encoder now; without it the change applies at the server's next start");
  c->add_option("--timeout", f.timeout_s, "seconds to wait for the server's answer")->capture_default_str();
  add_token_option(c, f.token);
}

/// One control request to --server, carrying the auth token (--token, env, config).
nlohmann::json call_server(const global_options& g, const model_flags& f, nlohmann::json req) {
  return transport::control_call(f.server, std::move(req), std::chrono::seconds(f.timeout_s),
                                 transport::client_auth_token(f.token, effective_config(g).server));
}

}  // namespace

void add_model_command(CLI::App& app, global_options& g) {
  static model_flags f;
  auto* cmd = app.add_subcommand(
      "model",
      "Manage the speech-encoder registry (encoder.registry, default <model_home>/encoders): versioned,\n"
      "verified projector checkpoints; the server serves the `current` one and can hot-swap between them\n"
      "(turns in flight finish on the old weights; every answer records its version). docs/hot-swap.md");
  cmd->require_subcommand(1);
  cmd->add_option("--registry", f.registry, "registry directory (overrides encoder.registry)");

  auto* list = cmd->add_subcommand("list", "List versions (* = current) with their parent, source and metrics");
  list->add_flag("--json", f.json, "one JSON object per version (meta.json + current)");
  list->callback([&g] {
    try {
      models::encoder_registry reg(registry_dir(g, f));
      auto vs = reg.list();
      if (!f.json) std::cout << "encoder registry: " << reg.dir() << " (" << vs.size() << " versions)\n";
      for (const auto& v : vs) {
        if (f.json) {
          nlohmann::json j = v.meta.is_object() ? v.meta : nlohmann::json::object();
          j["version"] = v.name;
          j["current"] = v.current;
          if (!v.ok) j["error"] = v.error;
          std::cout << j.dump() << "\n";
          continue;
        }
        std::cout << (v.current ? "* " : "  ") << v.name;
        if (!v.ok) {
          std::cout << "  BROKEN: " << v.error << "\n";
          continue;
        }
        const auto& m = v.meta;
        std::cout << "  " << m.value("created", std::string("?"));
        if (m.contains("parent") && m["parent"].is_string()) std::cout << "  parent " << m["parent"].get<std::string>();
        if (m.contains("source") && m["source"].is_string()) std::cout << "  source " << m["source"].get<std::string>();
        if (m.contains("metrics") && !m["metrics"].empty()) std::cout << "  metrics " << m["metrics"].dump();
        std::cout << "\n";
      }
      if (!f.json && vs.empty()) std::cout << "  (empty: `undertone model publish FILE` adds one)\n";
    } catch (const std::exception& e) {
      std::cerr << "model list: " << e.what() << "\n";
      exit_code() = 1;
    }
  });

  auto* verify = cmd->add_subcommand("verify", "Re-hash and check versions (all by default); exit 2 if one is corrupt");
  verify->add_option("VERSION", f.versions, "versions to check");
  verify->callback([&g] {
    try {
      models::encoder_registry reg(registry_dir(g, f));
      auto todo = f.versions;
      if (todo.empty())
        for (const auto& v : reg.list()) todo.push_back(v.name);
      for (const auto& v : todo) {
        try {
          reg.verify(v);
          std::cout << v << ": ok\n";
        } catch (const std::exception& e) {
          std::cerr << v << ": CORRUPT: " << e.what() << "\n";
          exit_code() = 2;
        }
      }
    } catch (const std::exception& e) {
      std::cerr << "model verify: " << e.what() << "\n";
      exit_code() = 1;
    }
  });

  auto* publish = cmd->add_subcommand(
      "publish", "Add a projector checkpoint as a new version (verified copy) and make it current");
  publish->add_option("FILE", f.file, "projector.safetensors (undertone train)")->required()->check(CLI::ExistingFile);
  publish->add_option("--encoder-layers", f.layers, "encoder_layers.safetensors trained with it (optional)")
      ->check(CLI::ExistingFile);
  publish->add_option("--source", f.source, "where it came from (default: the file's path)");
  publish->add_option("--metrics", f.metrics, "validation metrics as a JSON object, kept in meta.json");
  publish->add_flag("--no-current", f.no_current, "only add it; do not make it current");
  add_server_flag(publish, f);
  publish->callback([&g] {
    try {
      models::encoder_registry reg(registry_dir(g, f));
      nlohmann::json meta = nlohmann::json::object();
      if (!f.source.empty()) meta["source"] = f.source;
      if (!f.metrics.empty()) {
        meta["metrics"] = nlohmann::json::parse(f.metrics);
        if (!meta["metrics"].is_object()) throw std::invalid_argument("--metrics must be a JSON object");
      }
      const std::string v = reg.publish(f.file, meta, !f.no_current, f.layers);
      std::cout << "published " << v << (f.no_current ? "" : " (current)") << " in " << reg.dir() << "\n";
      if (!f.server.empty() && !f.no_current) {
        auto r = call_server(g, f, {{"t", "encoder_swap"}, {"version", v}});
        if (!report_swap(r)) exit_code() = 3;
      } else if (!f.no_current) {
        std::cout << "a running server switches at its next start (or: --server ENDPOINT)\n";
      }
    } catch (const std::exception& e) {
      std::cerr << "model publish: " << e.what() << "\n";
      exit_code() = 1;
    }
  });

  auto* use = cmd->add_subcommand("use", "Make VERSION current (verified first)");
  use->add_option("VERSION", f.version, "registry version, e.g. v0003")->required();
  add_server_flag(use, f);
  use->callback([&g] {
    try {
      if (!f.server.empty()) {
        // The server verifies, loads, and only then makes it current.
        auto r = call_server(g, f, {{"t", "encoder_swap"}, {"version", f.version}});
        if (!report_swap(r)) exit_code() = 3;
        return;
      }
      models::encoder_registry reg(registry_dir(g, f));
      reg.set_current(f.version);
      std::cout << f.version << " is current; a running server switches at its next start (or: --server)\n";
    } catch (const std::exception& e) {
      std::cerr << "model use: " << e.what() << "\n";
      exit_code() = 1;
    }
  });

  auto* rollback = cmd->add_subcommand(
      "rollback", "Make the previous current version (or VERSION) current again; each call goes one step back");
  rollback->add_option("VERSION", f.version, "roll back to this version instead of the previous one");
  add_server_flag(rollback, f);
  rollback->callback([&g] {
    try {
      if (!f.server.empty()) {
        nlohmann::json req = {{"t", "encoder_rollback"}};
        if (!f.version.empty()) req["to"] = f.version;
        auto r = call_server(g, f, req);
        if (!report_swap(r)) exit_code() = 3;
        return;
      }
      models::encoder_registry reg(registry_dir(g, f));
      const auto before = reg.current();
      const std::string v = reg.rollback(f.version);
      std::cout << "rolled back " << before.value_or("(none)") << " -> " << v
                << "; a running server switches at its next start (or: --server)\n";
    } catch (const std::exception& e) {
      std::cerr << "model rollback: " << e.what() << "\n";
      exit_code() = 1;
    }
  });

  auto* status = cmd->add_subcommand("status", "Ask a running server which encoder version it serves");
  add_server_flag(status, f);
  status->callback([&g] {
    try {
      if (f.server.empty()) throw std::invalid_argument("--server ENDPOINT is required (e.g. tcp://127.0.0.1:5557)");
      auto r = call_server(g, f, {{"t", "status"}});
      std::cout << r.dump(2) << "\n";
      if (!r.value("ok", false)) exit_code() = 3;
    } catch (const std::exception& e) {
      std::cerr << "model status: " << e.what() << "\n";
      exit_code() = 1;
    }
  });
}

}  // namespace undertone::apps
