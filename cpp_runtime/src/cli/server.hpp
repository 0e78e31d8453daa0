// The HTTP server: POST /generate (JSON -> PNG + JSON record), GET /health; loopback by default, a bounded queue
// that answers 503 when full, a per-request timeout (504), size limits (413), graceful stop on SIGTERM/SIGINT.
#pragma once

#include <cstddef>
#include <string>

#include "safe_denoiser_cpp/runtime.hpp"

namespace sdcpp::cli {

struct ServerOptions {
  std::string host = "127.0.0.1";
  int port = 8080;
  int queue = 16;            // waiting requests; one more answers 503
  int max_batch = 4;         // requests per ONNX Runtime call
  int timeout_ms = 60000;    // per request, from acceptance to answer
  size_t max_body = 65536;   // bytes
  long max_requests = 0;     // stop after this many answered /generate requests (0: never)
  double max_seconds = 0;    // stop after this long (0: never)
};

// Serve until SIGTERM/SIGINT or a limit; queued requests are finished before returning. Returns the exit code.
int serve(Runtime& runtime, const std::string& provider, const ServerOptions& options);

}  // namespace sdcpp::cli
