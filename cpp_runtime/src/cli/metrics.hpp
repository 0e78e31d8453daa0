// Prometheus metrics of the server, written by hand in the text exposition format (version 0.0.4): counters,
// gauges and histograms with fixed buckets. Thread-safe; label values are bounded (known routes, status codes).
#pragma once

#include <cstdint>
#include <map>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

namespace sdcpp::cli {

class Histogram {
 public:
  explicit Histogram(std::vector<double> bounds);
  void observe(double value);
  // "<name>_bucket{<labels>le=...} ..." lines, then _sum and _count; `labels` is empty or ends with ','.
  void write(std::string& out, const std::string& name, const std::string& labels) const;

 private:
  std::vector<double> bounds_;
  std::vector<uint64_t> counts_;  // per bucket, not cumulative
  double sum_ = 0;
  uint64_t count_ = 0;
};

// What the worker and the connection threads report; the gauges are read when /metrics is served.
struct Gauges {
  size_t queue_depth = 0, queue_capacity = 0, workers = 0;
  int connections_active = 0;
  long connections_rejected = 0;  // a counter kept by the connection layer
  bool ready = false;
};

class Metrics {
 public:
  Metrics();
  void request(const std::string& route, int status, double seconds);
  void batch(size_t size, double seconds);
  void images(size_t count, uint64_t steps, uint64_t correction_steps);
  std::string exposition(const Gauges& gauges) const;

 private:
  mutable std::mutex mutex_;
  std::map<std::pair<std::string, int>, uint64_t> requests_;
  std::map<std::string, Histogram> latency_;
  Histogram batch_size_, batch_seconds_;
  uint64_t images_ = 0, steps_ = 0, correction_steps_ = 0;
};

}  // namespace sdcpp::cli
