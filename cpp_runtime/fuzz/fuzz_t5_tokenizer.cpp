// libFuzzer target: T5Tokenizer::encode (src/t5_tokenizer.cpp) on arbitrary prompt bytes, with the tiny T5 model
// the package ships (safe_denoiser/testing/data/tiny_t5). Contract: Error (invalid UTF-8), or exactly max_length
// ids below vocab_size with a mask of ones then zeros whose last one is on </s>.
#include <cstdint>
#include <string>

#include "fuzz_common.hpp"
#include "safe_denoiser_cpp/errors.hpp"
#include "safe_denoiser_cpp/t5_tokenizer.hpp"

#ifndef SD_TINY_T5
#error "SD_TINY_T5 (the tiny T5 tokenizer folder) must be defined by the build"
#endif

namespace {
const sdcpp::T5Tokenizer* tokenizer = nullptr;
}

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  static const sdcpp::T5Tokenizer loaded(SD_TINY_T5, 64);
  tokenizer = &loaded;
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  sdcpp::T5Encoding encoded;
  try {
    encoded = tokenizer->encode(sdfuzz::text(data, size));
  } catch (const sdcpp::Error&) {
    return 0;
  }
  const size_t n = static_cast<size_t>(tokenizer->max_length());
  if (encoded.ids.size() != n || encoded.attention_mask.size() != n) sdfuzz::violated("not max_length ids and mask");
  size_t ones = 0;
  while (ones < n && encoded.attention_mask[ones] == 1) ++ones;
  if (ones == 0 || encoded.ids[ones - 1] != tokenizer->eos_id()) sdfuzz::violated("the text does not end with </s>");
  for (size_t i = 0; i < n; ++i) {
    if (encoded.ids[i] < 0 || encoded.ids[i] >= tokenizer->vocab_size()) {
      sdfuzz::violated("token id " + std::to_string(encoded.ids[i]) + " outside the vocabulary");
    }
    if (i >= ones && (encoded.attention_mask[i] != 0 || encoded.ids[i] != tokenizer->pad_id())) {
      sdfuzz::violated("padding is not <pad> with mask 0");
    }
  }
  return 0;
}
