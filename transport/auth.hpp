// Shared-secret token authentication for the server's three ZeroMQ endpoints
// (clients, remote workers, control; docs/protocol.md "Authentication").
//
// Where the token comes from, first match wins:
//   1. `--token` of a client command (clients only),
//   2. the environment variable UNDERTONE_AUTH_TOKEN (if non-empty),
//   3. config `server.auth_token`,
//   4. the first line of the file `server.auth_token_file`.
// Setting both config keys is an error. The server and its clients run the
// same resolution (servers without step 1), so one config file or one
// exported variable serves both sides. An empty result means no
// authentication (the embedded loopback default).
//
// Thread safety: pure functions (the resolvers read the environment and a file).
#pragma once

#include <string>
#include <string_view>

#include "config/config.hpp"

namespace undertone::transport {

/// Name of the environment variable that carries the token.
inline constexpr const char* auth_token_env = "UNDERTONE_AUTH_TOKEN";

/// The token the server requires ("" = none). Throws std::runtime_error naming
/// the key and file when server.auth_token_file cannot be read or its first line
/// is empty, or when both server.auth_token and server.auth_token_file are set.
std::string server_auth_token(const config::server_config& c);

/// The token a client presents: `cli` (its --token) if non-empty, else as
/// server_auth_token(c). Same errors.
std::string client_auth_token(const std::string& cli, const config::server_config& c);

/// True if `presented` equals `expected`. The time taken depends only on the
/// length of `presented`, never on where the two differ (no timing oracle).
bool token_matches(std::string_view expected, std::string_view presented);

/// True for endpoints only this machine can reach: ipc://, inproc://, and tcp
/// on 127.0.0.0/8, ::1 or localhost. False for wildcards (*, 0.0.0.0, ::) and
/// every other address.
bool is_loopback_endpoint(const std::string& endpoint);

}  // namespace undertone::transport
