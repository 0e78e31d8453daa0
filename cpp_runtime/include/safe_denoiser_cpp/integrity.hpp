// Bundle integrity: SHA-256 (OpenSSL's EVP API) of byte strings and files, and the manifest's `files` check
// (relative path -> sha256 of every graph, data and tokenizer file), as safe_denoiser.runtime.integrity does.
#pragma once

#include <map>
#include <string>

namespace sdcpp {

// Lower-case hex SHA-256 of `bytes`.
std::string sha256_hex(const std::string& bytes);
// Lower-case hex SHA-256 of a file's bytes, read in 1 MiB chunks; Error(io) when it cannot be read.
std::string file_sha256(const std::string& path);
// Error(bundle) naming the first file (in path order) that is missing under `bundle_dir` or whose SHA-256 differs
// from `expected` (relative path -> sha256).
void verify_files(const std::string& bundle_dir, const std::map<std::string, std::string>& expected);

}  // namespace sdcpp
