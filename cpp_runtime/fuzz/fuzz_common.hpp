// What the libFuzzer targets share: the input as text, the fixtures folder (data/), a scratch folder of the
// process's own for readers that take a path, and a loud abort when a reader breaks its contract.
#pragma once

#include <stdlib.h>

#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>

#ifndef SD_FUZZ_DATA
#error "SD_FUZZ_DATA (the fixtures folder) must be defined by the build"
#endif

namespace sdfuzz {

inline std::string text(const uint8_t* data, size_t size) { return {reinterpret_cast<const char*>(data), size}; }

// A reader returned something its header rules out: libFuzzer records the input as a crash.
[[noreturn]] inline void violated(const std::string& what) {
  std::fprintf(stderr, "fuzz property violated: %s\n", what.c_str());
  std::abort();
}

inline std::string data_path(const std::string& relative) { return std::string(SD_FUZZ_DATA) + "/" + relative; }

inline std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) violated("cannot read fixture " + path);
  std::ostringstream out;
  out << in.rdbuf();
  return out.str();
}

inline void write_file(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  if (!out) violated("cannot write " + path);
}

// <base>/sdcpp-fuzz-XXXXXX, made on first use and removed at exit (parallel fuzz jobs each get their own). The base
// is $SD_FUZZ_TMP, else /dev/shm, else /tmp: rewriting a file on ext4 flushes it to disk on close (auto_da_alloc),
// which made the file-reading targets 70 times slower.
inline const std::string& scratch_dir() {
  static const std::string dir = [] {
    const char* env = std::getenv("SD_FUZZ_TMP");
    std::error_code ec;
    const std::string base = env != nullptr && *env != '\0'          ? env
                             : std::filesystem::is_directory("/dev/shm", ec) ? "/dev/shm"
                                                                             : "/tmp";
    std::string tmpl = base + "/sdcpp-fuzz-XXXXXX";
    if (mkdtemp(tmpl.data()) == nullptr) violated("mkdtemp failed for " + tmpl);
    return tmpl;
  }();
  static const bool cleanup = std::atexit([] {
    std::error_code ignored;
    std::filesystem::remove_all(dir, ignored);
  }) == 0;
  (void)cleanup;
  return dir;
}

}  // namespace sdfuzz
