// libFuzzer target: the manifest contract (src/contract.cpp) and Manifest::parse (src/manifest.cpp) on arbitrary
// manifest.json text, then what the runtime derives
// from an accepted manifest before any graph runs (sample size, label range, the default step schedules).
// Contract: Error, or a manifest these derivations accept without UB (sample_shape: positive dims, a size that
// fits the int32 ORT shapes and buffers need).
#include <cstdint>
#include <string>

#include "../src/contract.hpp"
#include "fuzz_common.hpp"
#include "safe_denoiser_cpp/errors.hpp"
#include "safe_denoiser_cpp/manifest.hpp"
#include "safe_denoiser_cpp/scheduler.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  try {  // the manifest contract's numbers (Manifest::load runs them before parse): Error or nothing
    sdcpp::check_manifest_contract(sdfuzz::text(data, size));
  } catch (const sdcpp::Error&) {
  }
  try {
    const sdcpp::Manifest m = sdcpp::Manifest::parse(sdfuzz::text(data, size));
    int64_t elements = 1;  // sample_size() without its overflow: the runtime sizes every buffer from it
    for (const int64_t d : m.sample_shape) {
      if (d <= 0 || elements > INT32_MAX / d) sdfuzz::violated("accepted sample_shape dimension " + std::to_string(d));
      elements *= d;
    }
    if (m.sample_size() != elements) sdfuzz::violated("sample_size");
    (void)m.class_label_max();
    const auto steps = sdcpp::ddim_timesteps(m.scheduler, m.num_inference_steps);
    if (static_cast<int>(steps.size()) != m.num_inference_steps) sdfuzz::violated("DDIM schedule length");
    if (m.scheduler.ddpm) (void)sdcpp::ddpm_timesteps(m.scheduler, m.num_inference_steps);
    if (m.flow) {  // flow bundles: the FlowMatch schedule (steps bounded by the DDIM check above)
      const auto flow = sdcpp::flow_schedule(*m.flow, m.num_inference_steps);
      if (flow.sigmas.size() != flow.timesteps.size() + 1 || flow.sigmas.back() != 0.0f) sdfuzz::violated("flow schedule");
    }
  } catch (const sdcpp::Error&) {
  }
  return 0;
}
