// JSON requests (batch lines, POST /generate bodies) -> Request, and the JSON record written with every image.
#pragma once

#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>
#include <vector>

#include "safe_denoiser_cpp/runtime.hpp"

namespace sdcpp::cli {

struct ParsedRequest {
  Request request;
  int steps = 0;   // 0: the manifest's default
  Sampler sampler = Sampler::ddim;  // resolved for the bundle (Manifest::resolve_sampler) by whoever fills this in
  std::string id;  // batch mode: output file stem
};

// Deepest nesting of arrays and objects a request may have (requests are flat: 2 levels suffice).
constexpr int kMaxJsonDepth = 64;
// JSON text -> value for every request path (batch lines, server bodies). A linear pre-scan refuses nesting deeper
// than max_depth before nlohmann's recursive parser sees it (100,000 levels overflowed the stack). Error(input):
// "<what>: JSON nested deeper than <max_depth> levels" or "<what>: not JSON (<parser message>)".
nlohmann::json parse_json_limited(std::string_view text, const std::string& what = "request",
                                  int max_depth = kMaxJsonDepth);

// Validate keys and types; Error(input) naming the field and the expected form.
ParsedRequest parse_request(const nlohmann::json& body, const Manifest& manifest);
nlohmann::json make_record(const Runtime& runtime, const ParsedRequest& request, const Result& result,
                           const std::string& provider, double png_ms);
// The record's and `info`'s "correction": the guidance preset's name, null when the bundle has no correction.
nlohmann::json correction(const Manifest& manifest);
// PNG bytes of a result's decoded image.
std::vector<uint8_t> result_png(const Result& result);
// "<stem>.png" under `dir` is safe: [A-Za-z0-9._-], 1..128 characters, no leading dot.
bool safe_stem(const std::string& stem);

}  // namespace sdcpp::cli
