// Images: [-1, 1] float (C, H, W) -> uint8 (H, W, C) as Bundle.to_uint8 rounds, and a deterministic PNG encoder
// (filter 0 rows, one IDAT, zlib level 6) whose bytes equal safe_denoiser.runtime.png.png_bytes.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace sdcpp {

std::vector<uint8_t> to_uint8(const float* chw, int64_t c, int64_t h, int64_t w);
// PNG bytes of an (h, w, c) uint8 image, c = 1 (grey), 3 (RGB) or 4 (RGBA).
std::vector<uint8_t> png_bytes(const uint8_t* hwc, int64_t h, int64_t w, int64_t c);

}  // namespace sdcpp
