// SAFREE in the program: info's summary and the hidden `safree` parity subcommand.
#include "safree_cli.hpp"

#include <cmath>
#include <limits>

#include "requests.hpp"
#include "safe_denoiser_cpp/errors.hpp"
#include "safe_denoiser_cpp/files.hpp"
#include "safe_denoiser_cpp/json_limits.hpp"
#include "safe_denoiser_cpp/safree.hpp"

namespace sdcpp::cli {
namespace {
using nlohmann::json;

// A (rows, width) JSON matrix of numbers, row-major; Error(input) naming `what` otherwise.
std::vector<float> matrix(const json& v, const std::string& what, int64_t width, int64_t& rows) {
  if (!v.is_array()) throw Error(ErrorKind::input, what + ": expected a list of rows");
  std::vector<float> out;
  for (const json& row : v) {
    if (!row.is_array() || static_cast<int64_t>(row.size()) != width) {
      throw Error(ErrorKind::input, what + ": expected rows of " + std::to_string(width) + " numbers");
    }
    for (const json& x : row) {  // float32 values: converting a larger double to float is undefined
      if (!x.is_number() || !(std::abs(x.get<double>()) <= std::numeric_limits<float>::max())) {
        throw Error(ErrorKind::input, what + ": expected finite float32 numbers");
      }
      out.push_back(x.get<float>());
    }
  }
  rows = static_cast<int64_t>(v.size());
  return out;
}

json run_case(const SafreeSettings& s, const json& c, size_t index) {
  const std::string where = "--input cases[" + std::to_string(index) + "]";
  int64_t L = 0, n = 0;
  const auto tokens = matrix(c.at("tokens"), where + ".tokens", s.dim, L);
  const auto masked = matrix(c.at("masked"), where + ".masked", s.dim, n);
  const auto active = json_integer_in(c.at("active"), 0, L);
  if (!active) throw Error(ErrorKind::input, where + ".active: expected an integer in 0.." + std::to_string(L));
  const SafreePrompt p = safree_prompt(s, tokens.data(), L, masked.data(), n, *active);
  json filtered = json::array();
  for (int64_t j = 0; j < L; ++j) {
    filtered.push_back(std::vector<float>(p.filtered.begin() + j * s.dim, p.filtered.begin() + (j + 1) * s.dim));
  }
  return {{"filtered", filtered}, {"triggers", p.triggers}, {"last_step", p.last_step}};
}
}  // namespace

json safree_summary(const Manifest& m) {
  if (!m.safree) return nullptr;
  const SafreeSettings& s = *m.safree;
  return {{"alpha", s.alpha},
          {"self_validation", s.self_validation},
          {"svf_max_step", s.svf_max_step},
          {"svf_sharpness", s.svf_sharpness},
          {"svf_midpoint", s.svf_midpoint},
          {"mask_token_id", s.mask_token_id},
          {"pooling", s.pooling == SafreePooling::eos ? "eos" : "argmax"},
          {"eos_token_id", s.eos_token_id},
          {"concepts", s.concept_count},
          {"concept_basis", {s.dim, s.rank}}};
}

CLI::App* add_safree_check(CLI::App& app, SafreeCheckArgs& args) {
  auto* cmd = app.add_subcommand("safree", "SAFREE's text side on given hidden states (parity tests)");
  cmd->group("");  // hidden from --help: a test tool
  cmd->add_option("--input", args.input, "JSON: {settings, cases: [{tokens, masked, active}]}")->required();
  cmd->add_option("--out", args.out, "JSON results (filtered rows, triggers, last_step per case)")->required();
  return cmd;
}

int run_safree_check(const SafreeCheckArgs& args) {
  check_output_file(args.out, "--out");
  const json input = parse_json_limited(read_file(args.input), "--input");
  SafreeSettings s;
  try {
    s = SafreeSettings::parse(input.at("settings"));
  } catch (const Error& e) {
    throw Error(ErrorKind::input, std::string("--input settings: ") + e.what());
  }
  json results = json::array();
  const json& cases = input.at("cases");
  for (size_t i = 0; i < cases.size(); ++i) results.push_back(run_case(s, cases.at(i), i));
  atomic_write(args.out, results.dump() + "\n");
  return 0;
}

}  // namespace sdcpp::cli
