// Who may call the server and what it logs: loopback detection, the Host check against DNS rebinding, the bearer
// key (compared in constant time), request ids, and one JSON log line per event on stderr.
#pragma once

#include <nlohmann/json.hpp>
#include <string>

namespace sdcpp::cli {

// 127.0.0.0/8, ::1 or "localhost": the only binds that may run without an API key.
bool is_loopback_host(const std::string& host);
// Loopback binds: the Host header must name this machine (localhost, 127.0.0.1, [::1]) with the bound port, so
// that a web page on another name (DNS rebinding) cannot drive the server through the browser.
bool loopback_host_header_ok(const std::string& host_header, int port);
// "Bearer <key>" with the key compared in constant time (SHA-256 of both, then CRYPTO_memcmp).
bool bearer_matches(const std::string& authorization, const std::string& key);
// An API key must be 16..256 printable ASCII characters without spaces; Error(usage) naming `source` otherwise.
void check_api_key(const std::string& key, const std::string& source);
// The client's X-Request-Id when it is 1..64 of [A-Za-z0-9._-], else a new random 16-hex-digit id.
std::string request_id(const std::string& from_client);

enum class LogLevel { debug = 0, info = 1, warn = 2, error = 3 };
// "error", "warn", "info" or "debug"; Error(usage) naming --log-level otherwise.
LogLevel parse_log_level(const std::string& name);
void set_log_level(LogLevel level);
bool log_enabled(LogLevel level);
// One line {"time": ..., "level": ..., <fields>} on stderr when `level` is enabled.
void log_line(LogLevel level, nlohmann::json fields);

}  // namespace sdcpp::cli
