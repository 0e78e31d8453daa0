// The samplers: the training schedule and the DDIM / DDPM settings a bundle records (manifest `scheduler`), and
// DDIM and DDPM over them in the float32 order of operations of safe_denoiser/runtime/bundle.py and
// safe_denoiser/runtime/ddpm_sampler.py.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace sdcpp {

// What DDIM and DDPM share (resolved by diffusers' from_config at export): timestep spacing and x0 clipping.
struct StepSettings {
  std::string timestep_spacing = "leading";
  int64_t steps_offset = 0;
  bool clip_sample = false;
  double clip_sample_range = 1.0;
  bool thresholding = false;
};

// manifest scheduler.ddim, plus the pipeline's step argument.
struct DdimSettings : StepSettings {
  bool use_clipped_model_output = false;
};

// manifest scheduler.ddpm (DDPMScheduler.from_config at export).
struct DdpmSettings : StepSettings {
  std::string variance_type = "fixed_small";
};

// manifest `scheduler`: the training schedule and the sampler settings over it.
struct SchedulerInfo {
  std::vector<double> alphas_cumprod;  // one per training timestep
  double final_alpha_cumprod = 1.0;    // DDIM's abar after the last step
  DdimSettings ddim;
  std::optional<DdpmSettings> ddpm;  // absent in bundles exported before DDPM sampling existed
  int64_t num_train_timesteps() const { return static_cast<int64_t>(alphas_cumprod.size()); }
};

// The sampler loop around denoiser.onnx: on VP bundles deterministic DDIM (eta = 0) or DDPM (DDPMScheduler.step);
// on flow bundles (SD3, Flux) the FlowMatch Euler sampler. Manifest::resolve_sampler picks a bundle's default.
enum class Sampler { ddim, ddpm, flow_euler };
// "ddim" / "ddpm" / "flow_euler" (alias "euler") -> Sampler; Error(input) naming `field` otherwise.
Sampler parse_sampler(const std::string& name, const std::string& field = "sampler");
const char* sampler_name(Sampler sampler);  // "ddim", "ddpm" or "flow_euler" (what records say)

// DDIMScheduler.set_timesteps: int64 timesteps, noisiest first ("linspace", "leading", "trailing").
std::vector<int64_t> ddim_timesteps(const std::string& spacing, int64_t train_steps, int64_t steps_offset, int steps);
std::vector<int64_t> ddim_timesteps(const SchedulerInfo& scheduler, int steps);
// DDPMScheduler.set_timesteps: the same spacing code over the DDPM settings (Error(bundle) without them).
std::vector<int64_t> ddpm_timesteps(const SchedulerInfo& scheduler, int steps);
// The bundle's DDPM settings, checked (recorded, no thresholding, variance_type "fixed_small"); Error(bundle) else.
const DdpmSettings& ddpm_settings(const SchedulerInfo& scheduler);

// One deterministic DDIM update (eta = 0) over n values: x_prev written to out (may alias x).
void ddim_step(const SchedulerInfo& scheduler, const float* eps, int64_t t, const float* x, int steps, float* out,
               size_t n);

// One DDPM update (DDPMScheduler.step, epsilon prediction, "fixed_small") over n values; prev_t < 0 after the last
// step (abar_prev = 1). `noise` (n values) is added only where t > 0 (may be null otherwise); out may alias x.
void ddpm_step(const SchedulerInfo& scheduler, const float* eps, int64_t t, int64_t prev_t, const float* x,
               const float* noise, float* out, size_t n);

}  // namespace sdcpp
