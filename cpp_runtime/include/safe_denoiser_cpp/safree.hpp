// SAFREE's text side (safe_denoiser/runtime/safree_text.py; the equations are in safe_denoiser/core/safree.py's
// docstring): a prompt token is a trigger when masking it moves the prompt's pooled embedding away from the concept
// subspace; the trigger rows are projected out of that subspace inside the prompt's own span, and the
// self-validating filter conditions steps 0..t' on the filtered rows. The manifest's "safree" section configures it.
#pragma once

#include <cstdint>
#include <functional>
#include <nlohmann/json_fwd.hpp>
#include <string>
#include <vector>

#include "safe_denoiser_cpp/tokenizer.hpp"

namespace sdcpp {

// Where CLIP pools its last hidden state: the first eos_token_id, or the highest id (configs whose eos_token_id is
// the legacy 2, where the EOS id is the vocabulary's last).
enum class SafreePooling { eos, argmax };

// manifest "safree": what the text side uses. The latent re-attention is not exported (a manifest that turns it on
// with a scale other than 1 is refused).
struct SafreeSettings {
  double alpha = 0.01;          // trigger threshold: d_i >= (1 + alpha) mean_{j != i} d_j
  bool self_validation = true;  // false: the filtered rows condition every step
  int svf_max_step = 10;        // gamma
  double svf_sharpness = 50.0;  // a
  double svf_midpoint = 0.5333; // m
  int64_t mask_token_id = 0;    // replaces token i in the i-th leave-one-out prompt
  SafreePooling pooling = SafreePooling::eos;
  int64_t eos_token_id = 0;
  int64_t vocab_size = 0;       // the text encoder's vocabulary (0: not recorded); the ids above lie below it
  size_t concept_count = 0;     // phrases behind the basis (`concepts`; informational)
  int64_t dim = 0, rank = 0;    // concept_basis is (dim, rank): dim the text encoder's width
  std::vector<float> concept_basis;  // U_C row-major (dim, rank), orthonormal columns

  // Validate the section (Error(bundle) naming `safree.<field>` and the expected form).
  static SafreeSettings parse(const nlohmann::json& section);
};

// One prompt's result: its rows (L, D) with the trigger rows filtered, per real token whether it is a trigger, t'.
struct SafreePrompt {
  std::vector<float> filtered;
  std::vector<bool> triggers;
  int last_step = 0;
};

// (n, L): `ids` (L) with real token i (position i + 1) replaced by mask_token_id in row i.
std::vector<int64_t> leave_one_out_ids(const std::vector<int64_t>& ids, int64_t n, int64_t mask_token_id);
// The pooled row's position in `ids` (L): the first eos_token_id (0 when absent) or the first highest id.
int64_t pooled_position(const int64_t* ids, int64_t length, const SafreeSettings& s);
// t' = round(gamma sigmoid(a (1 - mean_cosine - m))), ties to even as Python's round.
int svf_last_step(double mean_cosine, const SafreeSettings& s);
// One prompt (safree_text.safree_prompt): `tokens` (L, D) its hidden states, `masked` (n, D) the pooled rows of its
// n leave-one-out prompts, `active` the attention mask's ones (its first positions). D == s.dim.
SafreePrompt safree_prompt(const SafreeSettings& s, const float* tokens, int64_t L, const float* masked, int64_t n,
                           int64_t active);

// A batch's prompt conditioning under SAFREE: per prompt its original and filtered rows, and which a step uses.
struct SafreeBatch {
  std::vector<float> original;  // (B, L, D): the prompts' hidden states
  std::vector<SafreePrompt> prompts;
  int64_t row_size = 0;         // L * D
  bool every_step = false;      // no self-validation: the filtered rows at every step
  // Bundle._safree_rows: image b's filtered rows for steps 0..t' (every step without self-validation), its
  // original rows after; written to `out` (B, L, D).
  void rows_at(size_t step, float* out) const;
};

// text_encoder.onnx on `rows` prompts of ids (rows, L): its last hidden state (rows, L, D).
using TextEncoder = std::function<std::vector<float>(const std::vector<int64_t>& ids, int64_t rows)>;
// Bundle.encode_safree: one text-encoder call on the prompts and one on all their leave-one-out prompts.
SafreeBatch safree_encode(const SafreeSettings& s, const std::vector<ClipTokens>& prompts, int64_t L,
                          const TextEncoder& text_encoder);

}  // namespace sdcpp
