// Helpers shared by the unit tests (no bundle needed).
#pragma once

#include <gtest/gtest.h>

#include <cstdlib>
#include <functional>
#include <stdexcept>
#include <string>

#include "safe_denoiser_cpp/errors.hpp"

namespace sdcpp::testing {

inline std::string nested(size_t depth, const std::string& inner = "1") {
  return std::string(depth, '[') + inner + std::string(depth, ']');
}

// A fresh folder under /tmp.
inline std::string temp_dir() {
  char tmpl[] = "/tmp/sdcpp-test-XXXXXX";
  const char* dir = mkdtemp(tmpl);
  if (dir == nullptr) throw std::runtime_error("mkdtemp failed");
  return dir;
}

inline std::string input_error(const std::function<void()>& call) {
  try {
    call();
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::input) << e.what();
    return e.what();
  }
  return "accepted";
}

}  // namespace sdcpp::testing
