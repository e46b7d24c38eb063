// Supervisor actor (actors/supervisor.hpp).
#include "actors/supervisor.hpp"

#include <chrono>
#include <deque>
#include <iostream>
#include <unordered_map>

namespace undertone::actors {

namespace {

using clk = std::chrono::steady_clock;

struct component {
  const char* which;
  caf::actor actor;
  std::function<caf::actor()> respawn;
  std::deque<clk::time_point> restarts;
};

struct supervisor_state {
  supervisor_options o;
  std::unordered_map<session_id, caf::actor> sessions;
  std::unordered_map<caf::actor_addr, session_id> session_of;
  std::vector<caf::actor> subscribers;
  component comps[3] = {{"encoder", {}, {}, {}}, {"llm", {}, {}, {}}, {"logger", {}, {}, {}}};
  session_id next_id = 1;
  static inline const char* name = "undertone.supervisor";

  void broadcast(caf::event_based_actor* self, const caf::message& m) {
    for (auto& kv : sessions) self->send(kv.second, m);
  }

  /// Passes a swap/rollback request to the encoder and its swap_result back.
  caf::result<swap_result> forward_swap(caf::event_based_actor* self, caf::message m) {
    swap_result failed;
    if (!comps[0].actor) {
      failed.message = "refused: the encoder is not running";
      return failed;
    }
    auto rp = self->make_response_promise<swap_result>();
    // Loading a checkpoint takes well under a second; the bound only keeps a
    // wedged encoder from leaving the requester without an answer.
    self->request(comps[0].actor, std::chrono::minutes(5), std::move(m))
        .then([rp](swap_result& r) mutable { rp.deliver(std::move(r)); },
              [rp](caf::error& e) mutable {
                swap_result f;
                f.message = "refused: the encoder did not answer (" + caf::to_string(e) + ")";
                rp.deliver(std::move(f));
              });
    return rp;
  }
};

caf::behavior supervisor_behavior(caf::stateful_actor<supervisor_state>* self, supervisor_options opt) {
  auto& st = self->state;
  st.o = std::move(opt);
  st.comps[0].actor = st.o.encoder;
  st.comps[0].respawn = st.o.respawn_encoder;
  st.comps[1].actor = st.o.llm;
  st.comps[1].respawn = st.o.respawn_llm;
  st.comps[2].actor = st.o.logger;
  st.comps[2].respawn = st.o.respawn_logger;
  for (auto& c : st.comps)
    if (c.actor) self->monitor(c.actor);

  self->set_down_handler([self](caf::down_msg& dm) {
    auto& st = self->state;
    if (auto it = st.session_of.find(dm.source); it != st.session_of.end()) {
      st.sessions.erase(it->second);
      st.session_of.erase(it);
      return;
    }
    for (auto& c : st.comps) {
      if (!c.actor || c.actor.address() != dm.source) continue;
      std::cerr << "undertone: " << c.which << " died (" << caf::to_string(dm.reason) << ")";
      c.actor = nullptr;
      const auto now = clk::now();
      while (!c.restarts.empty() && now - c.restarts.front() > std::chrono::minutes(1)) c.restarts.pop_front();
      if (!c.respawn || int(c.restarts.size()) >= st.o.max_restarts_per_minute) {
        std::cerr << "; not restarted (too many restarts)\n";
        return;
      }
      c.restarts.push_back(now);
      try {
        c.actor = c.respawn();
      } catch (const std::exception& e) {
        std::cerr << "; restart failed: " << e.what() << "\n";
        return;
      }
      std::cerr << "; restarted\n";
      self->monitor(c.actor);
      st.broadcast(self, caf::make_message(component_restarted{c.which, c.actor}));
      return;
    }
    auto& subs = st.subscribers;
    for (auto it = subs.begin(); it != subs.end(); ++it) {
      if (it->address() != dm.source) continue;
      st.broadcast(self, caf::make_message(unsubscribe_events{*it}));
      subs.erase(it);
      return;
    }
  });

  self->set_exit_handler([self](caf::exit_msg& em) {
    auto& st = self->state;
    for (auto& kv : st.sessions) self->send_exit(kv.second, em.reason);
    for (auto& c : st.comps)
      if (c.actor) self->send_exit(c.actor, em.reason);
    self->quit(em.reason);
  });

  return {
      [=](open_session& m) -> caf::message {
        auto& st = self->state;
        if (int64_t(st.sessions.size()) >= st.o.max_sessions)
          return caf::make_message(to_client_error{m.client_identity, error_code::server_full,
                                                   "server full (" + std::to_string(st.o.max_sessions) +
                                                       " sessions)",
                                                   true});
        if (!st.comps[0].actor || !st.comps[1].actor)
          return caf::make_message(
              to_client_error{m.client_identity, error_code::internal, "the engine is not running", true});
        session_options so;
        so.id = st.next_id++;
        so.client_identity = m.client_identity;
        so.client_name = m.client_name;
        so.settings = m.settings;
        so.env = st.o.env;
        so.gateway = caf::actor_cast<caf::actor>(self->current_sender());
        so.supervisor = caf::actor_cast<caf::actor>(self);
        so.encoder = st.comps[0].actor;
        so.llm = st.comps[1].actor;
        so.logger = st.comps[2].actor;
        so.subscribers = st.subscribers;
        const auto id = so.id;
        auto s = spawn_session(self->system(), std::move(so));
        self->monitor(s);
        st.sessions[id] = s;
        st.session_of[s.address()] = id;
        return caf::make_message(session_opened{m.client_identity, id, s, st.o.env->models});
      },
      [=](subscribe_events& m) {
        auto& st = self->state;
        if (!m.subscriber) return;
        st.subscribers.push_back(m.subscriber);
        self->monitor(m.subscriber);
        st.broadcast(self, caf::make_message(m));
      },
      [=](unsubscribe_events& m) {
        auto& subs = self->state.subscribers;
        subs.erase(std::remove(subs.begin(), subs.end(), m.subscriber), subs.end());
        self->state.broadcast(self, caf::make_message(m));
      },
      [=](inject_message& m) {
        auto& st = self->state;
        if (m.id == 0) {
          st.broadcast(self, caf::make_message(m));
        } else if (auto it = st.sessions.find(m.id); it != st.sessions.end()) {
          self->send(it->second, m);
        }
      },
      [=](stats_atom) { return int64_t(self->state.sessions.size()); },
      // Hot swap (docs/hot-swap.md): the encoder actor does the work.
      [=](swap_encoder& m) -> caf::result<swap_result> { return self->state.forward_swap(self, caf::make_message(std::move(m))); },
      [=](rollback_encoder& m) -> caf::result<swap_result> {
        return self->state.forward_swap(self, caf::make_message(std::move(m)));
      },
      // The finetune actor published a gated checkpoint in the registry: swap to it.
      [=](encoder_published& m) {
        auto& st = self->state;
        if (!st.comps[0].actor) return;
        self->request(st.comps[0].actor, std::chrono::minutes(5), swap_encoder{m.version, "", "", true})
            .then([](swap_result& r) {
                    std::cerr << "undertone supervisor: fine-tuned encoder " << r.version
                              << (r.ok ? " now serves new turns" : " refused: " + r.message) << "\n";
                  },
                  [](caf::error& e) { std::cerr << "undertone supervisor: encoder swap failed: " << caf::to_string(e) << "\n"; });
      },
      [=](status_request) -> caf::result<engine_status> {
        auto& st = self->state;
        engine_status s;
        s.models = st.o.env->models;
        s.llm_version = st.o.env->llm_version;
        s.sessions = int64_t(st.sessions.size());
        if (!st.comps[0].actor) {
          s.encoder.version = "(encoder not running)";
          return s;
        }
        auto rp = self->make_response_promise<engine_status>();
        self->request(st.comps[0].actor, std::chrono::seconds(30), status_request{})
            .then([rp, s](encoder_status& es) mutable {
              s.encoder = std::move(es);
              rp.deliver(std::move(s));
            },
                  [rp, s](caf::error&) mutable {
                    s.encoder.version = "(encoder did not answer)";
                    rp.deliver(std::move(s));
                  });
        return rp;
      },
  };
}

}  // namespace

caf::actor spawn_supervisor(caf::actor_system& sys, supervisor_options opt) {
  return sys.spawn(supervisor_behavior, std::move(opt));
}

}  // namespace undertone::actors
