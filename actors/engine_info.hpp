// Facts about the actor runtime, for `undertone --version` and logs.
#pragma once

#include <string>

namespace undertone::actors {

/// CAF version as "major.minor.patch".
std::string caf_version_string();

}  // namespace undertone::actors
