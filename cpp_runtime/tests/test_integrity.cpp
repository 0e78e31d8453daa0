// SHA-256 against FIPS 180-4's examples, and the bundle file check: verify_files (path order, the verified-files
// cache) and BackgroundVerification (the hashing that overlaps opening the sessions).
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdlib>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "safe_denoiser_cpp/errors.hpp"
#include "safe_denoiser_cpp/files.hpp"
#include "safe_denoiser_cpp/integrity.hpp"
#include "test_helpers.hpp"

using namespace sdcpp;
using sdcpp::testing::temp_dir;

// FIPS 180-4's SHA-256 examples (NIST CSRC "Examples with Intermediate Values"), plus the empty message.
TEST(Sha256, Fips180_4ExamplesForStringsAndFiles) {
  const std::string dir = temp_dir();
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"", "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"},
      {"abc", "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"},
      {"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq",
       "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1"},
      {"abcdefghbcdefghicdefghijdefghijkefghijklfghijklmghijklmnhijklmnoijklmnopjklmnopqklmnopqrlmnopqrsmnopqrstnopqrstu",
       "cf5b16a778af8380036ce59e7b0492370b249b11e8f07a51afac45037afee9d1"},
      {std::string(1000000, 'a'), "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0"},
  };
  for (const auto& [message, digest] : cases) {
    EXPECT_EQ(sha256_hex(message), digest) << message.size() << " bytes";
    atomic_write(dir + "/m.bin", message);
    EXPECT_EQ(file_sha256(dir + "/m.bin"), digest) << message.size() << " bytes";
  }
}

TEST(Sha256, FileHashCrossesChunkBoundaries) {
  // 3 MiB + 13 bytes: the 1 MiB chunked file hash equals the one-shot hash of the same bytes.
  const std::string dir = temp_dir();
  std::string bytes((3u << 20) + 13, '\0');
  uint32_t x = 12345;
  for (auto& c : bytes) c = static_cast<char>((x = x * 1664525u + 1013904223u) >> 24);
  atomic_write(dir + "/big.bin", bytes);
  EXPECT_EQ(file_sha256(dir + "/big.bin"), sha256_hex(bytes));
  try {
    file_sha256(dir + "/absent.bin");
    FAIL() << "hashed a missing file";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::io);
    EXPECT_NE(std::string(e.what()).find("absent.bin"), std::string::npos);
  }
}

TEST(Integrity, VerifyFilesNamesTheMissingOrAlteredFile) {
  const std::string dir = temp_dir();
  ASSERT_EQ(::mkdir((dir + "/sub").c_str(), 0700), 0);
  atomic_write(dir + "/a.onnx", std::string("abc"));
  atomic_write(dir + "/sub/b.json", std::string(""));
  const std::map<std::string, std::string> expected = {
      {"a.onnx", "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"},
      {"sub/b.json", "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"}};
  EXPECT_NO_THROW(verify_files(dir, expected));
  EXPECT_NO_THROW(verify_files(dir, {}));
  const auto message = [&]() {
    try {
      verify_files(dir, expected);
    } catch (const Error& e) {
      EXPECT_EQ(e.kind(), ErrorKind::bundle);
      return std::string(e.what());
    }
    return std::string("accepted");
  };
  atomic_write(dir + "/sub/b.json", std::string(" "));
  EXPECT_NE(message().find("file 'sub/b.json' does not match the manifest (sha256 36a9e7f1c95b82ff..., recorded "
                           "e3b0c44298fc1c14...)"),
            std::string::npos)
      << message();
  ::unlink((dir + "/sub/b.json").c_str());
  EXPECT_NE(message().find("file 'sub/b.json' listed in the manifest is missing"), std::string::npos) << message();
  atomic_write(dir + "/a.onnx", std::string("abd"));  // the first file in path order is named first
  EXPECT_NE(message().find("file 'a.onnx' does not match"), std::string::npos) << message();
}

TEST(Integrity, VerifiedFilesCacheRecordsOnlySettledFilesAndSurvivesGarbage) {
  // A file written just now is hashed every time and never recorded (the racy window); a cache file of another
  // form is ignored. The record-and-skip path (settled files, shared with Python) is tests/test_verify_cache.py's.
  const std::string dir = temp_dir();
  atomic_write(dir + "/a.onnx", std::string("abc"));
  const std::map<std::string, std::string> expected = {
      {"a.onnx", "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"}};
  const std::string cache = dir + "/cache/verified.json";
  for (int i = 0; i < 2; ++i) {
    const Verification v = verify_files(dir, expected, cache);
    EXPECT_EQ(v.hashed, 1);
    EXPECT_EQ(v.cached, 0);
  }
  struct stat st {};
  EXPECT_NE(::stat(cache.c_str(), &st), 0) << "a racy file was recorded";
  atomic_write(dir + "/garbage.json", std::string("{\"version\": 1, \"files\": {\"x\": [1, 2]}"));
  EXPECT_EQ(verify_files(dir, expected, dir + "/garbage.json").hashed, 1);
  EXPECT_EQ(verify_files(dir, expected, std::nullopt).hashed, 1);
  const char* before = std::getenv("SAFE_DENOISER_VERIFY_CACHE");
  const std::optional<std::string> saved = before ? std::optional<std::string>(before) : std::nullopt;
  ::setenv("SAFE_DENOISER_VERIFY_CACHE", "off", 1);
  EXPECT_FALSE(verify_cache_path().has_value());
  ::setenv("SAFE_DENOISER_VERIFY_CACHE", cache.c_str(), 1);
  EXPECT_EQ(verify_cache_path().value_or(""), cache);
  if (saved) {
    ::setenv("SAFE_DENOISER_VERIFY_CACHE", saved->c_str(), 1);
  } else {
    ::unsetenv("SAFE_DENOISER_VERIFY_CACHE");
  }
}

TEST(Integrity, BackgroundVerificationWaitsPerFileAndNamesTheBadOne) {
  // wait(path) returns once that file (or every file under that folder) is verified; finish() reports every file;
  // a bad file is the Error of finish() and of any wait after it failed.
  const std::string dir = temp_dir();
  ASSERT_EQ(::mkdir((dir + "/tok").c_str(), 0700), 0);
  std::string weights(5u << 20, '\0');  // raw weight bytes: hashed last
  uint32_t x = 7;
  for (auto& c : weights) c = static_cast<char>((x = x * 1664525u + 1013904223u) >> 24);
  atomic_write(dir + "/g.onnx", std::string("graph"));
  atomic_write(dir + "/g.onnx.data", weights);
  atomic_write(dir + "/tok/vocab.json", std::string("{}"));
  atomic_write(dir + "/tok/merges.txt", std::string("#"));
  const std::map<std::string, std::string> expected = {
      {"g.onnx", sha256_hex("graph")},
      {"g.onnx.data", sha256_hex(weights)},
      {"tok/vocab.json", sha256_hex("{}")},
      {"tok/merges.txt", sha256_hex("#")}};
  {
    BackgroundVerification files(dir, expected, {"g.onnx.data"}, std::nullopt);
    EXPECT_NO_THROW(files.wait("g.onnx"));
    EXPECT_NO_THROW(files.wait("tok"));
    EXPECT_NO_THROW(files.wait("not/listed"));  // nothing to wait for
    const Verification v = files.finish();
    EXPECT_EQ(v.hashed, 4);
    EXPECT_EQ(v.cached, 0);
    EXPECT_NO_THROW(files.finish());  // again: the same answer
  }
  const auto failure = [&](const std::function<void(BackgroundVerification&)>& use) {
    BackgroundVerification files(dir, expected, {"g.onnx.data"}, std::nullopt);
    try {
      use(files);
    } catch (const Error& e) {
      EXPECT_EQ(e.kind(), ErrorKind::bundle);
      return std::string(e.what());
    }
    return std::string("accepted");
  };
  weights[weights.size() / 2] ^= 1;
  atomic_write(dir + "/g.onnx.data", weights);
  EXPECT_NE(failure([](BackgroundVerification& f) { f.finish(); }).find("file 'g.onnx.data' does not match the manifest"),
            std::string::npos);
  // A graph verified before the bad weights file: waiting for it may succeed or report the failure, never hang.
  const std::string waited = failure([](BackgroundVerification& f) {
    f.wait("g.onnx");
    f.finish();
  });
  EXPECT_NE(waited.find("'g.onnx.data' does not match"), std::string::npos) << waited;
  ::unlink((dir + "/tok/merges.txt").c_str());
  EXPECT_NE(failure([](BackgroundVerification& f) { f.wait("tok"); }).find("file 'tok/merges.txt' listed in the "
                                                                          "manifest is missing"),
            std::string::npos);
  // Destroyed while hashing (an open() that failed early): stops and joins, nothing leaks (ASan).
  for (int i = 0; i < 3; ++i) BackgroundVerification(dir, expected, {"g.onnx.data"}, std::nullopt);
}
