// safe-denoiser-cpp: generate | batch | serve | info | schedule | noise | tokenize (see the README).
#include <sys/stat.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <iomanip>
#include <iostream>
#include <set>
#include <sstream>

#include "flags.hpp"
#include "flow_cli.hpp"
#include "requests.hpp"
#include "safree_cli.hpp"
#include "safe_denoiser_cpp/files.hpp"
#include "safe_denoiser_cpp/image.hpp"
#include "safe_denoiser_cpp/noise.hpp"
#include "safe_denoiser_cpp/scheduler.hpp"
#include "safe_denoiser_cpp/t5_tokenizer.hpp"
#include "safe_denoiser_cpp/tokenizer.hpp"
#include "server.hpp"

namespace {
using nlohmann::json;
using namespace sdcpp;
using cli::integer_in;
using cli::number_in;

std::string dump(const json& j) { return j.dump(2, ' ', false, json::error_handler_t::replace) + "\n"; }

std::string parent_dir(const std::string& path) {
  const auto slash = path.find_last_of('/');
  return slash == std::string::npos ? "." : (slash == 0 ? "/" : path.substr(0, slash));
}

// Fail before the (slow) generation when an output cannot be written.
void require_writable(const std::string& path, const char* what) {
  const std::string dir = parent_dir(path);
  struct stat st {};
  if (::stat(dir.c_str(), &st) != 0 || !S_ISDIR(st.st_mode) || ::access(dir.c_str(), W_OK) != 0) {
    throw Error(ErrorKind::io, std::string(what) + ": '" + dir + "' is not a writable folder");
  }
}

std::string stem_of(const std::string& path) {
  const auto dot = path.find_last_of('.');
  const auto slash = path.find_last_of('/');
  return dot == std::string::npos || (slash != std::string::npos && dot < slash) ? path : path.substr(0, dot);
}

double ms_since(std::chrono::steady_clock::time_point t) {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t).count();
}

struct Common {
  std::string bundle, provider = "cpu";
  int threads = 0, inter_threads = 0, device = 0;
  bool trt_fp16 = false, no_verify_files = false;
  RuntimeOptions options() const {
    RuntimeOptions o;
    o.provider = provider;
    o.intra_threads = threads;
    o.inter_threads = inter_threads;
    o.device_id = device;
    o.trt_fp16 = trt_fp16;
    o.check_files = !no_verify_files;
    return o;
  }
};

void add_common(CLI::App* app, Common& c) {
  app->add_option("--bundle", c.bundle, "bundle folder written by `safe-denoiser export`")->required();
  app->add_option("--provider", c.provider, "execution provider: cpu, cuda or tensorrt")->capture_default_str();
  app->add_option("--threads", c.threads, "intra-op threads (0: ONNX Runtime's default)")->check(integer_in(0, 1024));
  app->add_option("--inter-threads", c.inter_threads, "inter-op threads (0: default)")->check(integer_in(0, 1024));
  app->add_option("--device", c.device, "GPU device id (cuda, tensorrt)")->check(integer_in(0, 1023));
  app->add_flag("--trt-fp16", c.trt_fp16, "tensorrt: allow fp16 kernels");
  app->add_flag("--no-verify-files", c.no_verify_files,
                "skip hashing every bundle file against the manifest's sha256 (a huge bundle known to be intact)");
}

struct GenerateArgs {
  Common common;
  std::optional<int64_t> cls, negative_class;
  std::optional<std::string> prompt;
  std::string negative_prompt, out, record, noise, sample_out;
  uint64_t seed = 0;
  uint32_t item = 0;
  int steps = 0;
  std::optional<std::string> sampler;  // absent: the bundle's default (Manifest::resolve_sampler)
  std::optional<double> guidance;
};

// --noise: a float32 .npy of the sample's shape, with or without the batch axis.
std::vector<float> read_noise(const std::string& path, const Manifest& m) {
  NpyArray noise = read_npy_f32(path);
  std::vector<int64_t> expect = m.sample_shape, expect1 = {1};
  expect1.insert(expect1.end(), expect.begin(), expect.end());
  if (noise.shape != expect && noise.shape != expect1) {
    const auto text = [](const std::vector<int64_t>& shape) {
      std::string s;
      for (const auto d : shape) s += (s.empty() ? "" : ", ") + std::to_string(d);
      return "(" + s + ")";
    };
    throw Error(ErrorKind::input, "noise: '" + path + "' has shape " + text(noise.shape) + ", expected " +
                                      text(expect1) + " float32");  // sample_shape: 3 dims, or Flux's packed 2
  }
  return std::move(noise.data);
}

// The paths generate writes, checked before the (slow) generation; each distinct.
std::vector<std::pair<std::string, std::string>> generate_outputs(const GenerateArgs& a) {
  std::vector<std::pair<std::string, std::string>> outputs = {
      {a.out, "--out"}, {a.record.empty() ? stem_of(a.out) + ".json" : a.record, "--record"}};
  if (!a.sample_out.empty()) outputs.emplace_back(a.sample_out, "--sample-out");
  for (size_t i = 0; i < outputs.size(); ++i) {
    check_output_file(outputs[i].first, outputs[i].second);
    for (size_t j = 0; j < i; ++j) {
      if (outputs[i].first == outputs[j].first) {
        throw Error(ErrorKind::usage, outputs[i].second + ": '" + outputs[i].first + "' is also " + outputs[j].second);
      }
    }
  }
  return outputs;
}

int run_generate(const GenerateArgs& a) {
  const auto outputs = generate_outputs(a);
  auto runtime = Runtime::open(a.common.bundle, a.common.options());
  const Manifest& m = runtime->manifest();
  cli::ParsedRequest p;
  p.request.class_label = a.cls;
  p.request.negative_class = a.negative_class;
  p.request.prompt = a.prompt;
  p.request.negative_prompt = a.negative_prompt;
  p.request.seed = a.seed;
  p.request.item = a.item;
  p.request.guidance = a.guidance;
  p.steps = a.steps;
  p.sampler = m.resolve_sampler(a.sampler ? std::optional(parse_sampler(*a.sampler, "--sampler")) : std::nullopt,
                                "--sampler");
  if (!a.noise.empty()) p.request.noise = read_noise(a.noise, m);
  runtime->validate(p.request);
  auto results = runtime->generate({p.request}, p.steps, p.sampler);
  const auto t_png = std::chrono::steady_clock::now();
  const auto png = cli::result_png(results[0]);
  const double png_ms = ms_since(t_png);
  const json record = cli::make_record(*runtime, p, results[0], a.common.provider, png_ms);
  // All or nothing: the PNG, its record and the optional sample.
  std::vector<std::pair<std::string, std::string>> files = {{outputs[0].first, std::string(png.begin(), png.end())},
                                                            {outputs[1].first, dump(record)}};
  if (!a.sample_out.empty()) {
    std::vector<int64_t> shape = {1};
    shape.insert(shape.end(), m.sample_shape.begin(), m.sample_shape.end());
    files.emplace_back(a.sample_out, npy_bytes_f32(shape, results[0].sample.data()));
  }
  atomic_write_all(files);
  std::cout << a.out << " (" << results[0].corrected_steps.size() << " corrected steps, "
            << results[0].timings.denoise_ms << " ms)\n";
  return 0;
}

struct BatchArgs {
  Common common;
  std::string requests, out_dir;
  int max_batch = 4;
};

// Longest request line and most requests in a batch file: a file with no newline (/dev/zero) or endless lines
// must end in an error, not in memory exhaustion.
constexpr size_t kMaxBatchLine = size_t{1} << 20;
constexpr size_t kMaxBatchRequests = 100000;

// The next line of `in` (without its '\n') into `line`; false at the end of the file. Error(input) naming the line
// once it passes kMaxBatchLine bytes, before reading further.
bool bounded_line(std::istream& in, std::string& line, const std::string& file, int number) {
  line.clear();
  std::streambuf* buffer = in.rdbuf();
  for (;;) {
    const int c = buffer->sbumpc();
    if (c == std::char_traits<char>::eof()) return !line.empty();
    if (c == '\n') return true;
    if (line.size() >= kMaxBatchLine) {
      throw Error(ErrorKind::input, file + " line " + std::to_string(number) + ": longer than " +
                                        std::to_string(kMaxBatchLine) + " bytes (one JSON request per line)");
    }
    line.push_back(static_cast<char>(c));
  }
}

// Read and validate every line first: a malformed file writes nothing.
std::vector<cli::ParsedRequest> read_batch(const std::string& file, const Runtime& runtime) {
  struct stat st {};
  std::ifstream in(file, std::ios::binary);
  if (!in || (::stat(file.c_str(), &st) == 0 && S_ISDIR(st.st_mode))) {
    throw Error(ErrorKind::io, "--requests: cannot read '" + file + "' (expected a JSONL file)");
  }
  std::vector<cli::ParsedRequest> parsed;
  std::string line;
  std::set<std::string> ids;
  for (int number = 1; bounded_line(in, line, file, number); ++number) {
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    if (parsed.size() == kMaxBatchRequests) {
      throw Error(ErrorKind::input, file + ": more than " + std::to_string(kMaxBatchRequests) +
                                        " requests (split the file)");
    }
    try {
      auto p = cli::parse_request(cli::parse_json_limited(line, "request"), runtime.manifest());
      runtime.validate(p.request);
      if (p.id.empty()) {
        std::ostringstream id;
        id << "line" << std::setw(6) << std::setfill('0') << number;
        p.id = id.str();
      }
      if (!ids.insert(p.id).second) throw Error(ErrorKind::input, "id: '" + p.id + "' appears twice");
      parsed.push_back(std::move(p));
    } catch (const Error& e) {
      throw Error(e.kind(), file + " line " + std::to_string(number) + ": " + e.what());
    }
  }
  if (in.bad()) throw Error(ErrorKind::io, "--requests: read error in '" + file + "'");
  return parsed;
}

int run_batch(const BatchArgs& a) {
  require_writable(a.out_dir + "/x", "--out-dir");
  auto runtime = Runtime::open(a.common.bundle, a.common.options());
  const std::vector<cli::ParsedRequest> parsed = read_batch(a.requests, *runtime);
  size_t i = 0;
  while (i < parsed.size()) {  // consecutive requests with the same steps and sampler share a batch
    size_t j = i;
    std::vector<Request> batch;
    while (j < parsed.size() && static_cast<int>(batch.size()) < a.max_batch && parsed[j].steps == parsed[i].steps &&
           parsed[j].sampler == parsed[i].sampler) {
      batch.push_back(parsed[j++].request);
    }
    std::vector<Result> results;
    try {
      results = runtime->generate(batch, parsed[i].steps, parsed[i].sampler);
    } catch (const Error& e) {
      throw Error(e.kind(), "requests '" + parsed[i].id + "'..'" + parsed[j - 1].id + "' (" +
                                std::to_string(i) + " images written before them): " + e.what());
    }
    for (size_t k = 0; k < results.size(); ++k) {
      const auto t_png = std::chrono::steady_clock::now();
      const auto png = cli::result_png(results[k]);
      const auto& p = parsed[i + k];
      json rec = cli::make_record(*runtime, p, results[k], a.common.provider, ms_since(t_png));
      rec["batch_size"] = results.size();
      atomic_write_all({{a.out_dir + "/" + p.id + ".json", dump(rec)},
                        {a.out_dir + "/" + p.id + ".png", std::string(png.begin(), png.end())}});
    }
    i = j;
  }
  std::cout << parsed.size() << " images in " << a.out_dir << "\n";
  return 0;
}

int run_info(const Common& c) {
  auto runtime = Runtime::open(c.bundle, c.options());
  const Manifest& m = runtime->manifest();
  json info = {{"bundle", c.bundle},          {"model_kind", m.model_kind},
               {"source", m.source},          {"sample_shape", m.sample_shape},
               {"steps", m.num_inference_steps}, {"guidance_scale", m.guidance_scale},
               {"correction", cli::correction(m)},
               {"sld", m.has_sld},            {"bank_sha256", m.bank ? json(m.bank->sha256) : json(nullptr)},
               {"onnxruntime", ort_version()}, {"ort_api_version", kOrtApiVersion},
               {"providers", available_providers()}, {"load_ms", runtime->load_ms()},
               {"files", m.files.size()},     {"files_verified", !c.no_verify_files},
               {"files_hashed", m.files_check.hashed}, {"files_from_cache", m.files_check.cached},
               {"safree", cli::safree_summary(m)}};
  info.update(cli::bundle_needs(m));  // path, graphs, tokenizers, flow
  std::cout << dump(info);
  return 0;
}

struct ServeArgs {
  Common common;
  cli::ServerOptions server;
};

int run_serve(const ServeArgs& a) {
  auto runtime = Runtime::open(a.common.bundle, a.common.options());
  return cli::serve(*runtime, a.common.provider, a.server,
                    [&a] { return Runtime::open(a.common.bundle, a.common.options()); });
}

struct ScheduleArgs {
  std::string spacing, flow;  // DDIM's spacing, or a JSON file with a flow section
  int64_t train_steps = 1000, offset = 0;
  int steps = 10;
};

int run_schedule(const ScheduleArgs& a) {
  if (!a.flow.empty()) {
    std::cout << cli::flow_schedule_json(a.flow, a.steps).dump() << "\n";
    return 0;
  }
  if (a.spacing.empty()) throw Error(ErrorKind::usage, "schedule: give --spacing (DDIM) or --flow (a flow section)");
  std::cout << json(ddim_timesteps(a.spacing, a.train_steps, a.offset, a.steps)).dump() << "\n";
  return 0;
}

struct NoiseArgs {
  uint64_t seed = 0;
  uint32_t item = 0, stream = 0;
  size_t count = 16;
  std::string out;
};

int run_noise(const NoiseArgs& a) {
  std::vector<float> v(a.count);
  gaussian_noise(a.seed, a.item, a.stream, v.data(), v.size());
  atomic_write(a.out, npy_bytes_f32({static_cast<int64_t>(a.count)}, v.data()));
  return 0;
}

struct TokenizeArgs {
  std::string texts, tokenizer_dir, t5_dir;
  int max_length = 0;
};

// CLIP (--tokenizer): a list of id lists. T5 (--t5): a list of {"input_ids", "attention_mask"}.
int run_tokenize(const TokenizeArgs& a) {
  if (a.tokenizer_dir.empty() == a.t5_dir.empty()) throw Error(ErrorKind::usage, "tokenize: give --tokenizer or --t5");
  if (!a.t5_dir.empty() && a.max_length == 0) throw Error(ErrorKind::usage, "tokenize --t5: --max-length is required");
  json ids = json::array();
  const json texts = cli::parse_json_limited(read_file(a.texts), "--texts");
  if (!texts.is_array() || !std::all_of(texts.begin(), texts.end(), [](const json& t) { return t.is_string(); })) {
    throw Error(ErrorKind::input, "--texts: expected a JSON list of strings");
  }
  if (!a.t5_dir.empty()) {
    const T5Tokenizer t5(a.t5_dir, a.max_length);
    for (const auto& text : texts) {
      const auto encoded = t5.encode(text.get<std::string>());
      ids.push_back({{"input_ids", encoded.ids}, {"attention_mask", encoded.attention_mask}});
    }
    std::cout << ids.dump() << "\n";
    return 0;
  }
  const auto tokenizer = ClipTokenizer::load(a.tokenizer_dir);
  for (const auto& text : texts) ids.push_back(tokenizer.encode(text.get<std::string>()));
  std::cout << ids.dump() << "\n";
  return 0;
}

// ---- the subcommands' options ----------------------------------------------------------------------------------
CLI::App* add_generate(CLI::App& app, GenerateArgs& g) {
  auto* gen = app.add_subcommand("generate", "generate one image");
  add_common(gen, g.common);
  auto* cls = gen->add_option("--class", g.cls, "class label (class-conditional bundles)")
                  ->check(integer_in(INT64_MIN, INT64_MAX));
  auto* prompt = gen->add_option("--prompt", g.prompt, "prompt (text bundles)");
  cls->excludes(prompt);
  gen->add_option("--negative-class", g.negative_class, "negative class (default: the null class)")
      ->check(integer_in(INT64_MIN, INT64_MAX));  // the range: Runtime::validate
  gen->add_option("--negative-prompt", g.negative_prompt, "negative prompt (default: empty)");
  gen->add_option("--seed", g.seed, "noise seed")->required()->check(integer_in(0, UINT64_MAX));
  gen->add_option("--item", g.item, "noise stream under the seed (Python: position in the batch)")
      ->check(integer_in(0, UINT32_MAX));
  gen->add_option("--steps", g.steps, "sampler steps (default: the manifest's)")->check(integer_in(1, 1000000));
  gen->add_option("--sampler", g.sampler,
                  "VP bundles: ddim (deterministic, the default) or ddpm (Philox variance noise of seed/item); flow "
                  "bundles: flow_euler (alias euler, the default)")
      ->check(CLI::IsMember({"ddim", "ddpm", "flow_euler", "euler"}));
  gen->add_option("--guidance", g.guidance, "classifier-free guidance scale (default: the manifest's)")
      ->check(number_in(-kMaxGuidance, kMaxGuidance));
  gen->add_option("--out", g.out, "PNG to write")->required();
  gen->add_option("--record", g.record, "JSON record to write (default: OUT with .json)");
  gen->add_option("--noise", g.noise, "initial noise .npy, float32 (1, C, H, W)");
  gen->add_option("--sample-out", g.sample_out, "also write the final sample as .npy (float32)");
  return gen;
}

CLI::App* add_batch(CLI::App& app, BatchArgs& b) {
  auto* batch = app.add_subcommand("batch", "generate from JSONL requests (sessions load once)");
  add_common(batch, b.common);
  batch->add_option("--requests", b.requests, "JSONL file: one request object per line")->required();
  batch->add_option("--out-dir", b.out_dir, "folder for <id>.png and <id>.json")->required();
  batch->add_option("--max-batch", b.max_batch, "requests per ONNX Runtime call")->check(integer_in(1, 64));
  return batch;
}

CLI::App* add_info(CLI::App& app, Common& c) {
  auto* info = app.add_subcommand("info", "validate a bundle and print what the runtime sees");
  add_common(info, c);
  return info;
}

CLI::App* add_serve(CLI::App& app, ServeArgs& a) {
  cli::ServerOptions& so = a.server;
  auto* serve = app.add_subcommand("serve", "HTTP server: POST /generate, /v1/images/generations (OpenAI), "
                                             "/sdapi/v1/txt2img (AUTOMATIC1111); GET /health, /metrics");
  add_common(serve, a.common);
  serve->add_option("--host", so.host, "address to bind (loopback by default)")->capture_default_str();
  serve->add_option("--port", so.port, "port (0: any free port, printed on start)")
      ->check(integer_in(0, 65535))->capture_default_str();
  serve->add_option("--queue", so.queue, "queued requests before answering 503")
      ->check(integer_in(1, 4096))->capture_default_str();
  serve->add_option("--max-batch", so.max_batch, "requests per ONNX Runtime call")
      ->check(integer_in(1, 64))->capture_default_str();
  serve->add_option("--timeout-ms", so.timeout_ms, "per-request timeout (504 after it)")
      ->check(integer_in(1, 86400000))->capture_default_str();
  serve->add_option("--max-body", so.max_body, "largest request body in bytes (413 above)")
      ->check(integer_in(1, 1 << 30))->capture_default_str();
  serve->add_option("--max-requests", so.max_requests, "stop after this many answered requests (0: never)")
      ->check(integer_in(0, INT32_MAX));
  serve->add_option("--max-seconds", so.max_seconds, "stop after this many seconds (0: never)")
      ->check(number_in(0, 1e9));
  cli::add_serve_flags(*serve, so);  // keys, logs, connection limits (server.cpp)
  return serve;
}

CLI::App* add_schedule(CLI::App& app, ScheduleArgs& a) {
  auto* schedule = app.add_subcommand("schedule", "print DDIM timesteps, or a flow schedule, as JSON");
  auto* spacing = schedule->add_option("--spacing", a.spacing, "DDIM timestep spacing");
  schedule->add_option("--flow", a.flow, "JSON file: a manifest's flow section (or manifest.json)")->excludes(spacing);
  schedule->add_option("--train-steps", a.train_steps)->check(integer_in(1, 1000000));
  schedule->add_option("--offset", a.offset)->check(integer_in(0, 1000000));
  schedule->add_option("--steps", a.steps)->required()->check(integer_in(1, 1000000));
  return schedule;
}

CLI::App* add_noise(CLI::App& app, NoiseArgs& a) {
  auto* noise = app.add_subcommand("noise", "write Philox Gaussian noise as .npy (parity tests)");
  noise->add_option("--seed", a.seed)->required()->check(integer_in(0, UINT64_MAX));
  noise->add_option("--item", a.item)->check(integer_in(0, UINT32_MAX));
  noise->add_option("--stream", a.stream)->check(integer_in(0, UINT32_MAX));
  noise->add_option("--count", a.count)->required()->check(integer_in(0, 1 << 28));
  noise->add_option("--out", a.out)->required();
  return noise;
}

CLI::App* add_tokenize(CLI::App& app, TokenizeArgs& a) {
  auto* tokenize = app.add_subcommand("tokenize", "token ids of prompts (JSON list file) as JSON");
  auto* clip = tokenize->add_option("--tokenizer", a.tokenizer_dir, "a bundle's CLIP tokenizer folder (tokenizer.json)");
  auto* t5 = tokenize->add_option("--t5", a.t5_dir, "a T5 tokenizer folder (spiece.model)")->excludes(clip);
  tokenize->add_option("--max-length", a.max_length, "T5: ids per prompt (padded, truncated)")
      ->needs(t5)
      ->check(integer_in(1, T5Tokenizer::kMaxLength));
  tokenize->add_option("--texts", a.texts, "JSON file: a list of strings")->required();
  return tokenize;
}

// Run a subcommand; an error becomes a message on stderr and its kind's exit code.
int run_reporting_errors(const std::function<int()>& command) {
  try {
    return command();
  } catch (const Error& e) {
    std::cerr << "safe-denoiser-cpp: error: " << e.what() << "\n";
    return static_cast<int>(e.kind());
  } catch (const nlohmann::json::exception& e) {
    std::cerr << "safe-denoiser-cpp: error: invalid JSON: " << e.what() << "\n";
    return static_cast<int>(ErrorKind::input);
  } catch (const std::exception& e) {
    std::cerr << "safe-denoiser-cpp: error: " << e.what() << "\n";
    return static_cast<int>(ErrorKind::runtime);
  }
}
}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"safe-denoiser-cpp: run a safe-denoiser bundle with ONNX Runtime (no Python)"};
  app.require_subcommand(1);
  GenerateArgs generate;
  BatchArgs batch;
  Common info;
  ServeArgs serve;
  ScheduleArgs schedule;
  NoiseArgs noise;
  TokenizeArgs tokenize;
  cli::SafreeCheckArgs safree;
  // Each subcommand with what runs it, in the order --help lists them.
  const std::vector<std::pair<CLI::App*, std::function<int()>>> commands = {
      {add_generate(app, generate), [&] { return run_generate(generate); }},
      {add_batch(app, batch), [&] { return run_batch(batch); }},
      {add_info(app, info), [&] { return run_info(info); }},
      {add_serve(app, serve), [&] { return run_serve(serve); }},
      {add_schedule(app, schedule), [&] { return run_schedule(schedule); }},
      {add_noise(app, noise), [&] { return run_noise(noise); }},
      {add_tokenize(app, tokenize), [&] { return run_tokenize(tokenize); }},
      {cli::add_safree_check(app, safree), [&] { return cli::run_safree_check(safree); }},
  };
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    const int code = app.exit(e);
    return code == 0 ? 0 : static_cast<int>(ErrorKind::usage);
  }
  for (const auto& [subcommand, run] : commands) {
    if (*subcommand) return run_reporting_errors(run);
  }
  return static_cast<int>(ErrorKind::usage);
}
