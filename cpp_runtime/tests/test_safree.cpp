// SAFREE's text side (src/safree.cpp) without a bundle: the manifest section's validation (errors naming the
// field), the leave-one-out ids and pooling, t' with Python's rounding, the projection against closed forms
// (one masked row, duplicates, an all-zero set), the per-step row choice and the two text-encoder calls; with
// SD_TEST_BUNDLES, generation on the SAFREE test bundles (the runtime's path under the sanitizers).
// The parity with safree_text.py on many random inputs is tests/test_cpp_safree.py.
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <nlohmann/json.hpp>

#include "safe_denoiser_cpp/errors.hpp"
#include "safe_denoiser_cpp/files.hpp"
#include "safe_denoiser_cpp/manifest.hpp"
#include "safe_denoiser_cpp/runtime.hpp"
#include "safe_denoiser_cpp/safree.hpp"

using namespace sdcpp;
using nlohmann::json;

namespace {
// A valid section: width 4, the concept subspace spanned by the first axis.
json section() {
  return {{"concepts", {"nudity"}}, {"alpha", 0.01},        {"self_validation", true},
          {"svf_max_step", 10},      {"svf_sharpness", 50.0}, {"svf_midpoint", 0.5333},
          {"re_attention", false},   {"mask_token_id", 0},    {"pooling", "eos"},
          {"eos_token_id", 9},       {"concept_basis", json::parse("[[1.0], [0.0], [0.0], [0.0]]")}};
}

std::string parse_error(const json& s) {
  try {
    SafreeSettings::parse(s);
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::bundle) << e.what();
    return e.what();
  }
  return "accepted";
}

json with(const std::string& key, const json& value) {
  json s = section();
  s[key] = value;
  return s;
}

json without(const std::string& key) {
  json s = section();
  s.erase(key);
  return s;
}
}  // namespace

TEST(Safree, ParsesTheSection) {
  const SafreeSettings s = SafreeSettings::parse(section());
  EXPECT_EQ(s.dim, 4);
  EXPECT_EQ(s.rank, 1);
  EXPECT_EQ(s.eos_token_id, 9);
  EXPECT_EQ(s.concept_count, 1u);
  EXPECT_TRUE(s.self_validation);
  EXPECT_EQ(s.pooling, SafreePooling::eos);
  // re-attention with scale 1 is a no-op: accepted; argmax pooling needs no eos_token_id.
  json scales_one = with("re_attention", true);
  scales_one["re_attention_scales"] = {1.0, 1.0};
  EXPECT_EQ(parse_error(scales_one), "accepted");
  json argmax = without("eos_token_id");
  argmax["pooling"] = "argmax";
  EXPECT_EQ(SafreeSettings::parse(argmax).pooling, SafreePooling::argmax);
}

TEST(Safree, RefusesBadSectionsNamingTheField) {
  const std::vector<std::pair<json, std::string>> cases = {
      {json::array(), "manifest: safree must be an object"},
      {with("alpha", "0.01"), "safree.alpha must be a finite number > -1"},
      {with("alpha", -1.0), "safree.alpha must be a finite number > -1"},
      {with("alpha", std::nan("")), "safree.alpha must be a finite number > -1"},
      {with("self_validation", 1), "safree.self_validation must be true or false"},
      {with("svf_max_step", 2.5), "safree.svf_max_step must be an integer in 0..2147483647"},
      {with("svf_max_step", -1), "safree.svf_max_step must be an integer"},
      {with("svf_sharpness", -1.0), "safree.svf_sharpness must be a finite number >= 0"},
      {with("svf_midpoint", nullptr), "safree.svf_midpoint must be a finite number"},
      {with("mask_token_id", 1e30), "safree.mask_token_id must be an integer"},
      {with("pooling", "mean"), "safree.pooling must be 'eos' or 'argmax'"},
      {without("eos_token_id"), "safree.eos_token_id is missing"},
      {without("concept_basis"), "safree.concept_basis is missing"},
      {with("concepts", json::parse("[1, 2]")), "safree.concepts must be a list of strings"},
      {with("re_attention", true), "safree.re_attention must be false"},
      {with("re_attention_scales", json::parse("[0.9]")), "safree.re_attention_scales must be a pair"},
      {with("re_attention_radius", 0), "safree.re_attention_radius must be an integer in 1.."},
      {with("filter_mode", "fourier"), "safree has the unknown key 'filter_mode'"},
      {with("concept_basis", json::array()), "safree.concept_basis must be a (D, r) list"},
      {with("concept_basis", json::parse("[[1.0, 0.0]]")), "safree.concept_basis must be a (D, r) list"},  // r > D
      {with("concept_basis", json::parse("[[1.0], [0.0, 1.0]]")), "safree.concept_basis[1] must be a (D, r) list"},
      {with("concept_basis", json::parse(R"([[1.0], ["x"]])")), "safree.concept_basis[1] must be finite numbers"},
      {with("concept_basis", json::parse("[[0.5], [0.5]]")), "safree.concept_basis must have orthonormal columns"},
  };
  for (const auto& [s, needle] : cases) {
    const std::string why = parse_error(s);
    EXPECT_NE(why.find(needle), std::string::npos) << needle << " | " << why;
  }
}

TEST(Safree, ManifestParsesTheSection) {
  json m = {{"format", "safe-denoiser.bundle"}, {"format_version", 2}, {"model_kind", "class-conditional"},
            {"source", "test"}, {"sample_shape", {1, 2, 2}}, {"num_inference_steps", 2}, {"guidance_scale", 1.0},
            {"graphs", json::object()}, {"safree", section()}};
  m["scheduler"] = {{"alphas_cumprod", {0.9, 0.5}}, {"sigmas", {0.33, 1.0}}, {"final_alpha_cumprod", 1.0},
                    {"ddim", {{"timestep_spacing", "trailing"}}}};
  const Manifest parsed = Manifest::parse(m.dump());
  ASSERT_TRUE(parsed.safree.has_value());
  EXPECT_EQ(parsed.safree->dim, 4);
  m["safree"]["alpha"] = "high";
  try {
    Manifest::parse(m.dump());
    ADD_FAILURE() << "accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("manifest: safree.alpha"), std::string::npos) << e.what();
  }
}

TEST(Safree, RefusedOnAClassLabelBundle) {
  const std::string bundles = SD_TEST_BUNDLES;
  if (bundles.empty()) GTEST_SKIP() << "SD_TEST_BUNDLES not set";
  char tmpl[] = "/tmp/sdcpp-safree-XXXXXX";
  const std::string dir = mkdtemp(tmpl);
  json m = json::parse(read_file(bundles + "/demo_theorem/manifest.json"));  // checked before its files are
  m["safree"] = section();
  atomic_write(dir + "/manifest.json", m.dump());
  try {
    Manifest::load(dir);
    ADD_FAILURE() << "accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("manifest: safree must be null for a class-conditional bundle on path 'vp'"),
              std::string::npos) << e.what();
  }
  std::remove((dir + "/manifest.json").c_str());
  rmdir(dir.c_str());
}

TEST(Safree, LeaveOneOutIdsAndPooling) {
  const std::vector<int64_t> ids = {7, 3, 4, 9, 9, 9};  // BOS, 2 tokens, EOS, padding (= EOS)
  EXPECT_EQ(leave_one_out_ids(ids, 2, 0), (std::vector<int64_t>{7, 0, 4, 9, 9, 9, 7, 3, 0, 9, 9, 9}));
  EXPECT_TRUE(leave_one_out_ids(ids, 0, 0).empty());
  EXPECT_THROW(leave_one_out_ids(ids, 5, 0), Error);
  SafreeSettings s = SafreeSettings::parse(section());
  EXPECT_EQ(pooled_position(ids.data(), 6, s), 3);  // the first EOS
  const std::vector<int64_t> no_eos = {7, 3, 4};
  EXPECT_EQ(pooled_position(no_eos.data(), 3, s), 0);  // numpy's argmax of an all-false mask
  s.pooling = SafreePooling::argmax;
  EXPECT_EQ(pooled_position(ids.data(), 6, s), 3);  // the first highest id
}

TEST(Safree, LastStepRoundsHalfToEven) {
  SafreeSettings s = SafreeSettings::parse(section());
  EXPECT_EQ(svf_last_step(1.0, s), 0);    // beta 0: sigmoid(-26.7) * 10
  EXPECT_EQ(svf_last_step(-1.0, s), 10);  // beta 2
  s.svf_midpoint = 0.0;
  s.svf_max_step = 1;
  EXPECT_EQ(svf_last_step(1.0, s), 0);  // z = 0: 0.5 -> 0
  s.svf_max_step = 3;
  EXPECT_EQ(svf_last_step(1.0, s), 2);  // 1.5 -> 2
  s.svf_max_step = 5;
  EXPECT_EQ(svf_last_step(1.0, s), 2);  // 2.5 -> 2
}

TEST(Safree, ProjectionMatchesClosedForms) {
  const SafreeSettings s = SafreeSettings::parse(section());  // U_C = e_0
  // One real token: flagged; its row e -> (I - P_C) P_I e with P_I the projector onto the masked row m.
  const std::vector<float> tokens = {1, 2, 3, 4, 0.5f, 1, 2, 0.25f, 3, 3, 3, 3};  // L = 3, D = 4
  const std::vector<float> m = {2, 1, 0, 0};
  const SafreePrompt one = safree_prompt(s, tokens.data(), 3, m.data(), 1, 3);
  ASSERT_EQ(one.triggers, std::vector<bool>{true});
  // e P_I = (e . m / |m|^2) m = 0.4 m; (I - P_C) drops the first axis: (0, 0.4, 0, 0).
  for (int k = 0; k < 4; ++k) {
    EXPECT_FLOAT_EQ(one.filtered[4 + k], k == 1 ? 0.4f : 0.f) << k;
    EXPECT_EQ(one.filtered[k], tokens[k]);          // BOS keeps its bits
    EXPECT_EQ(one.filtered[8 + k], tokens[8 + k]);  // so does EOS
  }
  // The projected rows are (0, 0.8, 0, 0), (0, 0.4, 0, 0), (0, 1.8, 0, 0): cosines 2/sqrt(30), 1/sqrt(5.3125), 1/2.
  const double mean = (2 / std::sqrt(30.0) + 1 / std::sqrt(5.3125) + 0.5) / 3;
  EXPECT_EQ(one.last_step, svf_last_step(mean, s));
  EXPECT_EQ(one.last_step, 8);  // round(10 sigmoid(50 (1 - 0.433 - 0.5333)))
  // All-zero masked rows: rank 0, distances all 0 and so all flagged (not 0 < 0), rows projected to 0.
  const std::vector<float> zeros(8, 0.f), tokens4(4 * 4, 1.f);
  const SafreePrompt rank0 = safree_prompt(s, tokens4.data(), 4, zeros.data(), 2, 4);
  EXPECT_EQ(rank0.triggers, (std::vector<bool>{true, true}));
  for (int k = 4; k < 12; ++k) EXPECT_EQ(rank0.filtered[k], 0.f);
  // Duplicated masked rows span one direction (rank 1 by the cut-off, not 2). Equal distances are triggers only
  // with alpha 0 (d_i >= 1.01 d_j fails, d_i >= d_j holds).
  const std::vector<float> dup = {0, 1, 0, 0, 0, 1, 0, 0};
  EXPECT_EQ(safree_prompt(s, tokens4.data(), 4, dup.data(), 2, 4).triggers, (std::vector<bool>{false, false}));
  SafreeSettings alpha0 = s;
  alpha0.alpha = 0.0;
  const SafreePrompt twice = safree_prompt(alpha0, tokens4.data(), 4, dup.data(), 2, 4);
  EXPECT_EQ(twice.triggers, (std::vector<bool>{true, true}));
  for (int k = 0; k < 4; ++k) EXPECT_EQ(twice.filtered[4 + k], k == 1 ? 1.f : 0.f);
}

TEST(Safree, TriggersByLeaveOneOutDistance) {
  const SafreeSettings s = SafreeSettings::parse(section());
  // Distances to span(e_0) of the three masked rows: 1, 1, 3: only the third is >= 1.01 mean of the others.
  const std::vector<float> masked = {5, 1, 0, 0, 5, 0, 1, 0, 5, 0, 0, 3};
  const std::vector<float> tokens(5 * 4, 1.f);
  const SafreePrompt p = safree_prompt(s, tokens.data(), 5, masked.data(), 3, 5);
  EXPECT_EQ(p.triggers, (std::vector<bool>{false, false, true}));
  for (int k = 0; k < 20; ++k) {  // rows other than 3 (the third token) keep their bits
    if (k / 4 != 3) {  // braces: EXPECT_EQ expands to an if/else (-Wdangling-else)
      EXPECT_EQ(p.filtered[k], tokens[k]) << k;
    }
  }
  EXPECT_THROW(safree_prompt(s, tokens.data(), 5, masked.data(), 3, 0), Error);  // no active position
}

TEST(Safree, RowsPerStepAndTwoEncoderCalls) {
  SafreeSettings s = SafreeSettings::parse(section());
  int calls = 0;
  const TextEncoder encoder = [&](const std::vector<int64_t>& ids, int64_t rows) {
    ++calls;
    EXPECT_EQ(static_cast<int64_t>(ids.size()), rows * 4);
    std::vector<float> out;
    for (const int64_t id : ids) out.insert(out.end(), {1.f, static_cast<float>(id), 0.f, 0.f});
    return out;
  };
  const std::vector<ClipTokens> prompts = {{{1, 5, 6, 9}, 4}, {{1, 9, 9, 9}, 2}};  // 2 tokens; empty
  SafreeBatch batch = safree_encode(s, prompts, 4, encoder);
  EXPECT_EQ(calls, 2);  // the prompts, then all leave-one-out prompts together
  ASSERT_EQ(batch.prompts.size(), 2u);
  EXPECT_EQ(batch.prompts[0].triggers.size(), 2u);
  EXPECT_TRUE(batch.prompts[1].triggers.empty());
  EXPECT_EQ(batch.prompts[1].filtered, std::vector<float>(batch.original.begin() + 16, batch.original.end()));
  batch.prompts[0].filtered.assign(16, 7.f);  // mark the rows to see which are written
  batch.prompts[0].last_step = 1;
  std::vector<float> out(32);
  for (const size_t step : {0, 1, 2}) {
    batch.rows_at(step, out.data());
    EXPECT_EQ(out[0], step <= 1 ? 7.f : 1.f) << step;
  }
  batch.every_step = true;
  batch.rows_at(5, out.data());
  EXPECT_EQ(out[0], 7.f);
  calls = 0;
  safree_encode(s, std::vector<ClipTokens>{ClipTokens{{1, 9, 9, 9}, 2}}, 4, encoder);
  EXPECT_EQ(calls, 1);  // no real token: no leave-one-out call
}

TEST(Safree, GeneratesOnTheTestBundles) {
  const std::string bundles = SD_TEST_BUNDLES;
  if (bundles.empty()) GTEST_SKIP() << "SD_TEST_BUNDLES not set";
  for (const char* name : {"tiny_safree", "tiny_safree_always"}) {
    auto runtime = Runtime::open(bundles + "/" + name);
    std::vector<Request> requests(3);
    const char* prompts[] = {"a photo of a nude woman", "a red car", ""};
    for (size_t i = 0; i < requests.size(); ++i) {
      requests[i].prompt = prompts[i];
      requests[i].seed = 5;
      requests[i].item = static_cast<uint32_t>(i);
    }
    requests[1].negative_prompt = "a blurry photo";
    const auto results = runtime->generate(requests);
    ASSERT_EQ(results.size(), 3u);
    for (size_t i = 0; i < results.size(); ++i) {
      ASSERT_TRUE(results[i].safree.has_value()) << name;
      const SafreePrompt& p = *results[i].safree;
      EXPECT_EQ(p.filtered.size(), static_cast<size_t>(77 * 32));
      EXPECT_EQ(p.last_step, i < 2 ? 2 : 0) << name << " " << i;  // svf_midpoint 0: t' = gamma; empty prompt: 0
      for (const float v : results[i].sample) ASSERT_TRUE(std::isfinite(v));
    }
    const auto& flags = results[0].safree->triggers;  // one per real token (the tiny vocabulary splits words)
    EXPECT_GE(flags.size(), 6u);
    EXPECT_GE(std::count(flags.begin(), flags.end(), true), 1);  // the tiny CLIP flags some: filtered rows are used
    EXPECT_TRUE(results[2].safree->triggers.empty());
  }
}
