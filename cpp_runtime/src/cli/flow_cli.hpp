// Flow bundles in the program: `info`'s summary of what a bundle needs and has, and `schedule --flow`, the
// FlowMatch Euler schedule of a manifest's flow section (tests/test_cpp_flow.py compares it with flow_sampler.py).
#pragma once

#include <nlohmann/json.hpp>
#include <string>

#include "safe_denoiser_cpp/manifest.hpp"

namespace sdcpp::cli {

// `info`'s "path", "graphs", "tokenizers" and "flow" (the family and sampler settings; null on the VP path).
nlohmann::json bundle_needs(const Manifest& manifest);

// `flow_json`: a JSON file holding a manifest's flow section (or a whole manifest.json) -> {"timesteps": [...],
// "sigmas": [...]}, each float32 value printed as the shortest decimal that reads back to it.
nlohmann::json flow_schedule_json(const std::string& flow_json, int steps);

}  // namespace sdcpp::cli
