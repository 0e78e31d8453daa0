#include "safe_denoiser_cpp/integrity.hpp"

#include <fcntl.h>
#include <openssl/evp.h>
#include <sys/stat.h>
#include <unistd.h>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <memory>
#include <vector>

#include "safe_denoiser_cpp/errors.hpp"
#include "safe_denoiser_cpp/files.hpp"

namespace sdcpp {
namespace {
constexpr size_t kChunk = size_t{1} << 20;

using DigestContext = std::unique_ptr<EVP_MD_CTX, decltype(&EVP_MD_CTX_free)>;

DigestContext sha256_context() {
  DigestContext ctx(EVP_MD_CTX_new(), &EVP_MD_CTX_free);
  if (!ctx || EVP_DigestInit_ex(ctx.get(), EVP_sha256(), nullptr) != 1) throw Error(ErrorKind::runtime, "sha256: init failed");
  return ctx;
}

std::string hex_digest(EVP_MD_CTX* ctx) {
  unsigned char digest[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  if (EVP_DigestFinal_ex(ctx, digest, &len) != 1) throw Error(ErrorKind::runtime, "sha256: final failed");
  static const char* hex = "0123456789abcdef";
  std::string out;
  for (unsigned int i = 0; i < len; ++i) {
    out += hex[digest[i] >> 4];
    out += hex[digest[i] & 15];
  }
  return out;
}

// Closes the descriptor on every path out of file_sha256.
struct Fd {
  int fd;
  ~Fd() { if (fd >= 0) ::close(fd); }
};

bool is_file(const std::string& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}
}  // namespace

std::string sha256_hex(const std::string& bytes) {
  auto ctx = sha256_context();
  if (EVP_DigestUpdate(ctx.get(), bytes.data(), bytes.size()) != 1) throw Error(ErrorKind::runtime, "sha256: update failed");
  return hex_digest(ctx.get());
}

std::string file_sha256(const std::string& path) {
  const Fd file{::open(path.c_str(), O_RDONLY | O_CLOEXEC)};
  if (file.fd < 0) throw Error(ErrorKind::io, "cannot read '" + path + "': " + std::strerror(errno));
  auto ctx = sha256_context();
  std::vector<unsigned char> buffer(kChunk);
  for (;;) {
    const ssize_t n = ::read(file.fd, buffer.data(), buffer.size());
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) throw Error(ErrorKind::io, "cannot read '" + path + "': " + std::strerror(errno));
    if (n == 0) break;
    if (EVP_DigestUpdate(ctx.get(), buffer.data(), static_cast<size_t>(n)) != 1) {
      throw Error(ErrorKind::runtime, "sha256: update failed");
    }
  }
  return hex_digest(ctx.get());
}

namespace {
using CacheJson = nlohmann::ordered_json;  // insertion order: the newest entries are the ones kept
constexpr int kCacheVersion = 1;
constexpr size_t kMaxCacheEntries = 4096;
constexpr int64_t kRacyNs = 2'000'000'000;

int64_t ns_of(const timespec& t) { return int64_t{t.tv_sec} * 1'000'000'000 + t.tv_nsec; }

// [size, mtime ns, ctime ns, inode, device], as Python's FileStamp; nullopt when the file cannot be stat'ed.
std::optional<CacheJson> stamp_of(const std::string& path, int64_t* changed_ns = nullptr) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) return std::nullopt;
  if (changed_ns) *changed_ns = std::max(ns_of(st.st_mtim), ns_of(st.st_ctim));
  return CacheJson::array({static_cast<int64_t>(st.st_size), ns_of(st.st_mtim), ns_of(st.st_ctim),
                           static_cast<uint64_t>(st.st_ino), static_cast<uint64_t>(st.st_dev)});
}

std::string real_path(const std::string& path) {
  char buffer[PATH_MAX];
  return ::realpath(path.c_str(), buffer) ? std::string(buffer) : path;
}

int64_t now_ns() {
  timespec t {};
  ::clock_gettime(CLOCK_REALTIME, &t);
  return ns_of(t);
}

CacheJson read_cache(const std::optional<std::string>& path) {
  if (!path || !is_file(*path)) return CacheJson::object();
  try {
    const CacheJson data = CacheJson::parse(read_file(*path), nullptr, false);
    if (data.is_object() && data.value("version", 0) == kCacheVersion && data.contains("files") &&
        data["files"].is_object()) {
      return data["files"];
    }
  } catch (const std::exception&) {
  }
  return CacheJson::object();
}

// Whether the cache records `key` with this stamp and the expected hash (an entry of another form: no).
bool cached(const CacheJson& entries, const std::string& key, const CacheJson& stamp, const std::string& want) {
  try {
    const auto hit = entries.find(key);
    return hit != entries.end() && hit->is_object() && hit->at("sha256") == want && hit->at("stamp") == stamp;
  } catch (const std::exception&) {
    return false;
  }
}

void write_cache(const std::string& path, const CacheJson& files) {
  CacheJson kept = CacheJson::object();
  for (const auto& [key, entry] : files.items()) {
    if (::access(key.c_str(), F_OK) == 0) kept[key] = entry;
  }
  while (kept.size() > kMaxCacheEntries) kept.erase(kept.begin());
  try {
    const auto slash = path.find_last_of('/');
    for (size_t at = 1; slash != std::string::npos && at <= slash; ++at) {  // mkdir -p of the parent
      if (at == slash || path[at] == '/') ::mkdir(path.substr(0, at).c_str(), 0777);
    }
    atomic_write(path, CacheJson{{"version", kCacheVersion}, {"files", kept}}.dump());
  } catch (const std::exception&) {  // a cache that cannot be written is only a slower next start
  }
}
}  // namespace

std::optional<std::string> verify_cache_path() {
  if (const char* value = std::getenv("SAFE_DENOISER_VERIFY_CACHE")) {
    const std::string v(value);
    if (v.empty() || v == "off") return std::nullopt;
    return v;
  }
  std::string base;
  if (const char* xdg = std::getenv("XDG_CACHE_HOME"); xdg && *xdg) {
    base = xdg;
  } else if (const char* home = std::getenv("HOME"); home && *home) {
    base = std::string(home) + "/.cache";
  } else {
    return std::nullopt;
  }
  return base + "/safe-denoiser/verified-files.json";
}

Verification verify_files(const std::string& bundle_dir, const std::map<std::string, std::string>& expected,
                          const std::optional<std::string>& cache) {
  CacheJson entries = read_cache(cache);
  Verification out;
  bool changed = false;
  for (const auto& [name, want] : expected) {
    const std::string path = bundle_dir + "/" + name;
    const std::string where = "bundle '" + bundle_dir + "': file '" + name + "'";
    if (!is_file(path)) throw Error(ErrorKind::bundle, where + " listed in the manifest is missing");
    const std::string key = real_path(path);
    int64_t changed_ns = 0;
    const auto stamp = stamp_of(path, &changed_ns);
    if (stamp && cached(entries, key, *stamp, want)) {
      ++out.cached;
      continue;
    }
    std::string got;
    try {
      got = file_sha256(path);
    } catch (const Error& e) {
      throw Error(ErrorKind::bundle, where + ": " + e.what());
    }
    ++out.hashed;
    if (got == want && stamp && stamp_of(path) == stamp && now_ns() - changed_ns > kRacyNs) {
      entries.erase(key);  // re-inserted last
      entries[key] = CacheJson{{"stamp", *stamp}, {"sha256", got}};
      changed = true;
    }
    if (got != want) {
      throw Error(ErrorKind::bundle, where + " does not match the manifest (sha256 " + got.substr(0, 16) +
                                         "..., recorded " + want.substr(0, 16) +
                                         "...): it was changed or damaged after export (a partial copy, a flipped "
                                         "byte); copy or export the bundle again");
    }
  }
  if (changed && cache) write_cache(*cache, entries);
  return out;
}

}  // namespace sdcpp
