// Runtime: sessions, execution providers, and the DDIM / DDPM loop around denoiser.onnx (export/runtime.py's Bundle).
#define ORT_API_MANUAL_INIT
#include "safe_denoiser_cpp/runtime.hpp"

#include <onnxruntime_cxx_api.h>
#include <sys/stat.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <iostream>
#include <mutex>

#include "safe_denoiser_cpp/noise.hpp"
#include "safe_denoiser_cpp/scheduler.hpp"
#include "safe_denoiser_cpp/tokenizer.hpp"

namespace sdcpp {
namespace {
using Clock = std::chrono::steady_clock;

double ms_since(Clock::time_point start) {
  return std::chrono::duration<double, std::milli>(Clock::now() - start).count();
}

// Bind the C++ wrapper to the library's API table once; a library older than kOrtApiVersion is an error, not a crash.
void init_ort() {
  static std::once_flag once;
  static std::string failure;
  std::call_once(once, [] {
    const OrtApi* api = OrtGetApiBase()->GetApi(kOrtApiVersion);
    if (api == nullptr) {
      failure = std::string("the ONNX Runtime library (") + OrtGetApiBase()->GetVersionString() +
                ") does not serve C API version " + std::to_string(kOrtApiVersion) + " (needs ONNX Runtime >= 1.21)";
      return;
    }
    Ort::InitApi(api);
  });
  if (!failure.empty()) throw Error(ErrorKind::runtime, failure);
}

Ort::Env& env() {
  static Ort::Env instance(ORT_LOGGING_LEVEL_ERROR, "safe-denoiser-cpp");
  return instance;
}

std::string join(const std::vector<std::string>& items) {
  std::string out;
  for (const auto& s : items) out += (out.empty() ? "" : ", ") + s;
  return out;
}

const char* install_hint(const std::string& name) {
  if (name == "CUDAExecutionProvider") {
    return "build against an ONNX Runtime GPU release (onnxruntime-linux-x64-gpu, CUDA 12 + cuDNN 9 on the loader "
           "path) with -DONNXRUNTIME_ROOT=";
  }
  return "build against an ONNX Runtime GPU release with TensorRT support (-DONNXRUNTIME_ROOT=) and put NVIDIA "
         "TensorRT >= 10 (libnvinfer) on the loader path";
}

// Append the provider's options; Ort errors (a CPU-only library, a missing CUDA/TensorRT) become Error(provider).
void add_provider(Ort::SessionOptions& so, const RuntimeOptions& opt, const std::string& bundle_dir,
                  bool check_available) {
  const std::string name = provider_name(opt.provider);
  if (name == "CPUExecutionProvider") return;
  const auto available = available_providers();
  if (check_available && std::find(available.begin(), available.end(), name) == available.end()) {
    throw Error(ErrorKind::provider, "execution provider '" + opt.provider + "' (" + name +
                                         ") is not available in this ONNX Runtime " + ort_version() +
                                         " (available: " + join(available) + "): " + install_hint(name));
  }
  const OrtApi& api = Ort::GetApi();
  const std::string device = std::to_string(opt.device_id);
  try {
    if (name == "TensorrtExecutionProvider") {
      const std::string cache = bundle_dir + "/tensorrt/ort_engine_cache";
      ::mkdir((bundle_dir + "/tensorrt").c_str(), 0777);
      ::mkdir(cache.c_str(), 0777);
      OrtTensorRTProviderOptionsV2* trt = nullptr;
      Ort::ThrowOnError(api.CreateTensorRTProviderOptions(&trt));
      std::unique_ptr<OrtTensorRTProviderOptionsV2, decltype(api.ReleaseTensorRTProviderOptions)> guard(
          trt, api.ReleaseTensorRTProviderOptions);
      const char* keys[] = {"device_id", "trt_fp16_enable", "trt_engine_cache_enable", "trt_engine_cache_path",
                            "trt_timing_cache_enable", "trt_timing_cache_path"};
      const char* values[] = {device.c_str(), opt.trt_fp16 ? "1" : "0", "1", cache.c_str(), "1", cache.c_str()};
      Ort::ThrowOnError(api.UpdateTensorRTProviderOptions(trt, keys, values, 6));
      so.AppendExecutionProvider_TensorRT_V2(*trt);
    }
    // CUDA: the provider itself, or TensorRT's fallback for the nodes TensorRT does not take.
    OrtCUDAProviderOptionsV2* cuda = nullptr;
    Ort::ThrowOnError(api.CreateCUDAProviderOptions(&cuda));
    std::unique_ptr<OrtCUDAProviderOptionsV2, decltype(api.ReleaseCUDAProviderOptions)> guard(
        cuda, api.ReleaseCUDAProviderOptions);
    const char* keys[] = {"device_id"};
    const char* values[] = {device.c_str()};
    Ort::ThrowOnError(api.UpdateCUDAProviderOptions(cuda, keys, values, 1));
    so.AppendExecutionProvider_CUDA_V2(*cuda);
  } catch (const Ort::Exception& e) {
    throw Error(ErrorKind::provider, "execution provider '" + opt.provider + "' (" + name +
                                         ") could not be set up: " + e.what() + "; " + install_hint(name));
  }
}

std::string dtype_name(ONNXTensorElementDataType t) {
  switch (t) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT: return "float32";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64: return "int64";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL: return "bool";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16: return "float16";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32: return "int32";
    default: return "type" + std::to_string(static_cast<int>(t));
  }
}

// The session's I/O must be the manifest's: same names, dtypes and fixed dimensions.
void check_io(const std::string& graph, const std::vector<TensorSpec>& specs, size_t count,
              const std::function<Ort::TypeInfo(size_t)>& type_at, const std::function<std::string(size_t)>& name_at,
              const char* kind) {
  std::vector<std::string> names;
  for (size_t i = 0; i < count; ++i) names.push_back(name_at(i));
  if (names.size() != specs.size()) {
    throw Error(ErrorKind::bundle, graph + " has " + kind + "s [" + join(names) + "], the manifest lists " +
                                       std::to_string(specs.size()));
  }
  for (size_t i = 0; i < count; ++i) {
    const auto spec = std::find_if(specs.begin(), specs.end(), [&](const TensorSpec& s) { return s.name == names[i]; });
    if (spec == specs.end()) throw Error(ErrorKind::bundle, graph + ": " + kind + " '" + names[i] + "' is not in the manifest");
    const Ort::TypeInfo type = type_at(i);  // owns what the shape info views
    const auto info = type.GetTensorTypeAndShapeInfo();
    const auto shape = info.GetShape();
    const std::string dtype = dtype_name(info.GetElementType());
    bool same = dtype == spec->dtype && shape.size() == spec->shape.size();
    for (size_t d = 0; same && d < shape.size(); ++d) {
      same = shape[d] < 0 || spec->shape[d] < 0 || shape[d] == spec->shape[d];
    }
    if (!same) throw Error(ErrorKind::bundle, graph + ": " + kind + " '" + names[i] + "' differs from the manifest (dtype " + dtype + ")");
  }
}

void check_session(Ort::Session& s, const GraphSpec& spec, const std::string& graph) {
  Ort::AllocatorWithDefaultOptions alloc;
  check_io(graph, spec.inputs, s.GetInputCount(), [&](size_t i) { return s.GetInputTypeInfo(i); },
           [&](size_t i) { return std::string(s.GetInputNameAllocated(i, alloc).get()); }, "input");
  check_io(graph, spec.outputs, s.GetOutputCount(), [&](size_t i) { return s.GetOutputTypeInfo(i); },
           [&](size_t i) { return std::string(s.GetOutputNameAllocated(i, alloc).get()); }, "output");
}

template <typename T>
Ort::Value tensor(std::vector<T>& data, const std::vector<int64_t>& shape) {
  static const Ort::MemoryInfo cpu = Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault);
  return Ort::Value::CreateTensor<T>(cpu, data.data(), data.size(), shape.data(), shape.size());
}
}  // namespace

// Buffers of one batch size, bound once to denoiser.onnx through an IoBinding.
struct Workspace {
  int64_t b = 0;
  std::vector<float> x, timestep, alpha_bar, guidance, noise, momentum[2], eps, xc, x0, log_mass, prompt, negative;
  std::vector<float> ddpm_noise;  // DDPM's variance noise, filled per step (not bound to the graph)
  std::vector<int64_t> labels, negative_labels, sld_step;
  std::vector<uint8_t> applied;  // ONNX bool is one byte
  std::vector<Ort::Value> values;
  Ort::Value momentum_value[2]{Ort::Value(nullptr), Ort::Value(nullptr)};
  std::unique_ptr<Ort::IoBinding> binding;
};

struct Runtime::Impl {
  Manifest m;
  std::string dir;
  RuntimeOptions opt;
  std::unique_ptr<Ort::Session> denoiser, text_encoder, vae;
  std::optional<ClipTokenizer> tokenizer;
  std::map<int64_t, std::unique_ptr<Workspace>> workspaces;
  double load_ms = 0;
  int64_t embed_len = 0, embed_dim = 0;

  Workspace& workspace(int64_t b);
  std::vector<float> encode(const std::vector<std::string>& prompts);
  void decode(const std::vector<float>& latents, int64_t b, std::vector<Result>& out);
};

Workspace& Runtime::Impl::workspace(int64_t b) {
  if (const auto it = workspaces.find(b); it != workspaces.end()) return *it->second;
  if (workspaces.size() >= 8) workspaces.clear();  // bounded: a server sees at most max-batch sizes
  auto& slot = workspaces[b];
  auto ws = std::make_unique<Workspace>();
  ws->b = b;
  const auto n = static_cast<size_t>(b * m.sample_size());
  std::vector<int64_t> xshape = {b};
  xshape.insert(xshape.end(), m.sample_shape.begin(), m.sample_shape.end());
  const std::vector<int64_t> bshape = {b};
  ws->x.assign(n, 0.f);
  ws->timestep.assign(static_cast<size_t>(b), 0.f);
  ws->alpha_bar.assign(static_cast<size_t>(b), 0.f);
  ws->guidance.assign(static_cast<size_t>(b), 0.f);
  ws->eps.assign(n, 0.f);
  ws->xc.assign(n, 0.f);
  ws->x0.assign(n, 0.f);
  ws->log_mass.assign(static_cast<size_t>(b), 0.f);
  ws->applied.assign(static_cast<size_t>(b), 0);
  const GraphSpec& g = m.graphs.at("denoiser");
  ws->binding = std::make_unique<Ort::IoBinding>(*denoiser);
  auto bind_in = [&](const char* name, Ort::Value v) {
    ws->binding->BindInput(name, v);
    ws->values.push_back(std::move(v));
  };
  auto bind_out = [&](const char* name, Ort::Value v) {
    ws->binding->BindOutput(name, v);
    ws->values.push_back(std::move(v));
  };
  bind_in("sample", tensor(ws->x, xshape));
  bind_in("timestep", tensor(ws->timestep, bshape));
  bind_in("alpha_bar", tensor(ws->alpha_bar, bshape));
  bind_in("guidance_scale", tensor(ws->guidance, bshape));
  if (g.input("class_labels")) {
    ws->labels.assign(static_cast<size_t>(b), 0);
    ws->negative_labels.assign(static_cast<size_t>(b), 0);
    bind_in("class_labels", tensor(ws->labels, bshape));
    bind_in("negative_class_labels", tensor(ws->negative_labels, bshape));
  } else {
    const std::vector<int64_t> eshape = {b, embed_len, embed_dim};
    ws->prompt.assign(static_cast<size_t>(b * embed_len * embed_dim), 0.f);
    ws->negative.assign(ws->prompt.size(), 0.f);
    bind_in("prompt_embeds", tensor(ws->prompt, eshape));
    bind_in("negative_prompt_embeds", tensor(ws->negative, eshape));
  }
  if (g.input("noise")) {
    ws->noise.assign(n, 0.f);
    bind_in("noise", tensor(ws->noise, xshape));
  }
  if (g.input("sld_momentum")) {
    ws->sld_step.assign(static_cast<size_t>(b), 0);
    bind_in("sld_step", tensor(ws->sld_step, bshape));
    for (int k = 0; k < 2; ++k) {
      ws->momentum[k].assign(n, 0.f);
      ws->momentum_value[k] = tensor(ws->momentum[k], xshape);
    }
  }
  bind_out("noise_pred", tensor(ws->eps, xshape));
  bind_out("sample_corrected", tensor(ws->xc, xshape));
  bind_out("x0_hat", tensor(ws->x0, xshape));
  if (g.output("correction_applied")) {
    static const Ort::MemoryInfo cpu = Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault);
    bind_out("correction_applied",
             Ort::Value::CreateTensor(cpu, ws->applied.data(), ws->applied.size(), bshape.data(), 1,
                                      ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL));
    bind_out("kernel_log_mass", tensor(ws->log_mass, bshape));
  }
  slot = std::move(ws);
  return *slot;
}

std::vector<float> Runtime::Impl::encode(const std::vector<std::string>& prompts) {
  const auto b = static_cast<int64_t>(prompts.size());
  std::vector<int64_t> ids;
  for (const auto& p : prompts) {
    const auto row = tokenizer->encode(p);
    ids.insert(ids.end(), row.begin(), row.end());
  }
  const std::vector<int64_t> shape = {b, static_cast<int64_t>(tokenizer->max_length())};
  Ort::Value input = tensor(ids, shape);
  const char* in_names[] = {"input_ids"};
  const char* out_names[] = {"last_hidden_state"};
  auto out = text_encoder->Run(Ort::RunOptions{nullptr}, in_names, &input, 1, out_names, 1);
  const auto info = out[0].GetTensorTypeAndShapeInfo();
  const auto oshape = info.GetShape();
  if (oshape.size() != 3 || oshape[1] != embed_len || oshape[2] != embed_dim) {
    throw Error(ErrorKind::bundle, "text_encoder output shape differs from denoiser's prompt_embeds");
  }
  const float* p = out[0].GetTensorData<float>();
  return std::vector<float>(p, p + info.GetElementCount());
}

void Runtime::Impl::decode(const std::vector<float>& latents, int64_t b, std::vector<Result>& out) {
  const auto n = static_cast<size_t>(m.sample_size());
  if (!vae) {
    for (int64_t i = 0; i < b; ++i) {
      out[i].image.assign(latents.begin() + i * n, latents.begin() + (i + 1) * n);
      out[i].image_c = m.sample_shape[0];
      out[i].image_h = m.sample_shape[1];
      out[i].image_w = m.sample_shape[2];
    }
    return;
  }
  std::vector<float> copy = latents;
  std::vector<int64_t> shape = {b};
  shape.insert(shape.end(), m.sample_shape.begin(), m.sample_shape.end());
  Ort::Value input = tensor(copy, shape);
  const char* in_names[] = {"latents"};
  const char* out_names[] = {"image"};
  auto res = vae->Run(Ort::RunOptions{nullptr}, in_names, &input, 1, out_names, 1);
  const auto oshape = res[0].GetTensorTypeAndShapeInfo().GetShape();
  if (oshape.size() != 4 || oshape[0] != b) throw Error(ErrorKind::bundle, "vae_decoder output is not (B, C, H, W)");
  const float* p = res[0].GetTensorData<float>();
  const auto per = static_cast<size_t>(oshape[1] * oshape[2] * oshape[3]);
  for (int64_t i = 0; i < b; ++i) {
    out[i].image.assign(p + i * per, p + (i + 1) * per);
    out[i].image_c = oshape[1];
    out[i].image_h = oshape[2];
    out[i].image_w = oshape[3];
  }
}

Runtime::Runtime(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Runtime::~Runtime() = default;
const Manifest& Runtime::manifest() const { return impl_->m; }
const std::string& Runtime::bundle_dir() const { return impl_->dir; }
double Runtime::load_ms() const { return impl_->load_ms; }

std::unique_ptr<Runtime> Runtime::open(const std::string& bundle_dir, const RuntimeOptions& options) {
  const auto start = Clock::now();
  init_ort();
  provider_name(options.provider);  // unknown names fail before any file is read
  auto impl = std::make_unique<Impl>();
  impl->dir = bundle_dir;
  impl->opt = options;
  impl->m = Manifest::load(bundle_dir, options.check_bank, options.check_files);
  const Manifest& m = impl->m;
  Ort::SessionOptions so;
  so.SetLogSeverityLevel(3);
  if (options.intra_threads > 0) so.SetIntraOpNumThreads(options.intra_threads);
  if (options.inter_threads > 0) so.SetInterOpNumThreads(options.inter_threads);
  const bool check = std::getenv("SAFE_DENOISER_CPP_SKIP_PROVIDER_CHECK") == nullptr;  // tests: exercise the append path
  add_provider(so, options, bundle_dir, check);
  auto session = [&](const std::string& graph) {
    const std::string path = bundle_dir + "/" + m.graphs.at(graph).file;
    try {
      auto s = std::make_unique<Ort::Session>(env(), path.c_str(), so);
      check_session(*s, m.graphs.at(graph), graph);
      return s;
    } catch (const Ort::Exception& e) {
      throw Error(ErrorKind::bundle, "cannot load '" + path + "': " + e.what());
    }
  };
  impl->denoiser = session("denoiser");
  const GraphSpec& g = m.graphs.at("denoiser");
  const bool labels = g.input("class_labels") != nullptr;
  if (labels != (m.model_kind == "class-conditional")) {
    throw Error(ErrorKind::bundle, "denoiser inputs do not match model_kind '" + m.model_kind + "'");
  }
  if (m.reference() != (g.input("noise") != nullptr) || m.has_sld != (g.input("sld_momentum") != nullptr)) {
    throw Error(ErrorKind::bundle, "denoiser inputs do not match the manifest's guidance / sld settings");
  }
  if (!labels) {
    const TensorSpec* pe = g.input("prompt_embeds");
    if (pe == nullptr || pe->shape.size() != 3 || pe->shape[1] <= 0 || pe->shape[2] <= 0) {
      throw Error(ErrorKind::bundle, "denoiser has no fixed-size prompt_embeds input");
    }
    impl->embed_len = pe->shape[1];
    impl->embed_dim = pe->shape[2];
    impl->tokenizer = ClipTokenizer::load(bundle_dir + "/" + *m.tokenizer);
    impl->text_encoder = session("text_encoder");
  }
  if (m.graphs.count("vae_decoder")) impl->vae = session("vae_decoder");
  impl->load_ms = ms_since(start);
  return std::unique_ptr<Runtime>(new Runtime(std::move(impl)));
}

void Runtime::validate(const Request& r) const {
  const Manifest& m = impl_->m;
  if (m.model_kind == "class-conditional") {
    const int64_t null = m.null_label(), high = m.class_label_max();
    if (r.prompt) throw Error(ErrorKind::input, "prompt: this bundle takes class labels (class 0.." + std::to_string(high) + "), not prompts");
    if (!r.class_label) throw Error(ErrorKind::input, "class: required for this class-conditional bundle");
    for (const auto& [name, v] : {std::pair{"class", r.class_label}, std::pair{"negative_class", r.negative_class}}) {
      if (v && (*v < 0 || *v > high)) {
        throw Error(ErrorKind::input, std::string(name) + " must lie in 0.." + std::to_string(high) + " (" +
                                          std::to_string(null) + " = no class), got " + std::to_string(*v));
      }
    }
  } else {
    if (r.class_label) throw Error(ErrorKind::input, "class: this bundle takes prompts, not class labels");
    if (!r.prompt) throw Error(ErrorKind::input, "prompt: required for this text-to-image bundle");
  }
  if (!r.noise.empty() && static_cast<int64_t>(r.noise.size()) != m.sample_size()) {
    std::string shape;
    for (const auto d : m.sample_shape) shape += (shape.empty() ? "" : ", ") + std::to_string(d);
    throw Error(ErrorKind::input, "noise: expected " + std::to_string(m.sample_size()) + " float32 values (shape (1, " +
                                      shape + ")), got " + std::to_string(r.noise.size()));
  }
  if (r.guidance && !std::isfinite(*r.guidance)) throw Error(ErrorKind::input, "guidance: must be a finite number");
}

std::vector<std::vector<int64_t>> Runtime::tokenize(const std::vector<std::string>& prompts) const {
  if (!impl_->tokenizer) throw Error(ErrorKind::input, "prompt: this bundle has no tokenizer");
  std::vector<std::vector<int64_t>> out;
  for (const auto& p : prompts) out.push_back(impl_->tokenizer->encode(p));
  return out;
}

Sampler parse_sampler(const std::string& name, const std::string& field) {
  if (name == "ddim") return Sampler::ddim;
  if (name == "ddpm") return Sampler::ddpm;
  throw Error(ErrorKind::input, field + ": unknown sampler '" + name + "' (expected ddim or ddpm)");
}

const char* sampler_name(Sampler sampler) { return sampler == Sampler::ddpm ? "ddpm" : "ddim"; }

std::vector<Result> Runtime::generate(const std::vector<Request>& requests, int steps, Sampler sampler) {
  Impl& d = *impl_;
  const Manifest& m = d.m;
  if (requests.empty()) return {};
  for (const auto& r : requests) validate(r);
  steps = steps > 0 ? steps : m.num_inference_steps;
  const bool ddpm = sampler == Sampler::ddpm;
  const auto timesteps = ddpm ? ddpm_timesteps(m, steps) : ddim_timesteps(m, steps);
  std::vector<std::string> warnings;
  if (m.reference_threshold_alpha_bar && m.guidance_mode && !m.guidance_threshold &&
      std::abs(m.alphas_cumprod[static_cast<size_t>(timesteps.back())] - *m.reference_threshold_alpha_bar) > 1e-12) {
    // As export/runtime.py warns: the gate's threshold belongs to the export's schedule's last timestep.
    warnings.push_back("the reference gate's threshold was computed at export for a " +
                       std::to_string(m.reference_threshold_steps.value_or(0)) + "-step schedule; this " +
                       std::to_string(steps) + "-step schedule ends elsewhere, so the gate differs slightly from PyTorch's");
  }
  const auto b = static_cast<int64_t>(requests.size());
  const auto n = static_cast<size_t>(m.sample_size());
  std::vector<Result> results(static_cast<size_t>(b));
  Workspace& ws = d.workspace(b);
  const auto t_encode = Clock::now();
  if (m.model_kind == "class-conditional") {
    for (int64_t i = 0; i < b; ++i) {
      ws.labels[i] = *requests[i].class_label;
      ws.negative_labels[i] = requests[i].negative_class.value_or(m.null_label());
    }
  } else {
    std::vector<std::string> prompts, negatives;
    for (const auto& r : requests) {
      prompts.push_back(*r.prompt);
      negatives.push_back(r.negative_prompt);
    }
    // Copy into the bound buffers (assigning a new vector would free the memory the binding points to).
    const auto pos = d.encode(prompts), neg = d.encode(negatives);
    std::copy(pos.begin(), pos.end(), ws.prompt.begin());
    std::copy(neg.begin(), neg.end(), ws.negative.begin());
  }
  const double encode_ms = ms_since(t_encode);
  const auto t_denoise = Clock::now();
  for (int64_t i = 0; i < b; ++i) {
    const auto& r = requests[i];
    if (!r.noise.empty()) {
      std::copy(r.noise.begin(), r.noise.end(), ws.x.begin() + i * n);
    } else {
      gaussian_noise(r.seed, r.item, kInitialNoiseStream, ws.x.data() + i * n, n);
    }
    ws.guidance[i] = static_cast<float>(r.guidance.value_or(m.guidance_scale));
  }
  int cur = 0;
  if (!ws.sld_step.empty()) std::fill(ws.momentum[0].begin(), ws.momentum[0].end(), 0.f);
  for (size_t s = 0; s < timesteps.size(); ++s) {
    const int64_t t = timesteps[s];
    std::fill(ws.timestep.begin(), ws.timestep.end(), static_cast<float>(t));
    std::fill(ws.alpha_bar.begin(), ws.alpha_bar.end(), static_cast<float>(m.alphas_cumprod[static_cast<size_t>(t)]));
    if (!ws.noise.empty()) {
      const bool inside = m.window_lo <= static_cast<double>(t) && static_cast<double>(t) <= m.window_hi;
      for (int64_t i = 0; i < b; ++i) {
        float* dst = ws.noise.data() + i * n;
        if (inside) {
          gaussian_noise(requests[i].seed, requests[i].item, static_cast<uint32_t>(s + 1), dst, n);
        } else {
          std::fill(dst, dst + n, 0.f);
        }
      }
    }
    if (!ws.sld_step.empty()) {
      std::fill(ws.sld_step.begin(), ws.sld_step.end(), static_cast<int64_t>(s));
      ws.binding->BindInput("sld_momentum", ws.momentum_value[cur]);
      ws.binding->BindOutput("sld_momentum_out", ws.momentum_value[1 - cur]);
    }
    try {
      d.denoiser->Run(Ort::RunOptions{nullptr}, *ws.binding);
    } catch (const Ort::Exception& e) {
      throw Error(ErrorKind::runtime, std::string("denoiser.onnx failed: ") + e.what());
    }
    if (!ws.sld_step.empty()) cur = 1 - cur;
    if (!ws.applied.empty()) {
      for (int64_t i = 0; i < b; ++i) {
        if (ws.applied[i]) results[i].corrected_steps.push_back(t);
        results[i].kernel_log_mass.push_back(ws.log_mass[i]);
      }
    }
    if (ddpm) {
      const int64_t prev_t = s + 1 < timesteps.size() ? timesteps[s + 1] : -1;  // DDPMScheduler.previous_timestep
      if (t > 0) {  // DDPMScheduler draws noise only there
        ws.ddpm_noise.resize(ws.x.size());
        for (int64_t i = 0; i < b; ++i) {
          gaussian_noise(requests[i].seed, requests[i].item, ddpm_stream(static_cast<uint32_t>(s)),
                         ws.ddpm_noise.data() + i * n, n);
        }
      }
      ddpm_step(m, ws.eps.data(), t, prev_t, ws.xc.data(), t > 0 ? ws.ddpm_noise.data() : nullptr, ws.x.data(),
                ws.x.size());
    } else {
      ddim_step(m, ws.eps.data(), t, ws.xc.data(), steps, ws.x.data(), ws.x.size());
    }
  }
  const double denoise_ms = ms_since(t_denoise);
  const auto t_decode = Clock::now();
  d.decode(ws.x, b, results);
  const double decode_ms = ms_since(t_decode);
  for (int64_t i = 0; i < b; ++i) {
    results[i].sample.assign(ws.x.begin() + i * n, ws.x.begin() + (i + 1) * n);
    results[i].timesteps = timesteps;
    results[i].timings = {encode_ms, denoise_ms, decode_ms};
    results[i].warnings = warnings;
  }
  return results;
}

std::vector<std::string> available_providers() {
  init_ort();
  return Ort::GetAvailableProviders();
}

std::string provider_name(const std::string& provider) {
  std::string p = provider;
  std::transform(p.begin(), p.end(), p.begin(), [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  if (p == "cpu" || p == "cpuexecutionprovider") return "CPUExecutionProvider";
  if (p == "cuda" || p == "cudaexecutionprovider") return "CUDAExecutionProvider";
  if (p == "tensorrt" || p == "trt" || p == "tensorrtexecutionprovider") return "TensorrtExecutionProvider";
  throw Error(ErrorKind::provider, "provider: unknown execution provider '" + provider + "' (expected cpu, cuda or tensorrt)");
}

std::string ort_version() { return OrtGetApiBase()->GetVersionString(); }

}  // namespace sdcpp
