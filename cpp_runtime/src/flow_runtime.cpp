// Runtime's flow path (flow_runtime.hpp): the same steps, in the same float32 arithmetic, as
// safe_denoiser/runtime/flow_bundle.py, so both runtimes give the same final sample and PNG bytes.
#include "flow_runtime.hpp"
#include "sample_checks.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <map>
#include <optional>

#include "safe_denoiser_cpp/flow_sampler.hpp"
#include "safe_denoiser_cpp/noise.hpp"
#include "safe_denoiser_cpp/t5_tokenizer.hpp"
#include "safe_denoiser_cpp/tokenizer.hpp"

namespace sdcpp {

// One manifest tokenizer: a prompt's ids padded / truncated to the entry's max_length, with its recorded special ids.
class FlowTokenizer {
 public:
  FlowTokenizer(const TokenizerSpec& spec, const std::string& bundle_dir) : spec_(spec) {
    const std::string folder = bundle_dir + "/" + spec.folder;
    if (spec.kind == TokenizerKind::clip) {
      clip_ = ClipTokenizer::load(folder, spec.max_length, spec.special);
    } else {
      t5_.emplace(folder, spec.max_length, spec.special);
    }
  }
  const TokenizerSpec& spec() const { return spec_; }
  std::vector<int64_t> encode(const std::string& text) const { return clip_ ? clip_->encode(text) : t5_->encode(text).ids; }

 private:
  TokenizerSpec spec_;
  std::optional<ClipTokenizer> clip_;
  std::optional<T5Tokenizer> t5_;
};

namespace {
using Clock = std::chrono::steady_clock;

double ms_since(Clock::time_point start) {
  return std::chrono::duration<double, std::milli>(Clock::now() - start).count();
}

template <typename T>
Ort::Value tensor(std::vector<T>& data, const std::vector<int64_t>& shape) {
  static const Ort::MemoryInfo cpu = Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault);
  return Ort::Value::CreateTensor<T>(cpu, data.data(), data.size(), shape.data(), shape.size());
}

std::vector<int64_t> batched(int64_t b, const std::vector<int64_t>& shape) {
  std::vector<int64_t> out = {b};
  out.insert(out.end(), shape.begin(), shape.end());
  return out;
}

std::vector<Ort::Value> run(Ort::Session& session, const std::string& graph, const std::vector<const char*>& inputs,
                            std::vector<Ort::Value>& values, const std::vector<const char*>& outputs) {
  try {
    return session.Run(Ort::RunOptions{nullptr}, inputs.data(), values.data(), values.size(), outputs.data(),
                       outputs.size());
  } catch (const Ort::Exception& e) {
    throw Error(ErrorKind::runtime, graph + ".onnx failed: " + e.what());
  }
}

// A float32 output with its shape.
std::vector<float> floats(const Ort::Value& value, std::vector<int64_t>& shape) {
  const auto info = value.GetTensorTypeAndShapeInfo();
  shape = info.GetShape();
  const float* p = value.GetTensorData<float>();
  return std::vector<float>(p, p + info.GetElementCount());
}

std::string shape_text(const std::vector<int64_t>& shape) {
  std::string s = "(";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + ")";
}

std::string float_text(float v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.9g", static_cast<double>(v));
  return buf;
}

}  // namespace

FlowRuntime::FlowRuntime(const Manifest& manifest, const std::string& bundle_dir, const SessionFactory& session)
    : m_(manifest) {
  for (const auto& spec : m_.tokenizers) tokenizers_.push_back(std::make_unique<FlowTokenizer>(spec, bundle_dir));
  denoiser_ = session("denoiser");
  text_encoder_ = session("text_encoder");
  vae_ = session("vae_decoder");
  // Every text_encoder input is fed by exactly one tokenizer (flow_bundle.tokenize_flow's check).
  const GraphSpec& te = m_.graphs.at("text_encoder");
  std::string takes, fed;
  for (const auto& t : te.inputs) takes += (takes.empty() ? "" : ", ") + t.name;
  for (const auto& spec : m_.tokenizers) fed += (fed.empty() ? "" : ", ") + spec.input;
  bool same = te.inputs.size() == m_.tokenizers.size();
  for (const auto& spec : m_.tokenizers) same = same && te.input(spec.input) != nullptr;
  if (!same) throw Error(ErrorKind::bundle, "manifest: tokenizers feed [" + fed + "], text_encoder takes [" + takes + "]");
  negatives_ = m_.graphs.at("denoiser").input("negative_prompt_embeds") != nullptr;
}

FlowRuntime::~FlowRuntime() = default;

void FlowRuntime::validate(const Request& r) const {
  if (!negatives_ && !r.negative_prompt.empty()) {
    throw Error(ErrorKind::input, "negative_prompt: this " + m_.flow->family + " bundle takes none (its guidance scale "
                                  "is the guidance embedding's value, not classifier-free guidance); leave it empty");
  }
}

FlowRuntime::Embeddings FlowRuntime::encode(const std::vector<std::string>& prompts) {
  const auto b = static_cast<int64_t>(prompts.size());
  std::vector<std::vector<int64_t>> ids(tokenizers_.size());
  std::vector<std::vector<int64_t>> shapes;
  std::vector<Ort::Value> values;
  std::vector<const char*> names;
  for (size_t k = 0; k < tokenizers_.size(); ++k) {
    for (const auto& p : prompts) {
      const auto row = tokenizers_[k]->encode(p);
      ids[k].insert(ids[k].end(), row.begin(), row.end());
    }
    shapes.push_back({b, tokenizers_[k]->spec().max_length});
  }
  for (size_t k = 0; k < tokenizers_.size(); ++k) {
    values.push_back(tensor(ids[k], shapes[k]));
    names.push_back(tokenizers_[k]->spec().input.c_str());
  }
  auto out = run(*text_encoder_, "text_encoder", names, values, {"prompt_embeds", "pooled_prompt_embeds"});
  Embeddings e;
  e.prompt = floats(out[0], e.prompt_shape);
  e.pooled = floats(out[1], e.pooled_shape);
  const TensorSpec* want = m_.graphs.at("denoiser").input("prompt_embeds");
  if (e.prompt_shape.size() != 3 || e.prompt_shape[0] != b || e.pooled_shape.size() != 2 || e.pooled_shape[0] != b ||
      (want != nullptr && want->shape.size() == 3 && want->shape[2] > 0 && want->shape[2] != e.prompt_shape[2])) {
    throw Error(ErrorKind::bundle, "text_encoder gave prompt_embeds " + shape_text(e.prompt_shape) +
                                       " and pooled_prompt_embeds " + shape_text(e.pooled_shape) + " for " +
                                       std::to_string(b) + " prompts; the denoiser's prompt_embeds differ");
  }
  return e;
}

void FlowRuntime::denoise(std::vector<float>& x, std::vector<Embeddings>& conditioning, std::vector<float>& guidance,
                          const FlowSchedule& schedule, size_t s, std::vector<float>& velocity,
                          std::vector<Result>& results) {
  const auto b = static_cast<int64_t>(results.size());
  const std::vector<int64_t> batch = {b};
  std::vector<float> timestep(results.size(), schedule.timesteps[s]), sigma(results.size(), schedule.sigmas[s]);
  std::map<std::string, Ort::Value> feeds;
  feeds.emplace("sample", tensor(x, batched(b, m_.sample_shape)));
  feeds.emplace("timestep", tensor(timestep, batch));
  feeds.emplace("sigma", tensor(sigma, batch));
  feeds.emplace("guidance_scale", tensor(guidance, batch));
  for (size_t k = 0; k < conditioning.size(); ++k) {  // k = 1: SD3's negative prompts
    const std::string prefix = k == 0 ? "" : "negative_";
    feeds.emplace(prefix + "prompt_embeds", tensor(conditioning[k].prompt, conditioning[k].prompt_shape));
    feeds.emplace(prefix + "pooled_prompt_embeds", tensor(conditioning[k].pooled, conditioning[k].pooled_shape));
  }
  const GraphSpec& g = m_.graphs.at("denoiser");
  std::vector<Ort::Value> values;
  std::vector<const char*> names;
  for (const auto& input : g.inputs) {
    const auto it = feeds.find(input.name);
    if (it == feeds.end()) {
      throw Error(ErrorKind::bundle, "manifest: graphs.denoiser.inputs: '" + input.name +
                                         "' is not an input of a flow denoiser (docs/bundle_format.md)");
    }
    values.push_back(std::move(it->second));
    names.push_back(input.name.c_str());
  }
  const bool correction = g.output("correction_applied") != nullptr;
  std::vector<const char*> outputs = {"noise_pred"};
  if (correction) outputs.insert(outputs.end(), {"correction_applied", "kernel_log_mass"});
  auto out = run(*denoiser_, "denoiser", names, values, outputs);
  std::vector<int64_t> shape;
  velocity = floats(out[0], shape);
  if (velocity.size() != x.size()) {
    throw Error(ErrorKind::bundle, "denoiser gave noise_pred " + shape_text(shape) + ", expected " +
                                       shape_text(batched(b, m_.sample_shape)));
  }
  if (!correction) return;
  const bool* applied = out[1].GetTensorData<bool>();
  const float* log_mass = out[2].GetTensorData<float>();
  for (size_t i = 0; i < results.size(); ++i) {
    if (applied[i]) results[i].corrected_steps.push_back(schedule.timesteps[s]);
    results[i].kernel_log_mass.push_back(log_mass[i]);
  }
}

void FlowRuntime::decode(std::vector<float>& x, int64_t b, std::vector<Result>& results) {
  std::vector<Ort::Value> values;
  const auto shape = batched(b, m_.sample_shape);
  values.push_back(tensor(x, shape));
  auto out = run(*vae_, "vae_decoder", {"latents"}, values, {"image"});
  std::vector<int64_t> ishape;
  const std::vector<float> image = floats(out[0], ishape);
  if (ishape.size() != 4 || ishape[0] != b) {
    throw Error(ErrorKind::bundle, "vae_decoder gave image " + shape_text(ishape) + ", expected (B, C, H, W)");
  }
  const auto per = static_cast<size_t>(ishape[1] * ishape[2] * ishape[3]);
  for (size_t i = 0; i < results.size(); ++i) {
    results[i].image.assign(image.begin() + static_cast<std::ptrdiff_t>(i * per),
                            image.begin() + static_cast<std::ptrdiff_t>((i + 1) * per));
    results[i].image_c = ishape[1];
    results[i].image_h = ishape[2];
    results[i].image_w = ishape[3];
  }
}

std::vector<Result> FlowRuntime::generate(const std::vector<Request>& requests, int steps) {
  const int64_t train = m_.flow->num_train_timesteps;
  if (steps < 0 || steps > train) {
    throw Error(ErrorKind::input, "steps must lie in 1.." + std::to_string(train) + " (0: the manifest's default), got " +
                                      std::to_string(steps));
  }
  const FlowSchedule schedule = flow_schedule(*m_.flow, steps > 0 ? steps : m_.num_inference_steps);
  const auto b = static_cast<int64_t>(requests.size());
  const auto n = static_cast<size_t>(m_.sample_size());
  std::vector<Result> results(requests.size());
  const auto t_encode = Clock::now();
  std::vector<std::string> prompts, negatives;
  for (const auto& r : requests) {
    prompts.push_back(*r.prompt);
    negatives.push_back(r.negative_prompt);  // SD3's default "" each, as diffusers
  }
  std::vector<Embeddings> conditioning = {encode(prompts)};
  if (negatives_) conditioning.push_back(encode(negatives));  // a second call, not one on 2B rows
  const double encode_ms = ms_since(t_encode);
  const auto t_denoise = Clock::now();
  std::vector<float> x(requests.size() * n), guidance, velocity;
  for (size_t i = 0; i < requests.size(); ++i) {
    const auto& r = requests[i];
    if (!r.noise.empty()) {
      std::copy(r.noise.begin(), r.noise.end(), x.begin() + static_cast<std::ptrdiff_t>(i * n));
    } else {
      gaussian_noise(r.seed, r.item, kInitialNoiseStream, x.data() + i * n, n);
    }
    guidance.push_back(static_cast<float>(r.guidance.value_or(m_.guidance_scale)));
  }
  for (size_t s = 0; s < schedule.timesteps.size(); ++s) {
    denoise(x, conditioning, guidance, schedule, s, velocity, results);
    flow_euler_step(velocity.data(), x.data(), schedule.sigmas[s], schedule.sigmas[s + 1], x.data(), x.size());
    check_finite(x, n, s, schedule.timesteps.size(), float_text(schedule.timesteps[s]));
  }
  const double denoise_ms = ms_since(t_denoise);
  const auto t_decode = Clock::now();
  decode(x, b, results);
  const double decode_ms = ms_since(t_decode);
  for (size_t i = 0; i < results.size(); ++i) {
    results[i].sample.assign(x.begin() + static_cast<std::ptrdiff_t>(i * n),
                             x.begin() + static_cast<std::ptrdiff_t>((i + 1) * n));
    results[i].timesteps.assign(schedule.timesteps.begin(), schedule.timesteps.end());
    results[i].timings = {encode_ms, denoise_ms, decode_ms};
  }
  return results;
}

}  // namespace sdcpp
