#include "safe_denoiser_cpp/integrity.hpp"

#include <fcntl.h>
#include <openssl/evp.h>
#include <sys/stat.h>
#include <unistd.h>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cerrno>
#include <condition_variable>
#include <exception>
#include <climits>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <memory>
#include <mutex>
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

// Thrown out of a hash that BackgroundVerification's destructor stopped (never escapes this file).
struct Stopped {};

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

std::string file_sha256(const std::string& path) { return file_sha256(path, nullptr); }

std::string file_sha256(const std::string& path, const std::atomic<bool>* stop) {
  const Fd file{::open(path.c_str(), O_RDONLY | O_CLOEXEC)};
  if (file.fd < 0) throw Error(ErrorKind::io, "cannot read '" + path + "': " + std::strerror(errno));
  auto ctx = sha256_context();
  std::vector<unsigned char> buffer(kChunk);
  for (;;) {
    const ssize_t n = ::read(file.fd, buffer.data(), buffer.size());
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) throw Error(ErrorKind::io, "cannot read '" + path + "': " + std::strerror(errno));
    if (n == 0) break;
    if (stop != nullptr && stop->load(std::memory_order_relaxed)) throw Stopped{};
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

namespace {
// The verified-files cache while a check runs: read once, new records added, written once at the end.
struct CacheState {
  std::optional<std::string> path;
  CacheJson entries;
  bool changed = false;
};

// One listed file checked against `want`: true when it was hashed, false when the cache vouched for it; Error(bundle)
// when it is missing or differs. `stop` (optional) ends the hashing early by throwing Stopped. `lock` guards `cache`
// (nullptr: one thread only); it is not held while hashing.
bool verify_one(const std::string& bundle_dir, const std::string& name, const std::string& want, CacheState& cache,
                std::mutex* lock, const std::atomic<bool>* stop) {
  const std::string path = bundle_dir + "/" + name;
  const std::string where = "bundle '" + bundle_dir + "': file '" + name + "'";
  if (!is_file(path)) throw Error(ErrorKind::bundle, where + " listed in the manifest is missing");
  const std::string key = real_path(path);
  int64_t changed_ns = 0;
  const auto stamp = stamp_of(path, &changed_ns);
  {
    std::unique_lock<std::mutex> guard = lock ? std::unique_lock<std::mutex>(*lock) : std::unique_lock<std::mutex>();
    if (stamp && cached(cache.entries, key, *stamp, want)) return false;
  }
  std::string got;
  try {
    got = file_sha256(path, stop);
  } catch (const Error& e) {
    throw Error(ErrorKind::bundle, where + ": " + e.what());
  }
  if (got != want) {
    throw Error(ErrorKind::bundle, where + " does not match the manifest (sha256 " + got.substr(0, 16) +
                                       "..., recorded " + want.substr(0, 16) +
                                       "...): it was changed or damaged after export (a partial copy, a flipped "
                                       "byte); copy or export the bundle again");
  }
  if (stamp && stamp_of(path) == stamp && now_ns() - changed_ns > kRacyNs) {
    std::unique_lock<std::mutex> guard = lock ? std::unique_lock<std::mutex>(*lock) : std::unique_lock<std::mutex>();
    cache.entries.erase(key);  // re-inserted last
    cache.entries[key] = CacheJson{{"stamp", *stamp}, {"sha256", got}};
    cache.changed = true;
  }
  return true;
}

void count(Verification& v, bool hashed) { ++(hashed ? v.hashed : v.cached); }

// Whether `name` is `path` or lies under the folder `path`.
bool covers(const std::string& path, const std::string& name) {
  return name == path || (name.size() > path.size() && name.compare(0, path.size(), path) == 0 && name[path.size()] == '/');
}
}  // namespace

Verification verify_files(const std::string& bundle_dir, const std::map<std::string, std::string>& expected,
                          const std::optional<std::string>& cache) {
  CacheState state{cache, read_cache(cache)};
  Verification out;
  for (const auto& [name, want] : expected) {  // path order: the first bad file is named
    count(out, verify_one(bundle_dir, name, want, state, nullptr, nullptr));
  }
  if (state.changed && cache) write_cache(*cache, state.entries);
  return out;
}

struct BackgroundVerification::Shared {
  std::string dir;
  std::map<std::string, std::string> expected;
  std::set<std::string> raw;  // hashed by the worker
  std::mutex mutex;           // guards everything below, and cache.entries
  std::condition_variable changed;
  CacheState cache;
  std::set<std::string> verified;
  Verification worker_counts;
  bool worker_done = false;
  std::exception_ptr worker_error;
  std::atomic<bool> stop{false};
};

BackgroundVerification::BackgroundVerification(std::string bundle_dir, std::map<std::string, std::string> expected,
                                               const std::set<std::string>& raw_data, std::optional<std::string> cache)
    : shared_(std::make_unique<Shared>()) {
  Shared& sh = *shared_;
  sh.dir = std::move(bundle_dir);
  sh.expected = std::move(expected);
  for (const auto& entry : sh.expected) {
    if (raw_data.count(entry.first)) sh.raw.insert(entry.first);
  }
  sh.cache = CacheState{cache, read_cache(cache)};
  worker_ = std::thread([&sh] {
    Verification counts;
    std::exception_ptr error;
    try {
      for (const auto& name : sh.raw) {
        const bool hashed = verify_one(sh.dir, name, sh.expected.at(name), sh.cache, &sh.mutex, &sh.stop);
        count(counts, hashed);
        const std::lock_guard<std::mutex> lock(sh.mutex);
        sh.verified.insert(name);
        sh.changed.notify_all();
      }
    } catch (const Stopped&) {
    } catch (...) {
      error = std::current_exception();
    }
    const std::lock_guard<std::mutex> lock(sh.mutex);
    sh.worker_counts = counts;
    sh.worker_error = error;
    sh.worker_done = true;
    sh.changed.notify_all();
  });
}

BackgroundVerification::~BackgroundVerification() {
  shared_->stop = true;
  if (worker_.joinable()) worker_.join();
}

void BackgroundVerification::wait(const std::string& path) {
  Shared& sh = *shared_;
  for (const auto& [name, want] : sh.expected) {  // this thread's files: checked here, just before their use
    if (!covers(path, name) || sh.raw.count(name)) continue;
    {
      const std::lock_guard<std::mutex> lock(sh.mutex);
      if (sh.verified.count(name)) continue;
    }
    const bool hashed = verify_one(sh.dir, name, want, sh.cache, &sh.mutex, nullptr);
    const std::lock_guard<std::mutex> lock(sh.mutex);
    count(caller_counts_, hashed);
    sh.verified.insert(name);
  }
  std::unique_lock<std::mutex> lock(sh.mutex);
  sh.changed.wait(lock, [&] {
    if (sh.worker_done || sh.worker_error) return true;
    for (const auto& name : sh.raw) {
      if (covers(path, name) && !sh.verified.count(name)) return false;
    }
    return true;
  });
  if (sh.worker_error) std::rethrow_exception(sh.worker_error);
}

void BackgroundVerification::wait_parsed() {
  for (const auto& entry : shared_->expected) {
    if (!shared_->raw.count(entry.first)) wait(entry.first);
  }
}

Verification BackgroundVerification::finish() {
  Shared& sh = *shared_;
  if (finished_) return result_;
  wait_parsed();  // a bad file throws; the destructor stops the worker
  if (worker_.joinable()) worker_.join();
  if (sh.worker_error) std::rethrow_exception(sh.worker_error);
  result_ = {caller_counts_.hashed + sh.worker_counts.hashed, caller_counts_.cached + sh.worker_counts.cached};
  finished_ = true;
  if (sh.cache.changed && sh.cache.path) write_cache(*sh.cache.path, sh.cache.entries);
  return result_;
}

}  // namespace sdcpp
