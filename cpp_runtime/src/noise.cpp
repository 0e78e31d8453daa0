#include "safe_denoiser_cpp/noise.hpp"

#include <cmath>

namespace sdcpp {
namespace {
constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;  // Philox 4x32 multipliers
constexpr uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;  // Weyl key increments
constexpr double kTwoPi = 6.283185307179586;               // float64(2 * pi), as numpy's 2 * np.pi

void mulhilo(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
  const uint64_t p = static_cast<uint64_t>(a) * b;
  hi = static_cast<uint32_t>(p >> 32);
  lo = static_cast<uint32_t>(p);
}

double uniform_open(uint32_t r) { return (static_cast<double>(r) + 0.5) * 0x1p-32; }  // in (0, 1), exact
}  // namespace

std::array<uint32_t, 4> philox4x32_10(std::array<uint32_t, 4> c, std::array<uint32_t, 2> k) {
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, lo0, hi1, lo1;
    mulhilo(kM0, c[0], hi0, lo0);
    mulhilo(kM1, c[2], hi1, lo1);
    c = {hi1 ^ c[1] ^ k[0], lo1, hi0 ^ c[3] ^ k[1], lo0};
    k = {k[0] + kW0, k[1] + kW1};
  }
  return c;
}

void gaussian_noise(uint64_t seed, uint32_t item, uint32_t stream, float* out, size_t n) {
  const std::array<uint32_t, 2> key = {static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32)};
  for (size_t j = 0; 4 * j < n; ++j) {
    const auto r = philox4x32_10({static_cast<uint32_t>(j), item, stream, 0u}, key);
    double z[4];
    for (int pair = 0; pair < 2; ++pair) {
      // Separate calls (not sincos): the same libm entry points as Python's math.log / math.cos / math.sin.
      const double radius = std::sqrt(-2.0 * std::log(uniform_open(r[2 * pair])));
      const double theta = kTwoPi * uniform_open(r[2 * pair + 1]);
      z[2 * pair] = radius * std::cos(theta);
      z[2 * pair + 1] = radius * std::sin(theta);
    }
    for (size_t lane = 0; lane < 4 && 4 * j + lane < n; ++lane) out[4 * j + lane] = static_cast<float>(z[lane]);
  }
}

}  // namespace sdcpp
