// T5 tokenizer (see t5_tokenizer.hpp): libsentencepiece loads the model and normalizes (the model's precompiled
// charsmap, nmt_nfkc for T5); the segmentation and transformers' layer around it are here.
#include "safe_denoiser_cpp/t5_tokenizer.hpp"

#include <sentencepiece_processor.h>
#include <unicode/uniset.h>
#include <unicode/unistr.h>
#include <unicode/utf8.h>

#include <algorithm>
#include <bitset>
#include <limits>

#include "safe_denoiser_cpp/errors.hpp"
#include "safe_denoiser_cpp/files.hpp"
#include "safe_denoiser_cpp/tokenizer.hpp"

namespace sdcpp {
namespace {

std::string utf8_of(UChar32 c) {
  std::string out;
  icu::UnicodeString(c).toUTF8String(out);
  return out;
}

const std::string kSpace = "\xE2\x96\x81";  // U+2581, SentencePiece's (and Metaspace's) word boundary

size_t utf8_length(unsigned char lead) { return lead < 0x80 ? 1 : (lead >> 5) == 6 ? 2 : (lead >> 4) == 14 ? 3 : 4; }

// A special token's id from the model: -1 when the model has none.
int64_t piece_id(const sentencepiece::SentencePieceProcessor& model, const std::string& piece) {
  const int id = model.PieceToId(piece);
  return model.IdToPiece(id) == piece ? id : -1;
}

// T5TokenizerFast splits words at every White_Space character left after normalization; SentencePiece only at
// U+0020. nmt_nfkc maps most of them to U+0020 but keeps U+0085 (NEL): such characters encode to something on their
// own, and normalize() turns them into spaces first, as the fast tokenizer treats them.
std::vector<std::string> kept_white_space(const sentencepiece::SentencePieceProcessor& model) {
  UErrorCode error = U_ZERO_ERROR;
  const icu::UnicodeSet spaces(icu::UnicodeString(u"[:White_Space:]"), error);
  if (U_FAILURE(error)) throw Error(ErrorKind::runtime, "ICU: no White_Space set");
  std::vector<std::string> kept;
  for (int32_t r = 0; r < spaces.getRangeCount(); ++r) {
    for (UChar32 c = spaces.getRangeStart(r); c <= spaces.getRangeEnd(r); ++c) {
      std::vector<int> ids;
      if (c != U' ' && model.Encode(utf8_of(c), &ids).ok() && !ids.empty()) kept.push_back(utf8_of(c));
    }
  }
  return kept;
}

}  // namespace

T5Tokenizer::T5Tokenizer(const std::string& folder, int max_length, int extra_ids)
    : model_(std::make_unique<sentencepiece::SentencePieceProcessor>()), path_(folder + "/spiece.model"),
      max_length_(max_length) {
  const auto bad = [&](const std::string& why) { return Error(ErrorKind::bundle, "T5 tokenizer '" + path_ + "': " + why); };
  if (max_length < 1 || max_length > kMaxLength) {
    throw bad("max_length must be in 1.." + std::to_string(kMaxLength) + ", got " + std::to_string(max_length));
  }
  if (extra_ids < 0 || extra_ids > 10000) throw bad("extra_ids must be in 0..10000, got " + std::to_string(extra_ids));
  std::string bytes;
  try {
    bytes = read_file(path_);
  } catch (const Error&) {
    throw bad("cannot read the file (the runtime reads T5's SentencePiece model, spiece.model)");
  }
  const auto status = model_->LoadFromSerializedProto(bytes);
  if (!status.ok()) throw bad("not a SentencePiece model: " + status.ToString());
  pad_ = piece_id(*model_, "<pad>");
  eos_ = piece_id(*model_, "</s>");
  if (pad_ < 0 || eos_ < 0) throw bad("the model has no <pad> or no </s> piece (T5's have both)");
  unk_ = model_->unk_id();
  if (unk_ < 0 || !model_->IsUnknown(static_cast<int>(unk_))) throw bad("the model has no <unk> piece");
  const int pieces = model_->GetPieceSize();
  vocab_size_ = static_cast<int64_t>(pieces) + extra_ids;
  // The fast tokenizer's Unigram vocabulary: every piece with its score (control pieces included, at 0) and the
  // sentinels at 0; an unknown character scores the lowest piece score - 10, as in SentencePiece.
  double min_score = std::numeric_limits<double>::max();
  for (int id = 0; id < pieces; ++id) {
    const std::string& piece = model_->IdToPiece(id);
    pieces_.emplace(piece, Piece{id, model_->GetScore(id)});
    min_score = std::min(min_score, static_cast<double>(model_->GetScore(id)));
    // transformers' added tokens, matched in the raw text: the control and unknown pieces (<pad>, </s>, <unk>).
    if (model_->IsControl(id) || model_->IsUnknown(id)) special_.emplace_back(piece, id);
  }
  for (int n = 0; n < extra_ids; ++n) {
    const std::string sentinel = "<extra_id_" + std::to_string(n) + ">";
    const int64_t id = static_cast<int64_t>(pieces) + extra_ids - 1 - n;
    special_.emplace_back(sentinel, id);
    pieces_.emplace(sentinel, Piece{id, 0.0});
  }
  for (const auto& [piece, info] : pieces_) longest_piece_ = std::max(longest_piece_, piece.size());
  unk_score_ = std::min(min_score, 0.0) - 10.0;
  kept_spaces_ = kept_white_space(*model_);
}

T5Tokenizer::T5Tokenizer(const std::string& folder, int max_length, const SpecialTokenIds& special)
    : T5Tokenizer(folder, max_length, special.extra_ids) {
  for (const auto& [field, id] : {std::pair<const char*, int64_t>{"pad_id", special.pad}, {"eos_id", special.eos}}) {
    if (id < 0 || id >= vocab_size_) {
      throw Error(ErrorKind::bundle, "T5 tokenizer '" + path_ + "': the manifest's " + field + " " +
                                         std::to_string(id) + " is not an id of the model (0.." +
                                         std::to_string(vocab_size_ - 1) + ")");
    }
  }
  pad_ = special.pad;
  eos_ = special.eos;
}

T5Tokenizer::~T5Tokenizer() = default;
T5Tokenizer::T5Tokenizer(T5Tokenizer&&) noexcept = default;
T5Tokenizer& T5Tokenizer::operator=(T5Tokenizer&&) noexcept = default;

// SentencePiece's normalization of one stretch of text: the charsmap, whitespace collapsed to single "▁" and a "▁"
// in front (the fast tokenizer's WhitespaceSplit + Metaspace(prepend_scheme="always")). The pieces of its own
// segmentation concatenate to the normalized text (an unknown piece is its normalized surface).
std::string T5Tokenizer::normalize(const std::string& text) const {
  std::string spaced;
  spaced.reserve(text.size());
  for (size_t p = 0; p < text.size();) {
    const auto kept = std::find_if(kept_spaces_.begin(), kept_spaces_.end(),
                                   [&](const std::string& s) { return text.compare(p, s.size(), s) == 0; });
    if (kept != kept_spaces_.end()) {
      spaced += ' ';
      p += kept->size();
    } else {
      spaced += text[p++];
    }
  }
  sentencepiece::ImmutableSentencePieceText encoded;
  const auto status = model_->Encode(spaced, encoded.mutable_proto());
  if (!status.ok()) throw Error(ErrorKind::runtime, "T5 tokenizer '" + path_ + "': " + status.ToString());
  std::string normalized;
  for (size_t i = 0; i < encoded.pieces_size(); ++i) normalized += encoded.pieces(static_cast<int>(i)).piece();
  return normalized;
}

// The tokenizers library's Unigram encode_optimized: the best path ending at each byte (float64 sums; on a tie the
// path found first, i.e. the longest last piece, stays), unknown characters as <unk>, consecutive ones fused.
void T5Tokenizer::segment_word(const std::string& word, std::vector<int64_t>& ids) const {
  struct Best {
    double score = 0;
    size_t start = std::string::npos;  // npos: no path ends here yet
    int64_t id = 0;
  };
  std::vector<Best> best(word.size() + 1);
  best[0].start = 0;
  for (size_t start = 0; start < word.size();) {
    const size_t char_len = std::min(utf8_length(static_cast<unsigned char>(word[start])), word.size() - start);
    const auto offer = [&](size_t end, int64_t id, double score) {
      const double total = best[start].score + score;
      if (best[end].start == std::string::npos || total > best[end].score) best[end] = Best{total, start, id};
    };
    bool single_char_piece = false;
    for (size_t len = 1; len <= longest_piece_ && start + len <= word.size(); ++len) {
      const auto it = pieces_.find(word.substr(start, len));
      if (it == pieces_.end()) continue;
      offer(start + len, it->second.id, it->second.score);
      single_char_piece = single_char_piece || len == char_len;
    }
    if (!single_char_piece) offer(start + char_len, unk_, unk_score_);
    start += char_len;
  }
  std::vector<int64_t> reversed;
  for (size_t end = word.size(); end > 0; end = best[end].start) {
    const int64_t id = best[end].id;
    if (!(id == unk_ && !reversed.empty() && reversed.back() == unk_)) reversed.push_back(id);
  }
  ids.insert(ids.end(), reversed.rbegin(), reversed.rend());
}

// One stretch of text between special tokens, word by word ("▁" starts each word).
void T5Tokenizer::encode_text(const std::string& text, std::vector<int64_t>& ids) const {
  const std::string normalized = normalize(text);
  for (size_t start = 0; start < normalized.size();) {
    size_t next = normalized.find(kSpace, start + kSpace.size());
    if (next == std::string::npos) next = normalized.size();
    segment_word(normalized.substr(start, next - start), ids);
    start = next;
  }
}

T5Encoding T5Tokenizer::encode(const std::string& text) const {
  if (!valid_utf8(text)) throw Error(ErrorKind::input, "prompt: not valid UTF-8 text");
  std::bitset<256> first_bytes;  // a special token can start only where one of these is
  for (const auto& [content, id] : special_) first_bytes.set(static_cast<unsigned char>(content[0]));
  const auto keep = static_cast<size_t>(max_length_ - 1);  // room for </s>
  std::vector<int64_t> ids;
  size_t start = 0;
  for (size_t p = 0; p < text.size() && ids.size() < keep;) {  // later text cannot change the kept ids
    size_t best_len = 0;
    int64_t best_id = 0;
    if (first_bytes.test(static_cast<unsigned char>(text[p]))) {
      for (const auto& [content, id] : special_) {
        if (content.size() > best_len && text.compare(p, content.size(), content) == 0) {
          best_len = content.size();
          best_id = id;
        }
      }
    }
    if (best_len == 0) {
      ++p;
      continue;
    }
    encode_text(text.substr(start, p - start), ids);
    ids.push_back(best_id);
    p += best_len;
    start = p;
  }
  if (ids.size() < keep) encode_text(text.substr(start), ids);
  if (ids.size() > keep) ids.resize(keep);
  T5Encoding out;
  out.ids = std::move(ids);
  out.ids.push_back(eos_);
  out.attention_mask.assign(out.ids.size(), 1);
  out.ids.resize(static_cast<size_t>(max_length_), pad_);
  out.attention_mask.resize(static_cast<size_t>(max_length_), 0);
  return out;
}

}  // namespace sdcpp
