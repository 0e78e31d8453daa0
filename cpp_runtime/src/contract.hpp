// The manifest contract (safe_denoiser/runtime/contract.py is its Python twin): file names stay inside the bundle,
// and every number the manifest states agrees with where it is used. Each failure is an Error(bundle) whose message
// names the manifest field: "manifest: <field> must be <expected>, got <value>". The shared list of bad manifests
// that both runtimes must refuse is tests/test_manifest_contract.py.
#pragma once

#include <nlohmann/json.hpp>
#include <string>
#include <utility>
#include <vector>

namespace sdcpp {

// A relative '/'-separated path with no empty, "." or ".." component, no backslash and no NUL.
bool is_bundle_relative(const std::string& name);

// Every file name the manifest states, as (field, name): graphs' files and external data, the tokenizer folder,
// tokenizers[i].folder, the keys of `files`. Each must be a string passing is_bundle_relative (Error naming the
// field otherwise). A new file field is added here, and in contract.py's file_fields.
std::vector<std::pair<std::string, std::string>> manifest_file_fields(const nlohmann::json& data);

// `name` (already is_bundle_relative) resolved with its symlinks lies inside the bundle folder's real path; a name
// that does not exist passes (the caller reports it missing).
void check_inside_bundle(const std::string& bundle_dir, const std::string& name, const std::string& field);

// The manifest's numbers against each other and against its graph specs: default steps and guidance scale, the
// scheduler tables against the scheduler config (VP: alphas_cumprod from the beta schedule within a float32 bound;
// flow: the training sigmas of the flow section), the denoiser's I/O names and static dims, the text encoder's and
// VAE's, the banks, the class labels, the flow section. Reads no file.
void check_manifest_numbers(const nlohmann::json& data);

// check_manifest_numbers on manifest.json's text when it is JSON of this format and version (anything else is left
// for Manifest::parse to report). Manifest::load calls it; Manifest::parse (content only) does not.
void check_manifest_contract(const std::string& text);

}  // namespace sdcpp
