// cpp-httplib's Server with connections that slow clients cannot hold: every request must arrive whole within a
// read deadline (shorter when only the reserve threads are free), a bounded number of accepted connections may
// wait for a thread (beyond it: 503 and closed), and stop_now() ends idle keep-alive waits at once.
#pragma once

#include <httplib.h>

#include <atomic>
#include <chrono>
#include <string>

namespace sdcpp::cli {

struct ConnectionLimits {
  int threads = 24;                 // connection threads: each serves one connection at a time
  int max_connections = 96;         // served + waiting for a thread; beyond it a new connection gets 503
  int read_timeout_ms = 10000;      // to read one whole request: line, headers and body
  int busy_read_timeout_ms = 1000;  // the same while only `reserve` threads (or fewer) are free
  int reserve = 4;
  int write_timeout_ms = 10000;
  int keep_alive_ms = 2000;         // idle wait for the next request on a connection
  int keep_alive_max = 16;          // requests per connection
};

// Facts about the request being served on this thread: the handlers fill them, the access log reads them.
struct RequestContext {
  std::chrono::steady_clock::time_point start;
  std::string id, route = "other";
  long images = 0, steps = 0, correction_steps = 0;
  bool close_connection = false;
};
RequestContext& request_context();

class GuardedServer : public httplib::Server {
 public:
  explicit GuardedServer(const ConnectionLimits& limits);
  ~GuardedServer() override;
  // Stop accepting and wake idle connections; safe before or during listen_after_bind(), and more than once.
  void stop_now();
  int active_connections() const { return active_.load(); }
  std::atomic<long> rejected_connections{0};

 private:
  bool process_and_close_socket(socket_t sock) override;
  bool wait_for_next_request(socket_t sock) const;

  ConnectionLimits limits_;
  std::atomic<int> active_{0};
  std::atomic<int> waiting_{0};
  int stop_fd_ = -1;  // eventfd, readable once stopping
};

}  // namespace sdcpp::cli
