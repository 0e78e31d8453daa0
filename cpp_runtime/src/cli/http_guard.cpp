#include "http_guard.hpp"

#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>

namespace sdcpp::cli {
namespace {
using Clock = std::chrono::steady_clock;

thread_local RequestContext t_context;
thread_local bool t_over_capacity = false;
thread_local Clock::time_point t_accepted;  // when the connection being served was accepted

// A socket stream whose reads fail once the request's deadline passes, however slowly the bytes trickle in
// (cpp-httplib's own stream restarts its timeout at every byte).
class DeadlineStream : public httplib::Stream {
 public:
  DeadlineStream(int sock, int write_timeout_ms) : sock_(sock), write_timeout_ms_(write_timeout_ms) {}
  void set_read_deadline(Clock::time_point deadline) { deadline_ = deadline; }

  bool is_readable() const override { return off_ < len_ || wait(POLLIN, remaining_ms()); }
  bool is_writable() const override { return wait(POLLOUT, write_timeout_ms_); }

  ssize_t read(char* ptr, size_t size) override {
    if (off_ == len_) {
      if (!wait(POLLIN, remaining_ms())) return -1;
      const ssize_t n = ::recv(sock_, buf_, sizeof buf_, 0);
      if (n <= 0) return n;
      off_ = 0;
      len_ = static_cast<size_t>(n);
    }
    const size_t n = std::min(size, len_ - off_);
    std::memcpy(ptr, buf_ + off_, n);
    off_ += n;
    return static_cast<ssize_t>(n);
  }

  ssize_t write(const char* ptr, size_t size) override {
    if (!is_writable()) return -1;
    return ::send(sock_, ptr, size, MSG_NOSIGNAL);
  }
  using httplib::Stream::write;

  void get_remote_ip_and_port(std::string& ip, int& port) const override { address(::getpeername, ip, port); }
  void get_local_ip_and_port(std::string& ip, int& port) const override { address(::getsockname, ip, port); }
  socket_t socket() const override { return sock_; }

 private:
  int remaining_ms() const {
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline_ - Clock::now()).count();
    return static_cast<int>(std::max<long long>(0, left));
  }
  bool wait(short events, int timeout_ms) const {
    pollfd p{sock_, events, 0};
    return ::poll(&p, 1, timeout_ms) > 0 && (p.revents & (events | POLLHUP | POLLERR));
  }
  void address(int (*get)(int, sockaddr*, socklen_t*), std::string& ip, int& port) const {
    sockaddr_storage addr{};
    socklen_t len = sizeof addr;
    char host[NI_MAXHOST], serv[NI_MAXSERV];
    if (get(sock_, reinterpret_cast<sockaddr*>(&addr), &len) == 0 &&
        getnameinfo(reinterpret_cast<sockaddr*>(&addr), len, host, sizeof host, serv, sizeof serv,
                    NI_NUMERICHOST | NI_NUMERICSERV) == 0) {
      ip = host;
      port = std::atoi(serv);
    }
  }

  int sock_;
  int write_timeout_ms_;
  Clock::time_point deadline_ = Clock::now();
  char buf_[4096];
  size_t off_ = 0, len_ = 0;
};

// cpp-httplib's thread pool, counting the accepted connections that wait for a thread: a connection accepted
// while `max_waiting` already waited is answered 503 as soon as a thread takes it.
class CountingPool : public httplib::TaskQueue {
 public:
  CountingPool(size_t threads, std::atomic<int>& waiting, int max_waiting)
      : pool_(threads), waiting_(waiting), max_waiting_(max_waiting) {}
  void enqueue(std::function<void()> fn) override {
    const bool over = waiting_.fetch_add(1) >= max_waiting_;
    pool_.enqueue([this, over, accepted = Clock::now(), fn = std::move(fn)] {
      --waiting_;
      t_over_capacity = over;
      t_accepted = accepted;
      fn();
    });
  }
  void shutdown() override { pool_.shutdown(); }

 private:
  httplib::ThreadPool pool_;
  std::atomic<int>& waiting_;
  int max_waiting_;
};

void answer_over_capacity(int sock) {
  static const std::string body = "{\"error\": \"too many connections: retry later\", \"status\": 503}";
  static const std::string response =
      "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\nConnection: close\r\n"
      "Content-Length: " + std::to_string(body.size()) + "\r\n\r\n" + body;
  (void)::send(sock, response.data(), response.size(), MSG_NOSIGNAL | MSG_DONTWAIT);  // closed right after anyway
}
}  // namespace

RequestContext& request_context() { return t_context; }

GuardedServer::GuardedServer(const ConnectionLimits& limits) : limits_(limits), stop_fd_(::eventfd(0, EFD_CLOEXEC)) {
  const int max_waiting = std::max(0, limits_.max_connections - limits_.threads);
  new_task_queue = [this, max_waiting] {
    return new CountingPool(static_cast<size_t>(limits_.threads), waiting_, max_waiting);
  };
  set_read_timeout(limits_.read_timeout_ms / 1000, (limits_.read_timeout_ms % 1000) * 1000);
  set_keep_alive_max_count(static_cast<size_t>(limits_.keep_alive_max));  // what the Keep-Alive header announces
  set_keep_alive_timeout(std::max(1, limits_.keep_alive_ms / 1000));
}

GuardedServer::~GuardedServer() {
  if (stop_fd_ >= 0) ::close(stop_fd_);
}

void GuardedServer::stop_now() {
  const uint64_t one = 1;
  if (stop_fd_ >= 0) (void)::write(stop_fd_, &one, sizeof one);
  const socket_t sock = svr_sock_.exchange(INVALID_SOCKET);
  if (sock != INVALID_SOCKET) {  // wakes accept(); listen_after_bind() sees the invalid socket and returns
    ::shutdown(sock, SHUT_RDWR);
    ::close(sock);
  }
}

bool GuardedServer::wait_for_next_request(socket_t sock) const {
  pollfd p[2] = {{sock, POLLIN, 0}, {stop_fd_, POLLIN, 0}};
  return ::poll(p, 2, limits_.keep_alive_ms) > 0 && p[1].revents == 0 && p[0].revents != 0;
}

bool GuardedServer::process_and_close_socket(socket_t sock) {
  struct Active {
    std::atomic<int>& n;
    explicit Active(std::atomic<int>& a) : n(a) { ++n; }
    ~Active() { --n; }
  } active(active_);
  bool ok = true;
  if (t_over_capacity) {
    ++rejected_connections;
    answer_over_capacity(sock);
  } else {
    const int one = 1;  // answers go out in two writes (headers, body): Nagle + delayed ACK would add ~40 ms
    (void)::setsockopt(sock, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    DeadlineStream stream(sock, limits_.write_timeout_ms);
    for (int served = 0; served < limits_.keep_alive_max && ok; ++served) {
      if (served > 0 && !wait_for_next_request(sock)) break;
      // The first request's time counts from accept: a slow client that waited for a thread is cut off at once,
      // while a whole request that arrived meanwhile is still read from the socket buffer.
      const bool busy = active_.load() > limits_.threads - limits_.reserve;
      const auto start = served == 0 ? t_accepted : Clock::now();
      stream.set_read_deadline(start + std::chrono::milliseconds(busy ? limits_.busy_read_timeout_ms
                                                                      : limits_.read_timeout_ms));
      t_context = RequestContext{};
      t_context.start = Clock::now();
      bool closed = false;
      const bool last = served + 1 == limits_.keep_alive_max || svr_sock_ == INVALID_SOCKET;
      ok = process_request(stream, last, closed, nullptr);
      if (closed || last || t_context.close_connection) break;
    }
  }
  ::shutdown(sock, SHUT_RDWR);
  ::close(sock);
  return ok;
}

}  // namespace sdcpp::cli
