// libFuzzer target: the ONNX initializer reader (src/onnx_initializer.cpp) on arbitrary model.onnx bytes. The reader
// takes a path, so each input is written to a scratch folder that also holds bank.bin, the external data file the
// seeds name. Contract: Error, or an initializer with non-negative dims whose bytes fill its shape as float32.
#include <cstdint>
#include <string>

#include "../src/onnx_initializer.hpp"
#include "fuzz_common.hpp"
#include "safe_denoiser_cpp/errors.hpp"

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  sdfuzz::write_file(sdfuzz::scratch_dir() + "/bank.bin", std::string(64, '\x3f'));
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string path = sdfuzz::scratch_dir() + "/model.onnx";
  sdfuzz::write_file(path, sdfuzz::text(data, size));
  try {
    const sdcpp::Initializer init = sdcpp::read_float_initializer(path, "negative_bank");
    uint64_t count = 1;
    for (const int64_t d : init.dims) {
      if (d < 0) sdfuzz::violated("accepted a negative dimension " + std::to_string(d));
      if (d != 0 && count > UINT64_MAX / static_cast<uint64_t>(d)) sdfuzz::violated("accepted a shape past 2^64");
      count *= static_cast<uint64_t>(d);
    }
    if (init.bytes.size() / 4 != count || init.bytes.size() % 4 != 0) sdfuzz::violated("bytes do not fill the shape");
  } catch (const sdcpp::Error&) {
  }
  return 0;
}
