// manifest.json: what the runtime reads from a bundle's manifest (safe_denoiser/runtime/manifest.py holds the full
// format), and its loader, which validates the bundle as Manifest.load does.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "safe_denoiser_cpp/flow_sampler.hpp"
#include "safe_denoiser_cpp/integrity.hpp"
#include "safe_denoiser_cpp/safree.hpp"
#include "safe_denoiser_cpp/scheduler.hpp"
#include "safe_denoiser_cpp/tokenizer_spec.hpp"

namespace sdcpp {

// Largest |classifier-free guidance scale| (manifest, CLI, requests): past it the guided prediction is thousands of
// standard deviations off and the sample saturates or overflows (safe_denoiser.core.guidance.MAX_STRENGTH's reason).
constexpr double kMaxGuidance = 1e3;

inline constexpr const char* kFormat = "safe-denoiser.bundle";
inline constexpr int kFormatVersion = 2;  // manifest.json format_version this runtime reads

// One graph input or output.
struct TensorSpec {
  std::string name;
  std::string dtype;           // "float32", "int64", "bool"
  std::vector<int64_t> shape;  // -1 for a symbolic dimension ("batch", "height", ...)
};

// One ONNX file of the bundle and the I/O its session must have.
struct GraphSpec {
  std::string file;
  std::optional<std::string> external_data;
  std::vector<TensorSpec> inputs;
  std::vector<TensorSpec> outputs;
  // The provider the file was optimised offline for (`optimization.provider`, export --optimize); absent: as traced.
  std::optional<std::string> optimized_for;
  // `optimization.requires_provider` (export --optimize cuda): fused operators only `optimized_for` runs.
  bool requires_optimized_for = false;
  const TensorSpec* input(const std::string& name) const;
  const TensorSpec* output(const std::string& name) const;
};

// A bank stored as a constant inside denoiser.onnx.
struct BankInfo {
  int64_t count = 0;
  std::vector<int64_t> sample_shape;
  std::string sha256;
  std::string initializer = "negative_bank";
  std::string dtype = "float32";              // storage inside the graph: "float32" or "float16"
  std::optional<std::string> reference_kind;  // the odds preset's reference bank: "safe" or "data"
};

// The safe denoiser's preset family (manifest guidance.preset). The graph computes the correction; the runtime
// only needs what changes its inputs: odds carries a reference bank, reference takes re-noise (input `noise`).
// sgf (Safety-Guided Flow's MMD gradient) and shielded (Shielded Diffusion's sparse repellency) correct the
// prediction inside the graph from the negative bank alone, like constant and mass: no input of their own.
enum class GuidancePreset { constant, mass, odds, reference, sgf, shielded };
// "constant" / "mass" / "odds" / "reference" / "sgf" / "shielded" -> GuidancePreset; Error(bundle) naming `field`
// and the value else.
GuidancePreset parse_guidance_preset(const std::string& name, const std::string& field = "guidance.preset");
const char* guidance_preset_name(GuidancePreset preset);

// manifest `guidance` (the fields the runtime uses; the others configure the graph at export).
struct GuidanceInfo {
  GuidancePreset preset = GuidancePreset::constant;
  double window_lo = 0.0, window_hi = 0.0;  // timesteps where the correction (and the re-noise) applies
  std::optional<double> threshold;          // reference: a fixed gate threshold (absent: computed at export)
};

struct Manifest {
  std::string model_kind;  // "class-conditional" or "text-to-image"
  std::string source;
  std::vector<int64_t> sample_shape;  // (C, H, W)
  int num_inference_steps = 0;
  double guidance_scale = 1.0;
  SchedulerInfo scheduler;
  std::optional<GuidanceInfo> guidance;  // absent: correction off
  std::optional<double> reference_threshold_alpha_bar;
  std::optional<int> reference_threshold_steps;
  bool has_sld = false;
  std::optional<BankInfo> bank;
  std::optional<BankInfo> reference_bank;  // the odds preset's reference bank (inside denoiser.onnx)
  std::optional<std::string> tokenizer;
  std::optional<FlowInfo> flow;            // path "flow" (SD3, Flux): the flow sampler's settings; absent: VP path
  std::vector<TokenizerSpec> tokenizers;   // flow bundles: one per text_encoder input (tokenizer_spec.hpp)
  std::optional<SafreeSettings> safree;     // SAFREE's text side (text-to-image bundles; safree.hpp)
  std::optional<int64_t> null_class;        // the "no class" label
  std::optional<int64_t> num_class_labels;  // class-embedding rows; absent in older bundles (0..null_class only)
  std::map<std::string, GraphSpec> graphs;
  std::map<std::string, std::string> files;  // relative path -> sha256 of every graph, data and tokenizer file
  // Every file name the manifest states, as (field, name) (src/contract.hpp): checked to stay inside the bundle.
  std::vector<std::pair<std::string, std::string>> file_fields;
  Verification files_check;  // how load checked the files (hashed / from the verified-files cache; zeros: not checked)

  bool has_preset(GuidancePreset preset) const { return guidance && guidance->preset == preset; }
  // The reference preset: denoiser.onnx takes the re-noise input `noise`.
  bool reference() const { return has_preset(GuidancePreset::reference); }
  int64_t sample_size() const;  // C * H * W
  int64_t null_label() const { return null_class.value_or(0); }
  int64_t class_label_max() const { return num_class_labels ? *num_class_labels - 1 : null_label(); }
  // The sampler a request gets on this bundle, decided here only: none requested -> the path's default (VP: ddim,
  // flow: flow_euler); a sampler of the other path -> Error(input) naming `field` and the accepted values.
  Sampler resolve_sampler(std::optional<Sampler> requested, const std::string& field = "sampler") const;
  // Parse and validate as Manifest.load does: format and version, keys, files present, bank hash (check_bank),
  // every file listed in `files` against its sha256 (check_files; false skips reading them, for huge bundles).
  static Manifest load(const std::string& bundle_dir, bool check_bank = true, bool check_files = true);
  // load() without reading the graphs and files: the caller runs check_banks and verifies `files` (Runtime::open
  // verifies them while the sessions open: BackgroundVerification).
  static Manifest read(const std::string& bundle_dir);
  // The bank's (and reference bank's) shape, storage dtype and sha256 inside denoiser.onnx against their records.
  void check_banks(const std::string& bundle_dir) const;
  // The graphs' external-data files (weight bytes read at offsets their graph states).
  std::set<std::string> external_data_files() const;
  static Manifest parse(const std::string& json_text);  // format, version and content only
};

}  // namespace sdcpp
