#include "access.hpp"

#include <arpa/inet.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <chrono>
#include <ctime>
#include <iostream>
#include <mutex>
#include <random>

#include "safe_denoiser_cpp/errors.hpp"

namespace sdcpp::cli {
namespace {
std::atomic<int> g_level{static_cast<int>(LogLevel::info)};
std::mutex g_log_mutex;

std::string lower(std::string s) {
  std::transform(s.begin(), s.end(), s.begin(), [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  return s;
}

bool sha256(const std::string& data, unsigned char* digest) {
  unsigned int size = 0;
  return EVP_Digest(data.data(), data.size(), digest, &size, EVP_sha256(), nullptr) == 1 && size == 32;
}

std::string utc_now() {
  const auto now = std::chrono::system_clock::now();
  const std::time_t t = std::chrono::system_clock::to_time_t(now);
  const auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(now.time_since_epoch()).count() % 1000;
  std::tm tm{};
  gmtime_r(&t, &tm);
  char buf[64];
  std::snprintf(buf, sizeof buf, "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ", tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday,
                tm.tm_hour, tm.tm_min, tm.tm_sec, static_cast<int>(ms));
  return buf;
}
}  // namespace

bool is_loopback_host(const std::string& host) {
  if (lower(host) == "localhost") return true;
  unsigned char addr[16];
  if (inet_pton(AF_INET, host.c_str(), addr) == 1) return addr[0] == 127;
  static const unsigned char v6_loopback[16] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1};
  return inet_pton(AF_INET6, host.c_str(), addr) == 1 && std::equal(addr, addr + 16, v6_loopback);
}

bool loopback_host_header_ok(const std::string& host_header, int port) {
  const std::string h = lower(host_header);
  for (const char* name : {"localhost", "127.0.0.1", "[::1]"}) {
    if (h == std::string(name) + ":" + std::to_string(port) || (port == 80 && h == name)) return true;
  }
  return false;
}

bool bearer_matches(const std::string& authorization, const std::string& key) {
  if (authorization.size() < 7 || lower(authorization.substr(0, 7)) != "bearer ") return false;
  // Digests of equal length: the comparison takes the same time whatever the sent token's length or content.
  unsigned char sent[32], want[32];
  if (!sha256(authorization.substr(7), sent) || !sha256(key, want)) return false;
  return CRYPTO_memcmp(sent, want, sizeof sent) == 0;
}

void check_api_key(const std::string& key, const std::string& source) {
  const bool printable = std::all_of(key.begin(), key.end(), [](unsigned char c) { return c > 32 && c < 127; });
  if (key.size() < 16 || key.size() > 256 || !printable) {
    throw Error(ErrorKind::usage, source + ": expected 16..256 printable ASCII characters without spaces (got " +
                                      std::to_string(key.size()) + " characters)");
  }
}

std::string request_id(const std::string& from_client) {
  const bool sane = !from_client.empty() && from_client.size() <= 64 &&
                    std::all_of(from_client.begin(), from_client.end(), [](unsigned char c) {
                      return std::isalnum(c) || c == '.' || c == '_' || c == '-';
                    });
  if (sane) return from_client;
  static std::mutex mutex;
  static std::mt19937_64 rng{std::random_device{}()};
  std::lock_guard<std::mutex> lock(mutex);
  char buf[17];
  std::snprintf(buf, sizeof buf, "%016llx", static_cast<unsigned long long>(rng()));
  return buf;
}

LogLevel parse_log_level(const std::string& name) {
  if (name == "debug") return LogLevel::debug;
  if (name == "info") return LogLevel::info;
  if (name == "warn") return LogLevel::warn;
  if (name == "error") return LogLevel::error;
  throw Error(ErrorKind::usage, "--log-level: expected error, warn, info or debug, got '" + name + "'");
}

void set_log_level(LogLevel level) { g_level = static_cast<int>(level); }

bool log_enabled(LogLevel level) { return static_cast<int>(level) >= g_level.load(); }

void log_line(LogLevel level, nlohmann::json fields) {
  if (!log_enabled(level)) return;
  static const char* names[] = {"debug", "info", "warn", "error"};
  nlohmann::json line = {{"time", utc_now()}, {"level", names[static_cast<int>(level)]}};
  line.update(fields);
  const std::string text = line.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
  std::lock_guard<std::mutex> lock(g_log_mutex);
  std::cerr << text << '\n' << std::flush;
}

}  // namespace sdcpp::cli
