// Keyword spotter: the custom-actor example (actors/keyword_spotter.hpp).
#include "actors/keyword_spotter.hpp"

#include <cctype>

namespace undertone::actors {

namespace {

std::string lower(std::string s) {
  for (auto& c : s) c = char(std::tolower(static_cast<unsigned char>(c)));
  return s;
}
bool word_char(char c) { return std::isalnum(static_cast<unsigned char>(c)) || c == '\''; }

struct keyword_spotter_state {
  keyword_spotter_options o;
  int64_t matches = 0;
  static inline const char* name = "undertone.keyword_spotter";
};

caf::behavior keyword_spotter(caf::stateful_actor<keyword_spotter_state>* self, keyword_spotter_options opt) {
  self->state.o = std::move(opt);
  return {
      [=](session_event& ev) {
        auto& st = self->state;
        if (ev.kind != "answer" && ev.kind != "turn_text") return;
        for (auto& w : find_keywords(ev.text, st.o.words)) {
          ++st.matches;
          self->send(st.o.supervisor, inject_message{ev.id, st.o.prefix + w, st.o.as_system});
        }
      },
      [=](stats_atom) { return self->state.matches; },
  };
}

}  // namespace

std::vector<std::string> find_keywords(const std::string& text, const std::vector<std::string>& list) {
  const std::string t = lower(text);
  std::vector<std::string> out;
  for (const auto& w : list) {
    const std::string lw = lower(w);
    if (lw.empty()) continue;
    for (size_t at = t.find(lw); at != std::string::npos; at = t.find(lw, at + 1)) {
      const bool left = at == 0 || !word_char(t[at - 1]);
      const bool right = at + lw.size() >= t.size() || !word_char(t[at + lw.size()]);
      if (left && right) {
        out.push_back(w);
        break;
      }
    }
  }
  return out;
}

caf::actor spawn_keyword_spotter(caf::actor_system& sys, keyword_spotter_options opt) {
  return sys.spawn(keyword_spotter, std::move(opt));
}

}  // namespace undertone::actors
