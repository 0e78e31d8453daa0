// The CLIP BPE tokenizer of a bundle's tokenizer/tokenizer.json (Hugging Face tokenizers format): added special
// tokens, NFC + whitespace collapse + lower-casing, the CLIP split, byte-level mapping, BPE with "</w>", then
// [BOS] ids[:max-2] [EOS] padded to max_length, as transformers' tokenizer(..., padding="max_length",
// truncation=True) returns them.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace sdcpp {

// Well-formed UTF-8 (no overlong forms, surrogates or code points past U+10FFFF), checked with ICU's U8_NEXT.
bool valid_utf8(std::string_view text);

class ClipTokenizer {
 public:
  static ClipTokenizer load(const std::string& tokenizer_dir);
  std::vector<int64_t> encode(const std::string& text) const;
  int max_length() const { return max_length_; }

 private:
  std::vector<std::string> bpe(const std::string& word) const;
  std::map<std::string, int64_t> vocab_;
  std::map<std::pair<std::string, std::string>, int> ranks_;
  std::vector<std::pair<std::string, int64_t>> added_;  // special tokens matched in the raw text
  std::string suffix_ = "</w>";
  int64_t bos_ = 0, eos_ = 0, pad_ = 0, unk_ = -1;
  int max_length_ = 77;
};

}  // namespace sdcpp
