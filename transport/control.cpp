// The control endpoint and its blocking client (transport/control.hpp).
#include "transport/control.hpp"

#include <atomic>
#include <stdexcept>
#include <thread>
#include <vector>

#include <caf/all.hpp>
#include <zmq.hpp>
#include <zmq_addon.hpp>

#include "actors/messages.hpp"
#include "transport/auth.hpp"

namespace undertone::transport {

namespace {

constexpr int k_protocol_version = 1;
constexpr size_t k_max_request_bytes = 64 * 1024;

nlohmann::json error_reply(const std::string& code, const std::string& message) {
  return {{"v", k_protocol_version}, {"t", "error"}, {"ok", false}, {"code", code}, {"message", message}};
}

nlohmann::json swap_reply(const char* type, const actors::swap_result& r) {
  return {{"v", k_protocol_version}, {"t", type},           {"ok", r.ok},
          {"version", r.version},    {"previous", r.previous}, {"message", r.message}};
}

}  // namespace

struct control_server::impl {
  caf::actor_system& sys;
  caf::actor supervisor;
  std::string auth_token;  ///< "" = none
  zmq::context_t ctx{1};
  zmq::socket_t router{ctx, zmq::socket_type::router};
  std::string endpoint;
  std::atomic<bool> stop{false};
  std::thread thread;

  impl(caf::actor_system& s, caf::actor sup, std::string token)
      : sys(s), supervisor(std::move(sup)), auth_token(std::move(token)) {}

  // One request -> one reply (both JSON; msgpack on the wire).
  nlohmann::json handle(const nlohmann::json& req) {
    if (!req.is_object()) return error_reply("bad_frame", "a request is a msgpack map");
    if (req.value("v", k_protocol_version) != k_protocol_version)
      return error_reply("unsupported_version", "control protocol version 1 only");
    if (!auth_token.empty()) {
      const auto tok = req.find("token");
      const bool given = tok != req.end() && tok->is_string();
      if (!given || !token_matches(auth_token, tok->get_ref<const std::string&>()))
        return error_reply("unauthorized", given ? "wrong auth token"
                                                 : "this server requires an auth token (\"token\"; --token or "
                                                   "UNDERTONE_AUTH_TOKEN)");
    }
    const std::string t = req.value("t", std::string());
    caf::scoped_actor self{sys};
    auto ask = [&](auto msg, std::chrono::seconds timeout, auto on_reply) -> nlohmann::json {
      nlohmann::json out;
      self->request(supervisor, timeout, std::move(msg))
          .receive(on_reply(out), [&](caf::error& e) {
            out = error_reply("internal", "the engine did not answer: " + caf::to_string(e));
          });
      return out;
    };
    if (t == "status") {
      return ask(actors::status_request{}, std::chrono::seconds(30), [](nlohmann::json& out) {
        return [&out](actors::engine_status& s) {
          out = {{"v", k_protocol_version},
                 {"t", "status"},
                 {"ok", true},
                 {"models", s.models},
                 {"llm", s.llm_version},
                 {"sessions", s.sessions},
                 {"encoder",
                  {{"version", s.encoder.version},
                   {"generation", s.encoder.generation},
                   {"streams", s.encoder.streams},
                   {"registry", s.encoder.registry},
                   {"registry_current", s.encoder.registry_current}}}};
        };
      });
    }
    if (t == "encoder_swap" || t == "encoder_rollback") {
      const bool swap = t == "encoder_swap";
      const char* type = swap ? "encoder_swap" : "encoder_rollback";
      auto on = [type](nlohmann::json& out) {
        return [&out, type](actors::swap_result& r) { out = swap_reply(type, r); };
      };
      if (swap) {
        const auto v = req.find("version");
        if (v == req.end() || !v->is_string() || v->get<std::string>().empty())
          return error_reply("bad_frame", "encoder_swap needs \"version\" (a registry version name)");
        actors::swap_encoder m;
        m.version = v->get<std::string>();
        m.make_current = req.value("make_current", true);
        return ask(std::move(m), std::chrono::seconds(600), on);
      }
      actors::rollback_encoder m;
      m.to = req.value("to", std::string());
      return ask(std::move(m), std::chrono::seconds(600), on);
    }
    return error_reply("unknown_type", "unknown request type \"" + t + "\" (status, encoder_swap, encoder_rollback)");
  }

  void run() {
    zmq::pollitem_t item{router.handle(), 0, ZMQ_POLLIN, 0};
    while (!stop.load()) {
      try {
        zmq::poll(&item, 1, std::chrono::milliseconds(100));
      } catch (const zmq::error_t&) {
        continue;  // EINTR
      }
      if (!(item.revents & ZMQ_POLLIN)) continue;
      std::vector<zmq::message_t> parts;
      if (!zmq::recv_multipart(router, std::back_inserter(parts), zmq::recv_flags::dontwait)) continue;
      if (parts.size() < 2) continue;  // no identity: nothing to answer to
      nlohmann::json reply;
      const auto& body = parts.back();
      nlohmann::json req;
      if (body.size() > k_max_request_bytes) {
        reply = error_reply("frame_too_large", "control requests are at most 64 KiB");
      } else {
        try {
          const auto* b = static_cast<const uint8_t*>(body.data());
          req = nlohmann::json::from_msgpack(b, b + body.size());
          reply = handle(req);
        } catch (const nlohmann::json::exception& e) {
          reply = error_reply("bad_frame", std::string("undecodable msgpack: ") + e.what());
        } catch (const std::exception& e) {
          reply = error_reply("internal", e.what());
        }
      }
      if (req.is_object() && req.contains("id")) reply["id"] = req["id"];
      const auto bytes = nlohmann::json::to_msgpack(reply);
      std::vector<zmq::message_t> out;
      for (size_t i = 0; i + 1 < parts.size(); ++i) out.emplace_back(parts[i].data(), parts[i].size());
      out.emplace_back(bytes.data(), bytes.size());
      try {
        zmq::send_multipart(router, out, zmq::send_flags::dontwait);
      } catch (const zmq::error_t&) {
        // the client is gone: nothing to do
      }
    }
  }
};

control_server::control_server(caf::actor_system& sys, caf::actor supervisor, const std::string& bind,
                               const std::string& auth_token)
    : p_(std::make_unique<impl>(sys, std::move(supervisor), auth_token)) {
  p_->router.set(zmq::sockopt::linger, 0);
  p_->router.set(zmq::sockopt::router_mandatory, 0);
  try {
    p_->router.bind(bind);
  } catch (const zmq::error_t& e) {
    throw std::runtime_error("control endpoint: cannot bind " + bind + ": " + e.what() +
                             " (server.control_bind; \"\" disables it)");
  }
  p_->endpoint = p_->router.get(zmq::sockopt::last_endpoint);
  p_->thread = std::thread([this] { p_->run(); });
}

control_server::~control_server() {
  p_->stop.store(true);
  if (p_->thread.joinable()) p_->thread.join();
}

const std::string& control_server::endpoint() const { return p_->endpoint; }

nlohmann::json control_call(const std::string& endpoint, nlohmann::json request, std::chrono::milliseconds timeout,
                            const std::string& token) {
  if (!request.is_object()) throw std::invalid_argument("control_call: the request must be a JSON object");
  if (!request.contains("v")) request["v"] = k_protocol_version;
  if (!token.empty()) request["token"] = token;
  zmq::context_t ctx{1};
  zmq::socket_t s{ctx, zmq::socket_type::dealer};
  s.set(zmq::sockopt::linger, 0);
  try {
    s.connect(endpoint);
  } catch (const zmq::error_t& e) {
    throw std::runtime_error("control endpoint " + endpoint + ": " + e.what());
  }
  const auto bytes = nlohmann::json::to_msgpack(request);
  if (!s.send(zmq::buffer(bytes), zmq::send_flags::dontwait))
    throw std::runtime_error("control endpoint " + endpoint + ": cannot send (is the server running?)");
  zmq::pollitem_t item{s.handle(), 0, ZMQ_POLLIN, 0};
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  for (;;) {
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
    if (left.count() <= 0)
      throw std::runtime_error("control endpoint " + endpoint + ": no answer within " +
                               std::to_string(timeout.count()) + " ms (is `undertone serve` running with server.control_bind = " +
                               endpoint + "?)");
    try {
      zmq::poll(&item, 1, left);
    } catch (const zmq::error_t&) {
      continue;
    }
    if (!(item.revents & ZMQ_POLLIN)) continue;
    zmq::message_t msg;
    if (!s.recv(msg, zmq::recv_flags::dontwait)) continue;
    try {
      const auto* b = static_cast<const uint8_t*>(msg.data());
      auto j = nlohmann::json::from_msgpack(b, b + msg.size());
      if (!j.is_object()) throw std::runtime_error("not a map");
      return j;
    } catch (const std::exception& e) {
      throw std::runtime_error("control endpoint " + endpoint + ": undecodable reply (" + e.what() + ")");
    }
  }
}

}  // namespace undertone::transport
