// The flow section and the FlowMatch Euler schedule (safe_denoiser/runtime/flow_sampler.py, operation for operation).
#include "safe_denoiser_cpp/flow_sampler.hpp"

#include <cmath>
#include <nlohmann/json.hpp>

#include "safe_denoiser_cpp/errors.hpp"
#include "safe_denoiser_cpp/json_limits.hpp"

namespace sdcpp {
namespace {
using nlohmann::json;

[[noreturn]] void bad(const std::string& field, const std::string& expected, const json& got) {
  const std::string shown = got.dump();
  throw Error(ErrorKind::bundle, "manifest: flow." + field + " must be " + expected + ", got " +
                                     (shown.size() > 60 ? shown.substr(0, 57) + "..." : shown));
}

const json& field(const json& f, const std::string& key) {
  if (!f.contains(key)) throw Error(ErrorKind::bundle, "manifest: flow is missing the key '" + key + "'");
  return f.at(key);
}

double number(const json& f, const std::string& key) {
  const json& v = field(f, key);
  if (!v.is_number() || !std::isfinite(v.get<double>())) bad(key, "a finite number", v);
  return v.get<double>();
}

int64_t integer(const json& f, const std::string& key) {
  const json& v = field(f, key);
  const auto i = json_integer_in(v, 1, INT32_MAX);
  if (!i) bad(key, "an integer in 1..2147483647", v);
  return *i;
}

// numpy.linspace(start, stop, num) in float64: i * step + start, the last entry stop.
std::vector<double> linspace(double start, double stop, int num) {
  std::vector<double> y(static_cast<size_t>(num));
  const double delta = stop - start;
  const int div = num - 1;
  const double step = div > 0 ? delta / div : 0.0;
  for (int i = 0; i < num; ++i) {
    const double di = static_cast<double>(i);
    y[static_cast<size_t>(i)] = (div > 0 && step == 0.0 ? di / div * delta : di * step) + start;
  }
  if (num > 1) y.back() = stop;
  return y;
}

// The time shift of mu on sigma t, in T's arithmetic (numpy keeps float32 arrays float32: the Python scalar
// exp(mu) is rounded to T first). (1 / t - 1) ** 1.0 is exactly 1 / t - 1.
template <typename T>
T time_shift(const FlowInfo& f, double mu, T t) {
  const T m = static_cast<T>(f.time_shift_type == "exponential" ? std::exp(mu) : mu);
  return m / (m + (T(1) / t - T(1)));
}

// The static shift, in T's arithmetic: (shift - 1) is a Python float rounded to T, as numpy does.
template <typename T>
T static_shift(double shift, T t) {
  return static_cast<T>(shift) * t / (T(1) + static_cast<T>(shift - 1.0) * t);
}

template <typename T>
std::vector<float> shifted(const FlowInfo& f, const std::vector<T>& sigmas) {
  std::vector<float> out;
  out.reserve(sigmas.size() + 1);
  const double mu = f.use_dynamic_shifting ? f.mu.value_or(calculate_shift(f.image_seq_len.value_or(0), f)) : 0.0;
  for (const T s : sigmas) out.push_back(static_cast<float>(f.use_dynamic_shifting ? time_shift(f, mu, s)
                                                                                   : static_shift(f.shift, s)));
  return out;
}
}  // namespace

FlowInfo FlowInfo::parse(const json& f) {
  if (!f.is_object()) throw Error(ErrorKind::bundle, "manifest: flow must be an object (the flow sampler's settings)");
  FlowInfo info;
  const json& family = field(f, "family");
  if (family != "sd3" && family != "flux") bad("family", "'sd3' or 'flux'", family);
  info.family = family.get<std::string>();
  info.num_train_timesteps = integer(f, "num_train_timesteps");
  info.shift = number(f, "shift");
  if (!(info.shift > 0)) bad("shift", "> 0", field(f, "shift"));
  const json& dynamic = field(f, "use_dynamic_shifting");
  if (!dynamic.is_boolean()) bad("use_dynamic_shifting", "true or false", dynamic);
  info.use_dynamic_shifting = dynamic.get<bool>();
  if (f.contains("time_shift_type") && !f.at("time_shift_type").is_null()) {
    const json& type = f.at("time_shift_type");
    if (type != "exponential" && type != "linear") bad("time_shift_type", "'exponential' or 'linear'", type);
    info.time_shift_type = type.get<std::string>();
  }
  info.base_shift = number(f, "base_shift");
  info.max_shift = number(f, "max_shift");
  info.base_image_seq_len = integer(f, "base_image_seq_len");
  info.max_image_seq_len = integer(f, "max_image_seq_len");
  if (info.max_image_seq_len <= info.base_image_seq_len) {
    bad("max_image_seq_len", "> base_image_seq_len", field(f, "max_image_seq_len"));
  }
  info.sigma_min = number(f, "sigma_min");
  info.sigma_max = number(f, "sigma_max");
  if (!(0 < info.sigma_min && info.sigma_min <= info.sigma_max && info.sigma_max <= 1)) {
    bad("sigma_min", "in (0, sigma_max] with sigma_max <= 1", field(f, "sigma_min"));
  }
  const json& spacing = field(f, "pipeline_sigmas");
  if (!spacing.is_null() && spacing != "linspace") bad("pipeline_sigmas", "null or 'linspace'", spacing);
  info.linspace_sigmas = !spacing.is_null();
  if (f.contains("image_seq_len") && !f.at("image_seq_len").is_null()) info.image_seq_len = integer(f, "image_seq_len");
  if (f.contains("mu") && !f.at("mu").is_null()) info.mu = number(f, "mu");
  if (info.use_dynamic_shifting && !info.mu && !info.image_seq_len) {
    bad("mu", "a number, or image_seq_len given, with use_dynamic_shifting", json(nullptr));
  }
  return info;
}

double calculate_shift(int64_t image_seq_len, const FlowInfo& f) {
  const double m = (f.max_shift - f.base_shift) / static_cast<double>(f.max_image_seq_len - f.base_image_seq_len);
  return static_cast<double>(image_seq_len) * m + (f.base_shift - m * static_cast<double>(f.base_image_seq_len));
}

FlowSchedule flow_schedule(const FlowInfo& f, int steps) {
  if (steps < 1) throw Error(ErrorKind::input, "steps must be >= 1, got " + std::to_string(steps));
  const auto n = static_cast<double>(f.num_train_timesteps);
  FlowSchedule out;
  if (f.linspace_sigmas) {  // Flux: the pipeline's linspace(1, 1 / steps), cast to float32 by the scheduler
    std::vector<float> sigmas;
    for (const double s : linspace(1.0, 1.0 / steps, steps)) sigmas.push_back(static_cast<float>(s));
    out.sigmas = shifted(f, sigmas);
  } else {  // SD3: the scheduler's own spacing, float64 until the end
    std::vector<double> sigmas = linspace(f.sigma_max * n, f.sigma_min * n, steps);
    for (double& s : sigmas) s /= n;
    out.sigmas = shifted(f, sigmas);
  }
  const auto n32 = static_cast<float>(f.num_train_timesteps);
  for (const float s : out.sigmas) out.timesteps.push_back(s * n32);
  out.sigmas.push_back(0.0f);
  return out;
}

void flow_euler_step(const float* velocity, const float* x, float sigma, float sigma_next, float* out, size_t n) {
  const float dt = sigma_next - sigma;
  for (size_t i = 0; i < n; ++i) out[i] = x[i] + dt * velocity[i];
}

}  // namespace sdcpp
