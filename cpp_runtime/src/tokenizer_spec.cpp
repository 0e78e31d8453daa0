// manifest `tokenizers` (tokenizer_spec.hpp).
#include "safe_denoiser_cpp/tokenizer_spec.hpp"

#include <sys/stat.h>

#include <climits>

#include <nlohmann/json.hpp>

#include "safe_denoiser_cpp/errors.hpp"
#include "safe_denoiser_cpp/json_limits.hpp"

namespace sdcpp {
namespace {
using nlohmann::json;

[[noreturn]] void bad(const std::string& field, const std::string& expected, const json& got) {
  const std::string shown = got.dump();
  throw Error(ErrorKind::bundle, "manifest: " + field + " must be " + expected + ", got " +
                                     (shown.size() > 60 ? shown.substr(0, 57) + "..." : shown));
}

bool has_type(const std::string& path, mode_t type) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0 && (st.st_mode & S_IFMT) == type;
}

// The recorded special ids of one entry (tokenizer_spec.py's SPECIAL_ID_KEYS): clip pad_id, eos_id, bos_id; t5
// pad_id, eos_id, extra_ids. A key of the other kind must be absent (or null / 0, as Python writes none).
SpecialTokenIds parse_special(const json& entry, TokenizerKind kind, const std::string& where) {
  const auto id = [&](const char* key, int64_t high) -> int64_t {
    if (!entry.contains(key)) {
      throw Error(ErrorKind::bundle, "manifest: " + where + " has no " + key +
                                         " (exported before special token ids were recorded): re-export the bundle");
    }
    const auto n = json_integer_in(entry.at(key), 0, high);
    if (!n) bad(where + "." + key, "an integer in 0.." + std::to_string(high), entry.at(key));
    return *n;
  };
  const auto absent = [&](const char* key) {
    if (entry.contains(key) && !entry.at(key).is_null() && entry.at(key) != 0) {
      bad(where + "." + key, std::string("absent for a ") + tokenizer_kind_name(kind) + " tokenizer", entry.at(key));
    }
  };
  SpecialTokenIds special;
  special.pad = id("pad_id", INT32_MAX);
  special.eos = id("eos_id", INT32_MAX);
  if (kind == TokenizerKind::clip) {
    special.bos = id("bos_id", INT32_MAX);
    absent("extra_ids");
  } else {
    special.extra_ids = static_cast<int>(id("extra_ids", 10000));
    absent("bos_id");
  }
  return special;
}

TokenizerSpec parse_spec(const json& entry, const std::string& where) {
  if (!entry.is_object()) {
    bad(where, "an object {folder, kind, input, max_length, pad_id, eos_id, bos_id | extra_ids, padding, truncation}",
        entry);
  }
  const auto text = [&](const char* key) -> std::string {
    if (!entry.contains(key) || !entry.at(key).is_string() || entry.at(key).get<std::string>().empty()) {
      bad(where + "." + key, "a non-empty string", entry.value(key, json(nullptr)));
    }
    return entry.at(key).get<std::string>();
  };
  TokenizerSpec spec;
  spec.folder = text("folder");
  const std::string kind = text("kind");
  if (kind != "clip" && kind != "t5") bad(where + ".kind", "'clip' or 't5'", entry.at("kind"));
  spec.kind = kind == "clip" ? TokenizerKind::clip : TokenizerKind::t5;
  spec.input = text("input");
  const json& length = entry.contains("max_length") ? entry.at("max_length") : json(nullptr);
  const auto n = json_integer_in(length, 2, 65536);
  if (!n) bad(where + ".max_length", "an integer in 2..65536", length);
  spec.max_length = static_cast<int>(*n);
  spec.special = parse_special(entry, spec.kind, where);
  if (entry.contains("padding") && entry.at("padding") != "max_length") {
    bad(where + ".padding", "'max_length' (how the SD3 / Flux pipelines tokenize)", entry.at("padding"));
  }
  if (entry.contains("truncation") && entry.at("truncation") != true) {
    bad(where + ".truncation", "true (how the SD3 / Flux pipelines tokenize)", entry.at("truncation"));
  }
  return spec;
}
}  // namespace

const char* tokenizer_kind_name(TokenizerKind kind) { return kind == TokenizerKind::clip ? "clip" : "t5"; }

std::vector<TokenizerSpec> parse_tokenizer_specs(const json& manifest) {
  std::vector<TokenizerSpec> specs;
  if (!manifest.contains("tokenizers") || manifest.at("tokenizers").is_null()) return specs;
  const json& list = manifest.at("tokenizers");
  if (!list.is_array()) bad("tokenizers", "a list of tokenizer entries", list);
  for (size_t i = 0; i < list.size(); ++i) {
    specs.push_back(parse_spec(list[i], "tokenizers[" + std::to_string(i) + "]"));
    for (size_t j = 0; j < i; ++j) {
      if (specs[j].input == specs[i].input) {
        bad("tokenizers[" + std::to_string(i) + "].input", "a text_encoder input no other entry feeds", list[i].at("input"));
      }
    }
  }
  return specs;
}

void check_tokenizer_folders(const std::string& bundle_dir, const std::vector<TokenizerSpec>& specs) {
  for (const auto& spec : specs) {
    const std::string folder = bundle_dir + "/" + spec.folder;
    if (!has_type(folder, S_IFDIR)) {
      throw Error(ErrorKind::bundle, "bundle '" + bundle_dir + "': tokenizer folder '" + spec.folder + "' is missing");
    }
    if (!has_type(folder + "/" + spec.required_file(), S_IFREG)) {
      throw Error(ErrorKind::bundle, "bundle '" + bundle_dir + "': tokenizer folder '" + spec.folder + "' (" +
                                         tokenizer_kind_name(spec.kind) + ") has no '" + spec.required_file() +
                                         "', which a " + tokenizer_kind_name(spec.kind) + " tokenizer is read from");
    }
  }
}

}  // namespace sdcpp
