// The CLIP BPE tokenizer of a bundle's tokenizer/tokenizer.json (Hugging Face tokenizers format): added special
// tokens, NFC + whitespace collapse + lower-casing, the CLIP split, byte-level mapping, BPE with "</w>", then
// [BOS] ids[:max-2] [EOS] padded to max_length, as transformers' tokenizer(..., padding="max_length",
// truncation=True) returns them.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace sdcpp {

// Well-formed UTF-8 (no overlong forms, surrogates or code points past U+10FFFF), checked with ICU's U8_NEXT.
bool valid_utf8(std::string_view text);

// One prompt's ids, padded to max_length, and how many of them lead the padding (BOS, the kept tokens, EOS): the ones
// of transformers' attention mask (SAFREE's leave-one-out prompts mask the length - 2 real tokens).
struct ClipTokens {
  std::vector<int64_t> ids;
  int length = 0;
};

// The ids a tokenizer needs besides its vocabulary, as a flow bundle's manifest records them (tokenizers[i].pad_id,
// eos_id, and bos_id for CLIP or extra_ids for T5): read at export from the tokenizer object, because they come from
// tokenizer_config.json as transformers resolves it (SD3's CLIP-G pads with "!", which tokenizer.json does not say).
struct SpecialTokenIds {
  int64_t pad = 0, eos = 0;
  std::optional<int64_t> bos;  // CLIP
  int extra_ids = 0;           // T5: the <extra_id_N> sentinels
};

class ClipTokenizer {
 public:
  // max_length: the padded length (flow bundles: the manifest's tokenizers[i].max_length); 0: tokenizer_config.json's
  // model_max_length (CLIP: 77). Error(bundle) when it is outside 2..4095.
  // special: the recorded ids (flow bundles), used instead of tokenizer.json's; Error(bundle) naming the field when
  // bos / eos are not the ids its post_processor adds or pad is not an id of the vocabulary. Without: BOS / EOS from
  // the post_processor, padding from tokenizer.json's padding.pad_id, else EOS (SD-1.x; VP bundles).
  static ClipTokenizer load(const std::string& tokenizer_dir, int max_length = 0,
                            const std::optional<SpecialTokenIds>& special = std::nullopt);
  ClipTokens tokenize(const std::string& text) const;
  std::vector<int64_t> encode(const std::string& text) const { return tokenize(text).ids; }
  int max_length() const { return max_length_; }

 private:
  std::vector<std::string> bpe(const std::string& word) const;
  void use_special(const SpecialTokenIds& special, const std::string& dir);
  std::map<std::string, int64_t> vocab_;
  std::map<std::pair<std::string, std::string>, int> ranks_;
  std::vector<std::pair<std::string, int64_t>> added_;  // special tokens matched in the raw text
  std::string suffix_ = "</w>";
  int64_t bos_ = 0, eos_ = 0, pad_ = 0, unk_ = -1;
  int max_length_ = 77;
};

}  // namespace sdcpp
