// Bounds on JSON: on the text before nlohmann's parser sees it (the parser recurses once per nesting level, so text
// nested 100,000 deep overflows the stack: a SIGSEGV, not an error), and on the integers read from parsed values.
#pragma once

#include <cstdint>
#include <nlohmann/json.hpp>
#include <optional>
#include <string_view>

namespace sdcpp {

// True when arrays / objects in `text` nest deeper than max_depth (brackets inside strings do not count). A linear
// scan with no recursion; malformed text is left for the parser to report.
inline bool json_nesting_exceeds(std::string_view text, int max_depth) {
  int depth = 0;
  bool in_string = false, escaped = false;
  for (const char c : text) {
    if (in_string) {
      if (escaped) {
        escaped = false;
      } else if (c == '\\') {
        escaped = true;
      } else if (c == '"') {
        in_string = false;
      }
    } else if (c == '"') {
      in_string = true;
    } else if (c == '[' || c == '{') {
      if (++depth > max_depth) return true;
    } else if (c == ']' || c == '}') {
      --depth;
    }
  }
  return false;
}

// `v` when it is a JSON integer literal in [lo, hi]; nullopt for anything else, floats included: get<int>() of 1e30
// is undefined behaviour and of 2.5 a silent truncation. nlohmann stores non-negative literals as uint64: compared
// as such, so 2^64-1 is not read as -1. Callers name the field in their own error.
inline std::optional<int64_t> json_integer_in(const nlohmann::json& v, int64_t lo, int64_t hi) {
  if (v.is_number_unsigned()) {
    const uint64_t u = v.get<uint64_t>();
    if (hi < 0 || u > static_cast<uint64_t>(hi) || (lo > 0 && u < static_cast<uint64_t>(lo))) return std::nullopt;
    return static_cast<int64_t>(u);
  }
  if (!v.is_number_integer()) return std::nullopt;
  const int64_t i = v.get<int64_t>();
  if (i < lo || i > hi) return std::nullopt;
  return i;
}

}  // namespace sdcpp
