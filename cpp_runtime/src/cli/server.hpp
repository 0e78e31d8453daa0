// The HTTP server: POST /generate (JSON -> PNG + JSON record), the OpenAI and AUTOMATIC1111 image APIs, GET /health
// and GET /metrics. Loopback by default (other binds need an API key), a bounded queue that answers 503 when full,
// a per-request timeout (504), size limits (413), slow clients cut off, graceful stop on SIGTERM/SIGINT.
#pragma once

#include <cstddef>
#include <functional>
#include <memory>
#include <string>

#include "safe_denoiser_cpp/runtime.hpp"

namespace CLI {
class App;
}

namespace sdcpp::cli {

struct ServerOptions {
  std::string host = "127.0.0.1";
  int port = 8080;
  int queue = 16;            // waiting images; one more answers 503
  int max_batch = 4;         // images per ONNX Runtime call
  int timeout_ms = 60000;    // per request, from acceptance to answer
  size_t max_body = 65536;   // bytes
  long max_requests = 0;     // stop after this many answered image requests (0: never)
  double max_seconds = 0;    // stop after this long (0: never)
  std::string api_key;       // --api-key, else the environment variable SAFE_DENOISER_API_KEY
  std::string log_level = "info";
  int http_threads = 0;      // connection threads (0: queue + max_batch + 4)
  int max_connections = 0;   // connections served or waiting for a thread (0: 4 x http_threads)
  int read_timeout_ms = 10000;  // to receive one whole request
  int workers = 1;           // generation threads, each with its own Runtime (memory grows with it)
};

// The serve subcommand's options that belong to the HTTP layer (keys, logs, connections).
void add_serve_flags(CLI::App& serve, ServerOptions& options);

// Opens one more runtime on the same bundle with the same options (one per worker after the first).
using RuntimeOpener = std::function<std::unique_ptr<Runtime>()>;

// Serve until SIGTERM/SIGINT or a limit; queued requests are finished before returning. Returns the exit code.
// `runtime` serves worker 1; `open_runtime` opens one for each further worker (--workers).
int serve(Runtime& runtime, const std::string& provider, const ServerOptions& options,
          const RuntimeOpener& open_runtime = {});

}  // namespace sdcpp::cli
