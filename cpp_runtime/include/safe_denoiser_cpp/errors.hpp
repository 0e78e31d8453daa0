// Errors: every failure the library reports is an Error with a kind, which the CLI maps to its exit code and the
// server to an HTTP status.
#pragma once

#include <stdexcept>
#include <string>

namespace sdcpp {

// Exit codes of the CLI, one per error kind (0 = success).
enum class ErrorKind : int { usage = 2, bundle = 3, input = 4, provider = 5, io = 6, runtime = 7 };

// A kind and a message naming the field and the expected form.
class Error : public std::runtime_error {
 public:
  Error(ErrorKind kind, const std::string& message) : std::runtime_error(message), kind_(kind) {}
  ErrorKind kind() const { return kind_; }

 private:
  ErrorKind kind_;
};

}  // namespace sdcpp
