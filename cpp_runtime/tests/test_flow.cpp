// Flow matching (SD3, Flux): the flow section, the FlowMatch Euler schedule (its values for the test bundles'
// settings come from safe_denoiser.runtime.flow_sampler; tests/test_cpp_flow.py compares many more bit for bit), the
// Euler step, and a short generate on the tiny SD3 and Flux test bundles (when SD_TEST_BUNDLES has them).
#include <gtest/gtest.h>
#include <sys/stat.h>

#include <cmath>
#include <nlohmann/json.hpp>

#include "safe_denoiser_cpp/flow_sampler.hpp"
#include "safe_denoiser_cpp/runtime.hpp"
#include "safe_denoiser_cpp/tokenizer.hpp"

using namespace sdcpp;
using nlohmann::json;

namespace {
json sd3_section() {
  return {{"family", "sd3"},          {"num_train_timesteps", 1000},    {"shift", 3.0},
          {"use_dynamic_shifting", false}, {"time_shift_type", "exponential"}, {"base_shift", 0.5},
          {"max_shift", 1.15},        {"base_image_seq_len", 256},      {"max_image_seq_len", 4096},
          {"sigma_min", 0.002994012087583542}, {"sigma_max", 1.0},      {"pipeline_sigmas", nullptr}};
}

json flux_section() {
  json f = sd3_section();
  f["family"] = "flux";
  f["use_dynamic_shifting"] = true;
  f["sigma_min"] = 0.0010000000474974513;
  f["pipeline_sigmas"] = "linspace";
  f["image_seq_len"] = 16;
  f["mu"] = 0.459375;
  return f;
}

std::string parse_error(const json& section) {
  try {
    FlowInfo::parse(section);
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::bundle);
    return e.what();
  }
  return "";
}
}  // namespace

TEST(FlowSchedule, EqualsPythonOnTheTestBundlesSettings) {
  // flow_schedule(manifest.flow, 4) of tiny_sd3 (static shift 3) and tiny_flux (linspace, mu 0.459375), from numpy
  const auto sd3 = flow_schedule(FlowInfo::parse(sd3_section()), 4);
  EXPECT_EQ(sd3.timesteps, (std::vector<float>{1000.0f, 857.6923217773438f, 602.1505737304688f, 8.928571701049805f}));
  EXPECT_EQ(sd3.sigmas, (std::vector<float>{1.0f, 0.857692301273346f, 0.602150559425354f, 0.008928571827709675f, 0.0f}));
  const auto flux = flow_schedule(FlowInfo::parse(flux_section()), 4);
  EXPECT_EQ(flux.timesteps, (std::vector<float>{1000.0f, 826.0643310546875f, 612.8659057617188f, 345.4189758300781f}));
  EXPECT_EQ(flux.sigmas, (std::vector<float>{1.0f, 0.8260643482208252f, 0.6128659248352051f, 0.3454189896583557f, 0.0f}));
}

TEST(FlowSchedule, ShapesAndMuFromTheTokenCount) {
  json f = flux_section();
  f.erase("mu");  // calculate_shift(image_seq_len) instead: the same mu as recorded
  const FlowInfo info = FlowInfo::parse(f);
  EXPECT_DOUBLE_EQ(calculate_shift(16, info), 0.459375);
  EXPECT_EQ(flow_schedule(info, 4).sigmas, flow_schedule(FlowInfo::parse(flux_section()), 4).sigmas);
  for (const int steps : {1, 2, 7, 50, 1000}) {
    for (const auto& section : {sd3_section(), flux_section()}) {
      const auto s = flow_schedule(FlowInfo::parse(section), steps);
      ASSERT_EQ(s.timesteps.size(), static_cast<size_t>(steps));
      ASSERT_EQ(s.sigmas.size(), static_cast<size_t>(steps) + 1);
      EXPECT_EQ(s.sigmas.back(), 0.0f);
      EXPECT_EQ(s.sigmas.front(), 1.0f);  // sigma_max 1 and linspace's 1 are fixed points of every shift
      for (size_t i = 0; i + 1 < s.sigmas.size(); ++i) EXPECT_GT(s.sigmas[i], s.sigmas[i + 1]) << steps << " " << i;
    }
  }
  EXPECT_THROW(flow_schedule(info, 0), Error);
}

TEST(FlowSchedule, EulerStepIsFloat32DifferenceFirst) {
  std::vector<float> x = {1.0f, -2.0f, 0.5f}, v = {0.25f, 3.0f, -1.0f}, out(3);
  const float sigma = 0.857692301273346f, next = 0.602150559425354f;
  flow_euler_step(v.data(), x.data(), sigma, next, out.data(), x.size());
  const float dt = next - sigma;
  for (size_t i = 0; i < x.size(); ++i) EXPECT_EQ(out[i], x[i] + dt * v[i]);
  flow_euler_step(v.data(), x.data(), sigma, next, x.data(), x.size());  // in place
  EXPECT_EQ(x, out);
}

TEST(FlowInfoParse, NamesTheField) {
  json f = sd3_section();
  f["family"] = "sdxl";
  EXPECT_NE(parse_error(f).find("flow.family must be 'sd3' or 'flux'"), std::string::npos);
  f = sd3_section();
  f["num_train_timesteps"] = 1e30;
  EXPECT_NE(parse_error(f).find("flow.num_train_timesteps must be an integer"), std::string::npos);
  f = sd3_section();
  f["shift"] = "3";
  EXPECT_NE(parse_error(f).find("flow.shift must be a finite number"), std::string::npos);
  f = sd3_section();
  f.erase("pipeline_sigmas");
  EXPECT_NE(parse_error(f).find("flow is missing the key 'pipeline_sigmas'"), std::string::npos);
  f = flux_section();
  f.erase("mu");
  f.erase("image_seq_len");
  EXPECT_NE(parse_error(f).find("flow.mu must be a number, or image_seq_len given"), std::string::npos);
  f = sd3_section();
  f["sigma_min"] = 0.0;
  EXPECT_NE(parse_error(f).find("flow.sigma_min"), std::string::npos);
}

// ---- generate on the flow test bundles ------------------------------------------------------------------------
namespace {
std::string flow_bundle(const std::string& name) {
  const std::string dir = std::string(SD_TEST_BUNDLES) + "/" + name;
  struct stat st {};
  return std::string(SD_TEST_BUNDLES).empty() || ::stat((dir + "/manifest.json").c_str(), &st) != 0 ? "" : dir;
}

Request prompt(const std::string& text, uint64_t seed, uint32_t item = 0) {
  Request r;
  r.prompt = text;
  r.seed = seed;
  r.item = item;
  return r;
}
}  // namespace

TEST(FlowBundles, GenerateIsBatchIndependentAndDecodes) {
  for (const char* name : {"tiny_sd3", "tiny_flux"}) {
    const std::string dir = flow_bundle(name);
    if (dir.empty()) GTEST_SKIP() << "no flow test bundles in SD_TEST_BUNDLES";
    auto runtime = Runtime::open(dir);
    ASSERT_TRUE(runtime->manifest().flow.has_value());
    Request a = prompt("a photo of a cat", 7), b = prompt("", 8, 1);
    if (std::string(name) == "tiny_sd3") a.negative_prompt = "blurry";
    const auto both = runtime->generate({a, b}, 3);
    const auto one = runtime->generate({b}, 3);
    ASSERT_EQ(both.size(), 2u);
    EXPECT_EQ(both[1].sample, one[0].sample) << name;  // an image's noise and result do not depend on its batch
    EXPECT_EQ(both[0].timesteps.size(), 3u);
    EXPECT_EQ(both[0].kernel_log_mass.size(), 3u);  // both bundles carry a correction
    EXPECT_EQ(both[0].image_c, 3);
    EXPECT_EQ(both[0].image_h, 16);
    EXPECT_EQ(both[0].image.size(), static_cast<size_t>(3 * 16 * 16));
    EXPECT_EQ(both[0].sample.size(), static_cast<size_t>(runtime->manifest().sample_size()));
  }
}

TEST(FlowBundles, RefusesWhatTheFlowPathCannotRun) {
  const std::string dir = flow_bundle("tiny_flux");
  if (dir.empty()) GTEST_SKIP() << "no flow test bundles in SD_TEST_BUNDLES";
  auto runtime = Runtime::open(dir);
  Request r = prompt("a cat", 1);
  r.negative_prompt = "blurry";
  try {
    runtime->generate({r}, 2);
    ADD_FAILURE() << "Flux took a negative prompt";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::input);
    EXPECT_NE(std::string(e.what()).find("negative_prompt"), std::string::npos) << e.what();
  }
  EXPECT_THROW(runtime->generate({prompt("a cat", 1)}, 2, Sampler::ddpm), Error);
  EXPECT_THROW(runtime->generate({prompt("a cat", 1)}, 2, Sampler::ddim), Error);  // explicit: not the default
  // Finite but huge initial noise overflows inside the first step: the error names the step.
  Request huge = prompt("a cat", 1);
  huge.noise.assign(static_cast<size_t>(runtime->manifest().sample_size()), 3e38f);
  try {
    runtime->generate({huge}, 2);
    ADD_FAILURE() << "a non-finite sample was not reported";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::runtime);
    EXPECT_NE(std::string(e.what()).find("step 1 of 2 (timestep 1000)"), std::string::npos) << e.what();
  }
}

// The tiny SD3's CLIP-G tokenizer pads with "!" as SD3's tokenizer_2 does: the manifest records that id (the folder's
// tokenizer.json does not), ClipTokenizer pads with it, and recorded BOS / EOS that are not the post_processor's
// are refused naming the field.
TEST(FlowBundles, ClipPadsWithTheRecordedId) {
  const std::string dir = flow_bundle("tiny_sd3");
  if (dir.empty()) GTEST_SKIP() << "no flow test bundles in SD_TEST_BUNDLES";
  const Manifest manifest = Manifest::load(dir, false, false);
  ASSERT_EQ(manifest.tokenizers.size(), 2u);
  const SpecialTokenIds clip_l = manifest.tokenizers[0].special, clip_g = manifest.tokenizers[1].special;
  EXPECT_EQ(clip_l.pad, clip_l.eos);  // CLIP-L pads with its EOS
  ASSERT_NE(clip_g.pad, clip_g.eos);  // CLIP-G with "!"
  const auto g = ClipTokenizer::load(dir + "/tokenizer_2", 8, clip_g);
  const auto tokens = g.tokenize("a");
  EXPECT_EQ(tokens.ids, (std::vector<int64_t>{*clip_g.bos, tokens.ids[1], clip_g.eos, clip_g.pad, clip_g.pad,
                                              clip_g.pad, clip_g.pad, clip_g.pad}));
  EXPECT_EQ(g.encode("!")[1], clip_g.pad);  // "!" is a special token of that tokenizer, matched in the text
  SpecialTokenIds wrong = clip_g;
  wrong.bos = clip_g.eos;
  try {
    ClipTokenizer::load(dir + "/tokenizer_2", 8, wrong);
    ADD_FAILURE() << "a recorded bos_id other than the post_processor's was accepted";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::bundle);
    EXPECT_NE(std::string(e.what()).find("the manifest's bos_id"), std::string::npos) << e.what();
  }
}
