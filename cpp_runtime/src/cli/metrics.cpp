#include "metrics.hpp"

#include <cstdio>

namespace sdcpp::cli {
namespace {
const std::vector<double> kLatencyBounds = {0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120};
const std::vector<double> kBatchBounds = {1, 2, 4, 8, 16, 32, 64};

std::string number(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.10g", v);
  return buf;
}

// Label values: backslash, double quote and newline escaped (the exposition format's rules).
std::string escape(const std::string& s) {
  std::string out;
  for (const char c : s) {
    if (c == '\\' || c == '"') out += '\\';
    out += c == '\n' ? std::string("\\n") : std::string(1, c);
  }
  return out;
}

void family(std::string& out, const char* name, const char* type, const char* help) {
  out += std::string("# HELP ") + name + " " + help + "\n# TYPE " + name + " " + type + "\n";
}

void sample(std::string& out, const std::string& name, const std::string& labels, double value) {
  out += name + (labels.empty() ? "" : "{" + labels + "}") + " " + number(value) + "\n";
}
}  // namespace

Histogram::Histogram(std::vector<double> bounds) : bounds_(std::move(bounds)), counts_(bounds_.size() + 1, 0) {}

void Histogram::observe(double value) {
  size_t i = 0;
  while (i < bounds_.size() && value > bounds_[i]) ++i;
  ++counts_[i];
  sum_ += value;
  ++count_;
}

void Histogram::write(std::string& out, const std::string& name, const std::string& labels) const {
  uint64_t cumulative = 0;
  for (size_t i = 0; i <= bounds_.size(); ++i) {
    cumulative += counts_[i];
    const std::string le = i < bounds_.size() ? number(bounds_[i]) : "+Inf";
    sample(out, name + "_bucket", labels + "le=\"" + le + "\"", static_cast<double>(cumulative));
  }
  const std::string plain = labels.empty() ? "" : labels.substr(0, labels.size() - 1);
  sample(out, name + "_sum", plain, sum_);
  sample(out, name + "_count", plain, static_cast<double>(count_));
}

Metrics::Metrics() : batch_size_(kBatchBounds), batch_seconds_(kLatencyBounds) {}

void Metrics::request(const std::string& route, int status, double seconds) {
  std::lock_guard<std::mutex> lock(mutex_);
  ++requests_[{route, status}];
  latency_.try_emplace(route, kLatencyBounds).first->second.observe(seconds);
}

void Metrics::batch(size_t size, double seconds) {
  std::lock_guard<std::mutex> lock(mutex_);
  batch_size_.observe(static_cast<double>(size));
  batch_seconds_.observe(seconds);
}

void Metrics::images(size_t count, uint64_t steps, uint64_t correction_steps) {
  std::lock_guard<std::mutex> lock(mutex_);
  images_ += count;
  steps_ += steps;
  correction_steps_ += correction_steps;
}

std::string Metrics::exposition(const Gauges& g) const {
  std::lock_guard<std::mutex> lock(mutex_);
  std::string out;
  family(out, "safe_denoiser_http_requests_total", "counter", "HTTP requests answered, by route and status.");
  for (const auto& [key, n] : requests_) {
    sample(out, "safe_denoiser_http_requests_total",
           "route=\"" + escape(key.first) + "\",status=\"" + std::to_string(key.second) + "\"", static_cast<double>(n));
  }
  family(out, "safe_denoiser_http_request_duration_seconds", "histogram", "Time from request read to answer, by route.");
  for (const auto& [route, h] : latency_) h.write(out, "safe_denoiser_http_request_duration_seconds", "route=\"" + escape(route) + "\",");
  family(out, "safe_denoiser_queue_depth", "gauge", "Images waiting for the generation worker.");
  sample(out, "safe_denoiser_queue_depth", "", static_cast<double>(g.queue_depth));
  family(out, "safe_denoiser_queue_capacity", "gauge", "Images that may wait (--queue); one more answers 503.");
  sample(out, "safe_denoiser_queue_capacity", "", static_cast<double>(g.queue_capacity));
  family(out, "safe_denoiser_batch_size", "histogram", "Images per ONNX Runtime call.");
  batch_size_.write(out, "safe_denoiser_batch_size", "");
  family(out, "safe_denoiser_batch_duration_seconds", "histogram", "Time of one batched generation.");
  batch_seconds_.write(out, "safe_denoiser_batch_duration_seconds", "");
  family(out, "safe_denoiser_images_generated_total", "counter", "Images generated.");
  sample(out, "safe_denoiser_images_generated_total", "", static_cast<double>(images_));
  family(out, "safe_denoiser_denoise_steps_total", "counter", "Sampler steps run, summed over images.");
  sample(out, "safe_denoiser_denoise_steps_total", "", static_cast<double>(steps_));
  family(out, "safe_denoiser_correction_steps_total", "counter", "Steps at which the safe-denoiser correction fired.");
  sample(out, "safe_denoiser_correction_steps_total", "", static_cast<double>(correction_steps_));
  family(out, "safe_denoiser_http_connections_active", "gauge", "Connections held by a connection thread.");
  sample(out, "safe_denoiser_http_connections_active", "", g.connections_active);
  family(out, "safe_denoiser_http_connections_rejected_total", "counter", "Connections closed with 503: too many waiting.");
  sample(out, "safe_denoiser_http_connections_rejected_total", "", static_cast<double>(g.connections_rejected));
  family(out, "safe_denoiser_workers", "gauge", "Generation worker threads (--workers), each with its own runtime.");
  sample(out, "safe_denoiser_workers", "", static_cast<double>(g.workers));
  family(out, "safe_denoiser_ready", "gauge", "1 when the bundle is loaded and the worker runs.");
  sample(out, "safe_denoiser_ready", "", g.ready ? 1 : 0);
  return out;
}

}  // namespace sdcpp::cli
