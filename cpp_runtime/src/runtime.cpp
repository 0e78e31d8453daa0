// Runtime: sessions and the DDIM / DDPM loop around denoiser.onnx (safe_denoiser/runtime/bundle.py's Bundle).
#include "safe_denoiser_cpp/runtime.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <functional>

#include "safe_denoiser_cpp/noise.hpp"
#include "safe_denoiser_cpp/safree.hpp"
#include "safe_denoiser_cpp/scheduler.hpp"
#include "safe_denoiser_cpp/tokenizer.hpp"
#include "flow_runtime.hpp"
#include "ort_session.hpp"
#include "sample_checks.hpp"

namespace sdcpp {
namespace {
using Clock = std::chrono::steady_clock;

double ms_since(Clock::time_point start) {
  return std::chrono::duration<double, std::milli>(Clock::now() - start).count();
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

// The session's I/O must be the manifest's: same names, dtypes and fixed dimensions (the contract, as
// safe_denoiser/runtime/contract.py's check_session_io; each error names the manifest field graphs.<graph>.<kind>s).
void check_io(const std::string& graph, const std::vector<TensorSpec>& specs, size_t count,
              const std::function<Ort::TypeInfo(size_t)>& type_at, const std::function<std::string(size_t)>& name_at,
              const char* kind) {
  std::vector<std::string> names;
  for (size_t i = 0; i < count; ++i) names.push_back(name_at(i));
  const std::string field = "manifest: graphs." + graph + "." + kind + "s";
  if (names.size() != specs.size()) {
    throw Error(ErrorKind::bundle, field + " must be the graph's " + kind + "s [" + join(names) + "], the manifest lists " +
                                       std::to_string(specs.size()));
  }
  for (size_t i = 0; i < count; ++i) {
    const auto spec = std::find_if(specs.begin(), specs.end(), [&](const TensorSpec& s) { return s.name == names[i]; });
    if (spec == specs.end()) throw Error(ErrorKind::bundle, field + " must list the graph's " + kind + " '" + names[i] + "'");
    const Ort::TypeInfo type = type_at(i);  // owns what the shape info views
    const auto info = type.GetTensorTypeAndShapeInfo();
    const auto shape = info.GetShape();
    const std::string dtype = dtype_name(info.GetElementType());
    bool same = dtype == spec->dtype && shape.size() == spec->shape.size();
    for (size_t d = 0; same && d < shape.size(); ++d) {
      same = shape[d] < 0 || spec->shape[d] < 0 || shape[d] == spec->shape[d];
    }
    if (!same) {
      throw Error(ErrorKind::bundle, field + " '" + names[i] + "' dtype / shape must be the graph's (dtype '" + dtype +
                                         "', rank " + std::to_string(shape.size()) + "), got dtype '" + spec->dtype + "'");
    }
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

// Buffers of one batch size, bound once to denoiser.onnx through an IoBinding. A buffer is sized before its tensor is
// made and never resized after: the binding points into its memory.
struct Workspace {
  int64_t b = 0;
  std::vector<int64_t> sample_shape, batch_shape;  // (B, C, H, W) and (B)
  std::vector<float> x, timestep, alpha_bar, guidance, noise, momentum[2], eps, xc, x0, log_mass, prompt, negative;
  std::vector<float> ddpm_noise;  // DDPM's variance noise, filled per step (not bound to the graph)
  std::vector<int64_t> labels, negative_labels, sld_step;
  std::vector<uint8_t> applied;  // ONNX bool is one byte
  std::vector<Ort::Value> values;
  Ort::Value momentum_value[2]{Ort::Value(nullptr), Ort::Value(nullptr)};
  std::unique_ptr<Ort::IoBinding> binding;

  // Bind a tensor by name and keep its Ort::Value alive as long as the binding.
  void bind_input(const char* name, Ort::Value v) {
    binding->BindInput(name, v);
    values.push_back(std::move(v));
  }
  void bind_output(const char* name, Ort::Value v) {
    binding->BindOutput(name, v);
    values.push_back(std::move(v));
  }
};

namespace {
// What every denoiser takes and gives: the sample and the per-image step values in; noise prediction, corrected
// sample and x0 estimate out.
void bind_state(Workspace& ws, size_t n) {
  const auto b = static_cast<size_t>(ws.b);
  ws.x.assign(n, 0.f);
  ws.timestep.assign(b, 0.f);
  ws.alpha_bar.assign(b, 0.f);
  ws.guidance.assign(b, 0.f);
  ws.eps.assign(n, 0.f);
  ws.xc.assign(n, 0.f);
  ws.x0.assign(n, 0.f);
  ws.log_mass.assign(b, 0.f);  // read per step whether or not the graph gives them (zeros then)
  ws.applied.assign(b, 0);
  ws.bind_input("sample", tensor(ws.x, ws.sample_shape));
  ws.bind_input("timestep", tensor(ws.timestep, ws.batch_shape));
  ws.bind_input("alpha_bar", tensor(ws.alpha_bar, ws.batch_shape));
  ws.bind_input("guidance_scale", tensor(ws.guidance, ws.batch_shape));
  ws.bind_output("noise_pred", tensor(ws.eps, ws.sample_shape));
  ws.bind_output("sample_corrected", tensor(ws.xc, ws.sample_shape));
  ws.bind_output("x0_hat", tensor(ws.x0, ws.sample_shape));
}

// The condition: class labels (class-conditional) or prompt embeddings of (embed_len, embed_dim) per image.
void bind_condition(Workspace& ws, const GraphSpec& g, int64_t embed_len, int64_t embed_dim) {
  if (g.input("class_labels")) {
    ws.labels.assign(static_cast<size_t>(ws.b), 0);
    ws.negative_labels.assign(static_cast<size_t>(ws.b), 0);
    ws.bind_input("class_labels", tensor(ws.labels, ws.batch_shape));
    ws.bind_input("negative_class_labels", tensor(ws.negative_labels, ws.batch_shape));
    return;
  }
  const std::vector<int64_t> eshape = {ws.b, embed_len, embed_dim};
  ws.prompt.assign(static_cast<size_t>(ws.b * embed_len * embed_dim), 0.f);
  ws.negative.assign(ws.prompt.size(), 0.f);
  ws.bind_input("prompt_embeds", tensor(ws.prompt, eshape));
  ws.bind_input("negative_prompt_embeds", tensor(ws.negative, eshape));
}

// The graph's optional tensors: the reference preset's re-noise, SLD's momentum (its two buffers swap per step, so
// they are bound in step()), and the correction's per-image outputs.
void bind_optional(Workspace& ws, const GraphSpec& g, size_t n) {
  const auto b = static_cast<size_t>(ws.b);
  if (g.input("noise")) {
    ws.noise.assign(n, 0.f);
    ws.bind_input("noise", tensor(ws.noise, ws.sample_shape));
  }
  if (g.input("sld_momentum")) {
    ws.sld_step.assign(b, 0);
    ws.bind_input("sld_step", tensor(ws.sld_step, ws.batch_shape));
    for (int k = 0; k < 2; ++k) {
      ws.momentum[k].assign(n, 0.f);
      ws.momentum_value[k] = tensor(ws.momentum[k], ws.sample_shape);
    }
  }
  if (g.output("correction_applied")) {
    static const Ort::MemoryInfo cpu = Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault);
    ws.bind_output("correction_applied",
                   Ort::Value::CreateTensor(cpu, ws.applied.data(), ws.applied.size(), ws.batch_shape.data(), 1,
                                            ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL));
    ws.bind_output("kernel_log_mass", tensor(ws.log_mass, ws.batch_shape));
  }
}
}  // namespace

struct Runtime::Impl {
  Manifest m;
  std::string dir;
  RuntimeOptions opt;
  std::unique_ptr<Ort::Session> denoiser, text_encoder, vae;
  std::optional<ClipTokenizer> tokenizer;
  std::map<int64_t, std::unique_ptr<Workspace>> workspaces;
  double load_ms = 0;
  int64_t embed_len = 0, embed_dim = 0;
  std::optional<SafreeBatch> safree;  // the current batch's SAFREE rows (SAFREE bundles; set by condition())
  std::unique_ptr<FlowRuntime> flow;  // flow bundles (SD3, Flux): their sessions and loop (flow_runtime.cpp)
  Ort::SessionOptions session_options;  // threads and provider, shared by every graph's session
  std::string provider;                 // provider_name(opt.provider)
  std::unique_ptr<BackgroundVerification> files;  // the manifest's files, hashed while open() opens the sessions

  // Returns once `path` (a file or a folder) is verified, before anything parses it (no-op: not verifying).
  void verified(const std::string& path) const {
    if (files) files->wait(path);
  }

  void prepare_sessions();
  // A checked session of one manifest graph (its I/O against the manifest's GraphSpec).
  std::unique_ptr<Ort::Session> session(const std::string& graph) const;
  void open_vp();
  Workspace& workspace(int64_t b);
  std::vector<float> encode(const std::vector<std::string>& prompts);
  // text_encoder.onnx's last hidden state (rows, L, D) for ids (rows, L).
  std::vector<float> text_hidden(std::vector<int64_t> ids, int64_t rows);
  // Class labels or prompt embeddings of a batch into its workspace.
  void condition(const std::vector<Request>& requests, Workspace& ws);
  // One sampler step at timesteps[s]: the denoiser (with re-noise and SLD momentum), then the DDIM / DDPM update.
  void step(const std::vector<Request>& requests, const std::vector<int64_t>& timesteps, size_t s, int steps,
            Sampler sampler, Workspace& ws, int& momentum_in, std::vector<Result>& results);
  void decode(const std::vector<float>& latents, int64_t b, std::vector<Result>& out);
};

Workspace& Runtime::Impl::workspace(int64_t b) {
  if (const auto it = workspaces.find(b); it != workspaces.end()) return *it->second;
  if (workspaces.size() >= 8) workspaces.clear();  // bounded: a server sees at most max-batch sizes
  auto ws = std::make_unique<Workspace>();
  ws->b = b;
  ws->batch_shape = {b};
  ws->sample_shape = {b};
  ws->sample_shape.insert(ws->sample_shape.end(), m.sample_shape.begin(), m.sample_shape.end());
  ws->binding = std::make_unique<Ort::IoBinding>(*denoiser);
  const GraphSpec& g = m.graphs.at("denoiser");
  const auto n = static_cast<size_t>(b * m.sample_size());
  bind_state(*ws, n);
  bind_condition(*ws, g, embed_len, embed_dim);
  bind_optional(*ws, g, n);
  auto& slot = workspaces[b];  // stored only once fully bound
  slot = std::move(ws);
  return *slot;
}

std::vector<float> Runtime::Impl::encode(const std::vector<std::string>& prompts) {
  std::vector<int64_t> ids;
  for (const auto& p : prompts) {
    const auto row = tokenizer->encode(p);
    ids.insert(ids.end(), row.begin(), row.end());
  }
  return text_hidden(std::move(ids), static_cast<int64_t>(prompts.size()));
}

std::vector<float> Runtime::Impl::text_hidden(std::vector<int64_t> ids, int64_t b) {
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

// Session options for every graph of the bundle: threads and the provider (appended once, checked unless a test
// exercises the append path only).
void Runtime::Impl::prepare_sessions() {
  session_options.SetLogSeverityLevel(3);
  if (opt.intra_threads > 0) session_options.SetIntraOpNumThreads(opt.intra_threads);
  if (opt.inter_threads > 0) session_options.SetInterOpNumThreads(opt.inter_threads);
  const bool check = std::getenv("SAFE_DENOISER_CPP_SKIP_PROVIDER_CHECK") == nullptr;
  add_provider(session_options, opt, dir, check);
  provider = provider_name(opt.provider);
}

std::unique_ptr<Ort::Session> Runtime::Impl::session(const std::string& graph) const {
  const GraphSpec& spec = m.graphs.at(graph);
  const std::string path = dir + "/" + spec.file;
  if (spec.requires_optimized_for && *spec.optimized_for != provider) {  // e.g. NhwcConv, GroupNorm: CUDA only
    throw Error(ErrorKind::provider, "graph '" + spec.file + "' was optimised offline for " + *spec.optimized_for +
                                         " with fused operators that " + provider + " cannot run: open the" +
                                         " bundle with that provider, or export it with --optimize cpu");
  }
  verified(spec.file);  // its external-data file (weight bytes only) may still be being hashed: finish() waits
  try {
    // A graph optimised offline for this provider holds its optimisations already: skip them at session start.
    const bool optimized = spec.optimized_for && *spec.optimized_for == provider;
    Ort::SessionOptions graph_so = session_options.Clone();
    if (optimized) graph_so.SetGraphOptimizationLevel(GraphOptimizationLevel::ORT_DISABLE_ALL);
    auto s = std::make_unique<Ort::Session>(ort_env(), path.c_str(), optimized ? graph_so : session_options);
    check_session(*s, spec, graph);
    return s;
  } catch (const Ort::Exception& e) {
    throw Error(ErrorKind::bundle, "cannot load '" + path + "': " + e.what());
  }
}

// The VP path's sessions: the denoiser (its inputs against model_kind and the guidance / SLD settings), and for text
// bundles the tokenizer and text encoder; the VAE decoder when the bundle has one.
void Runtime::Impl::open_vp() {
  denoiser = session("denoiser");
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
    embed_len = pe->shape[1];
    embed_dim = pe->shape[2];  // SAFREE's concept basis is as wide: the manifest contract checked it
    verified(*m.tokenizer);
    tokenizer = ClipTokenizer::load(dir + "/" + *m.tokenizer);
    text_encoder = session("text_encoder");
  }
  if (m.graphs.count("vae_decoder")) vae = session("vae_decoder");
}

std::unique_ptr<Runtime> Runtime::open(const std::string& bundle_dir, const RuntimeOptions& options) {
  const auto start = Clock::now();
  init_ort();
  provider_name(options.provider);  // unknown names fail before any file is read
  auto impl = std::make_unique<Impl>();
  impl->dir = bundle_dir;
  impl->opt = options;
  impl->m = Manifest::read(bundle_dir);
  if (options.check_files) {
    impl->files = std::make_unique<BackgroundVerification>(bundle_dir, impl->m.files, impl->m.external_data_files());
  }
  try {
    if (options.check_bank) {
      impl->verified(impl->m.graphs.at("denoiser").file);  // the bank check parses it
      impl->m.check_banks(bundle_dir);
    }
    impl->prepare_sessions();
    if (impl->m.flow) {  // SD3 / Flux: flow_runtime.cpp owns the sessions and the sampling loop
      if (impl->files) impl->files->wait_parsed();  // its tokenizers load first
      const Impl& sessions = *impl;
      const auto session = [&sessions](const std::string& graph) { return sessions.session(graph); };
      impl->flow = std::make_unique<FlowRuntime>(impl->m, bundle_dir, session);
    } else {
      impl->open_vp();
    }
  } catch (...) {
    // A damaged file is named as such, not as what reading it gave (a truncated weights file, a bank hash).
    if (impl->files) impl->files->finish();
    throw;
  }
  if (impl->files) {
    impl->m.files_check = impl->files->finish();
    impl->files.reset();
  }
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
  for (const auto& [field, text] : {std::pair{"prompt", r.prompt ? &*r.prompt : nullptr},
                                    std::pair{"negative_prompt", &r.negative_prompt}}) {
    if (text != nullptr && !valid_utf8(*text)) throw Error(ErrorKind::input, std::string(field) + ": not valid UTF-8 text");
  }
  if (const auto bad = std::find_if(r.noise.begin(), r.noise.end(), [](float v) { return !std::isfinite(v); });
      bad != r.noise.end()) {
    throw Error(ErrorKind::input, "noise: holds NaN or Inf (value " + std::to_string(bad - r.noise.begin()) +
                                      "); expected finite float32 values");
  }
  if (r.guidance && !(std::abs(*r.guidance) <= kMaxGuidance)) {
    throw Error(ErrorKind::input, "guidance: expected a finite number in -1000..1000, got " + std::to_string(*r.guidance));
  }
  if (impl_->flow) impl_->flow->validate(r);
}

std::vector<std::vector<int64_t>> Runtime::tokenize(const std::vector<std::string>& prompts) const {
  if (!impl_->tokenizer) throw Error(ErrorKind::input, "prompt: this bundle has no tokenizer");
  std::vector<std::vector<int64_t>> out;
  for (const auto& p : prompts) out.push_back(impl_->tokenizer->encode(p));
  return out;
}

void Runtime::Impl::condition(const std::vector<Request>& requests, Workspace& ws) {
  const auto b = static_cast<int64_t>(requests.size());
  safree.reset();
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
    if (m.safree) {  // SAFREE: step() writes the filtered or the original prompt rows (Bundle.encode_safree)
      std::vector<ClipTokens> tokens;
      for (const auto& p : prompts) tokens.push_back(tokenizer->tokenize(p));
      safree = safree_encode(*m.safree, tokens, tokenizer->max_length(),
                             [this](const std::vector<int64_t>& ids, int64_t rows) { return text_hidden(ids, rows); });
    } else {
      const auto pos = encode(prompts);
      std::copy(pos.begin(), pos.end(), ws.prompt.begin());
    }
    const auto neg = encode(negatives);
    std::copy(neg.begin(), neg.end(), ws.negative.begin());
  }
}

void Runtime::Impl::step(const std::vector<Request>& requests, const std::vector<int64_t>& timesteps, size_t s,
                         int steps, Sampler sampler, Workspace& ws, int& momentum_in, std::vector<Result>& results) {
  const SchedulerInfo& sched = m.scheduler;
  const auto b = static_cast<int64_t>(requests.size());
  const auto n = static_cast<size_t>(m.sample_size());
  const int64_t t = timesteps[s];
  std::fill(ws.timestep.begin(), ws.timestep.end(), static_cast<float>(t));
  std::fill(ws.alpha_bar.begin(), ws.alpha_bar.end(), static_cast<float>(sched.alphas_cumprod[static_cast<size_t>(t)]));
  if (!ws.noise.empty()) {  // the reference preset's re-noise, inside its window
    const auto time = static_cast<double>(t);
    const bool inside = m.guidance->window_lo <= time && time <= m.guidance->window_hi;
    for (int64_t i = 0; i < b; ++i) {
      float* dst = ws.noise.data() + i * n;
      if (inside) {
        gaussian_noise(requests[i].seed, requests[i].item, static_cast<uint32_t>(s + 1), dst, n);
      } else {
        std::fill(dst, dst + n, 0.f);
      }
    }
  }
  if (safree) safree->rows_at(s, ws.prompt.data());
  if (!ws.sld_step.empty()) {
    std::fill(ws.sld_step.begin(), ws.sld_step.end(), static_cast<int64_t>(s));
    ws.binding->BindInput("sld_momentum", ws.momentum_value[momentum_in]);
    ws.binding->BindOutput("sld_momentum_out", ws.momentum_value[1 - momentum_in]);
  }
  try {
    denoiser->Run(Ort::RunOptions{nullptr}, *ws.binding);
  } catch (const Ort::Exception& e) {
    throw Error(ErrorKind::runtime, std::string("denoiser.onnx failed: ") + e.what());
  }
  if (!ws.sld_step.empty()) momentum_in = 1 - momentum_in;
  if (!ws.applied.empty()) {
    for (int64_t i = 0; i < b; ++i) {
      if (ws.applied[i]) results[i].corrected_steps.push_back(t);
      results[i].kernel_log_mass.push_back(ws.log_mass[i]);
    }
  }
  if (sampler == Sampler::ddpm) {
    const int64_t prev_t = s + 1 < timesteps.size() ? timesteps[s + 1] : -1;  // DDPMScheduler.previous_timestep
    if (t > 0) {  // DDPMScheduler draws noise only there
      ws.ddpm_noise.resize(ws.x.size());
      for (int64_t i = 0; i < b; ++i) {
        gaussian_noise(requests[i].seed, requests[i].item, ddpm_stream(static_cast<uint32_t>(s)),
                       ws.ddpm_noise.data() + i * n, n);
      }
    }
    ddpm_step(sched, ws.eps.data(), t, prev_t, ws.xc.data(), t > 0 ? ws.ddpm_noise.data() : nullptr, ws.x.data(),
              ws.x.size());
  } else {
    ddim_step(sched, ws.eps.data(), t, ws.xc.data(), steps, ws.x.data(), ws.x.size());
  }
}

std::vector<Result> Runtime::generate(const std::vector<Request>& requests, int steps,
                                      std::optional<Sampler> requested) {
  Impl& d = *impl_;
  const Manifest& m = d.m;
  const Sampler sampler = m.resolve_sampler(requested);  // a flow bundle's is flow_euler
  if (requests.empty()) return {};
  for (const auto& r : requests) validate(r);
  if (d.flow) return d.flow->generate(requests, steps);
  if (steps < 0) throw Error(ErrorKind::input, "steps must lie in 1.." + std::to_string(m.scheduler.alphas_cumprod.size()) +
                                                   " (0: the manifest's default), got " + std::to_string(steps));
  steps = steps > 0 ? steps : m.num_inference_steps;
  const SchedulerInfo& sched = m.scheduler;
  const auto timesteps = sampler == Sampler::ddpm ? ddpm_timesteps(sched, steps) : ddim_timesteps(sched, steps);
  std::vector<std::string> warnings;
  if (m.reference_threshold_alpha_bar && m.guidance && !m.guidance->threshold &&
      std::abs(sched.alphas_cumprod[static_cast<size_t>(timesteps.back())] - *m.reference_threshold_alpha_bar) > 1e-12) {
    // As safe_denoiser/runtime/bundle.py warns: the gate's threshold belongs to the export's schedule's last timestep.
    warnings.push_back("the reference gate's threshold was computed at export for a " +
                       std::to_string(m.reference_threshold_steps.value_or(0)) + "-step schedule; this " +
                       std::to_string(steps) + "-step schedule ends elsewhere, so the gate differs slightly from PyTorch's");
  }
  const auto b = static_cast<int64_t>(requests.size());
  const auto n = static_cast<size_t>(m.sample_size());
  std::vector<Result> results(static_cast<size_t>(b));
  Workspace& ws = d.workspace(b);
  const auto t_encode = Clock::now();
  d.condition(requests, ws);
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
  int momentum_in = 0;
  if (!ws.sld_step.empty()) std::fill(ws.momentum[0].begin(), ws.momentum[0].end(), 0.f);
  for (size_t s = 0; s < timesteps.size(); ++s) {
    d.step(requests, timesteps, s, steps, sampler, ws, momentum_in, results);
    check_finite(ws.x, n, s, timesteps.size(), std::to_string(timesteps[s]));
  }
  const double denoise_ms = ms_since(t_denoise);
  const auto t_decode = Clock::now();
  d.decode(ws.x, b, results);
  const double decode_ms = ms_since(t_decode);
  for (int64_t i = 0; i < b; ++i) {
    results[i].sample.assign(ws.x.begin() + i * n, ws.x.begin() + (i + 1) * n);
    results[i].timesteps.assign(timesteps.begin(), timesteps.end());
    results[i].timings = {encode_ms, denoise_ms, decode_ms};
    results[i].warnings = warnings;
    if (d.safree) results[i].safree = std::move(d.safree->prompts[static_cast<size_t>(i)]);
  }
  d.safree.reset();
  return results;
}

}  // namespace sdcpp
