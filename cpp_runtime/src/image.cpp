#include "safe_denoiser_cpp/image.hpp"

#include <zlib.h>

#include <algorithm>
#include <cmath>

#include "safe_denoiser_cpp/errors.hpp"

namespace sdcpp {
namespace {
void put_u32(std::vector<uint8_t>& out, uint32_t v) {
  for (int s = 24; s >= 0; s -= 8) out.push_back(static_cast<uint8_t>(v >> s));
}

void put_chunk(std::vector<uint8_t>& out, const char* type, const std::vector<uint8_t>& data) {
  put_u32(out, static_cast<uint32_t>(data.size()));
  const size_t start = out.size();
  out.insert(out.end(), type, type + 4);
  out.insert(out.end(), data.begin(), data.end());
  const uLong crc = crc32(0L, out.data() + start, static_cast<uInt>(out.size() - start));
  put_u32(out, static_cast<uint32_t>(crc));
}
}  // namespace

std::vector<uint8_t> to_uint8(const float* chw, int64_t c, int64_t h, int64_t w) {
  std::vector<uint8_t> out(static_cast<size_t>(c * h * w));
  for (int64_t ch = 0; ch < c; ++ch) {
    for (int64_t i = 0; i < h * w; ++i) {
      // float32 throughout, as numpy: clip(x / 2 + 0.5, 0, 1) * 255, rounded half to even.
      float v = chw[ch * h * w + i] / 2.0f + 0.5f;
      v = std::min(std::max(v, 0.0f), 1.0f);
      out[static_cast<size_t>(i * c + ch)] = static_cast<uint8_t>(std::nearbyint(v * 255.0f));
    }
  }
  return out;
}

std::vector<uint8_t> png_bytes(const uint8_t* hwc, int64_t h, int64_t w, int64_t c) {
  static const uint8_t colour_type[] = {0, 0, 0, 2, 6};  // by channel count: grey, -, RGB, RGBA
  if (h <= 0 || w <= 0 || (c != 1 && c != 3 && c != 4)) {
    throw Error(ErrorKind::input, "png: image must be (h, w, c) with c in {1, 3, 4}, got c = " + std::to_string(c));
  }
  std::vector<uint8_t> raw;
  raw.reserve(static_cast<size_t>(h * (w * c + 1)));
  for (int64_t y = 0; y < h; ++y) {
    raw.push_back(0);  // filter type 0 (None)
    raw.insert(raw.end(), hwc + y * w * c, hwc + (y + 1) * w * c);
  }
  uLongf zlen = compressBound(static_cast<uLong>(raw.size()));
  std::vector<uint8_t> z(zlen);
  if (compress2(z.data(), &zlen, raw.data(), static_cast<uLong>(raw.size()), 6) != Z_OK) {
    throw Error(ErrorKind::runtime, "png: zlib compression failed");
  }
  z.resize(zlen);
  std::vector<uint8_t> out = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n'};
  std::vector<uint8_t> ihdr;
  put_u32(ihdr, static_cast<uint32_t>(w));
  put_u32(ihdr, static_cast<uint32_t>(h));
  ihdr.insert(ihdr.end(), {8, colour_type[c], 0, 0, 0});  // bit depth 8, deflate, filter method 0, no interlace
  put_chunk(out, "IHDR", ihdr);
  put_chunk(out, "IDAT", z);
  put_chunk(out, "IEND", {});
  return out;
}

}  // namespace sdcpp
