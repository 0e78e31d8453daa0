// safe-denoiser C++ runtime: open an exported bundle, validate it, and generate images through denoiser.onnx.
// This header is the library's entry point: it brings the manifest, the samplers, the providers and Error.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "safe_denoiser_cpp/errors.hpp"
#include "safe_denoiser_cpp/manifest.hpp"
#include "safe_denoiser_cpp/providers.hpp"
#include "safe_denoiser_cpp/scheduler.hpp"

namespace sdcpp {

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
  std::vector<float> sample;            // final sample (sample_shape): latents for text bundles (Flux: packed)
  std::vector<float> image;             // decoded image (c, h, w) in [-1, 1]
  int64_t image_c = 0, image_h = 0, image_w = 0;
  std::vector<double> timesteps;        // the schedule, noisiest first (VP: integers; flow: sigma x 1000 in float32)
  std::vector<double> corrected_steps;  // timesteps at which the correction fired
  std::vector<float> kernel_log_mass;   // per step (empty when the correction is off)
  std::vector<std::string> warnings;    // e.g. the reference gate's threshold computed for another schedule
  std::optional<SafreePrompt> safree;   // SAFREE bundles: the trigger flags, t' and the filtered prompt rows
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
  // Generate one batch: all requests share `steps` (0: the manifest's default) and the sampler (none: the bundle's
  // default, Manifest::resolve_sampler; one of the other sampler path: Error(input)).
  std::vector<Result> generate(const std::vector<Request>& requests, int steps = 0,
                               std::optional<Sampler> sampler = std::nullopt);
  // Token ids (77 per prompt) as the bundle's tokenizer gives them (text bundles).
  std::vector<std::vector<int64_t>> tokenize(const std::vector<std::string>& prompts) const;
  double load_ms() const;

 private:
  struct Impl;
  explicit Runtime(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace sdcpp
