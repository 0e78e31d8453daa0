// Flow bundles in the program (flow_cli.hpp).
#include "flow_cli.hpp"

#include "requests.hpp"
#include "safe_denoiser_cpp/files.hpp"
#include "safe_denoiser_cpp/flow_sampler.hpp"

namespace sdcpp::cli {
using nlohmann::json;

json bundle_needs(const Manifest& m) {
  json graphs = json::array(), tokenizers = json::array();
  for (const auto& [name, spec] : m.graphs) graphs.push_back(name);
  for (const auto& t : m.tokenizers) {
    json entry = {{"folder", t.folder}, {"kind", tokenizer_kind_name(t.kind)}, {"input", t.input},
                  {"max_length", t.max_length}, {"pad_id", t.special.pad}, {"eos_id", t.special.eos}};
    if (t.kind == TokenizerKind::clip) entry["bos_id"] = t.special.bos.value_or(-1);
    if (t.kind == TokenizerKind::t5) entry["extra_ids"] = t.special.extra_ids;
    tokenizers.push_back(entry);
  }
  if (m.tokenizer) tokenizers.push_back({{"folder", *m.tokenizer}, {"kind", "clip"}, {"input", "input_ids"}});
  json flow = nullptr;
  if (m.flow) {
    const FlowInfo& f = *m.flow;
    flow = {{"family", f.family}, {"sampler", "flow_euler"}, {"shift", f.shift},
            {"use_dynamic_shifting", f.use_dynamic_shifting}, {"time_shift_type", f.time_shift_type},
            {"mu", f.mu ? json(*f.mu) : json(nullptr)}, {"pipeline_sigmas", f.linspace_sigmas ? "linspace" : "scheduler"},
            {"negative_prompt", f.flux() ? "refused (Flux has no classifier-free guidance)" : "accepted"}};
  }
  return {{"path", m.flow ? "flow" : "vp"}, {"graphs", graphs}, {"tokenizers", tokenizers}, {"flow", flow}};
}

json flow_schedule_json(const std::string& flow_json, int steps) {
  const json data = parse_json_limited(read_file(flow_json), "--flow");
  const FlowInfo flow = FlowInfo::parse(data.contains("flow") ? data.at("flow") : data);
  const FlowSchedule schedule = flow_schedule(flow, steps);
  // float -> double is exact, and nlohmann prints a double's shortest round-trip form.
  return {{"timesteps", std::vector<double>(schedule.timesteps.begin(), schedule.timesteps.end())},
          {"sigmas", std::vector<double>(schedule.sigmas.begin(), schedule.sigmas.end())}};
}

}  // namespace sdcpp::cli
