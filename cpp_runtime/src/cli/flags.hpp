// Validators for the program's numeric flags (every subcommand's, serve's HTTP flags included): numbers are
// validated, never reinterpreted.
#pragma once

#include <CLI/CLI.hpp>
#include <cstdint>

namespace sdcpp::cli {

// A decimal integer in [lo, hi]. CLI11 alone reads "-1" into a uint64 as 2^64-1, "010" as octal 8 and an
// overflowing value as the largest one; this refuses each, naming the expected form.
CLI::Validator integer_in(int64_t lo, uint64_t hi);
// A finite decimal number in [lo, hi] (CLI11's Range lets NaN through).
CLI::Validator number_in(double lo, double hi);

}  // namespace sdcpp::cli
