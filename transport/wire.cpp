#include "transport/wire.hpp"

#include <zmq.hpp>

namespace undertone::transport {

std::string zmq_version_string() {
  auto [major, minor, patch] = zmq::version();
  return std::to_string(major) + "." + std::to_string(minor) + "." + std::to_string(patch);
}

}  // namespace undertone::transport
