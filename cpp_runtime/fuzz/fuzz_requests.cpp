// libFuzzer target: the request parsers (src/cli/requests.cpp) as batch lines and POST /generate bodies reach them:
// parse_json_limited, then parse_request against a class-label and a text-to-image manifest (data/).
// Contract: Error (or nlohmann's exception, which both callers map to a 4xx / exit 4), or a request whose fields
// are in the ranges the header promises.
#include <nlohmann/json.hpp>

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "../src/cli/requests.hpp"
#include "fuzz_common.hpp"
#include "safe_denoiser_cpp/errors.hpp"
#include "safe_denoiser_cpp/manifest.hpp"

namespace {
std::vector<sdcpp::Manifest>* manifests = nullptr;

void check(const sdcpp::cli::ParsedRequest& p, const sdcpp::Manifest& m) {
  const auto& r = p.request;
  if (p.steps < 0 || p.steps > m.scheduler.num_train_timesteps()) sdfuzz::violated("steps out of range");
  if (!p.id.empty() && !sdcpp::cli::safe_stem(p.id)) sdfuzz::violated("unsafe id accepted");
  if (r.class_label && (*r.class_label < 0 || *r.class_label > m.class_label_max())) sdfuzz::violated("class");
  if (r.guidance && !std::isfinite(*r.guidance)) sdfuzz::violated("non-finite guidance accepted");
  if ((p.sampler == sdcpp::Sampler::flow_euler) != m.flow.has_value()) sdfuzz::violated("sampler of the other path");
}
}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  static std::vector<sdcpp::Manifest> loaded;
  for (const char* name : {"manifest_class.json", "manifest_text.json"}) {
    loaded.push_back(sdcpp::Manifest::parse(sdfuzz::read_file(sdfuzz::data_path(name))));
  }
  manifests = &loaded;
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  nlohmann::json body;
  try {
    body = sdcpp::cli::parse_json_limited(sdfuzz::text(data, size), "request");
  } catch (const sdcpp::Error&) {
    return 0;
  }
  for (const auto& m : *manifests) {
    try {
      check(sdcpp::cli::parse_request(body, m), m);
    } catch (const sdcpp::Error&) {
    } catch (const nlohmann::json::exception&) {
    }
  }
  return 0;
}
