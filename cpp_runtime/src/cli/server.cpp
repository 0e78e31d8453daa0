#include "server.hpp"

#include <httplib.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <csignal>
#include <deque>
#include <future>
#include <iostream>
#include <thread>

#include "requests.hpp"

namespace sdcpp::cli {
namespace {
using nlohmann::json;
using Clock = std::chrono::steady_clock;

volatile std::sig_atomic_t g_stop_signal = 0;
extern "C" void on_signal(int) { g_stop_signal = 1; }

struct Outcome {
  int status = 500;
  std::string png;
  json record;
  std::string error;
};

struct Job {
  ParsedRequest request;
  std::promise<Outcome> promise;
  std::atomic<bool> cancelled{false};
};

std::string base64(const std::string& data) {
  static const char* table = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  std::string out;
  size_t i = 0;
  for (; i + 2 < data.size(); i += 3) {
    const uint32_t v = (static_cast<uint8_t>(data[i]) << 16) | (static_cast<uint8_t>(data[i + 1]) << 8) |
                       static_cast<uint8_t>(data[i + 2]);
    for (int s = 18; s >= 0; s -= 6) out += table[(v >> s) & 63];
  }
  if (i < data.size()) {
    uint32_t v = static_cast<uint8_t>(data[i]) << 16;
    if (i + 1 < data.size()) v |= static_cast<uint8_t>(data[i + 1]) << 8;
    out += table[(v >> 18) & 63];
    out += table[(v >> 12) & 63];
    out += i + 1 < data.size() ? table[(v >> 6) & 63] : '=';
    out += '=';
  }
  return out;
}

int http_status(ErrorKind kind) { return kind == ErrorKind::input ? 400 : 500; }

void send_error(httplib::Response& res, int status, const std::string& message) {
  res.status = status;
  res.set_content(json{{"error", message}, {"status", status}}.dump(-1, ' ', true, json::error_handler_t::replace),
                  "application/json");
}

// One worker thread owns the runtime: it takes up to max_batch queued jobs with the same steps and sampler per call.
class Worker {
 public:
  Worker(Runtime& runtime, std::string provider, const ServerOptions& o)
      : runtime_(runtime), provider_(std::move(provider)), options_(o), thread_([this] { loop(); }) {}
  ~Worker() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stopping_ = true;
    }
    ready_.notify_all();
    thread_.join();
  }
  // False when the queue is full.
  bool submit(const std::shared_ptr<Job>& job) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (static_cast<int>(queue_.size()) >= options_.queue) return false;
      queue_.push_back(job);
    }
    ready_.notify_one();
    return true;
  }
  size_t queued() {
    std::lock_guard<std::mutex> lock(mutex_);
    return queue_.size();
  }

 private:
  void loop() {
    for (;;) {
      std::vector<std::shared_ptr<Job>> batch;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        ready_.wait(lock, [this] { return stopping_ || !queue_.empty(); });
        if (queue_.empty()) return;  // stopping and drained
        const int steps = queue_.front()->request.steps;
        const Sampler sampler = queue_.front()->request.sampler;
        for (auto it = queue_.begin(); it != queue_.end() && static_cast<int>(batch.size()) < options_.max_batch;) {
          if ((*it)->cancelled) {
            it = queue_.erase(it);
          } else if ((*it)->request.steps == steps && (*it)->request.sampler == sampler) {
            batch.push_back(*it);
            it = queue_.erase(it);
          } else {
            ++it;
          }
        }
      }
      if (!batch.empty()) run(batch);
    }
  }

  void run(const std::vector<std::shared_ptr<Job>>& batch) {
    std::vector<Request> requests;
    for (const auto& job : batch) requests.push_back(job->request.request);
    try {
      const auto results = runtime_.generate(requests, batch.front()->request.steps, batch.front()->request.sampler);
      for (size_t i = 0; i < batch.size(); ++i) {
        const auto start = Clock::now();
        const auto png = result_png(results[i]);
        const double png_ms = std::chrono::duration<double, std::milli>(Clock::now() - start).count();
        Outcome out;
        out.status = 200;
        out.png.assign(png.begin(), png.end());
        out.record = make_record(runtime_, batch[i]->request, results[i], provider_, png_ms);
        out.record["batch_size"] = batch.size();
        batch[i]->promise.set_value(std::move(out));
      }
    } catch (const std::exception& e) {
      const auto* err = dynamic_cast<const Error*>(&e);
      for (const auto& job : batch) {
        Outcome out;
        out.status = err ? http_status(err->kind()) : 500;
        out.error = e.what();
        job->promise.set_value(std::move(out));
      }
    }
  }

  Runtime& runtime_;
  std::string provider_;
  ServerOptions options_;
  std::mutex mutex_;
  std::condition_variable ready_;
  std::deque<std::shared_ptr<Job>> queue_;
  bool stopping_ = false;
  std::thread thread_;
};

// What /health reports and the final line prints; handler threads count, the monitor reads.
struct Counters {
  std::atomic<long> answered{0}, rejected{0}, timed_out{0};
};

// Threads: every queued request holds one while it waits, plus a few to answer 503 / health quickly.
void configure(httplib::Server& server, const ServerOptions& o) {
  const int threads = o.queue + o.max_batch + 4;
  server.new_task_queue = [threads] { return new httplib::ThreadPool(static_cast<size_t>(threads)); };
  server.set_payload_max_length(o.max_body);
  server.set_read_timeout(5, 0);
  server.set_write_timeout(5, 0);
  server.set_keep_alive_max_count(8);
  server.set_keep_alive_timeout(2);
}

std::string health(const Runtime& runtime, Worker& worker, const Counters& counts) {
  const Manifest& m = runtime.manifest();
  return json{{"status", "ok"},
              {"source", m.source},
              {"model_kind", m.model_kind},
              {"queued", worker.queued()},
              {"answered", counts.answered.load()},
              {"rejected", counts.rejected.load()},
              {"timed_out", counts.timed_out.load()}}
      .dump();
}

// POST /generate: parse and validate, queue (503 when full), wait up to the timeout (504), answer PNG or JSON.
void answer_generate(const httplib::Request& req, httplib::Response& res, const Runtime& runtime, Worker& worker,
                     const ServerOptions& o, Counters& counts) {
  struct Count {
    std::atomic<long>& n;
    ~Count() { ++n; }
  } count{counts.answered};
  auto job = std::make_shared<Job>();
  try {
    job->request = parse_request(json::parse(req.body), runtime.manifest());
    runtime.validate(job->request.request);
  } catch (const json::exception& e) {
    return send_error(res, 400, std::string("body: not a JSON object (") + e.what() + ")");
  } catch (const Error& e) {
    return send_error(res, http_status(e.kind()), e.what());
  }
  auto future = job->promise.get_future();
  if (!worker.submit(job)) {
    ++counts.rejected;
    res.set_header("Retry-After", "1");
    return send_error(res, 503, "queue full (" + std::to_string(o.queue) + " waiting): retry later");
  }
  if (future.wait_for(std::chrono::milliseconds(o.timeout_ms)) != std::future_status::ready) {
    job->cancelled = true;  // the worker skips it if it has not started
    ++counts.timed_out;
    return send_error(res, 504, "request took longer than " + std::to_string(o.timeout_ms) + " ms");
  }
  Outcome out = future.get();
  if (out.status != 200) return send_error(res, out.status, out.error);
  if (req.has_param("format") && req.get_param_value("format") == "png") {
    res.set_header("X-Safe-Denoiser-Record", out.record.dump(-1, ' ', true, json::error_handler_t::replace));
    res.set_content(out.png, "image/png");
  } else {
    res.set_content(json{{"record", out.record}, {"png_base64", base64(out.png)}}.dump(-1, ' ', true, json::error_handler_t::replace),
                    "application/json");
  }
}

// Listen on the bound socket until a signal or a limit; true when listen() ended without a socket error.
bool listen_until_stopped(httplib::Server& server, const ServerOptions& o, const Counters& counts) {
  std::atomic<bool> done{false};
  const auto start = Clock::now();
  std::thread monitor([&] {  // stops the server on a signal or a limit; listen() then returns
    while (!done) {
      const double age = std::chrono::duration<double>(Clock::now() - start).count();
      // Keep calling stop(): a stop() before listen() has started its loop would be lost.
      if (g_stop_signal || (o.max_requests > 0 && counts.answered >= o.max_requests) ||
          (o.max_seconds > 0 && age >= o.max_seconds)) {
        server.stop();
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
  });
  const bool ok = server.listen_after_bind();
  done = true;
  monitor.join();
  return ok;
}
}  // namespace

int serve(Runtime& runtime, const std::string& provider, const ServerOptions& o) {
  if (o.port < 0 || o.port > 65535) throw Error(ErrorKind::usage, "--port must lie in 0..65535");
  std::signal(SIGPIPE, SIG_IGN);
  std::signal(SIGTERM, on_signal);
  std::signal(SIGINT, on_signal);
  Counters counts;
  httplib::Server server;
  configure(server, o);
  auto worker = std::make_unique<Worker>(runtime, provider, o);
  server.Get("/health", [&](const httplib::Request&, httplib::Response& res) {
    res.set_content(health(runtime, *worker, counts), "application/json");
  });
  server.Post("/generate", [&](const httplib::Request& req, httplib::Response& res) {
    answer_generate(req, res, runtime, *worker, o, counts);
  });
  const int port = o.port == 0 ? server.bind_to_any_port(o.host.c_str()) : (server.bind_to_port(o.host.c_str(), o.port) ? o.port : -1);
  if (port < 0) throw Error(ErrorKind::io, "cannot listen on " + o.host + ":" + std::to_string(o.port));
  std::cout << "listening on http://" << o.host << ":" << port << std::endl;
  const bool ok = listen_until_stopped(server, o, counts);
  worker.reset();  // every handler has returned; the queue is drained
  std::cout << "stopped: " << counts.answered.load() << " answered, " << counts.rejected.load() << " rejected (503), "
            << counts.timed_out.load() << " timed out" << std::endl;
  return ok || g_stop_signal || o.max_requests > 0 || o.max_seconds > 0 ? 0 : static_cast<int>(ErrorKind::io);
}

}  // namespace sdcpp::cli
