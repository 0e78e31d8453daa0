// The manifest contract (contract.hpp; safe_denoiser/runtime/contract.py holds the same checks in the same order).
#include "contract.hpp"

#include <limits.h>
#include <stdlib.h>
#include <sys/stat.h>

#include <algorithm>
#include <cfloat>
#include <cstdio>
#include <cmath>
#include <optional>
#include <regex>
#include <set>

#include "safe_denoiser_cpp/errors.hpp"
#include "safe_denoiser_cpp/json_limits.hpp"
#include "safe_denoiser_cpp/manifest.hpp"
#include "safe_denoiser_cpp/scheduler.hpp"

namespace sdcpp {
namespace {
using nlohmann::json;

constexpr const char* kPathRule =
    "a relative path inside the bundle folder ('/'-separated; no absolute path, no empty, '.' or '..' component, no "
    "backslash, no symlink resolving outside the bundle)";
constexpr double kMaxGuidanceScale = 1e3;  // as manifest.hpp's kMaxGuidance and contract.py's MAX_GUIDANCE
constexpr double kUnit = 1.0 / 16777216.0;  // float32 unit roundoff 2^-24: diffusers builds the VP tables in float32
constexpr double kF64Rel = 1e-12;           // tables the exporter computes in float64: rounding only

std::string shown(const json& v) {
  const std::string s = v.dump();
  return s.size() > 80 ? s.substr(0, 77) + "..." : s;
}

[[noreturn]] void bad(const std::string& field, const std::string& expected, const std::string& got) {
  throw Error(ErrorKind::bundle, "manifest: " + field + " must be " + expected + ", got " + got);
}

[[noreturn]] void bad_text(const std::string& why) { throw Error(ErrorKind::bundle, "manifest: " + why); }

std::string num_text(double v) { return json(v).dump(); }

const json& at(const json& obj, const std::string& key) {
  static const json null_value;
  return obj.is_object() && obj.contains(key) ? obj.at(key) : null_value;
}

// An integer >= lo (a float such as 2.5 or 1e30 is refused, not converted).
int64_t int_at_least(const json& v, const std::string& field, int64_t lo) {
  const auto i = json_integer_in(v, lo, INT64_MAX);
  if (!i) bad(field, "an int >= " + std::to_string(lo), shown(v));
  return *i;
}

int64_t int_in(const json& v, const std::string& field, int64_t lo, int64_t hi) {
  const auto i = json_integer_in(v, lo, hi);
  if (!i) bad(field, "an int in " + std::to_string(lo) + ".." + std::to_string(hi), shown(v));
  return *i;
}

double finite_number(const json& v, const std::string& field) {
  if (!v.is_number() || !std::isfinite(v.get<double>())) bad(field, "a finite number", shown(v));
  return v.get<double>();
}

std::vector<double> number_list(const json& v, const std::string& field) {
  if (!v.is_array()) bad(field, "a list of numbers", shown(v));
  std::vector<double> out;
  for (const auto& x : v) out.push_back(finite_number(x, field));
  return out;
}

// `got` equal to `want` within rel[i] (relative); the first entry outside is named.
void check_table(const std::string& field, const std::vector<double>& got, const std::vector<double>& want,
                 const std::vector<double>& rel, const std::string& what) {
  if (got.size() != want.size()) {
    bad(field, std::to_string(want.size()) + " entries (" + what + ")", std::to_string(got.size()));
  }
  for (size_t i = 0; i < want.size(); ++i) {
    const double err = std::abs(got[i] - want[i]) / std::max(std::abs(want[i]), DBL_MIN);
    if (!(err <= rel[i])) {
      char bound[32];
      std::snprintf(bound, sizeof bound, "%.2g", rel[i]);
      bad(field + "[" + std::to_string(i) + "]", num_text(want[i]) + " (" + what + "; relative bound " + bound + ")",
          num_text(got[i]));
    }
  }
}

// numpy's linspace(a, b, n): a + i * step, the last entry exactly b.
std::vector<double> linspace(double a, double b, int64_t n) {
  std::vector<double> out(static_cast<size_t>(n));
  const double step = n > 1 ? (b - a) / static_cast<double>(n - 1) : 0.0;
  for (int64_t i = 0; i < n; ++i) out[static_cast<size_t>(i)] = static_cast<double>(i) * step + a;
  if (n > 1) out.back() = b;
  return out;
}

// The float64 betas of a diffusers VP scheduler config (contract.py's vp_alphas_cumprod).
std::vector<double> vp_betas(const json& config, int64_t n) {
  if (at(config, "rescale_betas_zero_snr").is_boolean() && at(config, "rescale_betas_zero_snr").get<bool>()) {
    bad("scheduler.config.rescale_betas_zero_snr", "false (its final alpha_bar of 0 is not samplable)", "true");
  }
  const json& schedule = at(config, "beta_schedule");
  if (!at(config, "trained_betas").is_null()) return number_list(at(config, "trained_betas"), "scheduler.config.trained_betas");
  const std::string name = schedule.is_string() ? schedule.get<std::string>() : "";
  if (name == "linear" || name == "scaled_linear") {
    const double lo = finite_number(at(config, "beta_start"), "scheduler.config.beta_start");
    const double hi = finite_number(at(config, "beta_end"), "scheduler.config.beta_end");
    if (name == "linear") return linspace(lo, hi, n);
    auto b = linspace(std::sqrt(lo), std::sqrt(hi), n);
    for (auto& v : b) v = v * v;
    return b;
  }
  if (name == "squaredcos_cap_v2") {
    const double pi = std::acos(-1.0);
    const auto abar = [&](int64_t i) {
      const double c = std::cos((static_cast<double>(i) / static_cast<double>(n) + 0.008) / 1.008 * pi / 2);
      return c * c;
    };
    std::vector<double> b;
    for (int64_t i = 0; i < n; ++i) b.push_back(std::min(1 - abar(i + 1) / abar(i), 0.999));
    return b;
  }
  bad("scheduler.config.beta_schedule", "linear, scaled_linear or squaredcos_cap_v2", shown(schedule));
}

// The default schedule (DDIM, and DDPM when recorded) fits the table: "leading" + steps_offset can pass its end.
void check_default_schedule(const json& sched, int64_t steps, int64_t n) {
  for (const char* key : {"ddim", "ddpm"}) {
    const json& s = at(sched, key);
    if (!s.is_object() || s.empty()) continue;
    const json& spacing = at(s, "timestep_spacing");
    const json& offset = at(s, "steps_offset");
    try {
      ddim_timesteps(spacing.is_string() ? spacing.get<std::string>() : "leading", n,
                     offset.is_null() ? 0 : int_in(offset, std::string("scheduler.") + key + ".steps_offset", 0, INT32_MAX),
                     static_cast<int>(steps));
    } catch (const Error& e) {
      throw Error(ErrorKind::bundle, "manifest: num_inference_steps " + std::to_string(steps) + ": " + e.what());
    }
  }
}

void check_vp_schedule(const json& sched) {
  const auto ac = number_list(at(sched, "alphas_cumprod"), "scheduler.alphas_cumprod");
  for (size_t t = 0; t < ac.size(); ++t) {
    if (!(ac[t] > 0.0 && ac[t] <= 1.0)) bad("scheduler.alphas_cumprod[" + std::to_string(t) + "]", "in (0, 1]", num_text(ac[t]));
  }
  const json& config = at(sched, "config");
  const int64_t n = int_at_least(at(config, "num_train_timesteps"), "scheduler.config.num_train_timesteps", 1);
  if (static_cast<int64_t>(ac.size()) != n) {
    bad("scheduler.alphas_cumprod", "scheduler.config.num_train_timesteps = " + std::to_string(n) + " entries",
        std::to_string(ac.size()));
  }
  const auto betas = vp_betas(config, n);
  if (static_cast<int64_t>(betas.size()) != n ||
      !std::all_of(betas.begin(), betas.end(), [](double b) { return b > 0.0 && b < 1.0; })) {
    bad("scheduler.config", std::to_string(n) + " betas in (0, 1)", std::to_string(betas.size()) + " betas");
  }
  // diffusers' float32 table lies within sum_{i <= t} (8 beta_i / alpha_i + 4) 2^-24 of the float64 product
  // (contract.py's vp_alphas_cumprod says why).
  std::vector<double> want, bound, sigmas, sigma_rel(ac.size(), kF64Rel);
  double product = 1.0, sum = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    const double b = betas[static_cast<size_t>(i)], a = 1.0 - b;
    product *= a;
    sum += 8 * b / a + 4;
    want.push_back(product);
    bound.push_back(sum * kUnit);
  }
  check_table("scheduler.alphas_cumprod", ac, want, bound, "the config's beta schedule");
  for (const double a : ac) sigmas.push_back(std::sqrt((1 - a) / a));
  check_table("scheduler.sigmas", number_list(at(sched, "sigmas"), "scheduler.sigmas"), sigmas, sigma_rel,
              "sqrt((1 - abar) / abar)");
  const json& one = at(at(sched, "ddim"), "set_alpha_to_one");
  const double first = one.is_boolean() && !one.get<bool>() ? ac[0] : 1.0;
  const double final_ac = finite_number(at(sched, "final_alpha_cumprod"), "scheduler.final_alpha_cumprod");
  if (final_ac != first) bad("scheduler.final_alpha_cumprod", num_text(first) + " (ddim.set_alpha_to_one)", num_text(final_ac));
}

// ---- flow ---------------------------------------------------------------------------------------------------------
// The pipelines' mu (flow_sampler.calculate_shift).
double calculate_shift(int64_t tokens, const json& f) {
  const double base_len = at(f, "base_image_seq_len").get<double>(), max_len = at(f, "max_image_seq_len").get<double>();
  const double base = at(f, "base_shift").get<double>(), top = at(f, "max_shift").get<double>();
  const double m = (top - base) / (max_len - base_len);
  return static_cast<double>(tokens) * m + (base - m * base_len);
}

void check_flow_tokens(const json& f, const std::vector<int64_t>& shape) {
  const int64_t tokens = int_at_least(at(f, "image_seq_len"), "flow.image_seq_len", 1);
  bool ok = false;
  std::string want;
  if (at(f, "family") == "flux") {  // packed (tokens, channels)
    ok = shape.size() == 2 && tokens == shape[0];
    want = "sample_shape[0] = " + std::to_string(shape.empty() ? 0 : shape[0]) + " (Flux's packed tokens)";
  } else {  // SD3: (H / p) (W / p) for a patch size p
    const int64_t area = shape.size() == 3 ? shape[1] * shape[2] : 0;
    const auto p = area % tokens == 0 ? static_cast<int64_t>(std::sqrt(static_cast<double>(area / tokens))) : 0;
    ok = p >= 1 && p * p * tokens == area && shape[1] % p == 0 && shape[2] % p == 0;
    want = "(H / p) (W / p) for sample_shape " + json(shape).dump() + " and a patch size p";
  }
  if (!ok) bad("flow.image_seq_len", want, std::to_string(tokens));
  const json& mu = at(f, "mu");
  const double want_mu = calculate_shift(tokens, f);
  if (!mu.is_null() && !(mu.is_number() && std::abs(mu.get<double>() - want_mu) <= kF64Rel * std::max(1.0, std::abs(want_mu)))) {
    bad("flow.mu", num_text(want_mu) + " (calculate_shift of image_seq_len)", shown(mu));
  }
  if (!mu.is_null() && at(f, "time_shift_type") == "linear" && !(mu.get<double>() > 0)) bad("flow.mu", "> 0 for the linear time shift", shown(mu));
}

void check_flow_tables(const json& data, const json& f, int64_t n) {
  const json& sched = at(data, "scheduler");
  const json& config_n = at(at(sched, "config"), "num_train_timesteps");
  if (!config_n.is_null() && config_n != n) {
    bad("flow.num_train_timesteps", "scheduler.config.num_train_timesteps (" + shown(config_n) + ")", std::to_string(n));
  }
  const auto sigmas = number_list(at(sched, "sigmas"), "scheduler.sigmas");
  if (static_cast<int64_t>(sigmas.size()) != n) {  // before building n entries: n is the manifest's word
    bad("scheduler.sigmas", "flow.num_train_timesteps = " + std::to_string(n) + " entries", std::to_string(sigmas.size()));
  }
  // FlowMatchEulerDiscreteScheduler's training sigmas, t = 0 first (float32 there: within 8 x 2^-24).
  const bool dynamic = at(f, "use_dynamic_shifting").get<bool>();
  const double shift = at(f, "shift").get<double>();
  std::vector<double> want;
  for (int64_t i = 1; i <= n; ++i) {
    const double s = static_cast<double>(i) / static_cast<double>(n);
    want.push_back(dynamic ? s : shift * s / (1 + (shift - 1) * s));
  }
  check_table("scheduler.sigmas", sigmas, want, std::vector<double>(want.size(), 8 * kUnit),
              "the flow section's training sigmas");
  const auto [lo, hi] = std::minmax_element(sigmas.begin(), sigmas.end());
  for (const auto& [key, v] : {std::pair{"sigma_min", *lo}, std::pair{"sigma_max", *hi}}) {
    if (std::abs(at(f, key).get<double>() - v) > kF64Rel * v) bad(std::string("flow.") + key, num_text(v) + " (of scheduler.sigmas)", shown(at(f, key)));
  }
  std::vector<double> ab;
  for (const double s : sigmas) ab.push_back((1 - s) * (1 - s) / ((1 - s) * (1 - s) + s * s));
  check_table("scheduler.alphas_cumprod", number_list(at(sched, "alphas_cumprod"), "scheduler.alphas_cumprod"), ab,
              std::vector<double>(ab.size(), kF64Rel), "(1 - s)^2 / ((1 - s)^2 + s^2)");
}

void check_flow(const json& data, const std::vector<int64_t>& shape) {
  const json& f = at(data, "flow");
  const int64_t n = int_at_least(at(f, "num_train_timesteps"), "flow.num_train_timesteps", 1);
  const int64_t base_len = int_at_least(at(f, "base_image_seq_len"), "flow.base_image_seq_len", 1);
  const int64_t max_len = int_at_least(at(f, "max_image_seq_len"), "flow.max_image_seq_len", 1);
  for (const char* key : {"shift", "sigma_min", "sigma_max", "base_shift", "max_shift"}) finite_number(at(f, key), std::string("flow.") + key);
  if (at(f, "family") != "sd3" && at(f, "family") != "flux") bad("flow.family", "'sd3' or 'flux'", shown(at(f, "family")));
  if (!at(f, "use_dynamic_shifting").is_boolean()) bad("flow.use_dynamic_shifting", "true or false", shown(at(f, "use_dynamic_shifting")));
  const json& shift_type = at(f, "time_shift_type");
  if (!shift_type.is_null() && shift_type != "exponential" && shift_type != "linear") {
    bad("flow.time_shift_type", "'exponential' or 'linear'", shown(shift_type));
  }
  if (!at(f, "pipeline_sigmas").is_null() && at(f, "pipeline_sigmas") != "linspace") bad("flow.pipeline_sigmas", "null or 'linspace'", shown(at(f, "pipeline_sigmas")));
  if (!(at(f, "shift").get<double>() > 0)) bad("flow.shift", "> 0", shown(at(f, "shift")));
  const double smin = at(f, "sigma_min").get<double>(), smax = at(f, "sigma_max").get<double>();
  if (!(0 < smin && smin <= smax && smax <= 1)) {
    bad("flow.sigma_min / flow.sigma_max", "0 < sigma_min <= sigma_max <= 1", "(" + num_text(smin) + ", " + num_text(smax) + ")");
  }
  if (!(base_len < max_len)) bad("flow.max_image_seq_len", "> base_image_seq_len (" + std::to_string(base_len) + ")", std::to_string(max_len));
  if (at(f, "use_dynamic_shifting").get<bool>()) check_flow_tokens(f, shape);
  check_flow_tables(data, f, n);
}

// ---- graphs -------------------------------------------------------------------------------------------------------
// The denoiser's (inputs, outputs) that the runtimes feed and read (contract.py's denoiser_io).
std::pair<std::vector<std::string>, std::vector<std::string>> denoiser_io(const json& data) {
  const bool guided = !at(data, "guidance").is_null();
  std::vector<std::string> in, out;
  if (at(data, "path") == "flow") {
    in = {"sample", "timestep", "sigma", "prompt_embeds", "pooled_prompt_embeds"};
    if (at(at(data, "flow"), "family") == "sd3") in.insert(in.end(), {"negative_prompt_embeds", "negative_pooled_prompt_embeds"});
    in.push_back("guidance_scale");
    out = {"noise_pred", "x0_hat"};
  } else {
    const std::string cond = at(data, "model_kind") == "class-conditional" ? "class_labels" : "prompt_embeds";
    in = {"sample", "timestep", "alpha_bar", cond, "negative_" + cond, "guidance_scale"};
    if (at(at(data, "guidance"), "preset") == "reference") in.push_back("noise");
    if (!at(data, "sld").is_null()) in.insert(in.end(), {"sld_momentum", "sld_step"});
    out = {"noise_pred", "sample_corrected", "x0_hat"};
  }
  if (guided) out.insert(out.end(), {"correction_applied", "kernel_log_mass"});
  if (at(data, "path") != "flow" && !at(data, "sld").is_null()) out.push_back("sld_momentum_out");
  return {in, out};
}

std::vector<std::string> names_of(const json& list) {
  std::vector<std::string> out;
  if (list.is_array()) for (const auto& t : list) out.push_back(at(t, "name").is_string() ? at(t, "name").get<std::string>() : "");
  return out;
}

const json* tensor_named(const json& list, const json& name) {
  if (list.is_array()) for (const auto& t : list) if (at(t, "name") == name) return &t;
  return nullptr;
}

// `spec`'s rank is want.size() and each int dim equals the wanted one (-1, or a named dim: any).
void static_dims(const json& spec, const std::string& field, const std::vector<int64_t>& want) {
  const json& shape = at(spec, "shape");
  bool ok = shape.is_array() && shape.size() == want.size();
  for (size_t d = 0; ok && d < want.size(); ++d) ok = !shape[d].is_number() || want[d] < 0 || shape[d] == want[d];
  if (!ok) {
    json shown_want = json::array();
    for (const auto w : want) shown_want.push_back(w < 0 ? json("any") : json(w));
    bad(field + " '" + at(spec, "name").get<std::string>() + "' shape", shown_want.dump() + " (from sample_shape; a named dim: any)", shown(shape));
  }
}

void check_denoiser_spec(const json& data, const std::vector<int64_t>& shape) {
  const json& g = at(at(data, "graphs"), "denoiser");
  const auto [in, out] = denoiser_io(data);
  for (const auto& [kind, want] : {std::pair{"inputs", in}, std::pair{"outputs", out}}) {
    auto got = names_of(at(g, kind)), sorted_want = want;
    const json shown_got = got;
    std::sort(got.begin(), got.end());
    std::sort(sorted_want.begin(), sorted_want.end());
    if (got != sorted_want) {
      bad(std::string("graphs.denoiser.") + kind, "the names " + json(want).dump() + " (what this bundle's runtime feeds/reads)", shown(shown_got));
    }
  }
  std::vector<int64_t> sample = {-1};
  sample.insert(sample.end(), shape.begin(), shape.end());
  const std::set<std::string> sample_like = {"sample", "noise_pred", "sample_corrected", "x0_hat", "noise", "sld_momentum"};
  for (const char* kind : {"inputs", "outputs"}) {
    for (const auto& t : at(g, kind)) {
      if (sample_like.count(at(t, "name").get<std::string>())) static_dims(t, std::string("graphs.denoiser.") + kind, sample);
    }
  }
}

void check_vp_graphs(const json& data, const std::vector<int64_t>& shape) {
  const json& graphs = at(data, "graphs");
  if (graphs.contains("vae_decoder")) {
    const json* latents = tensor_named(at(at(graphs, "vae_decoder"), "inputs"), "latents");
    if (!latents) bad("graphs.vae_decoder.inputs", "a list naming 'latents'", shown(names_of(at(at(graphs, "vae_decoder"), "inputs"))));
    static_dims(*latents, "graphs.vae_decoder.inputs", {-1, shape[0], -1, -1});
  }
  if (!graphs.contains("text_encoder")) return;
  const json& te = at(graphs, "text_encoder");
  if (!tensor_named(at(te, "inputs"), "input_ids")) bad("graphs.text_encoder.inputs", "a list naming 'input_ids'", shown(names_of(at(te, "inputs"))));
  const json* hidden = tensor_named(at(te, "outputs"), "last_hidden_state");
  if (!hidden) bad("graphs.text_encoder.outputs", "a list naming 'last_hidden_state'", shown(names_of(at(te, "outputs"))));
  const json* prompt = tensor_named(at(at(graphs, "denoiser"), "inputs"), "prompt_embeds");
  if (at(data, "model_kind") != "text-to-image" || prompt == nullptr || !at(*prompt, "shape").is_array()) return;
  std::vector<int64_t> want = {-1};
  const json& pshape = at(*prompt, "shape");
  for (size_t d = 1; d < pshape.size(); ++d) want.push_back(json_integer_in(pshape[d], 1, INT32_MAX).value_or(-1));
  static_dims(*hidden, "graphs.text_encoder.outputs", want);
}

// The denoiser input `name`'s dims after the batch axis (-1 where named): what a graph feeding it must produce.
std::vector<int64_t> denoiser_dims(const json& data, const std::string& name) {
  std::vector<int64_t> want = {-1};
  const json* spec = tensor_named(at(at(at(data, "graphs"), "denoiser"), "inputs"), name);
  static const json none;
  const json& shape = spec ? at(*spec, "shape") : none;
  for (size_t d = 1; shape.is_array() && d < shape.size(); ++d) want.push_back(json_integer_in(shape[d], 1, INT32_MAX).value_or(-1));
  return want;
}

// The text encoder's inputs: exactly the tokenizers' `input` names, each int64 (batch, max_length) (T5's length
// axis may be named).
void check_text_encoder_inputs(const json& te, const json& tokenizers) {
  std::vector<std::string> feeds, got = names_of(at(te, "inputs"));
  for (const auto& t : tokenizers) feeds.push_back(at(t, "input").is_string() ? at(t, "input").get<std::string>() : "");
  auto sorted_feeds = feeds, sorted_got = got;
  std::sort(sorted_feeds.begin(), sorted_feeds.end());
  std::sort(sorted_got.begin(), sorted_got.end());
  if (sorted_got != sorted_feeds) bad("graphs.text_encoder.inputs", "the names " + json(feeds).dump() + " (tokenizers[i].input)", shown(json(got)));
  for (size_t i = 0; i < tokenizers.size(); ++i) {
    const json& t = tokenizers[i];
    const json* found = tensor_named(at(te, "inputs"), at(t, "input"));
    if (found == nullptr) bad("graphs.text_encoder.inputs", "a list naming " + shown(at(t, "input")), shown(json(got)));
    const json& spec = *found;
    const std::string field = "graphs.text_encoder.inputs '" + feeds[i] + "'";
    if (at(spec, "dtype") != "int64") bad(field + " dtype", "'int64' (token ids)", shown(at(spec, "dtype")));
    const json& dims = at(spec, "shape");
    static const json none;
    const json& length = dims.is_array() && dims.size() == 2 ? dims[1] : none;
    if (length != at(t, "max_length") && !(at(t, "kind") == "t5" && length.is_string())) {
      bad(field + " shape", "[batch, " + shown(at(t, "max_length")) + "] (the tokenizer's max_length; T5's axis may be named)", shown(dims));
    }
  }
}

// Flow bundles (contract.py's _check_flow_graphs): the text encoder's inputs as above and its outputs
// prompt_embeds / pooled_prompt_embeds as wide as the denoiser's inputs of those names; vae_decoder's `latents`
// (batch, *sample_shape); `tokenizers` set exactly when there is a text encoder.
void check_flow_graphs(const json& data, const std::vector<int64_t>& shape) {
  const json& graphs = at(data, "graphs");
  const json& tokenizers = at(data, "tokenizers");
  const bool has_te = graphs.contains("text_encoder"), has_tok = tokenizers.is_array() && !tokenizers.empty();
  if (has_te != has_tok) {
    json folders = json::array();
    if (tokenizers.is_array()) for (const auto& t : tokenizers) folders.push_back(at(t, "folder"));
    bad("tokenizers", has_te ? "one entry per text_encoder input" : "empty without a text_encoder graph", shown(folders));
  }
  if (graphs.contains("vae_decoder")) {
    const json& inputs = at(at(graphs, "vae_decoder"), "inputs");
    const json* latents = tensor_named(inputs, "latents");
    if (!latents) bad("graphs.vae_decoder.inputs", "a list naming 'latents'", shown(names_of(inputs)));
    std::vector<int64_t> want = {-1};
    want.insert(want.end(), shape.begin(), shape.end());
    static_dims(*latents, "graphs.vae_decoder.inputs", want);
  }
  if (!has_te) return;
  const json& te = at(graphs, "text_encoder");
  check_text_encoder_inputs(te, tokenizers);
  auto out_names = names_of(at(te, "outputs"));
  const json shown_out = out_names;
  std::sort(out_names.begin(), out_names.end());
  if (out_names != std::vector<std::string>{"pooled_prompt_embeds", "prompt_embeds"}) {
    bad("graphs.text_encoder.outputs", "the names [\"prompt_embeds\",\"pooled_prompt_embeds\"]", shown(shown_out));
  }
  for (const char* name : {"prompt_embeds", "pooled_prompt_embeds"}) {  // the denoiser's inputs of these names
    static_dims(*tensor_named(at(te, "outputs"), name), "graphs.text_encoder.outputs", denoiser_dims(data, name));
  }
}

// SAFREE filters an SD-1.x prompt: a VP text-to-image bundle whose prompt rows are as wide as U_C's rows.
void check_safree(const json& data) {
  const json& section = at(data, "safree");
  if (section.is_null()) return;
  const SafreeSettings s = SafreeSettings::parse(section);
  if (at(data, "model_kind") != "text-to-image" || at(data, "path") == "flow") {
    const json& kind = at(data, "model_kind");
    bad_text("safree must be null for a " + (kind.is_string() ? kind.get<std::string>() : shown(kind)) +
             " bundle on path '" + (at(data, "path") == "flow" ? "flow" : "vp") +
             "' (SAFREE's text side needs an SD-1.x text-to-image bundle, path 'vp'), got a section");
  }
  const int64_t width = denoiser_dims(data, "prompt_embeds").back();
  if (width > 0 && s.dim != width) {
    bad("safree.concept_basis", "(D, r) with D = " + std::to_string(width) + " (prompt_embeds' width)",
        "D = " + std::to_string(s.dim));
  }
}

void check_labels_and_banks(const json& data) {
  static const std::regex sha256("[0-9a-f]{64}");
  if (at(data, "model_kind") == "class-conditional") {
    int_at_least(at(data, "null_class"), "null_class", 0);
  } else {
    for (const char* key : {"null_class", "num_class_labels"}) {
      if (!at(data, key).is_null()) bad(key, "null for a " + shown(at(data, "model_kind")) + " bundle", shown(at(data, key)));
    }
    if (at(data, "path") != "flow" && at(data, "tokenizer").is_null()) bad("tokenizer", "a folder name (a text-to-image bundle needs its tokenizer)", "null");
  }
  const json& constants = at(at(at(data, "graphs"), "denoiser"), "constants");
  for (const char* key : {"bank", "reference_bank"}) {
    const json& b = at(data, key);
    if (b.is_null()) continue;
    int_at_least(at(b, "count"), std::string(key) + ".count", 1);
    const json& digest = at(b, "sha256");
    if (!digest.is_string() || !std::regex_match(digest.get<std::string>(), sha256)) {
      bad(std::string(key) + ".sha256", "a sha256 (64 lower-case hex digits)", shown(digest));
    }
    const json& init = at(b, "initializer");
    if (constants.is_object() && !constants.empty() && init.is_string() && !constants.contains(init.get<std::string>())) {
      std::vector<std::string> names;
      for (const auto& [name, role] : constants.items()) names.push_back(name);
      bad(std::string(key) + ".initializer", "one of graphs.denoiser.constants " + json(names).dump(), shown(init));
    }
  }
}
}  // namespace

bool is_bundle_relative(const std::string& name) {
  if (name.empty() || name.find('\\') != std::string::npos || name.find('\0') != std::string::npos) return false;
  size_t start = 0;
  for (;;) {
    const size_t slash = name.find('/', start);
    const std::string part = name.substr(start, slash == std::string::npos ? std::string::npos : slash - start);
    if (part.empty() || part == "." || part == "..") return false;  // also a leading '/' (absolute) or '//'
    if (slash == std::string::npos) return true;
    start = slash + 1;
  }
}

std::vector<std::pair<std::string, std::string>> manifest_file_fields(const json& data) {
  std::vector<std::pair<std::string, json>> raw;
  const json& graphs = at(data, "graphs");
  if (graphs.is_object()) {
    for (const auto& [k, g] : graphs.items()) raw.emplace_back("graphs." + k + ".file", at(g, "file"));
    for (const auto& [k, g] : graphs.items()) {
      if (!at(g, "external_data").is_null()) raw.emplace_back("graphs." + k + ".external_data", at(g, "external_data"));
    }
  }
  if (!at(data, "tokenizer").is_null()) raw.emplace_back("tokenizer", at(data, "tokenizer"));
  const json& tokenizers = at(data, "tokenizers");
  for (size_t i = 0; tokenizers.is_array() && i < tokenizers.size(); ++i) {
    raw.emplace_back("tokenizers[" + std::to_string(i) + "].folder", at(tokenizers[i], "folder"));
  }
  const json& files = at(data, "files");
  if (files.is_object()) for (const auto& [name, digest] : files.items()) raw.emplace_back("files['" + name + "']", json(name));
  std::vector<std::pair<std::string, std::string>> out;
  for (const auto& [field, v] : raw) {
    if (!v.is_string() || !is_bundle_relative(v.get<std::string>())) bad(field, kPathRule, shown(v));
    out.emplace_back(field, v.get<std::string>());
  }
  return out;
}

void check_inside_bundle(const std::string& bundle_dir, const std::string& name, const std::string& field) {
  if (!is_bundle_relative(name)) bad(field, kPathRule, json(name).dump());
  const std::string path = bundle_dir + "/" + name;
  struct stat st {};
  if (::lstat(path.c_str(), &st) != 0) return;  // missing: reported by the caller
  char base[PATH_MAX], real[PATH_MAX];
  if (::realpath(bundle_dir.c_str(), base) == nullptr || ::realpath(path.c_str(), real) == nullptr) {
    throw Error(ErrorKind::bundle, "manifest: " + field + " '" + name + "' cannot be resolved (a dangling symlink?)");
  }
  const std::string b(base), r(real);
  if (!(r == b || b == "/" || (r.size() > b.size() && r.compare(0, b.size(), b) == 0 && r[b.size()] == '/'))) {
    throw Error(ErrorKind::bundle, "manifest: " + field + " '" + name + "' resolves to '" + r +
                                       "', outside the bundle folder '" + b + "'");
  }
}

namespace {
// What the Python runtime checks while reading the manifest, before its numbers: a known preset, and the banks that
// the guidance needs (the same messages as Manifest::load's, so both runtimes name the same field first).
void check_guidance_and_banks(const json& data) {
  const json& g = at(data, "guidance");
  const json& preset = at(g, "preset");
  if (preset.is_string()) parse_guidance_preset(preset.get<std::string>());
  if (g.is_null() != at(data, "bank").is_null()) bad_text("guidance and bank must both be set or both be null");
  if ((preset == "odds") == at(data, "reference_bank").is_null()) {
    bad_text("reference_bank must be set exactly when guidance.preset is 'odds'");
  }
}
}  // namespace

void check_manifest_numbers(const json& data) {
  check_guidance_and_banks(data);
  const json& shape_json = at(data, "sample_shape");
  std::vector<int64_t> shape;
  if (!shape_json.is_array() || shape_json.empty()) bad("sample_shape", "a list of ints >= 1", shown(shape_json));
  int64_t elements = 1;  // bounded as Manifest::parse bounds it: every buffer and ORT shape is sized from it
  for (const auto& d : shape_json) {
    shape.push_back(int_in(d, "sample_shape", 1, INT32_MAX));
    elements *= shape.back();
    if (elements > INT32_MAX) bad("sample_shape", "dims whose product is at most 2^31-1", shown(shape_json));
  }
  const json path = at(data, "path").is_null() ? json("vp") : at(data, "path");
  if (path != "vp" && path != "flow") bad("path", "'vp' or 'flow'", shown(path));
  const bool flow = path == "flow";
  // Name the section, the field that is wrong: the path itself is a valid one.
  if (flow && !at(data, "flow").is_object()) bad("flow", "an object (the flow sampler's settings)", shown(at(data, "flow")));
  if (!flow && !at(data, "flow").is_null()) bad("flow", "null on path 'vp'", shown(at(data, "flow")));
  const json& sched = at(data, "scheduler");
  const int64_t n = at(sched, "alphas_cumprod").is_array() ? static_cast<int64_t>(at(sched, "alphas_cumprod").size()) : 0;
  const auto steps = json_integer_in(at(data, "num_inference_steps"), 1, std::max<int64_t>(n, 1));
  if (!steps) bad("num_inference_steps", "an int in 1.." + std::to_string(n) + " (the schedule's length)", shown(at(data, "num_inference_steps")));
  const json& scale = at(data, "guidance_scale");
  if (!scale.is_number() || !(std::abs(scale.get<double>()) <= kMaxGuidanceScale)) {
    bad("guidance_scale", "a finite number in -1000..1000", shown(scale));
  }
  if (flow) {
    check_flow(data, shape);
  } else {
    check_default_schedule(sched, *steps, n);
    check_vp_schedule(sched);
  }
  if (!at(at(data, "graphs"), "denoiser").is_object()) bad("graphs.denoiser", "an object (the denoiser graph)", "nothing");
  check_denoiser_spec(data, shape);
  if (flow) {
    check_flow_graphs(data, shape);
  } else {
    check_vp_graphs(data, shape);
  }
  check_safree(data);
  check_labels_and_banks(data);
}

void check_manifest_contract(const std::string& text) {
  if (json_nesting_exceeds(text, 64)) return;
  const json data = json::parse(text, nullptr, false);
  if (data.is_discarded() || at(data, "format") != kFormat || at(data, "format_version") != kFormatVersion) return;
  try {
    check_manifest_numbers(data);
  } catch (const json::exception& e) {
    throw Error(ErrorKind::bundle, std::string("manifest: invalid content: ") + e.what());
  }
}

}  // namespace sdcpp
