// Unit tests of hostile input (no bundle needed): JSON nesting bounded before the recursive parser, UTF-8, and request
// numbers and text validated rather than reinterpreted.
#include <gtest/gtest.h>

#include <functional>
#include <string>

#include "safe_denoiser_cpp/json_limits.hpp"
#include "safe_denoiser_cpp/runtime.hpp"
#include "safe_denoiser_cpp/tokenizer.hpp"
#include "../src/cli/requests.hpp"
#include "test_helpers.hpp"

using namespace sdcpp;
using sdcpp::testing::input_error;
using sdcpp::testing::nested;

TEST(JsonLimits, NestingIsBoundedBeforeTheRecursiveParser) {
  EXPECT_FALSE(json_nesting_exceeds(nested(64), 64));
  EXPECT_TRUE(json_nesting_exceeds(nested(65), 64));
  EXPECT_TRUE(json_nesting_exceeds("{\"a\": " + nested(64) + "}", 64));
  // Brackets inside strings (escaped quotes included) do not nest; unbalanced text is left to the parser.
  EXPECT_FALSE(json_nesting_exceeds("[\"" + std::string(1000, '[') + "\\\"[[\"]", 2));
  EXPECT_FALSE(json_nesting_exceeds(std::string(1000, ']'), 2));
  EXPECT_EQ(cli::parse_json_limited(nested(64)).dump(), nested(64));
  // 100,000 levels (a SIGSEGV in the batch command before): an error naming the limit, not a crash.
  EXPECT_NE(input_error([] { cli::parse_json_limited(nested(100000), "body"); })
                .find("body: JSON nested deeper than 64 levels"),
            std::string::npos);
  EXPECT_NE(input_error([] { cli::parse_json_limited("{\"class\": ", "line 3"); }).find("line 3: not JSON ("),
            std::string::npos);
  // The manifest reader is bounded the same way.
  try {
    Manifest::parse("{\"format\": " + nested(100000) + "}");
    FAIL() << "a deep manifest was accepted";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::bundle);
    EXPECT_NE(std::string(e.what()).find("nested deeper than 64 levels"), std::string::npos) << e.what();
  }
}

TEST(Utf8, WellFormedOnly) {
  EXPECT_TRUE(valid_utf8(""));
  EXPECT_TRUE(valid_utf8("a cat \xc3\xa9 \xe6\x9d\xb1 \xf0\x9f\x90\xb1"));
  EXPECT_TRUE(valid_utf8(std::string("nul\0inside", 11)));
  for (const std::string bad : {"\xff", "\xc3", "a\x80" "b", "\xc0\xaf", "\xed\xa0\x80", "\xf4\x90\x80\x80",
                                "\xe6\x9d"}) {
    EXPECT_FALSE(valid_utf8(bad)) << bad.size();
  }
}

TEST(JsonLimits, IntegersAreExactLiteralsInRange) {
  using nlohmann::json;
  EXPECT_EQ(json_integer_in(json::parse("5"), 0, 10), 5);
  EXPECT_EQ(json_integer_in(json::parse("-1"), -1, 10), -1);
  EXPECT_EQ(json_integer_in(json(int64_t{7}), 1, 10), 7);  // built in C++: stored signed
  EXPECT_FALSE(json_integer_in(json::parse("0"), 1, 10));  // stored unsigned: lo still applies
  EXPECT_FALSE(json_integer_in(json(int64_t{-3}), 0, 10));
  EXPECT_FALSE(json_integer_in(json::parse("-1"), 0, 10));
  EXPECT_FALSE(json_integer_in(json::parse("11"), 0, 10));
  EXPECT_FALSE(json_integer_in(json::parse("18446744073709551615"), -1, INT64_MAX));  // not read as -1
  for (const char* v : {"2.0", "2.5", "1e30", "5e19", "-1e30", "\"3\"", "true", "null", "[1]"}) {
    EXPECT_FALSE(json_integer_in(json::parse(v), INT64_MIN, INT64_MAX)) << v;
  }
}
