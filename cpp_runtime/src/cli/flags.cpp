#include "flags.hpp"

#include <cmath>
#include <cstdlib>
#include <sstream>
#include <string>

namespace sdcpp::cli {

CLI::Validator integer_in(int64_t lo, uint64_t hi) {
  const std::string form = "a decimal integer in " + std::to_string(lo) + ".." + std::to_string(hi);
  return CLI::Validator(
      [lo, hi, form](std::string& text) -> std::string {
        const bool negative = !text.empty() && text[0] == '-';
        const std::string digits = text.substr(negative ? 1 : 0);
        uint64_t v = 0;
        bool ok = !digits.empty() && digits.size() <= 20 && (digits[0] != '0' || digits.size() == 1);
        for (size_t i = 0; ok && i < digits.size(); ++i) {
          const auto d = static_cast<uint64_t>(digits[i] - '0');
          ok = digits[i] >= '0' && digits[i] <= '9' && v <= (UINT64_MAX - d) / 10;
          v = v * 10 + d;
        }
        if (negative && v != 0) {
          ok = ok && lo < 0 && v <= static_cast<uint64_t>(-(lo + 1)) + 1;  // -v >= lo
        } else {  // "-0" is 0
          ok = ok && v <= hi && (lo <= 0 || v >= static_cast<uint64_t>(lo));
        }
        return ok ? std::string() : "expected " + form + ", got '" + text + "'";
      },
      form);
}

CLI::Validator number_in(double lo, double hi) {
  std::ostringstream form;
  form << "a finite number in " << lo << ".." << hi;
  return CLI::Validator(
      [lo, hi, form = form.str()](std::string& text) -> std::string {
        char* end = nullptr;
        const double v = text.empty() ? 0 : std::strtod(text.c_str(), &end);
        const bool ok = !text.empty() && end == text.c_str() + text.size() && std::isfinite(v) && v >= lo && v <= hi;
        return ok ? std::string() : "expected " + form + ", got '" + text + "'";
      },
      form.str());
}

}  // namespace sdcpp::cli
