#include "api_compat.hpp"

#include <algorithm>
#include <cctype>
#include <climits>
#include <mutex>
#include <ctime>
#include <map>
#include <random>
#include <set>

#include <openssl/evp.h>

#include "safe_denoiser_cpp/json_limits.hpp"

namespace sdcpp::cli {
namespace {
using nlohmann::json;

[[noreturn]] void bad(const std::string& field, const std::string& message) {
  throw Error(ErrorKind::input, field + ": " + message);
}

std::string shown(const json& v) {
  std::string s = v.dump(-1, ' ', false, json::error_handler_t::replace);
  return s.size() > 60 ? s.substr(0, 57) + "..." : s;
}

std::string text(const json& body, const char* field, const std::string& fallback) {
  if (!body.contains(field) || body[field].is_null()) return fallback;
  if (!body[field].is_string()) bad(field, "expected a string, got " + shown(body[field]));
  return body[field].get<std::string>();
}

int64_t integer(const json& body, const char* field, int64_t lo, int64_t hi, int64_t fallback) {
  if (!body.contains(field) || body[field].is_null()) return fallback;
  const json& v = body[field];
  const auto i = json_integer_in(v, lo, hi);
  if (!i) bad(field, "expected an integer in " + std::to_string(lo) + ".." + std::to_string(hi) + ", got " + shown(v));
  return *i;
}

// A class label written as a prompt ("3"): class-conditional bundles take their labels through the text fields.
std::optional<int64_t> label(const std::string& value, const char* field, int64_t max_label) {
  std::string t = value;
  t.erase(0, t.find_first_not_of(" \t"));
  t.erase(t.find_last_not_of(" \t") + 1);
  if (t.empty()) return std::nullopt;
  const bool digits = t.size() <= 6 && std::all_of(t.begin(), t.end(), [](unsigned char c) { return std::isdigit(c); });
  if (!digits || std::stoll(t) > max_label) {
    bad(field, "this bundle is class-conditional: expected a class label 0.." + std::to_string(max_label) +
                   " written as text (e.g. \"3\"), got " + shown(value));
  }
  return std::stoll(t);
}

// The conditioning keys of a /generate request from a prompt pair.
json conditioning(const Manifest& m, const std::string& prompt, const std::string& negative, const char* prompt_field,
                  const char* negative_field) {
  if (m.model_kind != "class-conditional") return {{"prompt", prompt}, {"negative_prompt", negative}};
  json out;
  const auto cls = label(prompt, prompt_field, m.class_label_max());
  if (!cls) bad(prompt_field, "this bundle is class-conditional: send a class label as the prompt (e.g. \"3\")");
  out["class"] = *cls;
  if (const auto neg = label(negative, negative_field, m.class_label_max())) out["negative_class"] = *neg;
  return out;
}

ParsedRequest item(const Runtime& runtime, const json& fields) {
  ParsedRequest p = parse_request(fields, runtime.manifest());
  runtime.validate(p.request);
  return p;
}

void check_size(const json& body, const char* field, int64_t want, const char* what) {
  if (body.contains(field) && !body[field].is_null() && integer(body, field, 1, 1 << 20, 0) != want) {
    bad(field, std::string("expected ") + std::to_string(want) + " (the bundle's image " + what + "), got " +
                   shown(body[field]));
  }
}

void check_openai_fields(const json& body, ImageSize size) {
  static const std::set<std::string> known = {"prompt", "model", "n", "size", "response_format", "user",
                                              "seed", "negative_prompt", "steps", "guidance_scale", "sampler"};
  for (const auto& [key, value] : body.items()) {
    if (!known.count(key)) {
      throw Error(ErrorKind::input, "unsupported field '" + key +
                                        "' (this server takes prompt, n, size, response_format, model, user and the "
                                        "extra fields seed, negative_prompt, steps, guidance_scale, sampler)");
    }
  }
  if (!body.contains("prompt") || !body["prompt"].is_string()) bad("prompt", "required, a string");
  text(body, "model", "");  // any model name is accepted: the server runs its one bundle
  text(body, "user", "");
  const std::string format = text(body, "response_format", "b64_json");
  if (format == "url") bad("response_format", "\"url\" is not supported (the server keeps no files): use \"b64_json\"");
  if (format != "b64_json") bad("response_format", "expected \"b64_json\", got " + shown(format));
  const std::string want = std::to_string(size.width) + "x" + std::to_string(size.height);
  const std::string got = text(body, "size", want);
  if (got != want && got != "auto") bad("size", "expected \"" + want + "\" (the bundle's image size) or \"auto\", got " + shown(got));
}

std::string lower_case(std::string name) {
  for (auto& c : name) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return name;
}

// A flow bundle (SD3, Flux) samples with the FlowMatch Euler sampler only: the OpenAI extra field `sampler` must name
// it ("flow_euler", what records say, or "euler"); the runtime's default sampler is then that one.
void check_flow_sampler(const json& value) {
  const std::string name = value.is_string() ? lower_case(value.get<std::string>()) : "";
  if (name != "flow_euler" && name != "euler") {
    bad("sampler", "this flow bundle (SD3, Flux) samples with the FlowMatch Euler sampler: expected \"flow_euler\" "
                   "(or \"euler\"), got " + shown(value));
  }
}
}  // namespace

ImageCall parse_openai(const json& body, const Runtime& runtime, ImageSize size, size_t max_images) {
  if (!body.is_object()) bad("body", "expected a JSON object");
  check_openai_fields(body, size);
  const int64_t n = integer(body, "n", 1, static_cast<int64_t>(std::min<size_t>(10, max_images)), 1);
  json fields = conditioning(runtime.manifest(), body["prompt"].get<std::string>(), text(body, "negative_prompt", ""),
                             "prompt", "negative_prompt");
  if (body.contains("seed")) fields["seed"] = body["seed"];
  if (body.contains("steps")) fields["steps"] = body["steps"];
  if (body.contains("guidance_scale")) fields["guidance"] = body["guidance_scale"];
  if (body.contains("sampler") && runtime.manifest().flow) check_flow_sampler(body["sampler"]);
  if (body.contains("sampler") && !runtime.manifest().flow) fields["sampler"] = body["sampler"];
  ImageCall call;
  for (int64_t i = 0; i < n; ++i) {
    fields["item"] = i;
    try {
      call.items.push_back(item(runtime, fields));
    } catch (const Error& e) {  // parse_request names the /generate key: say which API field it came from
      const std::string m = e.what();
      throw Error(e.kind(), m.rfind("guidance:", 0) == 0 ? "guidance_scale" + m.substr(8) : m);
    }
  }
  return call;
}

json answer_openai(const std::vector<std::string>& pngs) {
  json data = json::array();
  for (const auto& png : pngs) data.push_back({{"b64_json", base64(png)}});
  return {{"created", static_cast<int64_t>(std::time(nullptr))}, {"data", data}};
}

namespace {
// Fields that AUTOMATIC1111 clients (webuiapi) always send: accepted only at these values (or null: unset).
const std::map<std::string, std::vector<json>>& a1111_defaults() {
  static const std::map<std::string, std::vector<json>> d = {
      {"enable_hr", {false}}, {"denoising_strength", {0.7}}, {"firstphase_width", {0}}, {"firstphase_height", {0}},
      {"hr_scale", {2}}, {"hr_upscaler", {"Latent"}}, {"hr_second_pass_steps", {0}}, {"hr_resize_x", {0}},
      {"hr_resize_y", {0}}, {"hr_checkpoint_name", {}}, {"hr_sampler_name", {}}, {"hr_scheduler", {}},
      {"hr_prompt", {""}}, {"hr_negative_prompt", {""}}, {"styles", {json::array()}}, {"subseed", {-1}},
      {"subseed_strength", {0}}, {"seed_resize_from_h", {0, -1}}, {"seed_resize_from_w", {0, -1}},
      {"restore_faces", {false}}, {"tiling", {false}}, {"do_not_save_samples", {false}},
      {"do_not_save_grid", {false}}, {"s_churn", {0}}, {"s_tmax", {0}}, {"s_tmin", {0}}, {"s_noise", {1}},
      {"override_settings", {json::object()}}, {"override_settings_restore_afterwards", {true}},
      {"scheduler", {"automatic"}}, {"script_name", {}}, {"script_args", {json::array()}},
      {"send_images", {true}}, {"save_images", {false}}, {"alwayson_scripts", {json::object()}}};
  return d;
}

void check_a1111_fields(const json& body) {
  static const std::set<std::string> used = {"prompt", "negative_prompt", "seed", "steps", "cfg_scale", "batch_size",
                                             "n_iter", "width", "height", "sampler_name", "sampler_index", "eta"};
  const auto& defaults = a1111_defaults();
  for (const auto& [key, value] : body.items()) {
    if (used.count(key)) continue;
    const auto it = defaults.find(key);
    if (it == defaults.end()) {
      throw Error(ErrorKind::input, "unsupported field '" + key + "' (see docs/cpp_runtime.md for the txt2img fields)");
    }
    const bool at_default = value.is_null() || std::find(it->second.begin(), it->second.end(), value) != it->second.end();
    if (!at_default) {
      bad(key, "not supported; accepted only at its default " +
                   (it->second.empty() ? std::string("null") : shown(it->second.front())) + ", got " + shown(value));
    }
  }
}

// sampler_name (else the deprecated sampler_index, as A1111 reads them): VP bundles "DDIM" or "DDPM", eta must match
// it; flow bundles (SD3, Flux) "Euler" (the FlowMatch Euler sampler; absent means it too), eta a number or null and
// unused (A1111's Euler ignores eta; webuiapi always sends one).
std::string a1111_sampler(const json& body, bool flow) {
  std::string name = text(body, "sampler_name", "");
  const char* field = "sampler_name";
  if (name.empty()) {
    name = text(body, "sampler_index", flow ? "Euler" : "DDIM");
    field = "sampler_index";
  }
  const std::string lower = lower_case(name);
  if (flow) {
    if (lower != "euler") {
      bad(field, "this flow bundle (SD3, Flux) samples with the FlowMatch Euler sampler: expected \"Euler\", got " +
                     shown(name));
    }
    if (body.contains("eta") && !body["eta"].is_null() && !body["eta"].is_number()) {
      bad("eta", "expected a number or null (unused by Euler), got " + shown(body["eta"]));
    }
    return lower;
  }
  if (lower != "ddim" && lower != "ddpm") bad(field, "expected \"DDIM\" or \"DDPM\" (the bundle's samplers), got " + shown(name));
  if (body.contains("eta") && !body["eta"].is_null()) {
    const json& eta = body["eta"];
    const double want = lower == "ddim" ? 0.0 : 1.0;  // deterministic DDIM; DDPM is DDIM with eta 1
    if (!eta.is_number() || eta.get<double>() != want) {
      bad("eta", "with sampler " + name + " only " + shown(want) + " is supported, got " + shown(eta));
    }
  }
  return lower;
}

uint64_t a1111_seed(const json& body, size_t count) {
  if (!body.contains("seed") || body["seed"].is_null() || body["seed"] == -1) {
    static std::mutex mutex;
    static std::mt19937 rng{std::random_device{}()};
    std::lock_guard<std::mutex> lock(mutex);
    return rng();  // A1111 draws a 32-bit seed for -1
  }
  const json& s = body["seed"];
  if (!s.is_number_unsigned() || s.get<uint64_t>() > UINT64_MAX - count) {
    bad("seed", "expected -1 (random) or an integer in 0..2^64-" + std::to_string(count) + ", got " + shown(s));
  }
  return s.get<uint64_t>();
}
}  // namespace

ImageCall parse_a1111(const json& body, const Runtime& runtime, ImageSize size, size_t max_images) {
  if (!body.is_object()) bad("body", "expected a JSON object");
  check_a1111_fields(body);
  const Manifest& m = runtime.manifest();
  const std::string prompt = text(body, "prompt", ""), negative = text(body, "negative_prompt", "");
  const auto most = static_cast<int64_t>(max_images);
  const int64_t batch = integer(body, "batch_size", 1, most, 1), iters = integer(body, "n_iter", 1, most, 1);
  if (batch * iters > most) bad("batch_size", "batch_size x n_iter must be at most " + std::to_string(most));
  check_size(body, "width", size.width, "width");
  check_size(body, "height", size.height, "height");
  const std::string sampler = a1111_sampler(body, m.flow.has_value());
  const uint64_t seed = a1111_seed(body, static_cast<size_t>(batch * iters));
  json fields = conditioning(m, prompt, negative, "prompt", "negative_prompt");
  fields["sampler"] = sampler;  // "ddim", "ddpm", or "euler" (flow_euler) on a flow bundle
  if (body.contains("steps") && !body["steps"].is_null()) fields["steps"] = body["steps"];
  if (body.contains("cfg_scale") && !body["cfg_scale"].is_null()) fields["guidance"] = body["cfg_scale"];
  ImageCall call;
  json seeds = json::array();
  for (int64_t k = 0; k < batch * iters; ++k) {
    fields["seed"] = seed + static_cast<uint64_t>(k);
    try {
      call.items.push_back(item(runtime, fields));
    } catch (const Error& e) {
      const std::string msg = e.what();
      throw Error(e.kind(), msg.rfind("guidance:", 0) == 0 ? "cfg_scale" + msg.substr(8) : msg);
    }
    seeds.push_back(seed + static_cast<uint64_t>(k));
  }
  const ParsedRequest& first = call.items.front();
  call.info = {{"prompt", prompt}, {"all_prompts", json::array()}, {"negative_prompt", negative},
               {"seed", seed}, {"all_seeds", seeds}, {"subseed", -1}, {"subseed_strength", 0},
               {"steps", first.steps ? first.steps : m.num_inference_steps},
               {"cfg_scale", first.request.guidance.value_or(m.guidance_scale)}, {"width", size.width},
               {"height", size.height}, {"sampler_name", m.flow ? "Euler" : sampler == "ddim" ? "DDIM" : "DDPM"},
               {"batch_size", batch}, {"n_iter", iters}, {"correction", correction(m)}};
  for (int64_t k = 0; k < batch * iters; ++k) call.info["all_prompts"].push_back(prompt);
  return call;
}

json answer_a1111(const json& body, const ImageCall& call, const std::vector<std::string>& pngs,
                  const std::vector<json>& corrected) {
  json images = json::array();
  for (const auto& png : pngs) images.push_back(base64(png));
  json info = call.info;
  info["corrected_steps"] = corrected;
  return {{"images", images}, {"parameters", body}, {"info", info.dump(-1, ' ', false, json::error_handler_t::replace)}};
}

std::string base64(const std::string& data) {
  // OpenSSL's encoder (already linked for sha256 and the key comparison): standard alphabet, padded, no newlines.
  std::string out(4 * ((data.size() + 2) / 3) + 1, '\0');
  const int n = EVP_EncodeBlock(reinterpret_cast<unsigned char*>(out.data()),
                                reinterpret_cast<const unsigned char*>(data.data()), static_cast<int>(data.size()));
  out.resize(static_cast<size_t>(n));
  return out;
}

}  // namespace sdcpp::cli
