// libFuzzer target: the image-API request parsers (src/cli/api_compat.cpp) as POST /v1/images/generations and
// /sdapi/v1/txt2img bodies reach them: parse_json_limited (requests.hpp), then parse_openai and parse_a1111 against
// a class-label and a text-to-image test bundle (they need a Runtime: the bundles come from
// scripts/make_test_bundles.py, SD_FUZZ_BUNDLES). Contract: Error (or nlohmann's exception, mapped to a 4xx), or
// 1..max_images requests whose fields are in range.
#include <nlohmann/json.hpp>

#include <cmath>
#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "../src/cli/api_compat.hpp"
#include "fuzz_common.hpp"
#include "safe_denoiser_cpp/errors.hpp"
#include "safe_denoiser_cpp/runtime.hpp"

#ifndef SD_FUZZ_BUNDLES
#error "SD_FUZZ_BUNDLES (scripts/make_test_bundles.py's output folder) must be defined by the build"
#endif

namespace {
constexpr size_t kMaxImages = 8;
struct Bundle {
  std::unique_ptr<sdcpp::Runtime> runtime;
  sdcpp::cli::ImageSize size;
};
std::vector<Bundle>* bundles = nullptr;

void check(const sdcpp::cli::ImageCall& call, const sdcpp::Manifest& m) {
  if (call.items.empty() || call.items.size() > kMaxImages) sdfuzz::violated("image count out of 1..max_images");
  for (const auto& p : call.items) {
    if (p.steps < 0 || p.steps > m.scheduler.num_train_timesteps()) sdfuzz::violated("steps out of range");
    if (p.request.guidance && !std::isfinite(*p.request.guidance)) sdfuzz::violated("non-finite guidance");
  }
}
}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  static std::vector<Bundle> opened;
  // The image sizes the server probes: pixel space for the class-label demo, 8x the latents for the tiny SD.
  for (const auto& [name, size] : {std::pair<const char*, sdcpp::cli::ImageSize>{"demo_theorem", {8, 8}},
                                   std::pair<const char*, sdcpp::cli::ImageSize>{"tiny_theorem", {64, 64}}}) {
    opened.push_back({sdcpp::Runtime::open(std::string(SD_FUZZ_BUNDLES) + "/" + name), size});
  }
  bundles = &opened;
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text = sdfuzz::text(data, size);
  nlohmann::json body;
  try {
    body = sdcpp::cli::parse_json_limited(text, "body");
  } catch (const sdcpp::Error&) {
    return 0;
  }
  for (const auto& b : *bundles) {
    for (const bool openai : {true, false}) {
      try {
        check(openai ? sdcpp::cli::parse_openai(body, *b.runtime, b.size, kMaxImages)
                     : sdcpp::cli::parse_a1111(body, *b.runtime, b.size, kMaxImages),
              b.runtime->manifest());
      } catch (const sdcpp::Error&) {
      } catch (const nlohmann::json::exception&) {
      }
    }
  }
  return 0;
}
