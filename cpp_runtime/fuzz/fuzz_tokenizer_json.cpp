// libFuzzer target: ClipTokenizer::load (src/tokenizer.cpp) on arbitrary tokenizer.json text (the config is the
// fixture's), then encode of a few fixed prompts. Contract: Error, or a tokenizer whose encode gives max_length ids.
#include <cstdint>
#include <string>

#include "fuzz_common.hpp"
#include "safe_denoiser_cpp/errors.hpp"
#include "safe_denoiser_cpp/tokenizer.hpp"

namespace {
std::string folder() { return sdfuzz::scratch_dir() + "/tokenizer"; }
}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  std::filesystem::create_directories(folder());
  const std::string config = sdfuzz::read_file(sdfuzz::data_path("tokenizer/tokenizer_config.json"));
  sdfuzz::write_file(folder() + "/tokenizer_config.json", config);
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  sdfuzz::write_file(folder() + "/tokenizer.json", sdfuzz::text(data, size));
  try {
    const auto tokenizer = sdcpp::ClipTokenizer::load(folder());
    for (const char* prompt : {"a photo of a cat", "<|startoftext|>Hello, WORLD!! it's 4k", ""}) {
      const auto ids = tokenizer.encode(prompt);
      if (static_cast<int>(ids.size()) != tokenizer.max_length()) sdfuzz::violated("ids are not max_length long");
    }
  } catch (const sdcpp::Error&) {
  }
  return 0;
}
