// DDIM over the bundle's training schedule, in the float32 order of operations of export/runtime.py.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "safe_denoiser_cpp/runtime.hpp"

namespace sdcpp {

// DDIMScheduler.set_timesteps: int64 timesteps, noisiest first ("linspace", "leading", "trailing").
std::vector<int64_t> ddim_timesteps(const std::string& spacing, int64_t train_steps, int64_t steps_offset, int steps);
std::vector<int64_t> ddim_timesteps(const Manifest& manifest, int steps);

// One deterministic DDIM update (eta = 0) over n values: x_prev written to out (may alias x).
void ddim_step(const Manifest& m, const float* eps, int64_t t, const float* x, int steps, float* out, size_t n);

}  // namespace sdcpp
