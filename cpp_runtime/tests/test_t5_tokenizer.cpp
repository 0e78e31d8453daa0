// T5Tokenizer on the tiny model the package ships (safe_denoiser/testing/data/tiny_t5, made by make_tiny_t5.py):
// </s> and padding, truncation that keeps </s>, special tokens in the text, errors naming the file. Equality with
// transformers on a hard corpus: tests/test_t5_tokenizer.py.
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <string>
#include <vector>

#include "safe_denoiser_cpp/errors.hpp"
#include "safe_denoiser_cpp/t5_tokenizer.hpp"

#ifndef SD_TINY_T5
#error "SD_TINY_T5 (the tiny T5 tokenizer folder) must be defined by the build"
#endif

using sdcpp::T5Tokenizer;

namespace {
// The tiny model's ids (its vocabulary: python -m safe_denoiser.testing.make_tiny_t5; pieces 0..384).
constexpr int64_t kPad = 0, kEos = 1, kUnk = 2, kPieces = 385;

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const sdcpp::Error& e) {
    return e.what();
  }
  return "no error";
}
}  // namespace

TEST(T5Tokenizer, EosThenPaddingAndTheMask) {
  const T5Tokenizer t5(SD_TINY_T5, 8);
  EXPECT_EQ(t5.pad_id(), kPad);
  EXPECT_EQ(t5.eos_id(), kEos);
  EXPECT_EQ(t5.vocab_size(), kPieces + T5Tokenizer::kExtraIds);
  const auto empty = t5.encode("");
  EXPECT_EQ(empty.ids, (std::vector<int64_t>{kEos, kPad, kPad, kPad, kPad, kPad, kPad, kPad}));
  EXPECT_EQ(empty.attention_mask, (std::vector<int64_t>{1, 0, 0, 0, 0, 0, 0, 0}));
  const auto cat = t5.encode("a cat");
  ASSERT_EQ(cat.ids.size(), 8u);
  const auto length = std::find(cat.ids.begin(), cat.ids.end(), kEos) - cat.ids.begin();
  EXPECT_GE(length, 2);  // "▁a" and at least one piece of "▁cat"
  for (int64_t i = 0; i < 8; ++i) {
    EXPECT_EQ(cat.attention_mask[i], i <= length ? 1 : 0);
    if (i > length) {
      EXPECT_EQ(cat.ids[i], kPad);
    }
  }
  // Whitespace is only a word boundary: leading, trailing and repeated spaces, tabs and newlines change nothing.
  EXPECT_EQ(t5.encode("  a \t\n cat  ").ids, cat.ids);
}

TEST(T5Tokenizer, TruncationKeepsTheEos) {
  const T5Tokenizer t5(SD_TINY_T5, 6);
  const T5Tokenizer wide(SD_TINY_T5, 512);
  std::string prompt;
  for (int i = 0; i < 40; ++i) prompt += "a photo of a cat, ";
  const auto full = wide.encode(prompt);
  const auto cut = t5.encode(prompt);
  ASSERT_EQ(cut.ids.size(), 6u);
  EXPECT_EQ(std::vector<int64_t>(cut.ids.begin(), cut.ids.begin() + 5),
            std::vector<int64_t>(full.ids.begin(), full.ids.begin() + 5));
  EXPECT_EQ(cut.ids.back(), kEos);
  EXPECT_EQ(cut.attention_mask, std::vector<int64_t>(6, 1));
  const T5Tokenizer one(SD_TINY_T5, 1);
  EXPECT_EQ(one.encode(prompt).ids, std::vector<int64_t>{kEos});
}

TEST(T5Tokenizer, SpecialTokensInTheTextAreMatchedFirst) {
  const T5Tokenizer t5(SD_TINY_T5, 16);
  const auto ids = t5.encode("a</s><pad><unk><extra_id_0><extra_id_99>").ids;
  const int64_t extra0 = kPieces + T5Tokenizer::kExtraIds - 1, extra99 = kPieces;
  const std::vector<int64_t> want_tail = {kEos, kPad, kUnk, extra0, extra99, kEos};
  ASSERT_GE(ids.size(), want_tail.size() + 1);
  EXPECT_EQ(std::vector<int64_t>(ids.begin() + 1, ids.begin() + 1 + static_cast<long>(want_tail.size())), want_tail);
  // Not a sentinel: <extra_id_100> is text, and so is a </s> cut short.
  for (const auto* text : {"<extra_id_100>", "</s", "<extra_id_>"}) {
    const auto other = t5.encode(text).ids;
    EXPECT_EQ(std::count(other.begin(), other.end(), kEos), 1) << text;
    for (const int64_t id : other) EXPECT_LT(id, kPieces) << text;
  }
}

TEST(T5Tokenizer, UnknownCharactersAndNextLine) {
  const T5Tokenizer t5(SD_TINY_T5, 16);
  const auto emoji = t5.encode("\xF0\x9F\x98\x80\xF0\x9F\x98\x80").ids;  // two emoji: one fused <unk>
  EXPECT_EQ(std::count(emoji.begin(), emoji.end(), kUnk), 1);
  // U+0085 separates words as the fast tokenizer's WhitespaceSplit does (SentencePiece alone keeps it as a character).
  EXPECT_EQ(t5.encode("a\xC2\x85" "cat").ids, t5.encode("a cat").ids);
}

// Ids as T5TokenizerFast gives them (tests/test_t5_tokenizer.py compares the whole corpus): "fff" after an unknown
// "S" is an exact tie between f + ff and ff + f, which the fast tokenizer breaks towards the longer last piece
// (libsentencepiece 0.1.97, summing in float32, picks ff + f); full-width "＜/s＞" normalizes to "</s>", a piece of
// the fast tokenizer's vocabulary.
TEST(T5Tokenizer, SegmentsAsTheFastTokenizer) {
  const T5Tokenizer t5(SD_TINY_T5, 8);
  constexpr int64_t kSpace = 3, kF = 43, kFF = 264;
  EXPECT_EQ(t5.encode("Sfff").ids, (std::vector<int64_t>{kSpace, kUnk, kF, kFF, kEos, kPad, kPad, kPad}));
  EXPECT_EQ(t5.encode("\xEF\xBC\x9C/s\xEF\xBC\x9E").ids,  // ＜/s＞
            (std::vector<int64_t>{kSpace, kEos, kEos, kPad, kPad, kPad, kPad, kPad}));
}

TEST(T5Tokenizer, RefusesInvalidUtf8AndBadModels) {
  const T5Tokenizer t5(SD_TINY_T5, 8);
  for (const std::string bad : {"\xff", "a\xC3", "\xED\xA0\x80", "\xC0\xAF", "\xF4\x90\x80\x80"}) {
    EXPECT_NE(error_of([&] { t5.encode(bad); }).find("not valid UTF-8"), std::string::npos);
  }
  EXPECT_NE(error_of([] { T5Tokenizer("/nonexistent-folder", 8); }).find("/nonexistent-folder/spiece.model"),
            std::string::npos);
  EXPECT_NE(error_of([] { T5Tokenizer(SD_TINY_T5, 0); }).find("max_length must be in 1..65536, got 0"),
            std::string::npos);
  char tmpl[] = "/tmp/sdcpp-t5-XXXXXX";
  ASSERT_NE(mkdtemp(tmpl), nullptr);
  const std::string folder = tmpl;
  std::ofstream(folder + "/spiece.model", std::ios::binary) << "not a protobuf \x01\x02\x03";
  const std::string corrupt = error_of([&] { T5Tokenizer(folder, 8); });
  EXPECT_NE(corrupt.find(folder + "/spiece.model': not a SentencePiece model"), std::string::npos) << corrupt;
  std::remove((folder + "/spiece.model").c_str());
  rmdir(folder.c_str());
}

// A flow bundle's recorded ids (manifest tokenizers[i].pad_id, eos_id, extra_ids) replace the model's <pad>, </s> and
// T5's 100 sentinels: padding and the appended EOS use them, the sentinels are the recorded count (ids pieces +
// extra_ids - 1 - N), and an id past the vocabulary is refused naming the field.
TEST(T5Tokenizer, RecordedIdsReplaceTheDefaults) {
  const sdcpp::SpecialTokenIds special{5, 6, std::nullopt, 3};
  const T5Tokenizer t5(SD_TINY_T5, 4, special);
  EXPECT_EQ(t5.pad_id(), 5);
  EXPECT_EQ(t5.eos_id(), 6);
  EXPECT_EQ(t5.vocab_size(), kPieces + 3);
  EXPECT_EQ(t5.encode("").ids, (std::vector<int64_t>{6, 5, 5, 5}));
  // "</s>" in the text is still the </s> piece (a vocabulary token), only the appended EOS is the recorded one.
  EXPECT_EQ(t5.encode("<extra_id_2></s>").ids, (std::vector<int64_t>{kPieces, kEos, 6, 5}));
  const auto three = t5.encode("<extra_id_3>").ids;  // only 3 sentinels: text
  for (size_t i = 0; i + 1 < three.size() && three[i] != 6; ++i) EXPECT_LT(three[i], kPieces);
  const sdcpp::SpecialTokenIds past{kPieces + 3, 1, std::nullopt, 3};
  const std::string error = error_of([&] { T5Tokenizer(SD_TINY_T5, 4, past); });
  EXPECT_NE(error.find("the manifest's pad_id 388 is not an id of the model (0..387)"), std::string::npos) << error;
}
