// CLIP BPE tokenizer from tokenizer.json (see tokenizer.hpp). Unicode: ICU (NFC, White_Space, general categories,
// per-character full lower-casing as Rust's char::to_lowercase does).
#include "safe_denoiser_cpp/tokenizer.hpp"

#include <unicode/normalizer2.h>
#include <unicode/uchar.h>
#include <unicode/unistr.h>
#include <unicode/ustring.h>
#include <unicode/utf8.h>

#include <algorithm>
#include <climits>
#include <nlohmann/json.hpp>

#include "safe_denoiser_cpp/files.hpp"
#include "safe_denoiser_cpp/errors.hpp"
#include "safe_denoiser_cpp/json_limits.hpp"

namespace sdcpp {
namespace {
using nlohmann::json;

[[noreturn]] void bad(const std::string& dir, const std::string& why) {
  throw Error(ErrorKind::bundle, "tokenizer '" + dir + "': " + why);
}

// tokenizer_config.json's model_max_length. Hugging Face writes 1e30 there for "no limit": anything but an integer
// in 1..4095 means CLIP's 77.
int config_max_length(const json& config) {
  const auto n = config.contains("model_max_length") ? json_integer_in(config.at("model_max_length"), 1, 4095)
                                                     : std::nullopt;
  return static_cast<int>(n.value_or(77));
}

// A token id: a JSON integer in 0..2^31-1 (a float id such as 5e19 is refused, not converted: see json_integer_in).
int64_t token_id(const json& v, const std::string& dir, const std::string& field) {
  const auto id = json_integer_in(v, 0, INT32_MAX);
  if (!id) {
    const std::string got = v.dump();
    bad(dir, "tokenizer.json " + field + " must be an integer id in 0..2147483647, got " + got.substr(0, 60));
  }
  return *id;
}

bool is_letter(UChar32 c) { return (U_GET_GC_MASK(c) & U_GC_L_MASK) != 0; }
bool is_number(UChar32 c) { return (U_GET_GC_MASK(c) & U_GC_N_MASK) != 0; }
bool is_space(UChar32 c) { return u_hasBinaryProperty(c, UCHAR_WHITE_SPACE) != 0; }

std::u32string to_u32(const icu::UnicodeString& s) {
  std::u32string out;
  for (int32_t i = 0; i < s.length();) {
    const UChar32 c = s.char32At(i);
    out.push_back(static_cast<char32_t>(c));
    i += U16_LENGTH(c);
  }
  return out;
}

std::string to_utf8(const std::u32string& s) {
  icu::UnicodeString u;
  for (const char32_t c : s) u.append(static_cast<UChar32>(c));
  std::string out;
  u.toUTF8String(out);
  return out;
}

// NFC, \s+ -> " ", then per-character full lower-casing (no context: Rust's char::to_lowercase).
std::u32string normalize(const std::string& text) {
  UErrorCode status = U_ZERO_ERROR;
  const icu::Normalizer2* nfc = icu::Normalizer2::getNFCInstance(status);
  if (U_FAILURE(status)) throw Error(ErrorKind::runtime, "ICU: no NFC normalizer");
  const icu::UnicodeString normalized = nfc->normalize(icu::UnicodeString::fromUTF8(text), status);
  if (U_FAILURE(status)) throw Error(ErrorKind::input, "prompt: not normalizable text");
  std::u32string out;
  bool in_space = false;
  for (const char32_t c : to_u32(normalized)) {
    if (is_space(static_cast<UChar32>(c))) {
      if (!in_space) out.push_back(U' ');
      in_space = true;
      continue;
    }
    in_space = false;
    UChar src[2];
    int32_t len = 0;
    U16_APPEND_UNSAFE(src, len, static_cast<UChar32>(c));
    UChar dst[8];
    status = U_ZERO_ERROR;
    const int32_t n = u_strToLower(dst, 8, src, len, "", &status);
    if (U_FAILURE(status)) { out.push_back(c); continue; }
    for (int32_t i = 0; i < n;) {
      UChar32 lc;
      U16_NEXT(dst, i, n, lc);
      out.push_back(static_cast<char32_t>(lc));
    }
  }
  return out;
}

bool starts_with(const std::u32string& s, size_t p, const std::u32string& prefix) {
  return s.compare(p, prefix.size(), prefix) == 0;
}

// The CLIP split: <|startoftext|>|<|endoftext|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+,
// then ByteLevel's GPT-2 split, which leaves every piece whole except the two special-token spellings.
std::vector<std::u32string> split_words(const std::u32string& s) {
  static const std::u32string fixed[] = {U"<|startoftext|>", U"<|endoftext|>", U"'s", U"'t", U"'re", U"'ve",
                                         U"'m", U"'ll", U"'d"};
  std::vector<std::u32string> words;
  size_t p = 0;
  while (p < s.size()) {
    bool matched = false;
    for (const auto& f : fixed) {
      if (starts_with(s, p, f)) {
        if (f[0] == U'<') {  // ByteLevel's own GPT-2 split then cuts the special-token piece in three
          words.push_back(U"<|");
          words.push_back(f.substr(2, f.size() - 4));
          words.push_back(U"|>");
        } else {
          words.push_back(f);
        }
        p += f.size();
        matched = true;
        break;
      }
    }
    if (matched) continue;
    const auto c = static_cast<UChar32>(s[p]);
    size_t q = p + 1;
    if (is_letter(c)) {
      while (q < s.size() && is_letter(static_cast<UChar32>(s[q]))) ++q;
    } else if (is_number(c)) {
      // one code point
    } else if (!is_space(c)) {
      while (q < s.size()) {
        const auto d = static_cast<UChar32>(s[q]);
        if (is_space(d) || is_letter(d) || is_number(d)) break;
        ++q;
      }
    } else {
      ++p;  // whitespace separates words and is dropped
      continue;
    }
    words.push_back(s.substr(p, q - p));
    p = q;
  }
  return words;
}

// GPT-2's bytes_to_unicode: printable bytes map to themselves, the others to U+0100 onwards.
const std::vector<std::string>& byte_chars() {
  static const std::vector<std::string> table = [] {
    std::vector<std::string> t(256);
    int extra = 0;
    for (int b = 0; b < 256; ++b) {
      const bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
      t[b] = to_utf8(std::u32string(1, static_cast<char32_t>(printable ? b : 256 + extra++)));
    }
    return t;
  }();
  return table;
}

std::vector<std::string> utf8_chars(const std::string& s) {
  std::vector<std::string> out;
  for (size_t i = 0; i < s.size();) {
    const auto c = static_cast<unsigned char>(s[i]);
    const size_t n = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : 4;
    out.push_back(s.substr(i, n));
    i += n;
  }
  return out;
}

// A merge as tokenizers writes it: "a b" (older files) or ["a", "b"].
std::pair<std::string, std::string> merge_pair(const json& merge, const std::string& dir) {
  if (!merge.is_string()) return {merge.at(0).get<std::string>(), merge.at(1).get<std::string>()};
  const std::string m = merge.get<std::string>();
  const auto space = m.find(' ');
  if (space == std::string::npos) bad(dir, "merge '" + m + "' is not 'a b'");
  return {m.substr(0, space), m.substr(space + 1)};
}
}  // namespace

bool valid_utf8(std::string_view text) {
  const auto* s = reinterpret_cast<const uint8_t*>(text.data());
  const auto length = static_cast<int64_t>(text.size());
  for (int64_t i = 0; i < length;) {
    if (length - i > INT32_MAX) return false;  // ICU indexes with int32_t: prompts are far shorter
    UChar32 c = 0;
    int32_t offset = 0;
    U8_NEXT(s + i, offset, static_cast<int32_t>(length - i), c);  // c < 0: ill-formed, overlong or a surrogate
    if (c < 0) return false;
    i += offset;
  }
  return true;
}

// The recorded special ids in place of tokenizer.json's (see tokenizer.hpp): BOS / EOS must be the post_processor's
// (what transformers adds), the padding id one of the vocabulary (model.vocab or added_tokens).
void ClipTokenizer::use_special(const SpecialTokenIds& special, const std::string& dir) {
  const auto differs = [&](const char* field, int64_t recorded, int64_t found, const char* where) {
    bad(dir, std::string("the manifest's ") + field + " " + std::to_string(recorded) + " is not tokenizer.json's " +
                 where + " id " + std::to_string(found) + " (re-export the bundle, or restore the folder)");
  };
  if (!special.bos || *special.bos != bos_) differs("bos_id", special.bos.value_or(-1), bos_, "post_processor.cls");
  if (special.eos != eos_) differs("eos_id", special.eos, eos_, "post_processor.sep");
  bool known = std::any_of(vocab_.begin(), vocab_.end(), [&](const auto& v) { return v.second == special.pad; });
  known = known || std::any_of(added_.begin(), added_.end(), [&](const auto& a) { return a.second == special.pad; });
  if (!known) bad(dir, "the manifest's pad_id " + std::to_string(special.pad) + " is not an id of tokenizer.json");
  pad_ = special.pad;
}

ClipTokenizer ClipTokenizer::load(const std::string& dir, int max_length,
                                  const std::optional<SpecialTokenIds>& special) {
  if (max_length != 0 && (max_length < 2 || max_length > 4095)) {
    bad(dir, "max_length must be in 2..4095 (BOS, EOS and the text), got " + std::to_string(max_length));
  }
  std::string text;
  try {
    text = read_file(dir + "/tokenizer.json");
  } catch (const Error&) {
    bad(dir, "no tokenizer.json (the runtime reads the Hugging Face tokenizers format)");
  }
  if (json_nesting_exceeds(text, 64)) bad(dir, "tokenizer.json is nested deeper than 64 levels");
  json tok, config;
  try {
    tok = json::parse(text);
  } catch (const json::exception& e) {
    bad(dir, std::string("tokenizer.json is not JSON: ") + e.what());
  }
  try {
    text = read_file(dir + "/tokenizer_config.json");
    config = json::object();
    if (!json_nesting_exceeds(text, 64)) config = json::parse(text);  // optional: unreadable means absent
  } catch (const std::exception&) {
    config = json::object();
  }
  ClipTokenizer t;
  try {
    const auto& model = tok.at("model");
    if (model.value("type", std::string()) != "BPE") bad(dir, "model type must be BPE");
    for (const auto& [token, id] : model.at("vocab").items()) t.vocab_[token] = token_id(id, dir, "model.vocab values");
    int rank = 0;
    for (const auto& merge : model.at("merges")) t.ranks_[merge_pair(merge, dir)] = rank++;
    if (model.contains("end_of_word_suffix") && model.at("end_of_word_suffix").is_string()) {
      t.suffix_ = model.at("end_of_word_suffix").get<std::string>();
    }
    if (model.contains("unk_token") && model.at("unk_token").is_string()) {
      const auto it = t.vocab_.find(model.at("unk_token").get<std::string>());
      if (it != t.vocab_.end()) t.unk_ = it->second;
    }
    for (const auto& added : tok.value("added_tokens", json::array())) {
      if (added.value("special", false)) {
        const int64_t id = token_id(added.at("id"), dir, "added_tokens[].id");
        t.added_.emplace_back(added.at("content").get<std::string>(), id);
      }
    }
    const auto& post = tok.at("post_processor");
    if (post.value("type", std::string()) != "RobertaProcessing") bad(dir, "post_processor must be RobertaProcessing (CLIP)");
    t.bos_ = token_id(post.at("cls").at(1), dir, "post_processor.cls[1]");
    t.eos_ = token_id(post.at("sep").at(1), dir, "post_processor.sep[1]");
    const json* padding = tok.contains("padding") && tok.at("padding").is_object() ? &tok.at("padding") : nullptr;
    t.pad_ = padding && padding->contains("pad_id") ? token_id(padding->at("pad_id"), dir, "padding.pad_id") : t.eos_;
    const auto normalizers = tok.at("normalizer").dump();
    if (normalizers.find("NFC") == std::string::npos || normalizers.find("Lowercase") == std::string::npos) {
      bad(dir, "normalizer is not CLIP's (NFC, whitespace, lowercase): " + normalizers.substr(0, 200));
    }
  } catch (const json::exception& e) {
    bad(dir, std::string("unexpected tokenizer.json content: ") + e.what());
  }
  if (special) t.use_special(*special, dir);
  t.max_length_ = max_length != 0 ? max_length : config_max_length(config);
  return t;
}

std::vector<std::string> ClipTokenizer::bpe(const std::string& word) const {
  std::vector<std::string> parts = utf8_chars(word);
  if (parts.empty()) return parts;
  parts.back() += suffix_;
  while (parts.size() > 1) {
    int best = INT_MAX;
    size_t at = 0;
    for (size_t i = 0; i + 1 < parts.size(); ++i) {
      const auto it = ranks_.find({parts[i], parts[i + 1]});
      if (it != ranks_.end() && it->second < best) { best = it->second; at = i; }
    }
    if (best == INT_MAX) break;
    const std::string a = parts[at], b = parts[at + 1];
    std::vector<std::string> merged;
    for (size_t i = 0; i < parts.size();) {  // merge every occurrence of (a, b), left to right
      if (i + 1 < parts.size() && parts[i] == a && parts[i + 1] == b) {
        merged.push_back(a + b);
        i += 2;
      } else {
        merged.push_back(parts[i++]);
      }
    }
    parts = std::move(merged);
  }
  return parts;
}

ClipTokens ClipTokenizer::tokenize(const std::string& text) const {
  if (!valid_utf8(text)) throw Error(ErrorKind::input, "prompt: not valid UTF-8 text");
  std::vector<int64_t> ids;
  const auto& bytes = byte_chars();
  const auto encode_segment = [&](const std::string& segment) {
    for (const auto& word : split_words(normalize(segment))) {
      std::string mapped;
      for (const unsigned char b : to_utf8(word)) mapped += bytes[b];
      for (const auto& piece : bpe(mapped)) {
        const auto it = vocab_.find(piece);
        if (it != vocab_.end()) {
          ids.push_back(it->second);
        } else if (unk_ >= 0) {
          ids.push_back(unk_);
        } else {
          throw Error(ErrorKind::input, "prompt: token '" + piece + "' is not in the vocabulary and there is no unk");
        }
      }
    }
  };
  // Special tokens in the raw text are matched first (leftmost, longest) and never normalized.
  size_t start = 0, p = 0;
  while (p < text.size()) {
    size_t best_len = 0;
    int64_t best_id = 0;
    for (const auto& [content, id] : added_) {
      if (content.size() > best_len && text.compare(p, content.size(), content) == 0) {
        best_len = content.size();
        best_id = id;
      }
    }
    if (best_len == 0) { ++p; continue; }
    encode_segment(text.substr(start, p - start));
    ids.push_back(best_id);
    p += best_len;
    start = p;
  }
  encode_segment(text.substr(start));
  const auto keep = static_cast<size_t>(max_length_ - 2);
  if (ids.size() > keep) ids.resize(keep);
  ClipTokens out{{bos_}, std::min(static_cast<int>(ids.size()) + 2, max_length_)};
  out.ids.insert(out.ids.end(), ids.begin(), ids.end());
  out.ids.push_back(eos_);
  out.ids.resize(static_cast<size_t>(max_length_), pad_);
  return out;
}

}  // namespace sdcpp
