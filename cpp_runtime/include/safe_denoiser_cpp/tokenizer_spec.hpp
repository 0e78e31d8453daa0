// The manifest's `tokenizers` entries of a flow bundle (SD3, Flux): one typed value per tokenizer folder, as
// safe_denoiser/runtime/tokenizer_spec.py's TokenizerSpec (docs/bundle_format.md, "manifest.json: tokenizers").
#pragma once

#include <nlohmann/json_fwd.hpp>
#include <string>
#include <vector>

#include "safe_denoiser_cpp/tokenizer.hpp"

namespace sdcpp {

// "clip": byte-level BPE read from <folder>/tokenizer.json (ClipTokenizer); "t5": SentencePiece read from
// <folder>/spiece.model (T5Tokenizer).
enum class TokenizerKind { clip, t5 };
const char* tokenizer_kind_name(TokenizerKind kind);

struct TokenizerSpec {
  std::string folder;  // inside the bundle (contract.hpp checks the path)
  TokenizerKind kind = TokenizerKind::clip;
  std::string input;   // the text_encoder input its ids feed
  int max_length = 77; // every prompt padded / truncated to it
  // pad_id, eos_id, and bos_id (clip) or extra_ids (t5): required (a manifest without them was exported before they
  // were recorded, and tokenizer.json alone does not say them: re-export).
  SpecialTokenIds special;
  // padding "max_length" and truncation true are the only values the format allows (checked on parse).

  // The file of `folder` this kind's tokenizer reads: "tokenizer.json" or "spiece.model".
  const char* required_file() const { return kind == TokenizerKind::clip ? "tokenizer.json" : "spiece.model"; }
};

// manifest `tokenizers` (absent or null: none). Error(bundle) naming `tokenizers[i].<field>` and the expected form.
std::vector<TokenizerSpec> parse_tokenizer_specs(const nlohmann::json& manifest);

// Error(bundle) naming the folder and the file when a spec's folder or its kind's file is missing in bundle_dir.
void check_tokenizer_folders(const std::string& bundle_dir, const std::vector<TokenizerSpec>& specs);

}  // namespace sdcpp
