// Portable counter-based Gaussian noise: Philox 4x32-10 + Box-Muller, keyed by (seed, item, stream).
// safe_denoiser/runtime/noise.py computes the same bits in numpy, so Python and C++ draw the same noise for the same seed.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>

namespace sdcpp {

// Stream 0 is the initial noise; stream s + 1 is the reference preset's re-noise at step index s; stream
// 2^31 + s the DDPM sampler's variance noise at step index s (steps stay below 2^31 - 1: the streams never meet).
inline constexpr uint32_t kInitialNoiseStream = 0;
inline constexpr uint32_t kDdpmStreamBase = 0x80000000u;
inline constexpr uint32_t ddpm_stream(uint32_t step_index) { return kDdpmStreamBase + step_index; }

// One Philox 4x32 block with 10 rounds (Salmon et al., SC'11).
std::array<uint32_t, 4> philox4x32_10(std::array<uint32_t, 4> counter, std::array<uint32_t, 2> key);

// n standard normal float32 values: block j has counter (j, item, stream, 0) and key (seed low, seed high);
// its words (r0, r1, r2, r3) give two Box-Muller pairs computed in float64, then rounded to float32.
void gaussian_noise(uint64_t seed, uint32_t item, uint32_t stream, float* out, size_t n);

}  // namespace sdcpp
