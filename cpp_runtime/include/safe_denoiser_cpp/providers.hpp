// ONNX Runtime and its execution providers: the C API version the code is written against, the providers the
// loaded library offers, and the short provider names the CLI and RuntimeOptions take.
#pragma once

#include <string>
#include <vector>

namespace sdcpp {

// ORT_API_VERSION the code is written against (ONNX Runtime >= 1.21); newer libraries serve it too.
inline constexpr int kOrtApiVersion = 21;

// Providers that the loaded ONNX Runtime library offers (e.g. "CPUExecutionProvider").
std::vector<std::string> available_providers();
// The short provider name ("cpu", "cuda", "tensorrt", "trt") -> ONNX Runtime's name; Error(provider) otherwise.
std::string provider_name(const std::string& provider);
// The ONNX Runtime library's version string.
std::string ort_version();

}  // namespace sdcpp
