#include "actors/engine_info.hpp"

#include <caf/config.hpp>

namespace undertone::actors {

std::string caf_version_string() {
  return std::to_string(CAF_MAJOR_VERSION) + "." + std::to_string(CAF_MINOR_VERSION) + "." +
         std::to_string(CAF_PATCH_VERSION);
}

}  // namespace undertone::actors
