#include "requests.hpp"

#include <cmath>
#include <set>

#include "safe_denoiser_cpp/image.hpp"
#include "safe_denoiser_cpp/json_limits.hpp"

namespace sdcpp::cli {
namespace {
using nlohmann::json;

[[noreturn]] void bad(const std::string& field, const std::string& expected, const json& got) {
  std::string shown = got.dump();
  if (shown.size() > 60) shown = shown.substr(0, 57) + "...";
  throw Error(ErrorKind::input, field + ": expected " + expected + ", got " + shown);
}

int64_t integer(const json& v, const std::string& field, int64_t lo, int64_t hi) {
  if (!v.is_number_integer()) bad(field, "an integer", v);
  const auto i = json_integer_in(v, lo, hi);
  if (!i) bad(field, "an integer in " + std::to_string(lo) + ".." + std::to_string(hi), v);
  return *i;
}
// The parser's message quotes the bytes it last read: escape any that are not printable ASCII, so that an error
// about invalid UTF-8 is itself valid UTF-8 (a terminal, a log line, a JSON error body).
std::string escaped(const std::string& text) {
  static const char* hex = "0123456789abcdef";
  std::string out;
  for (const char c : text) {
    const auto b = static_cast<unsigned char>(c);
    if (b >= 0x20 && b < 0x7f) {
      out += c;
    } else {
      out += std::string("\\x") + hex[b >> 4] + hex[b & 15];
    }
  }
  return out;
}
}  // namespace

json parse_json_limited(std::string_view text, const std::string& what, int max_depth) {
  if (json_nesting_exceeds(text, max_depth)) {
    throw Error(ErrorKind::input, what + ": JSON nested deeper than " + std::to_string(max_depth) + " levels");
  }
  try {
    return json::parse(text);
  } catch (const json::exception& e) {
    throw Error(ErrorKind::input, what + ": not JSON (" + escaped(e.what()) + ")");
  }
}

bool safe_stem(const std::string& stem) {
  if (stem.empty() || stem.size() > 128 || stem[0] == '.') return false;
  for (const char c : stem) {
    if (!std::isalnum(static_cast<unsigned char>(c)) && c != '.' && c != '_' && c != '-') return false;
  }
  return true;
}

ParsedRequest parse_request(const json& body, const Manifest& m) {
  static const std::set<std::string> known = {"id", "class", "negative_class", "prompt", "negative_prompt",
                                              "seed", "item", "steps", "guidance", "sampler"};
  if (!body.is_object()) bad("request", "a JSON object", body);
  for (const auto& [key, value] : body.items()) {
    if (!known.count(key)) {
      throw Error(ErrorKind::input, "request: unknown field '" + key +
                                        "' (expected id, class, negative_class, prompt, negative_prompt, seed, item, steps, guidance, sampler)");
    }
  }
  ParsedRequest out;
  Request& r = out.request;
  const int64_t high = m.class_label_max();
  if (body.contains("class")) r.class_label = integer(body["class"], "class", 0, high);
  if (body.contains("negative_class")) r.negative_class = integer(body["negative_class"], "negative_class", 0, high);
  if (body.contains("prompt")) {
    if (!body["prompt"].is_string()) bad("prompt", "a string", body["prompt"]);
    r.prompt = body["prompt"].get<std::string>();
    if (r.prompt->size() > 16384) throw Error(ErrorKind::input, "prompt: longer than 16384 bytes");
  }
  if (body.contains("negative_prompt")) {
    if (!body["negative_prompt"].is_string()) bad("negative_prompt", "a string", body["negative_prompt"]);
    r.negative_prompt = body["negative_prompt"].get<std::string>();
    if (r.negative_prompt.size() > 16384) throw Error(ErrorKind::input, "negative_prompt: longer than 16384 bytes");
  }
  if (body.contains("seed")) {
    const auto& s = body["seed"];
    if (!s.is_number_integer() || (!s.is_number_unsigned() && s.get<int64_t>() < 0)) bad("seed", "an integer in 0..2^64-1", s);
    r.seed = s.get<uint64_t>();
  }
  if (body.contains("item")) r.item = static_cast<uint32_t>(integer(body["item"], "item", 0, 0xffffffffLL));
  const int64_t train = m.scheduler.num_train_timesteps();
  if (body.contains("steps")) out.steps = static_cast<int>(integer(body["steps"], "steps", 1, train));
  std::optional<Sampler> sampler;
  if (body.contains("sampler")) {
    if (!body["sampler"].is_string()) {
      bad("sampler", "\"ddim\" or \"ddpm\" (VP bundles), \"flow_euler\" (flow bundles)", body["sampler"]);
    }
    sampler = parse_sampler(body["sampler"].get<std::string>());
  }
  out.sampler = m.resolve_sampler(sampler);
  if (body.contains("guidance")) {
    const auto& g = body["guidance"];
    if (!g.is_number() || !(std::abs(g.get<double>()) <= kMaxGuidance)) bad("guidance", "a number in -1000..1000", g);
    r.guidance = g.get<double>();
  }
  if (body.contains("id")) {
    if (!body["id"].is_string() || !safe_stem(body["id"].get<std::string>())) {
      bad("id", "a file stem of letters, digits, '.', '_' or '-' (1..128 characters)", body["id"]);
    }
    out.id = body["id"].get<std::string>();
  }
  return out;
}

json correction(const Manifest& m) {
  return m.guidance ? json(guidance_preset_name(m.guidance->preset)) : json(nullptr);
}

std::vector<uint8_t> result_png(const Result& result) {
  const auto pixels = to_uint8(result.image.data(), result.image_c, result.image_h, result.image_w);
  return png_bytes(pixels.data(), result.image_h, result.image_w, result.image_c);
}

json make_record(const Runtime& runtime, const ParsedRequest& p, const Result& res, const std::string& provider,
                 double png_ms) {
  const Manifest& m = runtime.manifest();
  const Request& r = p.request;
  json rec = {
      {"runtime", "safe-denoiser-cpp"},
      {"onnxruntime", ort_version()},
      {"provider", provider},
      {"bundle", runtime.bundle_dir()},
      {"source", m.source},
      {"seed", r.seed},
      {"item", r.item},
      {"noise", r.noise.empty() ? "philox4x32-10 (seed, item)" : "explicit"},
      {"sampler", sampler_name(p.sampler)},
      {"steps", res.timesteps.size()},
      {"guidance_scale", r.guidance.value_or(m.guidance_scale)},
      {"timesteps", res.timesteps},
      {"correction", correction(m)},
      {"sld", m.has_sld},
      {"corrected_steps", res.corrected_steps},
      {"corrected_count", res.corrected_steps.size()},
      {"kernel_log_mass", res.kernel_log_mass},
      {"warnings", res.warnings},
      {"image", {{"height", res.image_h}, {"width", res.image_w}, {"channels", res.image_c}}},
      {"timings_ms",
       {{"load", runtime.load_ms()}, {"encode", res.timings.encode_ms}, {"denoise", res.timings.denoise_ms},
        {"decode", res.timings.decode_ms}, {"png", png_ms}}},
  };
  if (!p.id.empty()) rec["id"] = p.id;
  if (res.safree) rec["safree"] = {{"triggers", res.safree->triggers}, {"last_step", res.safree->last_step}};
  if (r.class_label) {
    rec["class"] = *r.class_label;
    rec["negative_class"] = r.negative_class.value_or(m.null_label());
  }
  if (r.prompt) {
    rec["prompt"] = *r.prompt;
    rec["negative_prompt"] = r.negative_prompt;
  }
  return rec;
}

}  // namespace sdcpp::cli
