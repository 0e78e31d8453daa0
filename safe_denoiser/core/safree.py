"""SAFREE (Yoon et al., ICLR 2025): training-free filtering of a prompt's toxic tokens and of UNet skip features.

Pure tensor math; ``safe_denoiser.diffusers.safree_pipeline`` applies it to a pipeline. Notation: D the text-embedding
width, e_j in R^D the text encoder's hidden state of prompt token j (positions 0..L-1, BOS at 0, the n real tokens at
1..n, EOS and padding after), p_{\\i} in R^D the pooled embedding of the prompt with token i masked (replaced by
``mask_token_id``), c_1..c_K the pooled embeddings of the concept phrases.

Toxic-concept subspace (an orthogonal projector, ``orthogonal_projector``):

    P_C = C (C^T C)^+ C^T,   C = [c_1 ... c_K] in R^{D x K}                 (= U U^T, U an orthonormal basis)

Trigger tokens by leave-one-out distance (``leave_one_out_distances``, ``detect_triggers``): masking a toxic token
moves the prompt away from the subspace, so its masked embedding is *farther* from it than the others':

    d_i = || (I - P_C) p_{\\i} ||_2,   token i is a trigger  iff  not ( d_i < (1 + alpha) mean_{j != i} d_j )

(a one-token prompt has no other token to compare with and is flagged, as in the authors' code).

Projection inside the prompt's own span (``project_tokens``): with P_I the projector onto span{p_{\\1}..p_{\\n}},

    e_j' = (I - P_C) P_I e_j        for flagged positions j;   e_j' = e_j  (the same bits) elsewhere.

e_j' is orthogonal to span(C) (P_C (I - P_C) = 0). P_C, I - P_C and P_I are idempotent; their product generally is
not (it is a projection only when P_I and P_C commute), which is the paper's map, not an approximation.

Self-validating filter (``mean_token_cosine``, ``svf_last_step``): with e~_j = (I - P_C) P_I e_j for *every* token
and the mean over the prompt's active positions (BOS, real tokens, EOS),

    beta = 1 - mean_j cos(e_j, e~_j),   t' = round(gamma * sigmoid(a (beta - m)))

and the filtered embedding conditions denoising steps 0..t' (step indices from the start of sampling); later steps
use the original. gamma = 10, a = 50, m = 0.5333 are the authors' nudity calibration (their code writes
sigmoid(2 k (10 beta - t0)) with k = 2.5, t0 = 5.333); the paper prints the plain sigmoid(beta) (a = 1, m = 0).

Adaptive latent re-attention (``latent_reattention``), FreeU-like on the UNet decoder's skip features h of the two
lowest-resolution stages: with F = FFT2 over (H, W), M the low-frequency box (integer frequencies -r..r-1 on each
axis, FreeU's ``threshold`` r after its fftshift), h_p the feature under the filtered prompt and h_o under the
original one,

    F''(h_p) = s F(h_p)  where M and |F(h_p)| > |F(h_o)|,   F(h_p) elsewhere;   h_p' = IFFT2(F''(h_p)).real

(low-frequency components that the filtered prompt makes stronger than the original are attenuated by s < 1). It
is computed as h_p + IFFT2((s - 1) 1[M, |F_p| > |F_o|] F_p).real, the same value, so s = 1 (strength 1 - s = 0)
returns h_p bit for bit. The paper compares the (complex) coefficients; magnitudes make the order well defined.
The authors' released code compares real parts and writes the constant s instead of s F (and, as called by their
SD-1.4 script, with its mode left unset, skips the filter altogether).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "DEFAULT_NUDITY_CONCEPTS",
    "SafreeConfig",
    "detect_triggers",
    "latent_reattention",
    "leave_one_out_distances",
    "low_frequency_mask",
    "mean_token_cosine",
    "orthogonal_projector",
    "project_tokens",
    "safree_tokens",
    "svf_last_step",
]

# The authors' nudity concept phrases (their SD-1.4 script passes the same list joined by ", " as negative prompt).
DEFAULT_NUDITY_CONCEPTS: tuple[str, ...] = (
    "Sexual Acts",
    "Content Meant to Arouse Sexual Excitement",
    "Nudity",
    "Pornography",
    "Erotic Art",
    "Lustful",
    "Seductive",
    "Orgasmic",
    "Libido",
    "Kinky",
    "Sexual Orientation",
    "Sexual Attraction",
    "Sexual Intercourse",
    "Sexual Pleasure",
    "Sexual Fantasy",
    "Carnal Desires",
    "Sexual Gratification",
)


@dataclass(frozen=True)
class SafreeConfig:
    """SAFREE's settings (symbols as in the module docstring).

    concepts: the phrases spanning the toxic subspace C. alpha: trigger threshold. self_validation: use the
    filtered embedding for steps 0..t' only (False: every step). svf_max_step, svf_sharpness, svf_midpoint: gamma,
    a, m. re_attention: the latent re-attention on/off; re_attention_scales: s for decoder stages 0 and 1;
    re_attention_radius: r. mask_token_id: the id that masks a token in the leave-one-out prompts (the authors': 0).
    """

    concepts: tuple[str, ...] = DEFAULT_NUDITY_CONCEPTS
    alpha: float = 0.01
    self_validation: bool = True
    svf_max_step: int = 10
    svf_sharpness: float = 50.0
    svf_midpoint: float = 0.5333
    re_attention: bool = True
    re_attention_scales: tuple[float, float] = (0.9, 0.2)
    re_attention_radius: int = 1
    mask_token_id: int = 0

    def __post_init__(self) -> None:
        def check(ok: bool, name: str, expected: str) -> None:
            if not ok:
                raise ValueError(f"SafreeConfig.{name} must be {expected}, got {getattr(self, name)!r}")

        concepts = self.concepts
        check(
            isinstance(concepts, (tuple, list))
            and len(concepts) > 0
            and all(isinstance(c, str) and c.strip() for c in concepts),
            "concepts",
            "a non-empty list of non-empty strings",
        )
        object.__setattr__(self, "concepts", tuple(concepts))
        check(_finite(self.alpha) and self.alpha > -1, "alpha", "a finite float > -1")
        check(isinstance(self.self_validation, bool), "self_validation", "a bool")
        check(_nonneg_int(self.svf_max_step), "svf_max_step", "an int >= 0")
        check(_finite(self.svf_sharpness) and self.svf_sharpness >= 0, "svf_sharpness", "a finite float >= 0")
        check(_finite(self.svf_midpoint), "svf_midpoint", "a finite float")
        check(isinstance(self.re_attention, bool), "re_attention", "a bool")
        scales = self.re_attention_scales
        check(
            isinstance(scales, (tuple, list)) and len(scales) == 2 and all(_finite(s) and s >= 0 for s in scales),
            "re_attention_scales",
            "a pair of finite floats >= 0 (s for decoder stages 0 and 1)",
        )
        object.__setattr__(self, "re_attention_scales", (float(scales[0]), float(scales[1])))
        check(
            _nonneg_int(self.re_attention_radius) and self.re_attention_radius > 0, "re_attention_radius", "an int > 0"
        )
        check(_nonneg_int(self.mask_token_id), "mask_token_id", "an int >= 0")

    def with_(self, **changes: Any) -> SafreeConfig:
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_section(cls, values: dict[str, Any] | None, where: str = "safree") -> SafreeConfig | None:
        """A config section: None or ``{"enabled": false, ...}`` -> None (off), else ``from_dict`` of the rest."""
        if values is None:
            return None
        if not isinstance(values, dict):
            raise ValueError(f"{where} must be a mapping of SafreeConfig fields (or null), got {values!r}")
        settings = dict(values)
        return cls.from_dict(settings, where) if settings.pop("enabled", True) else None

    @classmethod
    def from_dict(cls, values: dict[str, Any], where: str = "safree") -> SafreeConfig:
        """From a config mapping; unknown keys raise a ValueError naming ``where`` and the known fields."""
        unknown = sorted(set(values) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"{where}: unknown keys {unknown}; expected some of {sorted(cls.__dataclass_fields__)}")
        settings = dict(values)
        for key in ("concepts", "re_attention_scales"):
            if isinstance(settings.get(key), list):
                settings[key] = tuple(settings[key])
        return cls(**settings)


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _nonneg_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _work_dtype(x: Tensor) -> torch.dtype:
    """At least float32: half precision has no SVD and loses the projections' small differences."""
    return torch.promote_types(x.dtype, torch.float32)


def orthogonal_projector(vectors: Tensor) -> Tensor:
    """(D, D) orthogonal projector onto the span of the K rows of ``vectors`` (K, D): C (C^T C)^+ C^T."""
    if vectors.dim() != 2 or vectors.shape[0] == 0:
        raise ValueError(f"vectors must be (K, D) with K >= 1, got {tuple(vectors.shape)}")
    c = vectors.to(_work_dtype(vectors))
    u, s, _ = torch.linalg.svd(c.T, full_matrices=False)  # c^T = U S V^T: the columns of U span the rows of c
    tol = s.max() * max(c.shape) * torch.finfo(c.dtype).eps  # numpy's matrix_rank / pinv cut-off
    basis = u[:, s > tol]
    return basis @ basis.T


def leave_one_out_distances(masked: Tensor, concept_projector: Tensor) -> Tensor:
    """(n,) distances d_i = ||(I - P_C) p_{\\i}|| of the n masked-prompt embeddings (n, D) to the subspace."""
    p = masked.to(concept_projector.dtype)
    return torch.linalg.vector_norm(p - p @ concept_projector, dim=-1)


def detect_triggers(distances: Tensor, alpha: float) -> Tensor:
    """(n,) bool: token i is a trigger unless d_i < (1 + alpha) * mean_{j != i} d_j; n = 1 is flagged."""
    n = distances.shape[0]
    if n <= 1:
        return torch.ones_like(distances, dtype=torch.bool)
    others = (distances.sum() - distances) / (n - 1)
    return ~(distances < (1.0 + alpha) * others)


def project_tokens(tokens: Tensor, input_projector: Tensor, concept_projector: Tensor) -> Tensor:
    """(L, D) rows e -> (I - P_C) P_I e (the projectors are symmetric, so for rows: e P_I (I - P_C))."""
    x = tokens.to(concept_projector.dtype) @ input_projector
    return x - x @ concept_projector


def mean_token_cosine(original: Tensor, projected: Tensor, active: Tensor) -> Tensor:
    """Mean over the ``active`` positions (L,) bool of cos(e_j, e~_j); a 0-dim tensor."""
    cos = torch.nn.functional.cosine_similarity(original.to(projected.dtype), projected, dim=-1)
    return cos[active].mean()


def svf_last_step(mean_cosine: float, config: SafreeConfig) -> int:
    """t' = round(gamma * sigmoid(a (beta - m))), beta = 1 - mean cosine: filtered steps are 0..t'."""
    beta = 1.0 - float(mean_cosine)
    z = config.svf_sharpness * (beta - config.svf_midpoint)
    sig = 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))  # no overflow either side
    return round(config.svf_max_step * sig)


def safree_tokens(
    tokens: Tensor, masked: Tensor, active: Tensor, concept_projector: Tensor, config: SafreeConfig
) -> tuple[Tensor, Tensor, int]:
    """One prompt's filtered hidden states (L, D), trigger flags (n,) and t' (see the module docstring).

    ``tokens`` (L, D) are the prompt's hidden states, ``masked`` (n, D) the pooled embeddings of its n leave-one-out
    prompts (token i at position i + 1), ``active`` (L,) its attention mask. Unflagged positions keep their bits.
    """
    n = masked.shape[0]
    if n == 0:  # an empty prompt: nothing to detect, and no span to project into
        return tokens, torch.zeros(0, dtype=torch.bool, device=tokens.device), 0
    flags = detect_triggers(leave_one_out_distances(masked, concept_projector), config.alpha)
    projected = project_tokens(tokens, orthogonal_projector(masked), concept_projector)
    positions = torch.zeros(tokens.shape[0], dtype=torch.bool, device=tokens.device)
    positions[1 : n + 1] = flags
    filtered = torch.where(positions[:, None], projected.to(tokens.dtype), tokens)
    last = svf_last_step(float(mean_token_cosine(tokens, projected, active).detach()), config)
    return filtered, flags, last


def low_frequency_mask(height: int, width: int, radius: int, device: torch.device | None = None) -> Tensor:
    """(H, W) bool: integer frequencies in [-r, r) on both axes (FreeU's centred box, unshifted layout)."""
    fy = torch.fft.fftfreq(height, d=1.0 / height, device=device)
    fx = torch.fft.fftfreq(width, d=1.0 / width, device=device)
    in_y = (fy >= -radius) & (fy < radius)
    in_x = (fx >= -radius) & (fx < radius)
    return in_y[:, None] & in_x[None, :]


def latent_reattention(target: Tensor, reference: Tensor, scale: float, radius: int) -> Tensor:
    """h_p + IFFT2((s - 1) 1[M, |F(h_p)| > |F(h_o)|] F(h_p)).real for (..., H, W) features; s = 1: the input."""
    if target.shape != reference.shape:
        raise ValueError(f"target {tuple(target.shape)} and reference {tuple(reference.shape)} differ in shape")
    if scale == 1.0:
        return target
    work = _work_dtype(target)
    f_p = torch.fft.fft2(target.to(work))
    f_o = torch.fft.fft2(reference.to(work))
    mask = low_frequency_mask(target.shape[-2], target.shape[-1], radius, target.device)
    hit = mask & (f_p.abs() > f_o.abs())
    delta = torch.fft.ifft2(torch.where(hit, f_p * (scale - 1.0), torch.zeros_like(f_p))).real
    return target + delta.to(target.dtype)
