// Wire-level facts shared by the server and its clients. The full protocol is
// specified in docs/protocol.md (once the engine lands); this header must stay
// free of CAF and LibTorch so light clients can include it.
#pragma once

#include <cstdint>
#include <string>

namespace undertone::transport {

/// Protocol version carried in every hello frame; bumped on incompatible changes.
inline constexpr uint32_t protocol_version = 1;

/// libzmq's version as "major.minor.patch".
std::string zmq_version_string();

}  // namespace undertone::transport
