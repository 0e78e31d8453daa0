#include "safe_denoiser_cpp/scheduler.hpp"

#include <algorithm>
#include <cmath>

#include "safe_denoiser_cpp/errors.hpp"

namespace sdcpp {
namespace {
// numpy's round-half-to-even of a float64, as np.round / np.rint.
int64_t round_even(double v) { return static_cast<int64_t>(std::nearbyint(v)); }
}  // namespace

std::vector<int64_t> ddim_timesteps(const std::string& spacing, int64_t train_steps, int64_t steps_offset, int steps) {
  if (steps <= 0 || steps > train_steps) {
    throw Error(ErrorKind::input, "steps must lie in 1.." + std::to_string(train_steps) + ", got " +
                                      std::to_string(steps));
  }
  std::vector<int64_t> ts(static_cast<size_t>(steps));
  if (spacing == "linspace") {  // np.linspace(0, T - 1, steps).round()[::-1]
    const double stop = static_cast<double>(train_steps - 1);
    const double step = steps > 1 ? stop / (steps - 1) : 0.0;
    for (int i = 0; i < steps; ++i) {
      const double y = (steps > 1 && i == steps - 1) ? stop : (steps > 1 ? i * step : 0.0 * stop);
      ts[static_cast<size_t>(steps - 1 - i)] = round_even(y);
    }
  } else if (spacing == "leading") {  // (arange(steps) * (T // steps)).round()[::-1] + offset
    const int64_t ratio = train_steps / steps;
    for (int i = 0; i < steps; ++i) ts[static_cast<size_t>(steps - 1 - i)] = i * ratio + steps_offset;
  } else if (spacing == "trailing") {  // round(arange(T, 0, -T / steps)) - 1
    const double start = static_cast<double>(train_steps), step = -start / steps;
    const auto count = static_cast<int64_t>(std::ceil((0.0 - start) / step));
    if (count != steps) throw Error(ErrorKind::input, "trailing spacing gives " + std::to_string(count) + " steps");
    const double delta = (start + step) - start;  // numpy's arange fills start + i * (second - first)
    for (int64_t i = 0; i < count; ++i) {
      const double y = i == 0 ? start : (i == 1 ? start + step : start + static_cast<double>(i) * delta);
      ts[static_cast<size_t>(i)] = round_even(y) - 1;
    }
  } else {
    throw Error(ErrorKind::bundle, "unsupported timestep_spacing '" + spacing +
                                       "' (expected linspace, leading or trailing)");
  }
  // "leading" with an offset can step past the table (e.g. 1000 steps + offset 1): refuse, never read past it.
  for (const int64_t t : ts) {
    if (t < 0 || t >= train_steps) {
      throw Error(ErrorKind::input, std::to_string(steps) + " steps with " + spacing + " spacing and offset " +
                                        std::to_string(steps_offset) + " reach timestep " + std::to_string(t) +
                                        ", outside 0.." + std::to_string(train_steps - 1) + "; use fewer steps");
    }
  }
  return ts;
}

Sampler parse_sampler(const std::string& name, const std::string& field) {
  if (name == "ddim") return Sampler::ddim;
  if (name == "ddpm") return Sampler::ddpm;
  if (name == "flow_euler" || name == "euler") return Sampler::flow_euler;
  throw Error(ErrorKind::input, field + ": unknown sampler '" + name +
                                    "' (expected ddim or ddpm on VP bundles, flow_euler (or euler) on flow bundles)");
}

const char* sampler_name(Sampler sampler) {
  switch (sampler) {
    case Sampler::ddim: return "ddim";
    case Sampler::ddpm: return "ddpm";
    case Sampler::flow_euler: return "flow_euler";
  }
  return "ddim";  // unreachable: every enumerator returns above
}

std::vector<int64_t> ddim_timesteps(const SchedulerInfo& m, int steps) {
  return ddim_timesteps(m.ddim.timestep_spacing, m.num_train_timesteps(), m.ddim.steps_offset, steps);
}

const DdpmSettings& ddpm_settings(const SchedulerInfo& m) {
  if (!m.ddpm) {
    throw Error(ErrorKind::bundle, "this bundle records no DDPM settings (manifest scheduler.ddpm): it was exported "
                                   "before DDPM sampling existed; re-export it or sample with ddim");
  }
  if (m.ddpm->thresholding) throw Error(ErrorKind::bundle, "the bundle's DDPM scheduler uses dynamic thresholding (unsupported)");
  if (m.ddpm->variance_type != "fixed_small") {
    throw Error(ErrorKind::bundle, "scheduler.ddpm.variance_type '" + m.ddpm->variance_type +
                                       "' is not supported (expected 'fixed_small')");
  }
  return *m.ddpm;
}

std::vector<int64_t> ddpm_timesteps(const SchedulerInfo& m, int steps) {
  const DdpmSettings& s = ddpm_settings(m);
  return ddim_timesteps(s.timestep_spacing, m.num_train_timesteps(), s.steps_offset, steps);
}

void ddpm_step(const SchedulerInfo& m, const float* eps, int64_t t, int64_t prev_t, const float* x,
               const float* noise, float* out, size_t n) {
  const DdpmSettings& s = ddpm_settings(m);
  if (t > 0 && noise == nullptr) throw Error(ErrorKind::runtime, "the DDPM step at timestep " + std::to_string(t) + " needs noise");
  // DDPMScheduler.step's float32 operations in its order (safe_denoiser/runtime/ddpm_sampler.py; numpy's ** 0.5 is powf).
  const auto a_t = static_cast<float>(m.alphas_cumprod[static_cast<size_t>(t)]);
  const float a_prev = prev_t >= 0 ? static_cast<float>(m.alphas_cumprod[static_cast<size_t>(prev_t)]) : 1.0f;
  const float b_t = 1.0f - a_t, b_prev = 1.0f - a_prev;
  const float alpha = a_t / a_prev;
  const float beta = 1.0f - alpha;
  const float sa = std::pow(a_t, 0.5f), sb = std::pow(b_t, 0.5f);
  const float c_x0 = (std::pow(a_prev, 0.5f) * beta) / b_t;
  const float c_x = std::pow(alpha, 0.5f) * b_prev / b_t;
  const float sd = t > 0 ? std::pow(std::max(b_prev / b_t * beta, 1e-20f), 0.5f) : 0.0f;
  const auto r = static_cast<float>(s.clip_sample_range);
  for (size_t i = 0; i < n; ++i) {
    float x0 = (x[i] - sb * eps[i]) / sa;
    if (s.clip_sample) x0 = std::min(std::max(x0, -r), r);
    float v = c_x0 * x0 + c_x * x[i];
    if (t > 0) v = v + sd * noise[i];
    out[i] = v;
  }
}

void ddim_step(const SchedulerInfo& m, const float* eps, int64_t t, const float* x, int steps, float* out,
               size_t n) {
  const DdimSettings& s = m.ddim;
  if (s.thresholding) throw Error(ErrorKind::bundle, "the bundle's scheduler uses dynamic thresholding (unsupported)");
  const int64_t train = m.num_train_timesteps();
  const int64_t prev = t - train / steps;
  const auto a_t = static_cast<float>(m.alphas_cumprod[static_cast<size_t>(t)]);
  const auto a_prev = static_cast<float>(prev >= 0 ? m.alphas_cumprod[static_cast<size_t>(prev)] : m.final_alpha_cumprod);
  const float b_t = 1.0f - a_t;
  // numpy evaluates float32 ** 0.5 with powf; keep the same calls for bit-equal results.
  const float sa = std::pow(a_t, 0.5f), sb = std::pow(b_t, 0.5f);
  const float sa_prev = std::pow(a_prev, 0.5f), sb_prev = std::pow(1.0f - a_prev, 0.5f);
  const auto r = static_cast<float>(s.clip_sample_range);
  for (size_t i = 0; i < n; ++i) {
    float e = eps[i];
    float x0 = (x[i] - sb * e) / sa;
    if (s.clip_sample) {
      x0 = std::min(std::max(x0, -r), r);
      if (s.use_clipped_model_output) e = (x[i] - sa * x0) / sb;
    }
    out[i] = sa_prev * x0 + sb_prev * e;
  }
}

}  // namespace sdcpp
