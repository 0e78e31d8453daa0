// Execution providers: binding the ONNX Runtime C++ API, the environment, provider names and session options.
#include <sys/stat.h>

#include <algorithm>
#include <cctype>
#include <memory>
#include <mutex>

#include "ort_session.hpp"
#include "safe_denoiser_cpp/providers.hpp"

namespace sdcpp {
namespace {
const char* install_hint(const std::string& name) {
  if (name == "CUDAExecutionProvider") {
    return "build against an ONNX Runtime GPU release (onnxruntime-linux-x64-gpu, CUDA 12 + cuDNN 9 on the loader "
           "path) with -DONNXRUNTIME_ROOT=";
  }
  return "build against an ONNX Runtime GPU release with TensorRT support (-DONNXRUNTIME_ROOT=) and put NVIDIA "
         "TensorRT >= 10 (libnvinfer) on the loader path";
}
}  // namespace

// Bind the C++ wrapper to the library's API table once; a library older than kOrtApiVersion is an error, not a crash.
void init_ort() {
  static std::once_flag once;
  static std::string failure;
  std::call_once(once, [] {
    const OrtApi* api = OrtGetApiBase()->GetApi(kOrtApiVersion);
    if (api == nullptr) {
      failure = std::string("the ONNX Runtime library (") + OrtGetApiBase()->GetVersionString() +
                ") does not serve C API version " + std::to_string(kOrtApiVersion) + " (needs ONNX Runtime >= 1.21)";
      return;
    }
    Ort::InitApi(api);
  });
  if (!failure.empty()) throw Error(ErrorKind::runtime, failure);
}

Ort::Env& ort_env() {
  static Ort::Env instance(ORT_LOGGING_LEVEL_ERROR, "safe-denoiser-cpp");
  return instance;
}

std::string join(const std::vector<std::string>& items) {
  std::string out;
  for (const auto& s : items) out += (out.empty() ? "" : ", ") + s;
  return out;
}

// Ort errors (a CPU-only library, a missing CUDA/TensorRT) become Error(provider).
void add_provider(Ort::SessionOptions& so, const RuntimeOptions& opt, const std::string& bundle_dir,
                  bool check_available) {
  const std::string name = provider_name(opt.provider);
  if (name == "CPUExecutionProvider") return;
  const auto available = available_providers();
  if (check_available && std::find(available.begin(), available.end(), name) == available.end()) {
    throw Error(ErrorKind::provider, "execution provider '" + opt.provider + "' (" + name +
                                         ") is not available in this ONNX Runtime " + ort_version() +
                                         " (available: " + join(available) + "): " + install_hint(name));
  }
  const OrtApi& api = Ort::GetApi();
  const std::string device = std::to_string(opt.device_id);
  try {
    if (name == "TensorrtExecutionProvider") {
      const std::string cache = bundle_dir + "/tensorrt/ort_engine_cache";
      ::mkdir((bundle_dir + "/tensorrt").c_str(), 0777);
      ::mkdir(cache.c_str(), 0777);
      OrtTensorRTProviderOptionsV2* trt = nullptr;
      Ort::ThrowOnError(api.CreateTensorRTProviderOptions(&trt));
      std::unique_ptr<OrtTensorRTProviderOptionsV2, decltype(api.ReleaseTensorRTProviderOptions)> guard(
          trt, api.ReleaseTensorRTProviderOptions);
      const char* keys[] = {"device_id", "trt_fp16_enable", "trt_engine_cache_enable", "trt_engine_cache_path",
                            "trt_timing_cache_enable", "trt_timing_cache_path"};
      const char* values[] = {device.c_str(), opt.trt_fp16 ? "1" : "0", "1", cache.c_str(), "1", cache.c_str()};
      Ort::ThrowOnError(api.UpdateTensorRTProviderOptions(trt, keys, values, 6));
      so.AppendExecutionProvider_TensorRT_V2(*trt);
    }
    // CUDA: the provider itself, or TensorRT's fallback for the nodes TensorRT does not take.
    OrtCUDAProviderOptionsV2* cuda = nullptr;
    Ort::ThrowOnError(api.CreateCUDAProviderOptions(&cuda));
    std::unique_ptr<OrtCUDAProviderOptionsV2, decltype(api.ReleaseCUDAProviderOptions)> guard(
        cuda, api.ReleaseCUDAProviderOptions);
    const char* keys[] = {"device_id"};
    const char* values[] = {device.c_str()};
    Ort::ThrowOnError(api.UpdateCUDAProviderOptions(cuda, keys, values, 1));
    so.AppendExecutionProvider_CUDA_V2(*cuda);
  } catch (const Ort::Exception& e) {
    throw Error(ErrorKind::provider, "execution provider '" + opt.provider + "' (" + name +
                                         ") could not be set up: " + e.what() + "; " + install_hint(name));
  }
}

std::vector<std::string> available_providers() {
  init_ort();
  return Ort::GetAvailableProviders();
}

std::string provider_name(const std::string& provider) {
  std::string p = provider;
  std::transform(p.begin(), p.end(), p.begin(), [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  if (p == "cpu" || p == "cpuexecutionprovider") return "CPUExecutionProvider";
  if (p == "cuda" || p == "cudaexecutionprovider") return "CUDAExecutionProvider";
  if (p == "tensorrt" || p == "trt" || p == "tensorrtexecutionprovider") return "TensorrtExecutionProvider";
  throw Error(ErrorKind::provider, "provider: unknown execution provider '" + provider + "' (expected cpu, cuda or tensorrt)");
}

std::string ort_version() { return OrtGetApiBase()->GetVersionString(); }

}  // namespace sdcpp
