// T5's SentencePiece tokenizer (SD3's tokenizer_3, Flux's tokenizer_2) as transformers' T5TokenizerFast runs it:
// tokenizer(text, padding="max_length", max_length=N, truncation=True). A folder's spiece.model is read by Debian's
// libsentencepiece, which also normalizes the text (the model's charsmap: nmt_nfkc for T5). Around it: the special
// tokens (<pad>, </s>, <unk>, the <extra_id_N> sentinels) matched in the raw text first; each stretch between them
// normalized on its own and segmented word by word with the Unigram Viterbi of the tokenizers library (float64
// path scores, ties to the longest last piece, consecutive unknowns fused: libsentencepiece 0.1.97 sums in float32
// and breaks near-ties the other way); then ids[:max_length-1] </s>, padded with <pad> to max_length.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "safe_denoiser_cpp/tokenizer.hpp"

namespace sentencepiece {
class SentencePieceProcessor;
}

namespace sdcpp {

// One prompt's model input: max_length ids and the attention mask (1 for the text and its </s>, 0 for padding).
struct T5Encoding {
  std::vector<int64_t> ids;
  std::vector<int64_t> attention_mask;
};

class T5Tokenizer {
 public:
  static constexpr int kExtraIds = 100;  // T5's sentinels: <extra_id_N> has id piece_count + 99 - N
  static constexpr int kMaxLength = 1 << 16;

  // `folder`/spiece.model; Error(bundle) naming the file when it is missing or not a SentencePiece model with
  // <pad> and </s>, or when max_length is outside 1..kMaxLength.
  T5Tokenizer(const std::string& folder, int max_length, int extra_ids = kExtraIds);
  // A flow bundle's T5 tokenizer: the manifest's recorded ids (special.pad, special.eos, special.extra_ids sentinels)
  // instead of the model's <pad> / </s> pieces and T5's 100; Error(bundle) naming the field when an id is not below
  // the vocabulary size (pieces + extra_ids).
  T5Tokenizer(const std::string& folder, int max_length, const SpecialTokenIds& special);
  ~T5Tokenizer();
  T5Tokenizer(T5Tokenizer&&) noexcept;
  T5Tokenizer& operator=(T5Tokenizer&&) noexcept;

  // Error(input) when `text` is not valid UTF-8. Thread-safe (const).
  T5Encoding encode(const std::string& text) const;

  int max_length() const { return max_length_; }
  int64_t vocab_size() const { return vocab_size_; }  // every id encode returns is below it
  int64_t pad_id() const { return pad_; }
  int64_t eos_id() const { return eos_; }

 private:
  struct Piece {
    int64_t id;
    double score;
  };
  std::string normalize(const std::string& text) const;
  void segment_word(const std::string& word, std::vector<int64_t>& ids) const;
  void encode_text(const std::string& text, std::vector<int64_t>& ids) const;

  std::unique_ptr<sentencepiece::SentencePieceProcessor> model_;
  std::unordered_map<std::string, Piece> pieces_;  // every piece and sentinel, as the fast tokenizer's vocabulary
  std::vector<std::pair<std::string, int64_t>> special_;  // matched in the raw text, leftmost then longest
  std::vector<std::string> kept_spaces_;  // White_Space characters the model's normalizer keeps (see .cpp)
  std::string path_;
  size_t longest_piece_ = 0;  // bytes
  double unk_score_ = 0;
  int max_length_ = 0;
  int64_t vocab_size_ = 0, pad_ = 0, eos_ = 0, unk_ = 0;
};

}  // namespace sdcpp
