// How the server is told to stop, without polling: a condition variable that a signal (through a pipe its
// handler writes), the request limit, the time limit or the end of listen() wakes.
#pragma once

#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <csignal>
#include <mutex>
#include <thread>

#include "safe_denoiser_cpp/errors.hpp"

namespace sdcpp::cli {

// SIGTERM/SIGINT write a byte to a pipe (async-signal-safe); a thread blocked reading it notifies the waiters.
class StopSignal {
 public:
  StopSignal() {
    if (::pipe(pipe_) != 0) throw Error(ErrorKind::io, "cannot create the signal pipe");
    write_fd_ = pipe_[1];
    reader_ = std::thread([this] {
      char byte = 0;
      while (::read(pipe_[0], &byte, 1) < 0 && errno == EINTR) {
      }
      if (byte == 's') request(true);
    });
    std::signal(SIGTERM, on_signal);
    std::signal(SIGINT, on_signal);
  }
  ~StopSignal() {
    std::signal(SIGTERM, SIG_DFL);
    std::signal(SIGINT, SIG_DFL);
    const char quit = 'q';
    (void)::write(pipe_[1], &quit, 1);  // wakes the reader if no signal came
    reader_.join();
    write_fd_ = -1;
    ::close(pipe_[0]);
    ::close(pipe_[1]);
  }
  void request(bool by_signal = false) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      requested_ = true;
      by_signal_ = by_signal_ || by_signal;
    }
    changed_.notify_all();
  }
  // Until a stop is requested or `max_seconds` (> 0) pass.
  void wait(double max_seconds) {
    std::unique_lock<std::mutex> lock(mutex_);
    if (max_seconds > 0) {
      changed_.wait_for(lock, std::chrono::duration<double>(max_seconds), [this] { return requested_; });
    } else {
      changed_.wait(lock, [this] { return requested_; });
    }
  }
  bool by_signal() {
    std::lock_guard<std::mutex> lock(mutex_);
    return by_signal_;
  }
  bool requested() {
    std::lock_guard<std::mutex> lock(mutex_);
    return requested_;
  }

 private:
  static void on_signal(int) {
    const char stop = 's';
    if (write_fd_ >= 0) (void)!::write(write_fd_, &stop, 1);  // async-signal-safe
  }
  static inline volatile std::sig_atomic_t write_fd_ = -1;
  int pipe_[2] = {-1, -1};
  std::thread reader_;
  std::mutex mutex_;
  std::condition_variable changed_;
  bool requested_ = false, by_signal_ = false;
};

}  // namespace sdcpp::cli
