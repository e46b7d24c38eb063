// Token resolution and comparison (transport/auth.hpp).
#include "transport/auth.hpp"

#include <cstdlib>
#include <fstream>
#include <stdexcept>

namespace undertone::transport {

namespace {

std::string trim(std::string s) {
  const char* ws = " \t\r\n";
  const auto b = s.find_first_not_of(ws);
  if (b == std::string::npos) return {};
  const auto e = s.find_last_not_of(ws);
  return s.substr(b, e - b + 1);
}

std::string from_config(const config::server_config& c) {
  if (!c.auth_token.empty() && !c.auth_token_file.empty())
    throw std::runtime_error("server.auth_token and server.auth_token_file are both set: set only one");
  if (!c.auth_token.empty()) return c.auth_token;
  if (c.auth_token_file.empty()) return {};
  std::ifstream in(c.auth_token_file);
  if (!in)
    throw std::runtime_error("server.auth_token_file: cannot read " + c.auth_token_file +
                             " (create it with the token on its first line, or unset the key)");
  std::string line;
  std::getline(in, line);
  line = trim(std::move(line));
  // An empty token would silently mean "no authentication": refuse instead.
  if (line.empty())
    throw std::runtime_error("server.auth_token_file: the first line of " + c.auth_token_file +
                             " is empty (it must hold the token)");
  return line;
}

}  // namespace

std::string server_auth_token(const config::server_config& c) {
  if (const char* env = std::getenv(auth_token_env); env && *env) return env;
  return from_config(c);
}

std::string client_auth_token(const std::string& cli, const config::server_config& c) {
  if (!cli.empty()) return cli;
  return server_auth_token(c);
}

bool token_matches(std::string_view expected, std::string_view presented) {
  // Loop over the presented bytes only and fold every difference in, so the
  // time does not reveal the length of a matching prefix.
  volatile unsigned char diff = expected.size() == presented.size() ? 0 : 1;
  const size_t n = expected.size();
  for (size_t i = 0; i < presented.size(); ++i) {
    const unsigned char e = n ? static_cast<unsigned char>(expected[i % n]) : 0;
    diff = diff | (e ^ static_cast<unsigned char>(presented[i]));
  }
  return diff == 0;
}

bool is_loopback_endpoint(const std::string& endpoint) {
  if (endpoint.rfind("ipc://", 0) == 0 || endpoint.rfind("inproc://", 0) == 0) return true;
  if (endpoint.rfind("tcp://", 0) != 0) return false;
  std::string host = endpoint.substr(6);
  const auto colon = host.rfind(':');
  if (colon != std::string::npos) host = host.substr(0, colon);
  // "tcp://eth0;192.168.1.1:5555" style (source;destination) binds the last part.
  if (const auto semi = host.rfind(';'); semi != std::string::npos) host = host.substr(semi + 1);
  if (host.size() >= 2 && host.front() == '[' && host.back() == ']') host = host.substr(1, host.size() - 2);
  return host == "localhost" || host == "::1" || host.rfind("127.", 0) == 0;
}

}  // namespace undertone::transport
