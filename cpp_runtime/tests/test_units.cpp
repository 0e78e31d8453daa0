// Unit tests that need no bundle: Philox known answers, noise statistics, timesteps, the DDIM update against a
// float64 recomputation, PNG structure and round trip, .npy I/O, atomic writes, the manifest (format version,
// guidance presets, errors naming the field), providers. SHA-256 and the bundle file check: test_integrity.cpp.
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zlib.h>

#include <cmath>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <optional>

#include "safe_denoiser_cpp/files.hpp"
#include "safe_denoiser_cpp/image.hpp"
#include "safe_denoiser_cpp/json_limits.hpp"
#include "safe_denoiser_cpp/noise.hpp"
#include "safe_denoiser_cpp/runtime.hpp"
#include "safe_denoiser_cpp/scheduler.hpp"
#include "safe_denoiser_cpp/tokenizer.hpp"
#include "../src/cli/requests.hpp"
#include "test_helpers.hpp"

using namespace sdcpp;
using sdcpp::testing::input_error;
using sdcpp::testing::nested;
using sdcpp::testing::temp_dir;

namespace {
SchedulerInfo linear_schedule(bool clip, bool clipped_eps) {
  SchedulerInfo m;
  for (int t = 0; t < 1000; ++t) {  // the linear beta schedule's abar
    const double beta = 1e-4 + (0.02 - 1e-4) * t / 999.0;
    m.alphas_cumprod.push_back((t ? m.alphas_cumprod.back() : 1.0) * (1 - beta));
  }
  m.final_alpha_cumprod = 1.0;
  m.ddim.clip_sample = clip;
  m.ddim.use_clipped_model_output = clipped_eps;
  return m;
}
}  // namespace

// Random123's published known-answer vectors (kat_vectors) for Philox4x32-10.
TEST(Philox, KnownAnswerVectors) {
  using A4 = std::array<uint32_t, 4>;
  EXPECT_EQ(philox4x32_10({0, 0, 0, 0}, {0, 0}), (A4{0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8}));
  EXPECT_EQ(philox4x32_10({0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff}, {0xffffffff, 0xffffffff}),
            (A4{0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd}));
  EXPECT_EQ(philox4x32_10({0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344}, {0xa4093822, 0x299f31d0}),
            (A4{0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1}));
}

TEST(Noise, StandardNormalMoments) {
  // n = 2^20 draws: mean within 5 / sqrt(n), variance within 5 sqrt(2 / n) of 1 (5-sigma bounds).
  const size_t n = size_t{1} << 20;
  std::vector<float> z(n);
  gaussian_noise(12345, 3, 0, z.data(), n);
  double sum = 0, sq = 0;
  for (const float v : z) {
    sum += v;
    sq += static_cast<double>(v) * v;
  }
  const double mean = sum / n, var = sq / n - mean * mean;
  EXPECT_LT(std::abs(mean), 5.0 / std::sqrt(static_cast<double>(n)));
  EXPECT_LT(std::abs(var - 1.0), 5.0 * std::sqrt(2.0 / n));
}

TEST(Noise, KeyedBySeedItemStreamAndPrefixStable) {
  std::vector<float> a(64), b(64), c(10);
  gaussian_noise(7, 0, 0, a.data(), a.size());
  gaussian_noise(7, 0, 0, c.data(), c.size());  // a shorter draw is a prefix: the batch does not matter
  for (size_t i = 0; i < c.size(); ++i) EXPECT_EQ(a[i], c[i]);
  for (const auto& [seed, item, stream] : {std::tuple{8ull, 0u, 0u}, {7ull, 1u, 0u}, {7ull, 0u, 1u}, {7ull + (1ull << 32), 0u, 0u}}) {
    gaussian_noise(seed, item, stream, b.data(), b.size());
    EXPECT_NE(a, b) << seed << " " << item << " " << stream;
  }
  // Box-Muller of the first block, recomputed here in float64.
  const auto r = philox4x32_10({0, 0, 0, 0}, {7, 0});
  const double u0 = (r[0] + 0.5) / 4294967296.0, u1 = (r[1] + 0.5) / 4294967296.0;
  EXPECT_EQ(a[0], static_cast<float>(std::sqrt(-2 * std::log(u0)) * std::cos(2 * M_PI * u1)));
  EXPECT_EQ(a[1], static_cast<float>(std::sqrt(-2 * std::log(u0)) * std::sin(2 * M_PI * u1)));
}

TEST(Schedule, SpacingsMatchDiffusersFormulas) {
  EXPECT_EQ(ddim_timesteps("leading", 1000, 1, 10), (std::vector<int64_t>{901, 801, 701, 601, 501, 401, 301, 201, 101, 1}));
  EXPECT_EQ(ddim_timesteps("trailing", 1000, 0, 10), (std::vector<int64_t>{999, 899, 799, 699, 599, 499, 399, 299, 199, 99}));
  EXPECT_EQ(ddim_timesteps("linspace", 1000, 0, 4), (std::vector<int64_t>{999, 666, 333, 0}));
  EXPECT_EQ(ddim_timesteps("trailing", 1000, 0, 3), (std::vector<int64_t>{999, 666, 332}));
  EXPECT_THROW(ddim_timesteps("leading", 1000, 0, 0), Error);
  EXPECT_THROW(ddim_timesteps("leading", 1000, 0, 1001), Error);
  EXPECT_THROW(ddim_timesteps("karras", 1000, 0, 10), Error);
}

TEST(Ddim, StepEqualsFloat64Recomputation) {
  // |float32 - float64| <= 8 ulp-scale bound: a handful of float32 roundings of values of size ~|x| + |eps|.
  for (const bool clip : {false, true}) {
    const SchedulerInfo m = linear_schedule(clip, clip);
    const size_t n = 4096;
    std::vector<float> x(n), eps(n), out(n);
    gaussian_noise(1, 0, 0, x.data(), n);
    gaussian_noise(1, 1, 0, eps.data(), n);
    for (const int64_t t : {999, 500, 20}) {
      ddim_step(m, eps.data(), t, x.data(), 50, out.data(), n);
      const double a = static_cast<float>(m.alphas_cumprod[t]);
      const double ap = static_cast<float>(t - 20 >= 0 ? m.alphas_cumprod[t - 20] : 1.0);
      for (size_t i = 0; i < n; ++i) {
        double e = eps[i], x0 = (x[i] - std::sqrt(1 - a) * e) / std::sqrt(a);
        if (clip) {
          x0 = std::min(1.0, std::max(-1.0, x0));
          e = (x[i] - std::sqrt(a) * x0) / std::sqrt(1 - a);
        }
        const double want = std::sqrt(ap) * x0 + std::sqrt(1 - ap) * e;
        const double scale = (std::abs(x[i]) + std::abs(eps[i])) / std::sqrt(a) + std::abs(e) + 1.0;
        ASSERT_NEAR(out[i], want, 8 * 1.2e-7 * scale / std::sqrt(1 - a)) << "t=" << t << " i=" << i;
      }
    }
  }
}

TEST(Ddpm, StepEqualsFloat64Recomputation) {
  // DDPMScheduler.step ("fixed_small") recomputed in float64 from the same float32 abar values; the bound is
  // tests/test_runtime_ddpm.py's first-order float32 rounding bound (u = 2^-24), doubled.
  const double u = std::ldexp(1.0, -24);
  for (const bool clip : {false, true}) {
    SchedulerInfo m = linear_schedule(false, false);
    m.ddpm = DdpmSettings{};
    m.ddpm->clip_sample = clip;
    const size_t n = 4096;
    std::vector<float> x(n), eps(n), z(n), out(n);
    gaussian_noise(2, 0, 0, x.data(), n);
    gaussian_noise(2, 1, 0, eps.data(), n);
    gaussian_noise(2, 2, 0, z.data(), n);
    for (const auto& [t, prev] : {std::pair<int64_t, int64_t>{999, 979}, {500, 250}, {20, 19}, {1, 0}, {3, -1},
                                  {0, -1}}) {
      ddpm_step(m, eps.data(), t, prev, x.data(), z.data(), out.data(), n);
      const double a = static_cast<float>(m.alphas_cumprod[t]);
      const double ap = prev >= 0 ? static_cast<float>(m.alphas_cumprod[prev]) : 1.0;
      const double beta = 1 - a / ap, c0 = std::sqrt(ap) * beta / (1 - a);
      const double cx = std::sqrt(a / ap) * (1 - ap) / (1 - a), var = (1 - ap) / (1 - a) * beta;
      const double sd = t > 0 ? std::sqrt(std::max(var, 1e-20)) : 0.0;
      const double d_sd = t == 0 ? 0.0 : (ap == 1.0 ? 3 * u * sd : (4 * u * var + (1 - ap) / (1 - a) * u) / (2 * sd) + 2 * u * sd);
      for (size_t i = 0; i < n; ++i) {
        const double raw = (x[i] - std::sqrt(1 - a) * eps[i]) / std::sqrt(a);
        const double x0 = clip ? std::min(1.0, std::max(-1.0, raw)) : raw;
        const double want = c0 * x0 + cx * x[i] + sd * z[i];
        const double mag = (std::abs(x[i]) + std::sqrt(1 - a) * std::abs(eps[i])) / std::sqrt(a);
        const double ax0 = clip ? std::min(1.0, mag) : mag;
        const double terms = c0 * ax0 + cx * std::abs(x[i]) + sd * std::abs(z[i]);
        const double bound = 2 * ((5 * u * c0 + std::sqrt(ap) / (1 - a) * u) * ax0 + c0 * 8 * u * mag +
                                  7 * u * cx * std::abs(x[i]) + d_sd * std::abs(z[i]) + 3 * u * terms);
        ASSERT_NEAR(out[i], want, bound) << "t=" << t << " i=" << i;
      }
    }
  }
  // t = 0 draws no noise (a null pointer is fine); t > 0 without noise, or a bundle without DDPM settings, is an error.
  SchedulerInfo m = linear_schedule(false, false);
  std::vector<float> v(4, 0.5f), out(4);
  EXPECT_THROW(ddpm_step(m, v.data(), 10, 9, v.data(), v.data(), out.data(), 4), Error);
  m.ddpm = DdpmSettings{};
  EXPECT_NO_THROW(ddpm_step(m, v.data(), 0, -1, v.data(), nullptr, out.data(), 4));
  EXPECT_THROW(ddpm_step(m, v.data(), 10, 9, v.data(), nullptr, out.data(), 4), Error);
  m.ddpm->variance_type = "learned";
  EXPECT_THROW(ddpm_timesteps(m, 10), Error);
  EXPECT_EQ(ddpm_stream(0), 0x80000000u);
  EXPECT_EQ(parse_sampler("ddpm"), Sampler::ddpm);
}

TEST(Sampler, NamesAndTheBundlesDefaultAndRefusals) {
  for (const auto sampler : {Sampler::ddim, Sampler::ddpm, Sampler::flow_euler}) {
    EXPECT_EQ(parse_sampler(sampler_name(sampler)), sampler);
  }
  EXPECT_EQ(parse_sampler("euler"), Sampler::flow_euler);
  EXPECT_THROW(parse_sampler("DDIM"), Error);
  Manifest vp, flow;
  flow.flow = FlowInfo{};
  EXPECT_EQ(vp.resolve_sampler(std::nullopt), Sampler::ddim);
  EXPECT_EQ(vp.resolve_sampler(Sampler::ddpm), Sampler::ddpm);
  EXPECT_EQ(flow.resolve_sampler(std::nullopt), Sampler::flow_euler);
  EXPECT_EQ(flow.resolve_sampler(Sampler::flow_euler), Sampler::flow_euler);
  const auto refused = [](const Manifest& m, Sampler sampler) {
    try {
      m.resolve_sampler(sampler, "--sampler");
    } catch (const Error& e) {
      const std::string what = e.what();
      EXPECT_EQ(e.kind(), ErrorKind::input);
      return what.rfind("--sampler: ", 0) == 0 && what.find(m.flow ? "flow_euler" : "ddim or ddpm") != std::string::npos;
    }
    return false;
  };
  EXPECT_TRUE(refused(flow, Sampler::ddim));
  EXPECT_TRUE(refused(flow, Sampler::ddpm));
  EXPECT_TRUE(refused(vp, Sampler::flow_euler));
}

TEST(Image, Uint8RoundsHalfToEvenAndClips) {
  const float v[] = {-1.0f, 1.0f, 2.0f, -3.0f, 0.0f, 1.0f / 255.0f};
  const auto u = to_uint8(v, 1, 1, 6);
  EXPECT_EQ(u, (std::vector<uint8_t>{0, 255, 255, 0, 128, 128}));  // 0.5 * 255 = 127.5 -> 128 (even)
}

TEST(Image, PngStructureAndRoundTrip) {
  std::vector<uint8_t> pixels(5 * 7 * 3);
  for (size_t i = 0; i < pixels.size(); ++i) pixels[i] = static_cast<uint8_t>(i * 37);
  const auto png = png_bytes(pixels.data(), 5, 7, 3);
  ASSERT_GT(png.size(), 8u + 25 + 12 + 12);
  EXPECT_EQ(std::string(png.begin() + 12, png.begin() + 16), "IHDR");
  const uint32_t idat_len = (png[33] << 24) | (png[34] << 16) | (png[35] << 8) | png[36];
  EXPECT_EQ(std::string(png.begin() + 37, png.begin() + 41), "IDAT");
  std::vector<uint8_t> raw(5 * (7 * 3 + 1));
  uLongf raw_len = raw.size();
  ASSERT_EQ(uncompress(raw.data(), &raw_len, png.data() + 41, idat_len), Z_OK);
  ASSERT_EQ(raw_len, raw.size());
  for (int y = 0; y < 5; ++y) {
    EXPECT_EQ(raw[y * 22], 0);
    for (int x = 0; x < 21; ++x) EXPECT_EQ(raw[y * 22 + 1 + x], pixels[y * 21 + x]);
  }
  EXPECT_EQ(std::string(png.end() - 8, png.end() - 4), "IEND");
  EXPECT_THROW(png_bytes(pixels.data(), 5, 7, 2), Error);
}

TEST(Files, NpyRoundTripAndErrors) {
  const std::string dir = temp_dir();
  const std::vector<float> v = {1.5f, -2.0f, 3.25f, 0.0f, 7.0f, 8.0f};
  atomic_write(dir + "/a.npy", npy_bytes_f32({1, 2, 3}, v.data()));
  const auto back = read_npy_f32(dir + "/a.npy");
  EXPECT_EQ(back.shape, (std::vector<int64_t>{1, 2, 3}));
  EXPECT_EQ(back.data, v);
  std::string f64 = npy_bytes_f32({6}, v.data());
  f64.replace(f64.find("<f4"), 3, "<f8");
  atomic_write(dir + "/b.npy", f64);
  try {
    read_npy_f32(dir + "/b.npy");
    FAIL() << "float64 accepted";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::input);
    EXPECT_NE(std::string(e.what()).find("float32"), std::string::npos);
  }
  atomic_write(dir + "/c.npy", std::string("not numpy"));
  EXPECT_THROW(read_npy_f32(dir + "/c.npy"), Error);
  std::string truncated = npy_bytes_f32({6}, v.data());
  truncated.resize(truncated.size() - 4);
  atomic_write(dir + "/d.npy", truncated);
  EXPECT_THROW(read_npy_f32(dir + "/d.npy"), Error);
}

TEST(Files, AtomicWriteLeavesNothingOnFailure) {
  const std::string dir = temp_dir();
  try {
    atomic_write(dir + "/missing/x.png", std::string("data"));
    FAIL() << "wrote into a missing folder";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::io);
  }
  atomic_write(dir + "/x.txt", std::string("one"));
  atomic_write(dir + "/x.txt", std::string("two"));
  EXPECT_EQ(read_file(dir + "/x.txt"), "two");
  std::system(("ls " + dir + " | grep -c tmp > " + dir + "/count || true").c_str());
  EXPECT_EQ(read_file(dir + "/count"), "0\n");
}

TEST(Manifest, RejectsWrongFormatVersionAndBadJson) {
  const auto kind_of = [](const std::string& text) {
    try {
      Manifest::parse(text);
    } catch (const Error& e) {
      return std::make_pair(e.kind(), std::string(e.what()));
    }
    return std::make_pair(ErrorKind::runtime, std::string("accepted"));
  };
  EXPECT_EQ(kind_of("{").first, ErrorKind::bundle);
  EXPECT_NE(kind_of(R"({"format": "other"})").second.find("format"), std::string::npos);
  // Exactly kFormatVersion (2: the guidance entry names its preset) is read; 1 (guidance.mode) and 3 are refused.
  for (const int version : {1, 3}) {
    const auto [kind, why] = kind_of(R"({"format": "safe-denoiser.bundle", "format_version": )" +
                                     std::to_string(version) + "}");
    EXPECT_EQ(kind, ErrorKind::bundle);
    EXPECT_NE(why.find("format_version " + std::to_string(version) + " is not supported"), std::string::npos) << why;
  }
  EXPECT_NE(kind_of(R"({"format": "safe-denoiser.bundle", "format_version": 2})").second.find("model_kind"),
            std::string::npos);
}

namespace {
// The smallest manifest Manifest::parse accepts, with `guidance` as given (null: correction off).
std::string manifest_with_guidance(const std::string& guidance) {
  return R"({"format": "safe-denoiser.bundle", "format_version": 2, "model_kind": "class-conditional",
    "source": "test", "sample_shape": [1, 2, 2], "num_inference_steps": 2, "guidance_scale": 1.0,
    "scheduler": {"alphas_cumprod": [0.9, 0.5], "sigmas": [0.33, 1.0], "final_alpha_cumprod": 1.0,
                  "ddim": {"timestep_spacing": "trailing", "clip_sample": true}},
    "graphs": {}, "guidance": )" + guidance + "}";
}

std::string parse_error(const std::string& text) {
  try {
    Manifest::parse(text);
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::bundle) << e.what();
    return e.what();
  }
  return "accepted";
}
}  // namespace

TEST(Manifest, ReadsTheGuidancePreset) {
  const Manifest off = Manifest::parse(manifest_with_guidance("null"));
  EXPECT_FALSE(off.guidance.has_value());
  EXPECT_FALSE(off.reference());
  EXPECT_EQ(off.scheduler.ddim.timestep_spacing, "trailing");
  EXPECT_TRUE(off.scheduler.ddim.clip_sample);
  EXPECT_FALSE(off.scheduler.ddpm.has_value());
  for (const auto preset : {GuidancePreset::constant, GuidancePreset::mass, GuidancePreset::odds,
                            GuidancePreset::reference, GuidancePreset::sgf, GuidancePreset::shielded}) {
    const std::string name = guidance_preset_name(preset);
    EXPECT_EQ(parse_guidance_preset(name), preset);
    // Fields the runtime does not use (the preset's strength) are left to the graph.
    const Manifest m = Manifest::parse(manifest_with_guidance(R"({"preset": ")" + name +
                                                              R"(", "window": [100, 900], "beta": 2.0})"));
    ASSERT_TRUE(m.guidance.has_value()) << name;
    EXPECT_EQ(m.guidance->preset, preset);
    EXPECT_EQ(m.guidance->window_lo, 100.0);
    EXPECT_EQ(m.guidance->window_hi, 900.0);
    EXPECT_FALSE(m.guidance->threshold.has_value());
    EXPECT_EQ(m.reference(), preset == GuidancePreset::reference) << name;
    EXPECT_EQ(m.has_preset(GuidancePreset::odds), preset == GuidancePreset::odds) << name;
  }
  const Manifest ref = Manifest::parse(
      manifest_with_guidance(R"({"preset": "reference", "window": [0, 1000], "threshold": 0.25})"));
  EXPECT_EQ(ref.guidance->threshold, 0.25);
}

TEST(Manifest, RefusesABadGuidanceEntryNamingTheField) {
  EXPECT_NE(parse_error(manifest_with_guidance(R"({"preset": "theorem", "window": [0, 1]})"))
                .find("guidance.preset must be 'constant', 'mass', 'odds', 'reference', 'sgf' or 'shielded', got "
                      "'theorem'"),
            std::string::npos);
  // The format before version 2: mode / beta_mode, no preset.
  EXPECT_NE(parse_error(manifest_with_guidance(R"({"mode": "theorem", "beta_mode": "odds", "window": [0, 1]})"))
                .find("guidance is missing the key 'preset'"),
            std::string::npos);
  EXPECT_NE(parse_error(manifest_with_guidance(R"({"preset": 3, "window": [0, 1]})"))
                .find("guidance.preset must be a string, got 3"),
            std::string::npos);
  EXPECT_NE(parse_error(manifest_with_guidance(R"({"preset": "mass", "window": [0]})")).find("guidance.window"),
            std::string::npos);
  try {
    parse_guidance_preset("Odds", "field");
    FAIL() << "accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("field must be"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("got 'Odds'"), std::string::npos) << e.what();
  }
}

TEST(Providers, NamesAndUnknown) {
  EXPECT_EQ(provider_name("cpu"), "CPUExecutionProvider");
  EXPECT_EQ(provider_name("CUDA"), "CUDAExecutionProvider");
  EXPECT_EQ(provider_name("trt"), "TensorrtExecutionProvider");
  try {
    provider_name("rocm");
    FAIL();
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::provider);
  }
  const auto available = available_providers();
  EXPECT_NE(std::find(available.begin(), available.end(), "CPUExecutionProvider"), available.end());
}

// ---- issue 26: bounded input, refused numbers, nothing written on failure ----------------------------------------

TEST(Requests, NumbersAndTextAreValidatedNotReinterpreted) {
  Manifest m = Manifest::parse(manifest_with_guidance("null"));
  m.num_class_labels = 11;
  const auto parse = [&](const std::string& text) { cli::parse_request(cli::parse_json_limited(text), m); };
  EXPECT_NE(input_error([&] { parse(R"({"seed": -1})"); }).find("seed: expected an integer in 0..2^64-1"), std::string::npos);
  EXPECT_NE(input_error([&] { parse(R"({"seed": 1.5})"); }).find("seed"), std::string::npos);
  EXPECT_NE(input_error([&] { parse(R"({"seed": 18446744073709551616})"); }).find("seed"), std::string::npos);
  for (const char* steps : {"0", "-5", "3", "2.0"}) {  // the schedule above has 2 training steps
    EXPECT_NE(input_error([&] { parse(std::string(R"({"steps": )") + steps + "}"); }).find("steps: expected"),
              std::string::npos) << steps;
  }
  for (const char* g : {"1e30", "-1001", "\"2\"", "1e400"}) {
    const std::string why = input_error([&] { parse(std::string(R"({"guidance": )") + g + "}"); });
    EXPECT_TRUE(why.find("guidance: expected a number in -1000..1000") != std::string::npos ||
                why.find("not JSON") != std::string::npos) << g << ": " << why;
  }
  EXPECT_EQ(cli::parse_request(cli::parse_json_limited(R"({"seed": 18446744073709551615, "guidance": -1000})"), m)
                .request.seed, UINT64_MAX);
  // Invalid UTF-8 never reaches the tokenizer: JSON text refuses it, and so does the runtime's request check.
  EXPECT_NE(input_error([&] { parse("{\"prompt\": \"a \xff cat\"}"); }).find("not JSON"), std::string::npos);
}

TEST(Manifest, RefusesSchedulesAndScalesThatMakeNaN) {
  const std::string good = manifest_with_guidance("null");
  const auto with = [&](const std::string& from, const std::string& to) {
    std::string text = good;
    text.replace(text.find(from), from.size(), to);
    return parse_error(text);
  };
  EXPECT_EQ(parse_error(good), "accepted");
  EXPECT_NE(with("[0.9, 0.5]", "[1.5, 0.5]").find("scheduler.alphas_cumprod[0] must lie in (0, 1], got 1.5"),
            std::string::npos);
  EXPECT_NE(with("[0.9, 0.5]", "[0.9, 0]").find("alphas_cumprod[1] must lie in (0, 1]"), std::string::npos);
  EXPECT_NE(with("[0.9, 0.5]", "[0.9, -0.5]").find("alphas_cumprod[1]"), std::string::npos);
  EXPECT_NE(with("\"final_alpha_cumprod\": 1.0", "\"final_alpha_cumprod\": 2.0").find("final_alpha_cumprod"),
            std::string::npos);
  EXPECT_NE(with("\"guidance_scale\": 1.0", "\"guidance_scale\": 1e30").find("guidance_scale must be a number in"),
            std::string::npos);
  EXPECT_NE(with("\"num_inference_steps\": 2", "\"num_inference_steps\": 0")
                .find("num_inference_steps must be an integer in 1..2147483647, got 0"),
            std::string::npos);
}

// Fuzz findings (fuzz/regressions/): get<int>() of 1e30 was undefined behaviour, sample_shape [0, 8, 8] was accepted
// and [2^32, 2^32, 4] overflowed sample_size(); the A1111 batch_size 0 passed a lo > 0 bound stored unsigned.
TEST(Manifest, IntegerFieldsAreExactAndBounded) {
  const std::string good = manifest_with_guidance("null");
  const auto with = [&](const std::string& from, const std::string& to) {
    std::string text = good;
    text.replace(text.find(from), from.size(), to);
    return parse_error(text);
  };
  const auto refused = [](const std::string& why, const std::string& needle) {
    EXPECT_NE(why.find(needle), std::string::npos) << why;
  };
  const std::string shape = "\"sample_shape\": [1, 2, 2]";
  for (const char* dims : {"[0, 8, 8]", "[-1, 2, 2]", "[1.5, 2, 2]", "[4294967296, 4294967296, 4]"}) {
    refused(with(shape, std::string("\"sample_shape\": ") + dims), "sample_shape[0] must be an integer in 1..2147483647");
  }
  refused(with(shape, "\"sample_shape\": [65536, 65536, 1]"), "sample_shape [65536,65536,1] has more than 2^31-1");
  refused(with(shape, "\"sample_shape\": [1, 2]"), "sample_shape must be (C, H, W): 3 integers, got [1,2]");
  for (const char* steps : {"1e30", "2.5", "-1"}) {
    refused(with("\"num_inference_steps\": 2", std::string("\"num_inference_steps\": ") + steps),
            "num_inference_steps must be an integer in 1..2147483647, got ");
  }
  refused(with("\"clip_sample\": true", "\"steps_offset\": 1e30"), "scheduler.ddim.steps_offset must be an integer");
  const std::string graphs = "\"graphs\": {}";
  refused(with(graphs, graphs + ", \"null_class\": 1e30"), "null_class must be an integer in 0..");
  refused(with(graphs, graphs + ", \"null_class\": 10, \"num_class_labels\": 5e19"),
          "num_class_labels must be an integer > null_class (10), got 5e+19");
  refused(with(graphs, graphs + ", \"reference_threshold_steps\": 1.5"), "reference_threshold_steps must be an integer");
  const std::string bank = ", \"bank\": {\"count\": 2, \"sample_shape\": [1, 2, 2], \"sha256\": \"x\"}";
  EXPECT_EQ(with(graphs, graphs + bank), "accepted");
  refused(with(graphs, graphs + std::string(bank).replace(bank.find("2,"), 1, "1e30")), "bank.count must be an integer");
  refused(with(graphs, graphs + std::string(bank).replace(bank.find("2]"), 1, "2.5")),
          "bank.sample_shape[2] must be an integer");
  refused(with(graphs, R"("graphs": {"denoiser": {"file": "d.onnx", "outputs": [],
                          "inputs": [{"name": "sample", "dtype": "float32", "shape": ["batch", 1e30]}]}})"),
          "graph 'denoiser' inputs 'sample' shape must be an integer in -1..2147483647, got 1e+30");
}

TEST(Files, OutputPathsAreCheckedAndGroupsWrittenWhole) {
  const std::string dir = temp_dir();
  const auto io_error = [](const std::string& path) {
    try {
      check_output_file(path, "--out");
    } catch (const Error& e) {
      EXPECT_EQ(e.kind(), ErrorKind::io);
      return std::string(e.what());
    }
    return std::string("accepted");
  };
  EXPECT_NE(io_error("").find("--out: expected a file path, got ''"), std::string::npos);
  EXPECT_NE(io_error(dir).find("is a folder"), std::string::npos);
  EXPECT_NE(io_error(dir + "/").find("expected a file path"), std::string::npos);
  EXPECT_NE(io_error(dir + "/..").find("expected a file path"), std::string::npos);
  EXPECT_NE(io_error(dir + "/missing/x.png").find("is not a writable folder"), std::string::npos);
  EXPECT_EQ(io_error(dir + "/x.png"), "accepted");
  // A folder in the way of the second file: neither the first nor any temporary is left.
  ::mkdir((dir + "/in_the_way").c_str(), 0700);
  ::mkdir((dir + "/in_the_way/child").c_str(), 0700);  // a non-empty folder cannot be renamed over
  EXPECT_THROW(atomic_write_all({{dir + "/a.json", "{}"}, {dir + "/in_the_way", "png"}}), Error);
  EXPECT_THROW(atomic_write_all({{dir + "/a.json", "{}"}, {dir + "/missing/b.png", "png"}}), Error);
  std::system(("ls " + dir + " > " + dir + "/../listing-" + std::to_string(getpid())).c_str());
  EXPECT_EQ(read_file(dir + "/../listing-" + std::to_string(getpid())), "in_the_way\n");
  atomic_write_all({{dir + "/a.json", "{}"}, {dir + "/b.png", "png"}});
  EXPECT_EQ(read_file(dir + "/a.json") + read_file(dir + "/b.png"), "{}png");
}
