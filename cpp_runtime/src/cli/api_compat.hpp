// The image APIs that existing clients speak, translated into the runtime's requests: OpenAI's
// POST /v1/images/generations and AUTOMATIC1111's POST /sdapi/v1/txt2img. Every field is either used, accepted
// only at the default value those clients always send, or refused with Error(input) naming it.
#pragma once

#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "requests.hpp"

namespace sdcpp::cli {

struct ImageSize {
  int64_t width = 0, height = 0;
};

// One API call: its images in answer order (same steps and sampler), and what the answer reports about them.
struct ImageCall {
  std::vector<ParsedRequest> items;
  nlohmann::json info;  // AUTOMATIC1111's info object (seeds resolved); empty for OpenAI
};

// OpenAI images API. n images of (seed, item 0..n-1): image i equals `generate --seed S --item i`.
ImageCall parse_openai(const nlohmann::json& body, const Runtime& runtime, ImageSize size, size_t max_images);
nlohmann::json answer_openai(const std::vector<std::string>& pngs);

// AUTOMATIC1111 txt2img. batch_size x n_iter images; image k has seed S + k, item 0 (A1111's all_seeds), so it
// equals `generate --seed S+k`; seed -1 draws a random 32-bit S.
ImageCall parse_a1111(const nlohmann::json& body, const Runtime& runtime, ImageSize size, size_t max_images);
// `corrected`: per image, the timesteps at which the correction fired (recorded in info).
nlohmann::json answer_a1111(const nlohmann::json& body, const ImageCall& call, const std::vector<std::string>& pngs,
                            const std::vector<nlohmann::json>& corrected);

std::string base64(const std::string& data);

}  // namespace sdcpp::cli
