#include "server.hpp"

#include <httplib.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <csignal>
#include <cstdlib>
#include <deque>
#include <future>
#include <iostream>
#include <thread>

#include "access.hpp"
#include "api_compat.hpp"
#include "flags.hpp"
#include "http_guard.hpp"
#include "metrics.hpp"
#include "requests.hpp"
#include "stop_signal.hpp"

namespace sdcpp::cli {
namespace {
using nlohmann::json;
using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

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

int http_status(ErrorKind kind) { return kind == ErrorKind::input ? 400 : 500; }

// Records and /health name the model, never a folder of this machine: a source that is a path shows its last part.
std::string public_source(const std::string& source) {
  const bool path = !source.empty() && (source[0] == '/' || source[0] == '.' || source[0] == '~' ||
                                        source.find('\\') != std::string::npos);
  return path ? source.substr(source.find_last_of("/\\") + 1) : source;
}

// The one bounded queue every worker takes from. A worker takes up to max_batch queued jobs with the same steps and
// sampler per call.
class JobQueue {
 public:
  explicit JobQueue(const ServerOptions& o) : options_(o) {}
  // All or none: false when the jobs do not all fit in the queue.
  bool submit(const std::vector<std::shared_ptr<Job>>& jobs) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (stopping_ || queue_.size() + jobs.size() > static_cast<size_t>(options_.queue)) return false;
      queue_.insert(queue_.end(), jobs.begin(), jobs.end());
    }
    ready_.notify_all();  // several workers may each take a batch of different steps/sampler
    return true;
  }
  size_t queued() {
    std::lock_guard<std::mutex> lock(mutex_);
    return queue_.size();
  }
  bool running() {
    std::lock_guard<std::mutex> lock(mutex_);
    return !stopping_;
  }
  void stop() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stopping_ = true;
    }
    ready_.notify_all();
  }
  // Blocks until jobs are queued or the queue stops; empty only when stopping and drained.
  std::vector<std::shared_ptr<Job>> take_batch() {
    std::unique_lock<std::mutex> lock(mutex_);
    ready_.wait(lock, [this] { return stopping_ || !queue_.empty(); });
    std::vector<std::shared_ptr<Job>> batch;
    while (!queue_.empty() && queue_.front()->cancelled) queue_.pop_front();
    if (queue_.empty()) return batch;
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
    return batch;
  }

 private:
  const ServerOptions& options_;
  std::mutex mutex_;
  std::condition_variable ready_;
  std::deque<std::shared_ptr<Job>> queue_;
  bool stopping_ = false;
};

// One worker thread per runtime (a runtime is not thread-safe); every worker takes from the same queue. The
// destructor stops the queue and joins each worker once the queue is drained.
class Worker {
 public:
  Worker(Runtime& runtime, std::string provider, JobQueue& queue, Metrics& metrics)
      : runtime_(runtime), provider_(std::move(provider)), queue_(queue), metrics_(metrics), thread_([this] { loop(); }) {}
  ~Worker() {
    queue_.stop();
    thread_.join();
  }

 private:
  void loop() {
    for (;;) {
      const auto batch = queue_.take_batch();
      if (batch.empty()) return;  // stopping and drained
      run(batch);
    }
  }

  Outcome outcome(const Job& job, const Result& result, size_t batch_size) {
    const auto png_start = Clock::now();
    const auto png = result_png(result);
    Outcome out;
    out.status = 200;
    out.png.assign(png.begin(), png.end());
    out.record = make_record(runtime_, job.request, result, provider_, seconds_since(png_start) * 1e3);
    out.record["batch_size"] = batch_size;
    out.record.erase("bundle");  // no filesystem paths in answers
    out.record["source"] = public_source(runtime_.manifest().source);
    return out;
  }

  void run(const std::vector<std::shared_ptr<Job>>& batch) {
    std::vector<Request> requests;
    for (const auto& job : batch) requests.push_back(job->request.request);
    const auto start = Clock::now();
    try {
      const auto results = runtime_.generate(requests, batch.front()->request.steps, batch.front()->request.sampler);
      metrics_.batch(batch.size(), seconds_since(start));
      uint64_t steps = 0, corrected = 0;
      std::vector<Outcome> outcomes;
      for (size_t i = 0; i < batch.size(); ++i) {
        outcomes.push_back(outcome(*batch[i], results[i], batch.size()));
        steps += results[i].timesteps.size();
        corrected += results[i].corrected_steps.size();
      }
      metrics_.images(batch.size(), steps, corrected);  // before the answers: a client then sees them counted
      for (size_t i = 0; i < batch.size(); ++i) batch[i]->promise.set_value(std::move(outcomes[i]));
    } catch (const std::exception& e) {
      const auto* err = dynamic_cast<const Error*>(&e);
      log_line(LogLevel::error, {{"event", "generation_failed"}, {"images", batch.size()}, {"message", e.what()}});
      for (const auto& job : batch) {
        Outcome out;
        out.status = err ? http_status(err->kind()) : 500;
        out.error = out.status < 500 ? e.what() : "generation failed (the server log has the details)";
        job->promise.set_value(std::move(out));
      }
    }
  }

  Runtime& runtime_;
  std::string provider_;
  JobQueue& queue_;
  Metrics& metrics_;
  std::thread thread_;
};

// Everything the handlers share.
struct State {
  State(Runtime& r, const ServerOptions& options, std::string key)
      : runtime(r), o(options), api_key(std::move(key)), loopback(is_loopback_host(options.host)), queue(options) {}
  Runtime& runtime;
  const ServerOptions& o;
  std::string api_key;
  bool loopback;
  int port = 0;
  ImageSize size;
  Metrics metrics;
  StopSignal stop;
  JobQueue queue;
  std::vector<std::unique_ptr<Runtime>> more_runtimes;  // workers 2..N each own one
  std::vector<std::unique_ptr<Worker>> workers;          // declared after the queue: destroyed (joined) first
  GuardedServer* server = nullptr;
  std::atomic<long> answered{0}, rejected{0}, timed_out{0};
};

struct Route {
  const char* path;
  const char* allow;
};
constexpr Route kRoutes[] = {{"/health", "GET, HEAD"},
                             {"/metrics", "GET, HEAD"},
                             {"/generate", "POST"},
                             {"/v1/images/generations", "POST"},
                             {"/sdapi/v1/txt2img", "POST"}};

const Route* find_route(const std::string& path) {
  for (const auto& r : kRoutes) {
    if (path == r.path) return &r;
  }
  return nullptr;
}

// The OpenAI routes answer errors in OpenAI's shape (its clients read error.message); the others {error, status}.
void send_error(const std::string& path, httplib::Response& res, int status, const std::string& message) {
  res.status = status;
  json body;
  if (path.rfind("/v1/", 0) == 0) {
    const auto colon = message.find(':');
    const std::string head = message.substr(0, colon == std::string::npos ? 0 : colon);
    const bool param = !head.empty() && head.find_first_not_of("abcdefghijklmnopqrstuvwxyz_") == std::string::npos;
    body = {{"error",
             {{"message", message},
              {"type", status < 500 ? "invalid_request_error" : "server_error"},
              {"param", param ? json(head) : json(nullptr)},
              {"code", nullptr}}}};
  } else {
    body = {{"error", message}, {"status", status}};
  }
  res.set_content(body.dump(-1, ' ', true, json::error_handler_t::replace), "application/json");
}

std::string status_message(int status, const ServerOptions& o) {
  switch (status) {
    case 413: return "request body larger than --max-body (" + std::to_string(o.max_body) + " bytes)";
    case 414: return "request target too long";
    case 404: return "no such route";
    default: return "bad request (malformed HTTP, or not received within --read-timeout-ms)";
  }
}

using Verdict = httplib::Server::HandlerResponse;

Verdict refuse(const httplib::Request& req, httplib::Response& res, int status, const std::string& message) {
  send_error(req.path, res, status, message);
  request_context().close_connection = true;  // its body, if any, was not read
  res.set_header("Connection", "close");
  return Verdict::Handled;
}

bool json_content_type(const std::string& value) {
  std::string media = value.substr(0, value.find(';'));
  media.erase(media.find_last_not_of(" \t") + 1);
  for (auto& c : media) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return media == "application/json";
}

// Before the body is read: the request id, then Host (loopback binds), the key, the route and method, the type.
Verdict pre_route(const httplib::Request& req, httplib::Response& res, State& s) {
  auto& ctx = request_context();
  ctx.id = request_id(req.get_header_value("X-Request-Id"));
  res.set_header("X-Request-Id", ctx.id);
  const Route* route = find_route(req.path);
  if (s.loopback && !loopback_host_header_ok(req.get_header_value("Host"), s.port)) {
    return refuse(req, res, 403, "Host: expected localhost, 127.0.0.1 or [::1] with port " + std::to_string(s.port) +
                                     " (a loopback server answers only its own names, against DNS rebinding)");
  }
  if (!s.api_key.empty() && !(route && req.path == "/health") &&
      !bearer_matches(req.get_header_value("Authorization"), s.api_key)) {
    res.set_header("WWW-Authenticate", "Bearer");
    return refuse(req, res, 401, "Authorization: expected 'Bearer <key>' with the server's API key");
  }
  if (!route) return refuse(req, res, 404, "no route " + req.path.substr(0, 100) +
                                               " (routes: /generate, /v1/images/generations, /sdapi/v1/txt2img, /health, /metrics)");
  const std::string allow = route->allow;
  if ((", " + allow + ",").find(", " + req.method + ",") == std::string::npos) {
    res.set_header("Allow", allow);
    return refuse(req, res, 405, "method " + req.method.substr(0, 20) + " not allowed on " + req.path + " (allowed: " + allow + ")");
  }
  if (req.method == "POST" && !json_content_type(req.get_header_value("Content-Type"))) {
    return refuse(req, res, 415, "Content-Type: expected application/json");
  }
  return Verdict::Unhandled;
}

// After the answer is written: metrics and one JSON log line; connections close after an error.
void log_request(const httplib::Request& req, const httplib::Response& res, State& s) {
  auto& ctx = request_context();
  if (ctx.id.empty()) ctx.id = request_id("");
  const Route* route = find_route(req.path);
  const std::string name = route ? route->path : "other";
  const double seconds = seconds_since(ctx.start);
  s.metrics.request(name, res.status, seconds);
  const LogLevel level = res.status >= 500 ? LogLevel::error : res.status >= 400 ? LogLevel::warn : LogLevel::info;
  log_line(level, {{"event", "request"}, {"id", ctx.id}, {"method", req.method.substr(0, 20)}, {"route", name},
                   {"status", res.status}, {"latency_ms", seconds * 1e3}, {"images", ctx.images},
                   {"steps", ctx.steps}, {"correction_steps", ctx.correction_steps}});
}

// Answers cpp-httplib wrote itself (413, malformed requests) get a JSON body and the request id too.
void fill_error(const httplib::Request& req, httplib::Response& res, const ServerOptions& o) {
  auto& ctx = request_context();
  if (ctx.id.empty()) ctx.id = request_id("");
  if (!res.has_header("X-Request-Id")) res.set_header("X-Request-Id", ctx.id);
  if (res.body.empty()) {  // cpp-httplib's own errors: the rest of the request was not read
    send_error(req.path, res, res.status, status_message(res.status, o));
    ctx.close_connection = true;
    res.set_header("Connection", "close");
  }
}

struct Generated {
  int status = 200;
  std::string error;
  std::vector<Outcome> outcomes;
};

// Queue every image of a call at once (503 when they do not all fit), wait for all of them within the timeout.
Generated generate_all(std::vector<ParsedRequest> items, State& s) {
  std::vector<std::shared_ptr<Job>> jobs;
  std::vector<std::future<Outcome>> futures;
  for (auto& item : items) {
    jobs.push_back(std::make_shared<Job>());
    jobs.back()->request = std::move(item);
    futures.push_back(jobs.back()->promise.get_future());
  }
  if (!s.queue.submit(jobs)) {
    ++s.rejected;
    return {503, "queue full (" + std::to_string(s.o.queue) + " images may wait): retry later", {}};
  }
  const auto deadline = Clock::now() + std::chrono::milliseconds(s.o.timeout_ms);
  Generated out;
  for (auto& f : futures) {
    if (f.wait_until(deadline) != std::future_status::ready) {
      for (auto& job : jobs) job->cancelled = true;  // the worker skips those it has not started
      ++s.timed_out;
      return {504, "request took longer than " + std::to_string(s.o.timeout_ms) + " ms", {}};
    }
    out.outcomes.push_back(f.get());
    if (out.outcomes.back().status != 200) return {out.outcomes.back().status, out.outcomes.back().error, {}};
  }
  auto& ctx = request_context();
  for (const auto& o : out.outcomes) {
    ++ctx.images;
    ctx.steps += o.record.value("steps", 0L);
    ctx.correction_steps += o.record.value("corrected_count", 0L);
  }
  return out;
}

// Counts answered image requests; the last one allowed by --max-requests asks the server to stop.
struct AnsweredCount {
  State& s;
  ~AnsweredCount() {
    if (++s.answered == s.o.max_requests) s.stop.request();
  }
};

void answer_generate(const httplib::Request& req, httplib::Response& res, State& s) {
  AnsweredCount count{s};
  ParsedRequest p;
  try {
    p = parse_request(parse_json_limited(req.body, "body"), s.runtime.manifest());
    s.runtime.validate(p.request);
  } catch (const Error& e) {
    return send_error(req.path, res, http_status(e.kind()), e.what());
  } catch (const json::exception& e) {  // a value of a JSON type the parsers do not name (the batch CLI exits 4 too)
    return send_error(req.path, res, 400, std::string("body: ") + e.what());
  }
  Generated g = generate_all({p}, s);
  if (g.status != 200) {
    if (g.status == 503) res.set_header("Retry-After", "1");
    return send_error(req.path, res, g.status, g.error);
  }
  const Outcome& out = g.outcomes.front();
  if (req.has_param("format") && req.get_param_value("format") == "png") {
    res.set_header("X-Safe-Denoiser-Record", out.record.dump(-1, ' ', true, json::error_handler_t::replace));
    res.set_content(out.png, "image/png");
  } else {
    res.set_content(json{{"record", out.record}, {"png_base64", base64(out.png)}}.dump(-1, ' ', true, json::error_handler_t::replace),
                    "application/json");
  }
}

// POST /v1/images/generations and /sdapi/v1/txt2img: translate, generate, answer in the API's shape.
void answer_image_api(const httplib::Request& req, httplib::Response& res, State& s, bool openai) {
  AnsweredCount count{s};
  json body;
  ImageCall call;
  try {
    body = parse_json_limited(req.body, "body");
    const auto most = static_cast<size_t>(s.o.queue);
    call = openai ? parse_openai(body, s.runtime, s.size, most) : parse_a1111(body, s.runtime, s.size, most);
  } catch (const Error& e) {
    return send_error(req.path, res, http_status(e.kind()), e.what());
  } catch (const json::exception& e) {  // a value of a JSON type the parsers do not name (the batch CLI exits 4 too)
    return send_error(req.path, res, 400, std::string("body: ") + e.what());
  }
  Generated g = generate_all(std::move(call.items), s);
  if (g.status != 200) {
    if (g.status == 503) res.set_header("Retry-After", "1");
    return send_error(req.path, res, g.status, g.error);
  }
  std::vector<std::string> pngs;
  std::vector<json> corrected;
  for (const auto& o : g.outcomes) {
    pngs.push_back(o.png);
    corrected.push_back(o.record.value("corrected_steps", json::array()));
  }
  const json answer = openai ? answer_openai(pngs) : answer_a1111(body, call, pngs, corrected);
  res.set_content(answer.dump(-1, ' ', true, json::error_handler_t::replace), "application/json");
}

void answer_health(httplib::Response& res, State& s) {
  const Manifest& m = s.runtime.manifest();
  const bool worker = s.queue.running();
  const bool ready = worker && !s.stop.requested();
  res.status = ready ? 200 : 503;
  res.set_content(json{{"status", ready ? "ok" : "stopping"},
                       {"ready", ready},
                       {"bundle_loaded", true},
                       {"worker_running", worker},
                       {"workers", s.workers.size()},
                       {"queued", s.queue.queued()},
                       {"queue_capacity", s.o.queue},
                       {"model_kind", m.model_kind},
                       {"source", public_source(m.source)},
                       {"image", {{"width", s.size.width}, {"height", s.size.height}}},
                       {"auth", s.api_key.empty() ? "none" : "bearer"},
                       {"answered", s.answered.load()},
                       {"rejected", s.rejected.load()},
                       {"timed_out", s.timed_out.load()}}
                      .dump(),
                  "application/json");
}

void answer_metrics(httplib::Response& res, State& s) {
  Gauges g;
  g.queue_depth = s.queue.queued();
  g.workers = s.workers.size();
  g.queue_capacity = static_cast<size_t>(s.o.queue);
  g.connections_active = s.server->active_connections();
  g.ready = s.queue.running() && !s.stop.requested();
  g.connections_rejected = s.server->rejected_connections.load();
  res.set_content(s.metrics.exposition(g), "text/plain; version=0.0.4; charset=utf-8");
}

void add_routes(GuardedServer& server, State& s) {
  server.set_pre_routing_handler([&s](const httplib::Request& req, httplib::Response& res) { return pre_route(req, res, s); });
  server.set_logger([&s](const httplib::Request& req, const httplib::Response& res) { log_request(req, res, s); });
  server.set_error_handler([&s](const httplib::Request& req, httplib::Response& res) { fill_error(req, res, s.o); });
  server.Get("/health", [&s](const httplib::Request&, httplib::Response& res) { answer_health(res, s); });
  server.Get("/metrics", [&s](const httplib::Request&, httplib::Response& res) { answer_metrics(res, s); });
  server.Post("/generate", [&s](const httplib::Request& req, httplib::Response& res) { answer_generate(req, res, s); });
  server.Post("/v1/images/generations",
              [&s](const httplib::Request& req, httplib::Response& res) { answer_image_api(req, res, s, true); });
  server.Post("/sdapi/v1/txt2img",
              [&s](const httplib::Request& req, httplib::Response& res) { answer_image_api(req, res, s, false); });
}

// The image size the APIs check width/height against: one 1-step image (also a warm-up of every session).
ImageSize probe_image_size(Runtime& runtime) {
  Request probe;
  if (runtime.manifest().model_kind == "class-conditional") {
    probe.class_label = 0;
  } else {
    probe.prompt = "";
  }
  const auto result = runtime.generate({probe}, 1);
  return {result.at(0).image_w, result.at(0).image_h};
}

// The API key (flag, else environment) and the rule that only loopback binds may run without one.
std::string access_key(const ServerOptions& o) {
  std::string key = o.api_key, source = "--api-key";
  if (key.empty()) {
    const char* env = std::getenv("SAFE_DENOISER_API_KEY");
    key = env ? env : "";
    source = "SAFE_DENOISER_API_KEY";
  }
  if (!key.empty()) check_api_key(key, source);
  if (key.empty() && !is_loopback_host(o.host)) {
    throw Error(ErrorKind::usage, "--host " + o.host +
                                      " is not a loopback address: serving beyond this machine needs an API key "
                                      "(--api-key KEY or the environment variable SAFE_DENOISER_API_KEY); clients "
                                      "then send 'Authorization: Bearer KEY'. TLS is not served: put a proxy in front");
  }
  return key;
}

// Worker 1 uses the runtime already open; each further worker opens its own (memory grows with --workers) and
// warms it up with the probe, so no first request pays for that.
void start_workers(State& s, const std::string& provider, const RuntimeOpener& open_runtime) {
  for (int i = 1; i < s.o.workers; ++i) {
    if (!open_runtime) throw Error(ErrorKind::usage, "--workers: this caller cannot open more runtimes");
    s.more_runtimes.push_back(open_runtime());
    probe_image_size(*s.more_runtimes.back());
  }
  s.workers.push_back(std::make_unique<Worker>(s.runtime, provider, s.queue, s.metrics));
  for (auto& r : s.more_runtimes) s.workers.push_back(std::make_unique<Worker>(*r, provider, s.queue, s.metrics));
}

ConnectionLimits connection_limits(const ServerOptions& o) {
  ConnectionLimits l;
  l.threads = o.http_threads > 0 ? o.http_threads : o.queue + o.max_batch + 4;
  l.max_connections = o.max_connections > 0 ? o.max_connections : 4 * l.threads;
  if (l.max_connections < l.threads) {
    throw Error(ErrorKind::usage, "--max-connections: expected at least --http-threads (" + std::to_string(l.threads) + ")");
  }
  l.read_timeout_ms = o.read_timeout_ms;
  l.busy_read_timeout_ms = std::min(1000, o.read_timeout_ms);
  l.reserve = std::max(1, std::min(4, l.threads / 4));
  return l;
}
}  // namespace

void add_serve_flags(CLI::App& serve, ServerOptions& so) {
  serve.add_option("--api-key", so.api_key,
                   "require 'Authorization: Bearer KEY' (16..256 characters; default: $SAFE_DENOISER_API_KEY); "
                   "needed to bind a non-loopback address");
  serve.add_option("--log-level", so.log_level, "JSON log lines on stderr from this level: error, warn, info, debug")
      ->check(CLI::IsMember({"error", "warn", "info", "debug"}))
      ->capture_default_str();
  serve.add_option("--workers", so.workers,
                   "generation threads, each with its own copy of the model: memory grows with N (one bundle's "
                   "sessions per worker)")
      ->check(integer_in(1, 16))
      ->capture_default_str();
  serve.add_option("--http-threads", so.http_threads, "connection threads (default: queue + max-batch + 4)")
      ->check(integer_in(1, 1024));
  serve.add_option("--max-connections", so.max_connections,
                   "connections served or waiting for a thread; more get 503 (default: 4 x http-threads)")
      ->check(integer_in(1, 65536));
  serve.add_option("--read-timeout-ms", so.read_timeout_ms,
                   "time to receive one whole request (1000 ms while the connection threads are nearly all busy)")
      ->check(integer_in(100, 600000))
      ->capture_default_str();
}

int serve(Runtime& runtime, const std::string& provider, const ServerOptions& o, const RuntimeOpener& open_runtime) {
  if (o.port < 0 || o.port > 65535) throw Error(ErrorKind::usage, "--port must lie in 0..65535");
  set_log_level(parse_log_level(o.log_level));
  State s(runtime, o, access_key(o));
  const ConnectionLimits limits = connection_limits(o);
  std::signal(SIGPIPE, SIG_IGN);
  const auto probe_start = Clock::now();
  s.size = probe_image_size(runtime);
  GuardedServer server(limits);
  s.server = &server;
  server.set_payload_max_length(o.max_body);
  server.set_write_timeout(10, 0);
  start_workers(s, provider, open_runtime);
  add_routes(server, s);
  s.port = o.port == 0 ? server.bind_to_any_port(o.host.c_str()) : (server.bind_to_port(o.host.c_str(), o.port) ? o.port : -1);
  if (s.port < 0) throw Error(ErrorKind::io, "cannot listen on " + o.host + ":" + std::to_string(o.port));
  log_line(LogLevel::info, {{"event", "start"}, {"host", o.host}, {"port", s.port}, {"workers", o.workers},
                            {"http_threads", limits.threads},
                            {"max_connections", limits.max_connections}, {"auth", s.api_key.empty() ? "none" : "bearer"},
                            {"warmup_ms", seconds_since(probe_start) * 1e3}});
  std::cout << "listening on http://" << o.host << ":" << s.port << std::endl;
  bool listened = false;
  std::thread listener([&] {
    listened = server.listen_after_bind();
    s.stop.request();  // listen() ended by itself: a socket error
  });
  s.stop.wait(o.max_seconds);
  server.stop_now();
  listener.join();  // every connection thread has finished its request
  s.workers.clear();  // each worker finishes what is queued before it joins
  std::cout << "stopped: " << s.answered.load() << " answered, " << s.rejected.load() << " rejected (503), "
            << s.timed_out.load() << " timed out" << std::endl;
  const bool limited = o.max_requests > 0 || o.max_seconds > 0;
  return listened || s.stop.by_signal() || limited ? 0 : static_cast<int>(ErrorKind::io);
}

}  // namespace sdcpp::cli
