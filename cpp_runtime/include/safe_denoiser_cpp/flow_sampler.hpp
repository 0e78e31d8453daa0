// Flow matching (SD3, Flux): the manifest's `flow` section and the FlowMatch Euler sampler over it, in the float64 /
// float32 operations of safe_denoiser/runtime/flow_sampler.py (itself diffusers' FlowMatchEulerDiscreteScheduler as
// the SD3 and Flux pipelines call it), so the C++ and Python schedules are equal bit for bit.
#pragma once

#include <cstddef>
#include <cstdint>
#include <nlohmann/json_fwd.hpp>
#include <optional>
#include <string>
#include <vector>

namespace sdcpp {

// manifest `flow`: what the sampler needs, resolved at export.
struct FlowInfo {
  std::string family;                            // "sd3" or "flux" (Flux: packed samples, no negatives)
  int64_t num_train_timesteps = 1000;
  double shift = 1.0;                            // static shift: s sigma / (1 + (s - 1) sigma)
  bool use_dynamic_shifting = false;             // the time shift of mu instead
  std::string time_shift_type = "exponential";   // or "linear"
  double base_shift = 0.5, max_shift = 1.15;     // calculate_shift's line through (base, max) image_seq_len
  int64_t base_image_seq_len = 256, max_image_seq_len = 4096;
  double sigma_min = 0.0, sigma_max = 1.0;       // the training schedule's ends
  bool linspace_sigmas = false;                  // pipeline_sigmas "linspace" (Flux); null: the scheduler's spacing
  std::optional<int64_t> image_seq_len;          // the sample's token count (dynamic shifting)
  std::optional<double> mu;                      // dynamic shifting's mu (absent: calculate_shift(image_seq_len))

  bool flux() const { return family == "flux"; }
  // Validate the section: Error(bundle) naming `flow.<field>` and the expected form.
  static FlowInfo parse(const nlohmann::json& section);
};

// A steps-step schedule, noisiest first: timesteps (steps) = sigma x num_train_timesteps, sigmas (steps + 1) ending
// in 0; both float32 as the scheduler holds them.
struct FlowSchedule {
  std::vector<float> timesteps;
  std::vector<float> sigmas;
};

// The pipelines' mu: linear in the token count between (base_image_seq_len, base_shift) and the max pair.
double calculate_shift(int64_t image_seq_len, const FlowInfo& flow);
// flow_sampler.flow_schedule; Error(input) when steps < 1.
FlowSchedule flow_schedule(const FlowInfo& flow, int steps);
// One Euler step over n values: out = x + (sigma_next - sigma) velocity in float32, the difference first (out may
// alias x).
void flow_euler_step(const float* velocity, const float* x, float sigma, float sigma_next, float* out, size_t n);

}  // namespace sdcpp
