// manifest.json: parse and validate as safe_denoiser.runtime.manifest.Manifest.load does.
#include <sys/stat.h>

#include <climits>
#include <cmath>
#include <nlohmann/json.hpp>

#include "contract.hpp"
#include "onnx_initializer.hpp"
#include "safe_denoiser_cpp/files.hpp"
#include "safe_denoiser_cpp/errors.hpp"
#include "safe_denoiser_cpp/integrity.hpp"
#include "safe_denoiser_cpp/json_limits.hpp"
#include "safe_denoiser_cpp/manifest.hpp"

namespace sdcpp {
namespace {
using nlohmann::json;

[[noreturn]] void bad(const std::string& why) { throw Error(ErrorKind::bundle, "manifest: " + why); }

const json& require(const json& obj, const std::string& key, const std::string& where) {
  if (!obj.is_object() || !obj.contains(key)) bad(where + " is missing the key '" + key + "'");
  return obj.at(key);
}

bool is_file(const std::string& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

bool is_dir(const std::string& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}

std::string shape_text(const std::vector<int64_t>& shape) {
  std::string s = "(";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + ")";
}

std::string shown(const json& v) {
  const std::string s = v.dump();
  return s.size() > 60 ? s.substr(0, 57) + "..." : s;
}

// An integer field (a float such as 1e30 is refused, not converted: see json_integer_in).
int64_t integer(const json& v, const std::string& field, int64_t lo, int64_t hi) {
  const auto i = json_integer_in(v, lo, hi);
  if (!i) bad(field + " must be an integer in " + std::to_string(lo) + ".." + std::to_string(hi) + ", got " + shown(v));
  return *i;
}

std::optional<int64_t> optional_integer(const json& data, const std::string& key, int64_t lo, int64_t hi) {
  if (!data.contains(key) || data.at(key).is_null()) return std::nullopt;
  return integer(data.at(key), key, lo, hi);
}

// (C, H, W): three integers >= 1 whose product, the element count of one sample that sizes every buffer and ORT
// shape, fits int32 (so sample_size() and batch * sample_size() cannot overflow). The flow path also takes Flux's
// packed (tokens, 64).
std::vector<int64_t> read_sample_shape(const json& v, const std::string& field, bool flow) {
  if (!v.is_array() || !(v.size() == 3 || (flow && v.size() == 2))) {
    bad(field + (flow ? " must be (C, H, W) or Flux's packed (tokens, 64): 3 or 2 integers, got "
                      : " must be (C, H, W): 3 integers, got ") + shown(v));
  }
  std::vector<int64_t> shape;
  int64_t elements = 1;
  for (size_t i = 0; i < v.size(); ++i) {
    shape.push_back(integer(v[i], field + "[" + std::to_string(i) + "]", 1, INT32_MAX));
    elements *= shape.back();  // both factors <= INT32_MAX: no overflow
    if (elements > INT32_MAX) bad(field + " " + shown(v) + " has more than 2^31-1 elements");
  }
  return shape;
}

std::vector<TensorSpec> tensors(const json& list, const std::string& where) {
  if (!list.is_array()) bad(where + " must be a list");
  std::vector<TensorSpec> out;
  for (const auto& t : list) {
    TensorSpec spec{require(t, "name", where).get<std::string>(), require(t, "dtype", where).get<std::string>(), {}};
    // A name ("batch") is a symbolic dimension: -1.
    for (const auto& d : require(t, "shape", where)) {
      spec.shape.push_back(d.is_number() ? integer(d, where + " '" + spec.name + "' shape", -1, INT32_MAX) : -1);
    }
    out.push_back(std::move(spec));
  }
  return out;
}

GraphSpec graph(const json& g, const std::string& name) {
  const std::string where = "graph '" + name + "'";
  GraphSpec spec;
  spec.file = require(g, "file", where).get<std::string>();
  if (g.contains("external_data") && !g.at("external_data").is_null()) spec.external_data = g.at("external_data");
  spec.inputs = tensors(require(g, "inputs", where), where + " inputs");
  spec.outputs = tensors(require(g, "outputs", where), where + " outputs");
  if (g.contains("optimization") && !g.at("optimization").is_null()) {
    const auto& provider = require(g.at("optimization"), "provider", where + " optimization");
    if (!provider.is_string()) bad(where + " optimization.provider must be a string");
    spec.optimized_for = provider.get<std::string>();
    const json& opt = g.at("optimization");
    spec.requires_optimized_for = opt.contains("requires_provider") && opt.at("requires_provider") == true;
  }
  return spec;
}

template <typename T>
std::optional<T> optional_value(const json& data, const std::string& key) {
  if (!data.contains(key) || data.at(key).is_null()) return std::nullopt;
  return data.at(key).get<T>();
}

BankInfo bank_info(const json& b, const std::string& where, const std::string& initializer, bool flow) {
  BankInfo bank;
  bank.count = integer(require(b, "count", where), where + ".count", 1, INT32_MAX);
  bank.sample_shape = read_sample_shape(require(b, "sample_shape", where), where + ".sample_shape", flow);
  bank.sha256 = require(b, "sha256", where).get<std::string>();
  bank.initializer = b.value("initializer", initializer);
  bank.dtype = b.value("dtype", std::string("float32"));
  if (bank.dtype != "float32" && bank.dtype != "float16") bad(where + ".dtype must be 'float32' or 'float16', got '" + bank.dtype + "'");
  bank.reference_kind = optional_value<std::string>(b, "reference_kind");
  if (bank.reference_kind && *bank.reference_kind != "safe" && *bank.reference_kind != "data") {
    bad(where + ".reference_kind must be 'safe' or 'data', got '" + *bank.reference_kind + "'");
  }
  return bank;
}

// Shape, storage dtype and sha256 (of the float32 values) of one bank inside denoiser.onnx against its record.
void check_bank_constant(const std::string& onnx, const BankInfo& info, const std::vector<int64_t>& sample_shape,
                         const std::string& what) {
  const Initializer bank = read_float_initializer(onnx, info.initializer);
  std::vector<int64_t> expected = {info.count};
  expected.insert(expected.end(), sample_shape.begin(), sample_shape.end());
  if (bank.dims != expected) {
    const std::string key = what == "bank" ? "bank" : "reference_bank";  // the manifest field
    throw Error(ErrorKind::bundle, what + " inside '" + onnx + "' has shape " + shape_text(bank.dims) + ", the manifest's " +
                                       key + ".count and " + key + ".sample_shape say " + shape_text(expected));
  }
  if (bank.stored_dtype != info.dtype) {
    throw Error(ErrorKind::bundle, what + " inside '" + onnx + "' is " + bank.stored_dtype + ", the manifest says " +
                                       info.dtype);
  }
  const std::string digest = sha256_hex(bank.bytes);
  if (digest != info.sha256) {
    throw Error(ErrorKind::bundle, what + " hash mismatch: the " + what + " inside '" + onnx + "' hashes to " +
                                       digest.substr(0, 16) + "..., the manifest records " + info.sha256.substr(0, 16) +
                                       "... (the graph or the manifest was changed after export)");
  }
}

bool safe_relative(const std::string& file) { return is_bundle_relative(file); }  // contract.hpp: the one rule

bool is_sha256_hex(const std::string& s) {
  return s.size() == 64 && s.find_first_not_of("0123456789abcdef") == std::string::npos;
}

// manifest "files": relative path -> sha256 (absent in bundles exported before it existed: nothing to check).
std::map<std::string, std::string> file_hashes(const json& data) {
  std::map<std::string, std::string> out;
  if (!data.contains("files") || data.at("files").is_null()) return out;
  const auto& files = data.at("files");
  if (!files.is_object()) bad("files must be an object {relative path: sha256}");
  for (const auto& [name, digest] : files.items()) {
    if (!safe_relative(name)) bad("files names an unsafe path '" + name + "'");
    if (!digest.is_string() || !is_sha256_hex(digest.get<std::string>())) {
      bad("files['" + name + "'] must be a sha256 (64 lower-case hex digits), got " + digest.dump());
    }
    out[name] = digest.get<std::string>();
  }
  return out;
}

// The keys DDIM and DDPM share, each defaulting to diffusers' value when absent.
void read_step_settings(const json& obj, const std::string& where, StepSettings& s) {
  s.timestep_spacing = obj.value("timestep_spacing", s.timestep_spacing);
  if (obj.contains("steps_offset")) {
    s.steps_offset = integer(obj.at("steps_offset"), where + ".steps_offset", 0, INT32_MAX);
  }
  s.clip_sample = obj.value("clip_sample", s.clip_sample);
  s.clip_sample_range = obj.value("clip_sample_range", s.clip_sample_range);
  s.thresholding = obj.value("thresholding", s.thresholding);
}

SchedulerInfo scheduler_info(const json& sched, bool flow) {
  SchedulerInfo info;
  info.alphas_cumprod = require(sched, "alphas_cumprod", "scheduler").get<std::vector<double>>();
  const auto sigmas = require(sched, "sigmas", "scheduler").get<std::vector<double>>();
  info.final_alpha_cumprod = require(sched, "final_alpha_cumprod", "scheduler").get<double>();
  const auto& ddim = require(sched, "ddim", "scheduler");
  read_step_settings(ddim, "scheduler.ddim", info.ddim);
  info.ddim.use_clipped_model_output = ddim.value("use_clipped_model_output", false);
  if (sched.contains("ddpm") && !sched.at("ddpm").is_null() && !sched.at("ddpm").empty()) {
    const auto& ddpm = sched.at("ddpm");
    if (!ddpm.is_object()) bad("scheduler.ddpm must be an object");
    DdpmSettings s;
    read_step_settings(ddpm, "scheduler.ddpm", s);
    s.variance_type = ddpm.value("variance_type", s.variance_type);
    info.ddpm = s;
  }
  if (info.alphas_cumprod.empty() || info.alphas_cumprod.size() != sigmas.size()) {
    bad("scheduler.alphas_cumprod and scheduler.sigmas must be non-empty and equal");
  }
  // Products of alphas in (0, 1]: anything else (above 1, 0, NaN) makes sqrt(1 - a) or 1 / sqrt(a) NaN or infinite
  // and every image black. The flow path does not sample over them (its abar of sigma 1 is 0).
  for (size_t t = 0; t < info.alphas_cumprod.size(); ++t) {
    const double a = info.alphas_cumprod[t];
    if (!((a > 0.0 || (flow && a == 0.0)) && a <= 1.0)) {
      bad("scheduler.alphas_cumprod[" + std::to_string(t) + "] must lie in " + (flow ? "[0, 1]" : "(0, 1]") + ", got " +
          json(a).dump());
    }
  }
  if (!(info.final_alpha_cumprod > 0.0 && info.final_alpha_cumprod <= 1.0)) {
    bad("scheduler.final_alpha_cumprod must lie in (0, 1], got " + json(info.final_alpha_cumprod).dump());
  }
  return info;
}

GuidanceInfo guidance_info(const json& g) {
  GuidanceInfo info;
  const auto& preset = require(g, "preset", "guidance");
  if (!preset.is_string()) bad("guidance.preset must be a string, got " + preset.dump());
  info.preset = parse_guidance_preset(preset.get<std::string>());
  const auto window = require(g, "window", "guidance").get<std::vector<double>>();
  if (window.size() != 2) bad("guidance.window must be [lo, hi]");
  info.window_lo = window[0];
  info.window_hi = window[1];
  info.threshold = optional_value<double>(g, "threshold");
  return info;
}

// The sampler path: "vp" (DDIM / DDPM) or "flow" (SD3, Flux; with its `flow` section). True for flow.
bool flow_path(const json& data) {
  const json path = data.contains("path") ? data.at("path") : json("vp");
  const bool flow = path == "flow";
  if (path != "vp" && !flow) bad("path must be 'vp' or 'flow', got " + path.dump());
  const bool section = data.contains("flow") && !data.at("flow").is_null();
  if (flow != section) {  // name the section (contract.cpp says the same)
    bad(std::string("flow must be ") + (flow ? "an object (the flow sampler's settings), got null" : "null on path 'vp'"));
  }
  return flow;
}

void check_format(const json& data) {
  if (!data.is_object() || !data.contains("format") || data.at("format") != kFormat) {
    bad(std::string("format is ") + (data.is_object() && data.contains("format") ? data.at("format").dump() : "missing") +
        ", expected '" + kFormat + "'");
  }
  if (!data.contains("format_version") || data.at("format_version") != kFormatVersion) {
    bad("bundle format_version " + (data.contains("format_version") ? data.at("format_version").dump() : "missing") +
        " is not supported by this runtime (it reads format_version " + std::to_string(kFormatVersion) +
        "); re-export the bundle with a matching safe-denoiser");
  }
}

bool present(const json& data, const std::string& key) {
  return data.contains(key) && !data.at(key).is_null();
}

// A flow bundle goes from a prompt to an image with text_encoder.onnx, vae_decoder.onnx and its tokenizers; bundles
// exported before those were take embeddings, which this runtime has no way to receive: refuse them, saying so.
void check_flow_text_side(const std::string& bundle_dir, const Manifest& m) {
  std::string missing;
  for (const char* graph : {"text_encoder", "vae_decoder"}) {
    if (!m.graphs.count(graph)) missing += std::string(missing.empty() ? "" : ", ") + "graph '" + graph + "'";
  }
  if (m.tokenizers.empty()) missing += std::string(missing.empty() ? "" : ", ") + "tokenizers";
  if (!missing.empty()) {
    bad("this flow bundle has no " + missing + " (it was exported before flow text encoders were, and takes "
        "precomputed embeddings, which only the Python runtime's Bundle.sample_flow(prompt_embeds=...) accepts); "
        "re-export it with the current safe-denoiser to run it from a prompt");
  }
  check_tokenizer_folders(bundle_dir, m.tokenizers);
}
}  // namespace

const TensorSpec* GraphSpec::input(const std::string& name) const {
  for (const auto& t : inputs) if (t.name == name) return &t;
  return nullptr;
}

const TensorSpec* GraphSpec::output(const std::string& name) const {
  for (const auto& t : outputs) if (t.name == name) return &t;
  return nullptr;
}

int64_t Manifest::sample_size() const {
  int64_t n = 1;
  for (const auto d : sample_shape) n *= d;
  return n;
}

Sampler Manifest::resolve_sampler(std::optional<Sampler> requested, const std::string& field) const {
  const Sampler chosen = requested.value_or(flow ? Sampler::flow_euler : Sampler::ddim);
  if (flow && chosen != Sampler::flow_euler) {
    throw Error(ErrorKind::input, field + ": this flow bundle (SD3, Flux) samples with the flow-matching Euler sampler: "
                                          "expected flow_euler (or euler), got " + sampler_name(chosen));
  }
  if (!flow && chosen == Sampler::flow_euler) {
    throw Error(ErrorKind::input, field + ": this VP bundle samples with ddim or ddpm, got flow_euler (flow bundles "
                                          "(SD3, Flux) only)");
  }
  return chosen;
}

GuidancePreset parse_guidance_preset(const std::string& name, const std::string& field) {
  for (const auto preset : {GuidancePreset::constant, GuidancePreset::mass, GuidancePreset::odds,
                            GuidancePreset::reference, GuidancePreset::sgf, GuidancePreset::shielded}) {
    if (name == guidance_preset_name(preset)) return preset;
  }
  throw Error(ErrorKind::bundle, "manifest: " + field +
                                     " must be 'constant', 'mass', 'odds', 'reference', 'sgf' or 'shielded', got '" +
                                     name + "'");
}

const char* guidance_preset_name(GuidancePreset preset) {
  switch (preset) {
    case GuidancePreset::constant: return "constant";
    case GuidancePreset::mass: return "mass";
    case GuidancePreset::odds: return "odds";
    case GuidancePreset::reference: return "reference";
    case GuidancePreset::sgf: return "sgf";
    case GuidancePreset::shielded: return "shielded";
  }
  return "constant";  // unreachable: every enumerator is named above
}

Manifest Manifest::parse(const std::string& text) {
  json data;
  if (json_nesting_exceeds(text, 64)) bad("JSON nested deeper than 64 levels");
  try {
    data = json::parse(text);
  } catch (const json::exception& e) {
    bad(std::string("not readable JSON: ") + e.what());
  }
  check_format(data);
  Manifest m;
  try {
    m.file_fields = manifest_file_fields(data);  // the path rule (contract.hpp), before what this runtime refuses
  } catch (const json::exception& e) {
    bad(std::string("invalid content: ") + e.what());
  }
  const bool flow = flow_path(data);
  try {
    m.model_kind = require(data, "model_kind", "the manifest").get<std::string>();
    m.source = require(data, "source", "the manifest").get<std::string>();
    m.sample_shape = read_sample_shape(require(data, "sample_shape", "the manifest"), "sample_shape", flow);
    const auto& steps = require(data, "num_inference_steps", "the manifest");
    m.num_inference_steps = static_cast<int>(integer(steps, "num_inference_steps", 1, INT_MAX));
    m.guidance_scale = require(data, "guidance_scale", "the manifest").get<double>();
    if (!(std::abs(m.guidance_scale) <= kMaxGuidance)) {
      bad("guidance_scale must be a number in -1000..1000, got " + json(m.guidance_scale).dump());
    }
    m.scheduler = scheduler_info(require(data, "scheduler", "the manifest"), flow);
    if (present(data, "guidance")) m.guidance = guidance_info(data.at("guidance"));
    m.reference_threshold_alpha_bar = optional_value<double>(data, "reference_threshold_alpha_bar");
    if (const auto n = optional_integer(data, "reference_threshold_steps", 0, INT_MAX)) {
      m.reference_threshold_steps = static_cast<int>(*n);
    }
    m.has_sld = present(data, "sld");
    if (present(data, "bank")) m.bank = bank_info(data.at("bank"), "bank", "negative_bank", flow);
    if (present(data, "reference_bank")) {
      m.reference_bank = bank_info(data.at("reference_bank"), "reference_bank", "reference_bank", flow);
    }
    m.tokenizer = optional_value<std::string>(data, "tokenizer");
    if (flow) m.flow = FlowInfo::parse(data.at("flow"));
    m.tokenizers = parse_tokenizer_specs(data);
    if (present(data, "safree")) m.safree = SafreeSettings::parse(data.at("safree"));
    m.null_class = optional_integer(data, "null_class", 0, INT32_MAX - 1);
    if (present(data, "num_class_labels")) {
      const auto& n = data.at("num_class_labels");
      m.num_class_labels = json_integer_in(n, m.null_label() + 1, INT32_MAX);
      if (!m.num_class_labels) {
        bad("num_class_labels must be an integer > null_class (" + std::to_string(m.null_label()) + "), got " +
            shown(n));
      }
    }
    for (const auto& [name, g] : require(data, "graphs", "the manifest").items()) m.graphs[name] = graph(g, name);
    m.files = file_hashes(data);
  } catch (const json::exception& e) {
    bad(std::string("invalid content: ") + e.what());
  }
  return m;
}

Manifest Manifest::read(const std::string& bundle_dir) {
  if (!is_dir(bundle_dir)) throw Error(ErrorKind::bundle, "bundle '" + bundle_dir + "' is not a folder");
  const std::string path = bundle_dir + "/manifest.json";
  if (!is_file(path)) throw Error(ErrorKind::bundle, "bundle '" + bundle_dir + "' has no manifest.json");
  const std::string text = read_file(path);
  check_manifest_contract(text);  // its numbers (contract.hpp), before parse refuses what this runtime lacks
  Manifest m = parse(text);
  for (const auto& [field, name] : m.file_fields) check_inside_bundle(bundle_dir, name, field);
  if (m.model_kind != "class-conditional" && m.model_kind != "text-to-image") bad("unknown model_kind '" + m.model_kind + "'");
  if (!m.graphs.count("denoiser")) bad("no 'denoiser' graph");
  if (m.model_kind == "text-to-image" && m.flow) {
    check_flow_text_side(bundle_dir, m);
  } else if (m.model_kind == "text-to-image") {
    for (const char* name : {"text_encoder", "vae_decoder"}) {
      if (!m.graphs.count(name)) bad(std::string("a text-to-image bundle needs a '") + name + "' graph");
    }
    if (!m.tokenizer) bad("a text-to-image bundle needs a tokenizer folder");
  }
  for (const auto& [name, g] : m.graphs) {
    for (const auto* file : {&g.file, g.external_data ? &*g.external_data : nullptr}) {
      if (file == nullptr) continue;
      if (!safe_relative(*file)) bad("graph '" + name + "' names an unsafe path '" + *file + "'");
      if (!is_file(bundle_dir + "/" + *file)) {
        throw Error(ErrorKind::bundle, "bundle '" + bundle_dir + "': file '" + *file + "' of graph '" + name + "' is missing");
      }
    }
  }
  if (m.tokenizer && (!safe_relative(*m.tokenizer) || !is_dir(bundle_dir + "/" + *m.tokenizer))) {
    throw Error(ErrorKind::bundle, "bundle '" + bundle_dir + "': tokenizer folder '" + *m.tokenizer + "' is missing");
  }
  if (m.guidance.has_value() != m.bank.has_value()) bad("guidance and bank must both be set or both be null");
  // The odds preset's beta (Theorem 1) needs the reference bank inside the graph; this runtime only feeds the graph.
  if (m.has_preset(GuidancePreset::odds) != m.reference_bank.has_value()) {
    bad("reference_bank must be set exactly when guidance.preset is 'odds'");
  }
  if (m.bank) {
    for (const auto* info : {&*m.bank, m.reference_bank ? &*m.reference_bank : nullptr}) {
      if (info != nullptr && info->sample_shape != m.sample_shape) {
        bad(std::string(info == &*m.bank ? "bank" : "reference_bank") + " item shape " + shape_text(info->sample_shape) +
            " differs from sample_shape " + shape_text(m.sample_shape));
      }
    }
  }
  return m;
}

void Manifest::check_banks(const std::string& bundle_dir) const {
  if (!bank) return;
  const std::string onnx = bundle_dir + "/" + graphs.at("denoiser").file;
  check_bank_constant(onnx, *bank, sample_shape, "bank");
  if (reference_bank) check_bank_constant(onnx, *reference_bank, sample_shape, "reference bank");
}

std::set<std::string> Manifest::external_data_files() const {
  std::set<std::string> out;
  for (const auto& [name, g] : graphs) {
    if (g.external_data) out.insert(*g.external_data);
  }
  return out;
}

Manifest Manifest::load(const std::string& bundle_dir, bool check_bank, bool check_files) {
  Manifest m = read(bundle_dir);
  // Before the bank check: a damaged denoiser.onnx is reported as a damaged file, not as what parsing it gives.
  if (check_files) m.files_check = verify_files(bundle_dir, m.files);
  if (check_bank) m.check_banks(bundle_dir);
  return m;
}

}  // namespace sdcpp
