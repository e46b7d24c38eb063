// Example custom actor (docs/extending.md): watches every session's answers and
// user text turns for words from a list and, on a match, injects a message into
// that session through the supervisor (the client sees an "inject" event, or
// with as_system the LLM gets a system line before the next answer).
#pragma once

#include <string>
#include <vector>

#include "actors/messages.hpp"

namespace undertone::actors {

struct keyword_spotter_options {
  std::vector<std::string> words;  ///< matched case-insensitively as whole words
  caf::actor supervisor;           ///< where inject_message goes (engine::supervisor())
  bool as_system = false;          ///< inject as a system line for the LLM instead of a client event
  std::string prefix = "keyword: ";
};

/// Handles session_event (kinds "answer" and "turn_text"); replies to stats_atom
/// with the number of matches so far (int64_t).
caf::actor spawn_keyword_spotter(caf::actor_system& sys, keyword_spotter_options opt);

/// The words of `list` found in `text` (case-insensitive, whole words), in list order.
std::vector<std::string> find_keywords(const std::string& text, const std::vector<std::string>& list);

}  // namespace undertone::actors
