// safe-denoiser C++ runtime: open an exported bundle, validate it, and generate images through denoiser.onnx.
//
// Requires the ONNX Runtime C API version kOrtApiVersion (ONNX Runtime >= 1.21); newer libraries serve it too.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

namespace sdcpp {

inline constexpr int kOrtApiVersion = 21;  // ORT_API_VERSION the code is written against (ORT 1.21)
inline constexpr int kFormatVersion = 1;   // manifest.json format_version this runtime reads
inline constexpr const char* kFormat = "safe-denoiser.bundle";

// Exit codes of the CLI, one per error kind (0 = success).
enum class ErrorKind : int { usage = 2, bundle = 3, input = 4, provider = 5, io = 6, runtime = 7 };

// Every failure the library reports: a kind (mapped to an exit code / HTTP status) and a message naming the field.
class Error : public std::runtime_error {
 public:
  Error(ErrorKind kind, const std::string& message) : std::runtime_error(message), kind_(kind) {}
  ErrorKind kind() const { return kind_; }

 private:
  ErrorKind kind_;
};

struct TensorSpec {
  std::string name;
  std::string dtype;           // "float32", "int64", "bool"
  std::vector<int64_t> shape;  // -1 for a symbolic dimension ("batch", "height", ...)
};

struct GraphSpec {
  std::string file;
  std::optional<std::string> external_data;
  std::vector<TensorSpec> inputs;
  std::vector<TensorSpec> outputs;
  const TensorSpec* input(const std::string& name) const;
  const TensorSpec* output(const std::string& name) const;
};

struct BankInfo {
  int64_t count = 0;
  std::vector<int64_t> sample_shape;
  std::string sha256;
  std::string initializer = "negative_bank";
  std::string dtype = "float32";              // storage inside the graph: "float32" or "float16"
  std::optional<std::string> reference_kind;  // the odds preset's reference bank: "safe" or "data"
};

// DDPM sampler settings (manifest scheduler.ddpm, resolved by DDPMScheduler.from_config at export).
struct DdpmSettings {
  std::string timestep_spacing = "leading";
  int64_t steps_offset = 0;
  bool clip_sample = false;
  double clip_sample_range = 1.0;
  bool thresholding = false;
  std::string variance_type = "fixed_small";
};

// The sampler loop around denoiser.onnx: deterministic DDIM (eta = 0) or DDPM (DDPMScheduler.step).
enum class Sampler { ddim, ddpm };
// "ddim" / "ddpm" -> Sampler; Error(input) naming `field` otherwise.
Sampler parse_sampler(const std::string& name, const std::string& field = "sampler");
const char* sampler_name(Sampler sampler);

// What the runtime reads from manifest.json (see export/manifest.py for the full format).
struct Manifest {
  std::string model_kind;  // "class-conditional" or "text-to-image"
  std::string source;
  std::vector<int64_t> sample_shape;  // (C, H, W)
  int num_inference_steps = 0;
  double guidance_scale = 1.0;
  // scheduler
  std::vector<double> alphas_cumprod;
  double final_alpha_cumprod = 1.0;
  std::string timestep_spacing = "leading";
  int64_t steps_offset = 0;
  bool clip_sample = false;
  double clip_sample_range = 1.0;
  bool thresholding = false;
  bool use_clipped_model_output = false;
  std::optional<DdpmSettings> ddpm;  // absent in bundles exported before DDPM sampling existed
  // guidance
  std::optional<std::string> guidance_mode;  // "theorem" / "reference"; empty: correction off
  std::string beta_mode = "constant";        // "constant" / "mass" / "odds" (odds: the graph holds reference_bank)
  double window_lo = 0.0, window_hi = 0.0;
  std::optional<double> guidance_threshold;
  std::optional<double> reference_threshold_alpha_bar;
  std::optional<int> reference_threshold_steps;
  bool has_sld = false;
  std::optional<BankInfo> bank;
  std::optional<BankInfo> reference_bank;  // the odds preset's reference bank (inside denoiser.onnx)
  std::optional<std::string> tokenizer;
  std::optional<int64_t> null_class;        // the "no class" label
  std::optional<int64_t> num_class_labels;  // class-embedding rows; absent in older bundles (0..null_class only)
  std::map<std::string, GraphSpec> graphs;
  std::map<std::string, std::string> files;  // relative path -> sha256 of every graph, data and tokenizer file

  bool reference() const { return guidance_mode && *guidance_mode == "reference"; }
  int64_t sample_size() const;  // C * H * W
  int64_t null_label() const { return null_class.value_or(0); }
  int64_t class_label_max() const { return num_class_labels ? *num_class_labels - 1 : null_label(); }
  // Parse and validate as Manifest.load does: format and version, keys, files present, bank hash (check_bank),
  // every file listed in `files` against its sha256 (check_files; false skips reading them, for huge bundles).
  static Manifest load(const std::string& bundle_dir, bool check_bank = true, bool check_files = true);
  static Manifest parse(const std::string& json_text);  // format, version and content only
};

struct RuntimeOptions {
  std::string provider = "cpu";  // cpu | cuda | tensorrt
  int intra_threads = 0;         // 0: ONNX Runtime's default
  int inter_threads = 0;
  int device_id = 0;             // cuda / tensorrt
  bool trt_fp16 = false;         // tensorrt: fp16 kernels
  bool check_bank = true;
  bool check_files = true;  // hash every file the manifest lists (false: skip, for a bundle known to be intact)
};

// One image to generate. Class-conditional bundles take class_label; text bundles take prompt.
struct Request {
  std::optional<int64_t> class_label;
  std::optional<int64_t> negative_class;  // default: the null class
  std::optional<std::string> prompt;
  std::string negative_prompt;
  uint64_t seed = 0;
  uint32_t item = 0;                 // noise stream of this image under its seed (Python: position in the batch)
  std::optional<double> guidance;    // default: the manifest's
  std::vector<float> noise;          // explicit initial noise (C*H*W floats); empty: drawn from seed/item
};

struct Timings {
  double encode_ms = 0, denoise_ms = 0, decode_ms = 0;
};

struct Result {
  std::vector<float> sample;            // final sample (C, H, W): latents for text bundles
  std::vector<float> image;             // decoded image (c, h, w) in [-1, 1]
  int64_t image_c = 0, image_h = 0, image_w = 0;
  std::vector<int64_t> timesteps;       // the schedule, noisiest first
  std::vector<int64_t> corrected_steps; // timesteps at which the correction fired
  std::vector<float> kernel_log_mass;   // per step (empty when the correction is off)
  std::vector<std::string> warnings;    // e.g. the reference gate's threshold computed for another schedule
  Timings timings;
};

class Runtime {
 public:
  // Open and validate the bundle, create the sessions once (text encoder / VAE when present).
  static std::unique_ptr<Runtime> open(const std::string& bundle_dir, const RuntimeOptions& options = {});
  ~Runtime();
  Runtime(const Runtime&) = delete;
  Runtime& operator=(const Runtime&) = delete;

  const Manifest& manifest() const;
  const std::string& bundle_dir() const;
  // Check a request against the bundle (classes, prompt vs class, noise size); Error(input) naming the field.
  void validate(const Request& request) const;
  // Generate one batch: all requests share `steps` (0: the manifest's default) and the sampler.
  std::vector<Result> generate(const std::vector<Request>& requests, int steps = 0, Sampler sampler = Sampler::ddim);
  // Token ids (77 per prompt) as the bundle's tokenizer gives them (text bundles).
  std::vector<std::vector<int64_t>> tokenize(const std::vector<std::string>& prompts) const;
  double load_ms() const;

 private:
  struct Impl;
  explicit Runtime(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// Providers that the loaded ONNX Runtime library offers (e.g. "CPUExecutionProvider").
std::vector<std::string> available_providers();
// The short provider name ("cpu", "cuda", "tensorrt", "trt") -> ONNX Runtime's name; Error(provider) otherwise.
std::string provider_name(const std::string& provider);
// The ONNX Runtime library's version string.
std::string ort_version();

}  // namespace sdcpp
