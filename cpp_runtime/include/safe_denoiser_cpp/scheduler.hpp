// DDIM and DDPM over the bundle's training schedule, in the float32 order of operations of export/runtime.py and
// export/ddpm_sampler.py.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "safe_denoiser_cpp/runtime.hpp"

namespace sdcpp {

// DDIMScheduler.set_timesteps: int64 timesteps, noisiest first ("linspace", "leading", "trailing").
std::vector<int64_t> ddim_timesteps(const std::string& spacing, int64_t train_steps, int64_t steps_offset, int steps);
std::vector<int64_t> ddim_timesteps(const Manifest& manifest, int steps);
// DDPMScheduler.set_timesteps: the same spacing code over the manifest's DDPM settings (Error(bundle) without them).
std::vector<int64_t> ddpm_timesteps(const Manifest& manifest, int steps);
// The bundle's DDPM settings, checked (recorded, no thresholding, variance_type "fixed_small"); Error(bundle) else.
const DdpmSettings& ddpm_settings(const Manifest& manifest);

// One deterministic DDIM update (eta = 0) over n values: x_prev written to out (may alias x).
void ddim_step(const Manifest& m, const float* eps, int64_t t, const float* x, int steps, float* out, size_t n);

// One DDPM update (DDPMScheduler.step, epsilon prediction, "fixed_small") over n values; prev_t < 0 after the last
// step (abar_prev = 1). `noise` (n values) is added only where t > 0 (may be null otherwise); out may alias x.
void ddpm_step(const Manifest& m, const float* eps, int64_t t, int64_t prev_t, const float* x, const float* noise,
               float* out, size_t n);

}  // namespace sdcpp
