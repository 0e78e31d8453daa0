// libFuzzer target: ClipTokenizer::encode (src/tokenizer.cpp) on arbitrary prompt bytes, with the test bundles'
// tokenizer (data/tokenizer). Contract: Error (e.g. invalid UTF-8), or exactly max_length non-negative ids.
#include <cstdint>
#include <string>

#include "fuzz_common.hpp"
#include "safe_denoiser_cpp/errors.hpp"
#include "safe_denoiser_cpp/tokenizer.hpp"

namespace {
const sdcpp::ClipTokenizer* tokenizer = nullptr;
}

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  static const sdcpp::ClipTokenizer loaded = sdcpp::ClipTokenizer::load(sdfuzz::data_path("tokenizer"));
  tokenizer = &loaded;
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  try {
    const auto ids = tokenizer->encode(sdfuzz::text(data, size));
    if (static_cast<int>(ids.size()) != tokenizer->max_length()) sdfuzz::violated("ids are not max_length long");
    for (const int64_t id : ids) {
      if (id < 0) sdfuzz::violated("negative token id " + std::to_string(id));
    }
  } catch (const sdcpp::Error&) {
  }
  return 0;
}
