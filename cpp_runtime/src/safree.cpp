// SAFREE's text side with Eigen (safe_denoiser/runtime/safree_text.py in C++).
//
// Precision: everything is computed in float64 from the float32 inputs and rounded to float32 once, at the end, as
// safree_text.py does. Both results are then the float32 rounding of the same real numbers up to float64 error
// (about 1e-16 relative times the span's condition number), so they agree bit for bit except where an exact value
// lies within that error of a float32 rounding midpoint, which the parity tests have not met: the same PNG bytes
// from both runtimes. A float32 computation here would differ from numpy's float32 LAPACK and BLAS by their
// rounding (several float32 ulps, more for ill-conditioned spans), which the tiny UNet amplifies into pixels that
// differ by one level.
#include "safe_denoiser_cpp/safree.hpp"

#include <Eigen/Dense>
#include <algorithm>
#include <climits>
#include <cmath>
#include <limits>
#include <nlohmann/json.hpp>

#include "safe_denoiser_cpp/errors.hpp"
#include "safe_denoiser_cpp/json_limits.hpp"

namespace sdcpp {
namespace {
using nlohmann::json;
using RowMatrix = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

// The keys of a manifest's "safree" section: SafreeConfig's fields plus what the exporter adds (pooling,
// eos_token_id, concept_basis). Any other key is refused: it would be a setting this runtime ignores.
const char* const kKeys[] = {"concepts",      "alpha",          "self_validation",     "svf_max_step",
                             "svf_sharpness", "svf_midpoint",   "re_attention",        "re_attention_scales",
                             "re_attention_radius", "mask_token_id", "pooling", "eos_token_id", "vocab_size",
                             "concept_basis"};
// |U_C^T U_C - I| allowed: the exporter's float32 basis is orthonormal to about 1e-6.
constexpr double kOrthonormalTolerance = 1e-4;

std::string shown(const json& v) {
  const std::string s = v.dump();
  return s.size() > 60 ? s.substr(0, 57) + "..." : s;
}

[[noreturn]] void bad(const std::string& field, const std::string& expected, const json& got) {
  throw Error(ErrorKind::bundle, "manifest: safree." + field + " must be " + expected + ", got " + shown(got));
}

const json& required(const json& section, const std::string& key) {
  if (!section.contains(key)) {
    throw Error(ErrorKind::bundle, "manifest: safree." + key + " is missing (SAFREE's text side needs it; re-export "
                                   "the bundle with a matching safe-denoiser)");
  }
  return section.at(key);
}

bool finite_number(const json& v) { return v.is_number() && std::isfinite(v.get<double>()); }

double number(const json& section, const std::string& key, double lo, const std::string& expected) {
  const json& v = required(section, key);
  if (!finite_number(v) || v.get<double>() < lo) bad(key, expected, v);
  return v.get<double>();
}

int64_t integer(const json& section, const std::string& key, int64_t lo, int64_t hi) {
  const json& v = required(section, key);
  const auto i = json_integer_in(v, lo, hi);
  if (!i) bad(key, "an integer in " + std::to_string(lo) + ".." + std::to_string(hi), v);
  return *i;
}

bool boolean(const json& section, const std::string& key) {
  const json& v = required(section, key);
  if (!v.is_boolean()) bad(key, "true or false", v);
  return v.get<bool>();
}

// The latent re-attention is not exported (the exporter refuses it too): on with a scale other than 1 is refused.
void check_re_attention(const json& section) {
  if (section.contains("re_attention_scales")) {
    const json& scales = section.at("re_attention_scales");
    if (!scales.is_array() || scales.size() != 2 || !finite_number(scales[0]) || !finite_number(scales[1]) ||
        scales[0].get<double>() < 0 || scales[1].get<double>() < 0) {
      bad("re_attention_scales", "a pair of finite numbers >= 0", scales);
    }
  }
  if (section.contains("re_attention_radius")) integer(section, "re_attention_radius", 1, INT32_MAX);
  if (!section.contains("re_attention")) return;
  if (!boolean(section, "re_attention")) return;
  const json scales = section.value("re_attention_scales", json::array({0.9, 0.2}));
  if (scales[0].get<double>() != 1.0 || scales[1].get<double>() != 1.0) {
    bad("re_attention", "false (the latent re-attention is not exported and this runtime does not implement it)",
        section.at("re_attention"));
  }
}

// U_C (D, r): D rows of r finite numbers, 1 <= r <= D, orthonormal columns.
void read_concept_basis(const json& section, SafreeSettings& s) {
  const json& rows = required(section, "concept_basis");
  const std::string form = "a (D, r) list of D rows of r finite numbers with 1 <= r <= D";
  if (!rows.is_array() || rows.empty() || !rows[0].is_array() || rows[0].empty() || rows[0].size() > rows.size()) {
    bad("concept_basis", form, rows);
  }
  s.dim = static_cast<int64_t>(rows.size());
  s.rank = static_cast<int64_t>(rows[0].size());
  s.concept_basis.reserve(rows.size() * rows[0].size());
  for (size_t i = 0; i < rows.size(); ++i) {
    const json& row = rows[i];
    if (!row.is_array() || row.size() != rows[0].size()) bad("concept_basis[" + std::to_string(i) + "]", form, row);
    for (const json& v : row) {
      if (!finite_number(v) || std::abs(v.get<double>()) > 1.0) {
        bad("concept_basis[" + std::to_string(i) + "]", "finite numbers in -1..1 (an orthonormal basis)", row);
      }
      s.concept_basis.push_back(v.get<float>());
    }
  }
  const Eigen::Map<const Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>> u(
      s.concept_basis.data(), s.dim, s.rank);
  const Eigen::MatrixXd gram = u.cast<double>().transpose() * u.cast<double>();
  const double off = (gram - Eigen::MatrixXd::Identity(s.rank, s.rank)).cwiseAbs().maxCoeff();
  if (off > kOrthonormalTolerance) {
    throw Error(ErrorKind::bundle, "manifest: safree.concept_basis must have orthonormal columns (|U^T U - I| <= " +
                                       json(kOrthonormalTolerance).dump() + "), got " + json(off).dump());
  }
}

Eigen::MatrixXd concept_matrix(const SafreeSettings& s) {
  return Eigen::Map<const Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>>(
             s.concept_basis.data(), s.dim, s.rank)
      .cast<double>();
}

// (D, k) orthonormal basis of the span of the n rows of `masked` (n, D), with numpy's rank cut-off
// (tol = s_max max(n, D) eps, eps of the float32 inputs: safree_text.orthonormal_basis, the PyTorch side's rule).
// The basis itself is not unique (numpy's LAPACK and Eigen return bases that differ by a rotation within the span,
// and by signs); what the filter uses is the projector P_I = B B^T onto the span, which is unique once the rank is,
// so that is what must match. JacobiSVD (QR-preconditioned, float64) rather than an eigen-solver on the n x n Gram
// matrix: the Gram matrix squares the condition number, so its small singular values (the ones near tol) and their
// directions lose half the digits, where the SVD keeps them to float64 relative accuracy.
Eigen::MatrixXd prompt_span(const RowMatrix& masked) {
  const Eigen::JacobiSVD<Eigen::MatrixXd, Eigen::ColPivHouseholderQRPreconditioner> svd(masked.transpose(),
                                                                                         Eigen::ComputeThinU);
  const Eigen::VectorXd& sv = svd.singularValues();  // non-increasing
  const double eps = std::numeric_limits<float>::epsilon();
  const double tol = sv.size() > 0 ? sv(0) * static_cast<double>(std::max(masked.rows(), masked.cols())) * eps : 0.0;
  Eigen::Index rank = 0;
  while (rank < sv.size() && sv(rank) > tol) ++rank;
  return svd.matrixU().leftCols(rank);
}

// Trigger flags from the leave-one-out distances d_i = ||(I - P_C) p_i||: not (d_i < (1 + alpha) mean_{j != i} d_j);
// a one-token prompt is flagged.
std::vector<bool> detect_triggers(const RowMatrix& masked, const Eigen::MatrixXd& uc, double alpha) {
  const Eigen::Index n = masked.rows();
  if (n == 1) return {true};
  const RowMatrix residual = masked - (masked * uc) * uc.transpose();
  const Eigen::VectorXd d = residual.rowwise().norm();
  const double total = d.sum();
  std::vector<bool> flags(static_cast<size_t>(n));
  for (Eigen::Index i = 0; i < n; ++i) {
    const double others = (total - d(i)) / static_cast<double>(n - 1);
    flags[static_cast<size_t>(i)] = !(d(i) < (1.0 + alpha) * others);
  }
  return flags;
}

// Mean over the first `active` rows of cos(e_j, e~_j), with torch's cosine_similarity guard (eps 1e-8 on the
// product of the norms).
double mean_cosine(const RowMatrix& tokens, const RowMatrix& projected, int64_t active) {
  double sum = 0.0;
  for (Eigen::Index j = 0; j < active; ++j) {
    const double dot = tokens.row(j).dot(projected.row(j));
    const double norms = tokens.row(j).squaredNorm() * projected.row(j).squaredNorm();
    sum += dot / std::sqrt(std::max(norms, static_cast<double>(1e-16f)));  // numpy's float32(1e-16), widened
  }
  return sum / static_cast<double>(active);
}

std::vector<float> encoded(const TextEncoder& text_encoder, const std::vector<int64_t>& ids, int64_t rows,
                           int64_t row_size) {
  std::vector<float> hidden = text_encoder(ids, rows);
  if (static_cast<int64_t>(hidden.size()) != rows * row_size) {
    throw Error(ErrorKind::bundle, "text_encoder gave " + std::to_string(hidden.size()) + " values for " +
                                       std::to_string(rows) + " prompts, SAFREE expects (prompts, L, " +
                                       "safree.concept_basis's D)");
  }
  return hidden;
}
}  // namespace

SafreeSettings SafreeSettings::parse(const json& section) {
  if (!section.is_object()) {
    throw Error(ErrorKind::bundle, "manifest: safree must be an object of SAFREE settings, got " + shown(section));
  }
  for (const auto& item : section.items()) {
    if (std::find(std::begin(kKeys), std::end(kKeys), item.key()) == std::end(kKeys)) {
      throw Error(ErrorKind::bundle, "manifest: safree has the unknown key '" + item.key() +
                                         "' (a SAFREE setting this runtime does not implement)");
    }
  }
  SafreeSettings s;
  s.alpha = number(section, "alpha", -1.0, "a finite number > -1");
  if (!(s.alpha > -1.0)) bad("alpha", "a finite number > -1", section.at("alpha"));
  s.self_validation = boolean(section, "self_validation");
  s.svf_max_step = static_cast<int>(integer(section, "svf_max_step", 0, INT32_MAX));
  s.svf_sharpness = number(section, "svf_sharpness", 0.0, "a finite number >= 0");
  s.svf_midpoint = number(section, "svf_midpoint", -std::numeric_limits<double>::max(), "a finite number");
  // An id the text encoder has no row for would fail inside its Gather: refused here, by name.
  if (section.contains("vocab_size")) s.vocab_size = integer(section, "vocab_size", 1, INT32_MAX);
  const int64_t top_id = s.vocab_size > 0 ? s.vocab_size - 1 : INT32_MAX;
  s.mask_token_id = integer(section, "mask_token_id", 0, top_id);
  const json& pooling = required(section, "pooling");
  if (pooling != "eos" && pooling != "argmax") bad("pooling", "'eos' or 'argmax'", pooling);
  s.pooling = pooling == "eos" ? SafreePooling::eos : SafreePooling::argmax;
  if (s.pooling == SafreePooling::eos || section.contains("eos_token_id")) {
    s.eos_token_id = integer(section, "eos_token_id", 0, top_id);
  }
  if (section.contains("concepts")) {
    const json& concepts = section.at("concepts");
    if (!concepts.is_array() || !std::all_of(concepts.begin(), concepts.end(), [](const json& c) { return c.is_string(); })) {
      bad("concepts", "a list of strings", concepts);
    }
    s.concept_count = concepts.size();
  }
  check_re_attention(section);
  read_concept_basis(section, s);
  return s;
}

std::vector<int64_t> leave_one_out_ids(const std::vector<int64_t>& ids, int64_t n, int64_t mask_token_id) {
  const auto L = static_cast<int64_t>(ids.size());
  if (n < 0 || n > L - 2) throw Error(ErrorKind::input, "safree: " + std::to_string(n) + " real tokens in " + std::to_string(L) + " ids");
  std::vector<int64_t> rows;
  rows.reserve(static_cast<size_t>(n * L));
  for (int64_t i = 0; i < n; ++i) {
    rows.insert(rows.end(), ids.begin(), ids.end());
    rows[static_cast<size_t>(i * L + i + 1)] = mask_token_id;
  }
  return rows;
}

int64_t pooled_position(const int64_t* ids, int64_t length, const SafreeSettings& s) {
  if (s.pooling == SafreePooling::argmax) return std::max_element(ids, ids + length) - ids;
  const int64_t* eos = std::find(ids, ids + length, s.eos_token_id);
  return eos == ids + length ? 0 : eos - ids;  // numpy's argmax of an all-false mask
}

int svf_last_step(double mean_cosine, const SafreeSettings& s) {
  const double z = s.svf_sharpness * (1.0 - mean_cosine - s.svf_midpoint);
  const double sig = z >= 0 ? 1.0 / (1.0 + std::exp(-z)) : std::exp(z) / (1.0 + std::exp(z));
  const double t = static_cast<double>(s.svf_max_step) * sig;
  if (!std::isfinite(t)) throw Error(ErrorKind::runtime, "safree: the self-validating filter's step count is not finite");
  return static_cast<int>(std::nearbyint(t));  // the default rounding mode: ties to even, as Python's round
}

SafreePrompt safree_prompt(const SafreeSettings& s, const float* tokens, int64_t L, const float* masked, int64_t n,
                           int64_t active) {
  const int64_t D = s.dim;
  SafreePrompt out;
  out.filtered.assign(tokens, tokens + L * D);
  if (n == 0) return out;  // an empty prompt: nothing to detect, no span to project into
  if (n > L - 2 || active < 1 || active > L) {
    throw Error(ErrorKind::input, "safree: " + std::to_string(n) + " real tokens and " + std::to_string(active) +
                                      " active positions do not fit " + std::to_string(L) + " rows");
  }
  using FloatRows = Eigen::Map<const Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>>;
  const RowMatrix e = FloatRows(tokens, L, D).cast<double>();
  const RowMatrix m = FloatRows(masked, n, D).cast<double>();
  const Eigen::MatrixXd uc = concept_matrix(s);
  out.triggers = detect_triggers(m, uc, s.alpha);
  const Eigen::MatrixXd span = prompt_span(m);
  const RowMatrix x = (e * span) * span.transpose();          // rows e P_I
  const RowMatrix projected = x - (x * uc) * uc.transpose();  // rows e P_I (I - P_C)
  for (int64_t i = 0; i < n; ++i) {
    if (!out.triggers[static_cast<size_t>(i)]) continue;
    for (int64_t k = 0; k < D; ++k) out.filtered[static_cast<size_t>((i + 1) * D + k)] = static_cast<float>(projected(i + 1, k));
  }
  out.last_step = svf_last_step(mean_cosine(e, projected, active), s);
  return out;
}

void SafreeBatch::rows_at(size_t step, float* out) const {
  for (size_t b = 0; b < prompts.size(); ++b) {
    const bool filtered = every_step || static_cast<int64_t>(step) <= prompts[b].last_step;
    const float* src = filtered ? prompts[b].filtered.data() : original.data() + b * static_cast<size_t>(row_size);
    std::copy(src, src + row_size, out + b * static_cast<size_t>(row_size));
  }
}

SafreeBatch safree_encode(const SafreeSettings& s, const std::vector<ClipTokens>& prompts, int64_t L,
                          const TextEncoder& text_encoder) {
  const auto b = static_cast<int64_t>(prompts.size());
  SafreeBatch batch;
  batch.row_size = L * s.dim;
  batch.every_step = !s.self_validation;
  std::vector<int64_t> ids, masked_ids;
  std::vector<int64_t> counts;
  for (const auto& p : prompts) {
    ids.insert(ids.end(), p.ids.begin(), p.ids.end());
    counts.push_back(std::max<int64_t>(p.length - 2, 0));  // the real tokens between BOS and EOS
    const auto rows = leave_one_out_ids(p.ids, counts.back(), s.mask_token_id);
    masked_ids.insert(masked_ids.end(), rows.begin(), rows.end());
  }
  batch.original = encoded(text_encoder, ids, b, batch.row_size);
  const auto total = static_cast<int64_t>(masked_ids.size()) / L;
  std::vector<float> pooled(static_cast<size_t>(total * s.dim));
  if (total > 0) {
    const std::vector<float> hidden = encoded(text_encoder, masked_ids, total, L * s.dim);
    for (int64_t r = 0; r < total; ++r) {
      const int64_t pos = pooled_position(masked_ids.data() + r * L, L, s);
      const float* row = hidden.data() + (r * L + pos) * s.dim;
      std::copy(row, row + s.dim, pooled.begin() + r * s.dim);
    }
  }
  int64_t offset = 0;
  for (int64_t i = 0; i < b; ++i) {
    batch.prompts.push_back(safree_prompt(s, batch.original.data() + i * batch.row_size, L,
                                          pooled.data() + offset * s.dim, counts[static_cast<size_t>(i)],
                                          prompts[static_cast<size_t>(i)].length));
    offset += counts[static_cast<size_t>(i)];
  }
  return batch;
}

}  // namespace sdcpp
