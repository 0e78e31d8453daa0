// Bundle integrity: SHA-256 (OpenSSL's EVP API) of byte strings and files, and the manifest's `files` check
// (relative path -> sha256 of every graph, data and tokenizer file), as safe_denoiser.runtime.integrity does.
#pragma once

#include <atomic>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <thread>

namespace sdcpp {

// Lower-case hex SHA-256 of `bytes`.
std::string sha256_hex(const std::string& bytes);
// Lower-case hex SHA-256 of a file's bytes, read in 1 MiB chunks; Error(io) when it cannot be read.
std::string file_sha256(const std::string& path);
// The same, ending early (throwing a type private to integrity.cpp) once `stop` is set; for BackgroundVerification.
std::string file_sha256(const std::string& path, const std::atomic<bool>* stop);
// How verify_files checked the files: `hashed` read and hashed, `cached` matched a recorded stamp.
struct Verification {
  int hashed = 0;
  int cached = 0;
};
// The verified-files cache shared with the Python runtime (safe_denoiser.runtime.integrity): a file whose hash
// matched is recorded with its stat stamp (size, mtime, ctime, inode, device); a later check of the same stamp and
// expected hash does not read it again. Any write changes the ctime, which no user process can set back; a file
// changed within 2 s of the check is never recorded (a coarse clock tick could hide a second write). The file:
// $SAFE_DENOISER_VERIFY_CACHE ("" or "off": no cache), else $XDG_CACHE_HOME (or ~/.cache)/safe-denoiser/
// verified-files.json. A cache that cannot be read or written is ignored: the files are hashed.
std::optional<std::string> verify_cache_path();
// Error(bundle) naming the first file (in path order) that is missing under `bundle_dir` or whose SHA-256 differs
// from `expected` (relative path -> sha256); `cache`: the verified-files cache (nullopt: hash every file).
Verification verify_files(const std::string& bundle_dir, const std::map<std::string, std::string>& expected,
                          const std::optional<std::string>& cache = verify_cache_path());

// verify_files split over two threads, so that the hashing overlaps opening the sessions (on an SD-1.4 bundle
// each takes about 2 s). `raw_data` (the graphs' external-data files: weight bytes that onnxruntime copies at
// offsets their verified graph states, never parses) is hashed on a worker from construction and may be read while
// it is being hashed; every other file is hashed by the caller in wait(path), just before it parses that file.
// finish() before the first use of anything loaded: no image is made from bytes that are not verified. A bad file
// is named as by verify_files, though not necessarily the first in path order; destruction stops the worker.
class BackgroundVerification {
 public:
  BackgroundVerification(std::string bundle_dir, std::map<std::string, std::string> expected,
                         const std::set<std::string>& raw_data,
                         std::optional<std::string> cache = verify_cache_path());
  ~BackgroundVerification();
  BackgroundVerification(const BackgroundVerification&) = delete;
  BackgroundVerification& operator=(const BackgroundVerification&) = delete;
  // Returns once every listed file that is `path` or lies under the folder `path` is verified (hashing those that
  // are not raw data here); Error(bundle) for a bad one, or as soon as the worker has found one.
  void wait(const std::string& path);
  // wait() for every file that is not raw data (what a parser reads: graphs, tokenizer files).
  void wait_parsed();
  // Every file verified, how (hashed / from the cache), the cache written once; Error(bundle) otherwise.
  Verification finish();

 private:
  struct Shared;  // what the worker and the caller share (integrity.cpp)
  std::unique_ptr<Shared> shared_;
  Verification caller_counts_;
  Verification result_;
  bool finished_ = false;
  std::thread worker_;
};

}  // namespace sdcpp
