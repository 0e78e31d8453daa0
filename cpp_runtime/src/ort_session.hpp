// Internal: the ONNX Runtime C++ API bound by hand (ORT_API_MANUAL_INIT, so an old library is an Error, not a crash),
// the process-wide environment, and session options for an execution provider. Every file that uses the C++ API
// includes this header, so all of them see the same ORT_API_MANUAL_INIT.
#pragma once

#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>

#include <string>
#include <vector>

#include "safe_denoiser_cpp/runtime.hpp"

namespace sdcpp {

// Bind the C++ wrapper to the library's API table once; Error(runtime) when it does not serve kOrtApiVersion.
void init_ort();
Ort::Env& ort_env();
// Append the options' provider (nothing for cpu); Error(provider) naming it and what to install when it is not
// available (check_available) or cannot be set up. TensorRT keeps its engine cache under bundle_dir/tensorrt.
void add_provider(Ort::SessionOptions& session, const RuntimeOptions& options, const std::string& bundle_dir,
                  bool check_available);
std::string join(const std::vector<std::string>& items);  // "a, b, c"

}  // namespace sdcpp
