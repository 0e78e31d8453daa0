// Checks on the sampler's state shared by the VP and flow loops (internal header).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <string>
#include <vector>

#include "safe_denoiser_cpp/errors.hpp"

namespace sdcpp {

// As safe_denoiser/runtime/bundle.py's _check_finite: a NaN or Inf sample after step `s` (0-based) of `steps` is an
// error naming the step, its timestep (as text) and the images, never a black image.
inline void check_finite(const std::vector<float>& x, size_t per_image, size_t s, size_t steps,
                         const std::string& timestep) {
  std::string images;
  for (size_t i = 0; i * per_image < x.size(); ++i) {
    const auto first = x.begin() + static_cast<std::ptrdiff_t>(i * per_image);
    if (!std::all_of(first, first + static_cast<std::ptrdiff_t>(per_image), [](float v) { return std::isfinite(v); })) {
      images += (images.empty() ? "" : ", ") + std::to_string(i);
    }
  }
  if (images.empty()) return;
  throw Error(ErrorKind::runtime, "step " + std::to_string(s + 1) + " of " + std::to_string(steps) + " (timestep " +
                                      timestep + ") made non-finite samples for image(s) [" + images +
                                      "]; check the guidance scale, the conditioning and the bank");
}

}  // namespace sdcpp
