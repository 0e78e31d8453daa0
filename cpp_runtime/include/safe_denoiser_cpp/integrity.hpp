// Bundle integrity: SHA-256 (OpenSSL's EVP API) of byte strings and files, and the manifest's `files` check
// (relative path -> sha256 of every graph, data and tokenizer file), as safe_denoiser.runtime.integrity does.
#pragma once

#include <map>
#include <optional>
#include <string>

namespace sdcpp {

// Lower-case hex SHA-256 of `bytes`.
std::string sha256_hex(const std::string& bytes);
// Lower-case hex SHA-256 of a file's bytes, read in 1 MiB chunks; Error(io) when it cannot be read.
std::string file_sha256(const std::string& path);
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

}  // namespace sdcpp
