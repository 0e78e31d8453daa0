// SAFREE in the program: `info`'s summary of the settings, and the hidden `safree` subcommand that runs the text
// side on given hidden states and pooled rows (tests/test_cpp_safree.py compares it with safree_text.py).
#pragma once

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>
#include <string>

#include "safe_denoiser_cpp/manifest.hpp"

namespace sdcpp::cli {

// `info`'s "safree": the settings and the concept basis's shape; null without SAFREE.
nlohmann::json safree_summary(const Manifest& manifest);

struct SafreeCheckArgs {
  std::string input, out;
};
// safree --input cases.json --out results.json: {"settings": <a manifest's safree section>, "cases": [{"tokens":
// (L, D), "masked": (n, D), "active": k}, ...]} -> [{"filtered": (L, D), "triggers": [n bools], "last_step": t'}].
CLI::App* add_safree_check(CLI::App& app, SafreeCheckArgs& args);
int run_safree_check(const SafreeCheckArgs& args);

}  // namespace sdcpp::cli
