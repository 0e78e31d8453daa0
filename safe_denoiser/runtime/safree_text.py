"""SAFREE's text side in numpy, for bundles (no torch): trigger detection, projection and the filter's step count.

The same equations as ``safe_denoiser.core.safree`` (see its docstring), on what a bundle's graphs give: the masked
prompts' pooled embeddings are rows of ``text_encoder.onnx``'s ``last_hidden_state`` (CLIP pools the final hidden
state at the EOS position, ``pooled_rows``), and the toxic subspace ships as its orthonormal basis U_C (D, r) in
the manifest's ``safree`` section (``SafreeSettings``, parsed and checked once), computed at export from the concept
phrases. The prompt's own span needs an SVD of its n <= 75 masked embeddings, which ONNX has no operator for:
``numpy.linalg.svd`` here, with the same rank cut-off as the PyTorch side (numpy's max(n, D) eps sigma_max).

A runtime then passes the filtered ``prompt_embeds`` to the unchanged denoiser graph for steps 0..t' and the original
ones after (``Bundle.sample`` does it when the manifest has a ``safree`` section and the prompts are given as text).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

__all__ = [
    "SAFREE_KEYS",
    "SafreePrompt",
    "SafreeSettings",
    "masked_ids",
    "orthonormal_basis",
    "pooled_rows",
    "safree_prompt",
    "svf_last_step",
]


@dataclass(frozen=True)
class SafreePrompt:
    """One prompt's result: filtered hidden states (L, D), per real token whether it is a trigger, and t'."""

    filtered: np.ndarray
    triggers: tuple[bool, ...]
    last_step: int


# The keys of a manifest's "safree" section (cpp_runtime/src/safree.cpp's kKeys): SafreeConfig's fields and what the
# exporter adds. Any other key is refused: it would be a setting the runtimes ignore.
SAFREE_KEYS = (
    *("concepts", "alpha", "self_validation", "svf_max_step", "svf_sharpness", "svf_midpoint", "re_attention"),
    *("re_attention_scales", "re_attention_radius", "mask_token_id", "pooling", "eos_token_id", "vocab_size"),
    "concept_basis",
)
_INT32_MAX = 2**31 - 1
_ORTHONORMAL_TOLERANCE = 1e-4  # |U_C^T U_C - I| allowed: the exporter's float32 basis is orthonormal to about 1e-6


def _section_error(message: str) -> ValueError:
    from .manifest import ManifestError  # manifest.py imports this module

    return ManifestError(f"manifest: safree{message}")


def _bad(key: str, expected: str, got: Any) -> ValueError:
    shown = repr(got)
    return _section_error(f".{key} must be {expected}, got {shown[:57] + '...' if len(shown) > 60 else shown}")


def _required(section: Mapping[str, Any], key: str) -> Any:
    if key not in section:
        raise _section_error(
            f".{key} is missing (SAFREE's text side needs it; re-export the bundle with a matching safe-denoiser)"
        )
    return section[key]


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _integer(section: Mapping[str, Any], key: str, lo: int, hi: int) -> int:
    v = _required(section, key)
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise _bad(key, f"an integer in {lo}..{hi}", v)
    return v


def _float(section: Mapping[str, Any], key: str, ok: Any, expected: str) -> float:
    v = _required(section, key)
    if not (_number(v) and ok(float(v))):
        raise _bad(key, expected, v)
    return float(v)


@dataclass(frozen=True, eq=False)
class SafreeSettings:
    """The manifest's ``safree`` section, parsed and checked once (``from_dict``; the same rules, field names and
    messages as cpp_runtime/src/safree.cpp's ``SafreeSettings::parse``). ``concept_basis`` is U_C (D, r) float32
    with orthonormal columns; ``vocab_size`` the text encoder's vocabulary (None in bundles exported before it was
    recorded), which ``mask_token_id`` and ``eos_token_id`` lie below. The latent re-attention is not exported: a
    section that turns it on with a scale other than 1 is refused."""

    concept_basis: np.ndarray
    alpha: float = 0.01
    self_validation: bool = True
    svf_max_step: int = 10
    svf_sharpness: float = 50.0
    svf_midpoint: float = 0.5333
    mask_token_id: int = 0
    pooling: Literal["eos", "argmax"] = "eos"
    eos_token_id: int | None = None
    vocab_size: int | None = None
    concepts: tuple[str, ...] = ()
    re_attention: bool = False
    re_attention_scales: tuple[float, float] = (0.9, 0.2)
    re_attention_radius: int = 1

    @property
    def dim(self) -> int:
        """D: the text encoder's width that the basis lives in."""
        return int(self.concept_basis.shape[0])

    @classmethod
    def from_dict(cls, section: Any) -> SafreeSettings:
        """``ManifestError`` naming ``safree.<field>`` and the expected form for anything the runtimes cannot use."""
        if not isinstance(section, dict):
            raise _section_error(f" must be an object of SAFREE settings, got {section!r:.60}")
        unknown = [k for k in section if k not in SAFREE_KEYS]
        if unknown:
            raise _section_error(
                f" has the unknown key {unknown[0]!r} (a SAFREE setting this runtime does not implement)"
            )
        self_validation = _required(section, "self_validation")
        if not isinstance(self_validation, bool):
            raise _bad("self_validation", "true or false", self_validation)
        pooling = _required(section, "pooling")
        if pooling not in ("eos", "argmax"):
            raise _bad("pooling", "'eos' or 'argmax'", pooling)
        concepts = section.get("concepts", [])
        if not isinstance(concepts, list) or not all(isinstance(c, str) for c in concepts):
            raise _bad("concepts", "a list of strings", concepts)
        vocab = _integer(section, "vocab_size", 1, _INT32_MAX) if "vocab_size" in section else None
        top = _INT32_MAX if vocab is None else vocab - 1
        eos = None
        if pooling == "eos" or "eos_token_id" in section:
            eos = _integer(section, "eos_token_id", 0, top)
        return cls(
            alpha=_float(section, "alpha", lambda v: v > -1, "a finite number > -1"),
            self_validation=self_validation,
            svf_max_step=_integer(section, "svf_max_step", 0, _INT32_MAX),
            svf_sharpness=_float(section, "svf_sharpness", lambda v: v >= 0, "a finite number >= 0"),
            svf_midpoint=_float(section, "svf_midpoint", lambda v: True, "a finite number"),
            mask_token_id=_integer(section, "mask_token_id", 0, top),
            pooling=pooling,
            eos_token_id=eos,
            vocab_size=vocab,
            concepts=tuple(concepts),
            **_re_attention(section),
            concept_basis=_concept_basis(_required(section, "concept_basis")),
        )

    def to_dict(self) -> dict[str, Any]:
        """The manifest's section (``from_dict``'s inverse; unset optional ids are left out)."""
        d: dict[str, Any] = {
            "concepts": list(self.concepts),
            "alpha": self.alpha,
            "self_validation": self.self_validation,
            "svf_max_step": self.svf_max_step,
            "svf_sharpness": self.svf_sharpness,
            "svf_midpoint": self.svf_midpoint,
            "re_attention": self.re_attention,
            "re_attention_scales": list(self.re_attention_scales),
            "re_attention_radius": self.re_attention_radius,
            "mask_token_id": self.mask_token_id,
            "pooling": self.pooling,
        }
        d |= {k: v for k, v in (("eos_token_id", self.eos_token_id), ("vocab_size", self.vocab_size)) if v is not None}
        return d | {"concept_basis": self.concept_basis.tolist()}


def _re_attention(section: Mapping[str, Any]) -> dict[str, Any]:
    """The latent re-attention's settings: recorded, and refused when on with a scale other than 1."""
    scales = section.get("re_attention_scales", [0.9, 0.2])
    if not (isinstance(scales, list) and len(scales) == 2 and all(_number(v) and v >= 0 for v in scales)):
        raise _bad("re_attention_scales", "a pair of finite numbers >= 0", scales)
    radius = _integer(section, "re_attention_radius", 1, _INT32_MAX) if "re_attention_radius" in section else 1
    on = section.get("re_attention", False)
    if not isinstance(on, bool):
        raise _bad("re_attention", "true or false", on)
    if on and any(float(v) != 1.0 for v in scales):
        raise _bad(
            "re_attention", "false (the latent re-attention is not exported and this runtime does not implement it)", on
        )
    return {
        "re_attention": on,
        "re_attention_scales": (float(scales[0]), float(scales[1])),
        "re_attention_radius": radius,
    }


def _concept_basis(rows: Any) -> np.ndarray:
    """U_C (D, r): D rows of r finite numbers in -1..1, 1 <= r <= D, orthonormal columns; as float32."""
    form = "a (D, r) list of D rows of r finite numbers with 1 <= r <= D"
    if not (isinstance(rows, list) and rows and isinstance(rows[0], list) and 0 < len(rows[0]) <= len(rows)):
        raise _bad("concept_basis", form, rows)
    for i, row in enumerate(rows):
        if not isinstance(row, list) or len(row) != len(rows[0]):
            raise _bad(f"concept_basis[{i}]", form, row)
        if not all(_number(v) and abs(v) <= 1.0 for v in row):
            raise _bad(f"concept_basis[{i}]", "finite numbers in -1..1 (an orthonormal basis)", row)
    basis = np.asarray(rows, dtype=np.float32)
    wide = basis.astype(np.float64)
    off = float(np.abs(wide.T @ wide - np.eye(basis.shape[1])).max())
    if off > _ORTHONORMAL_TOLERANCE:
        raise _section_error(
            f".concept_basis must have orthonormal columns (|U^T U - I| <= {_ORTHONORMAL_TOLERANCE}), got {off!r}"
        )
    return basis


def orthonormal_basis(vectors: np.ndarray, eps: float | None = None) -> np.ndarray:
    """(D, r) orthonormal basis of the span of the K rows of ``vectors`` (K, D) (numpy's rank cut-off; ``eps``: the
    precision it is relative to, default the dtype's)."""
    u, s, _ = np.linalg.svd(vectors.T, full_matrices=False)
    tol = s.max() * max(vectors.shape) * (np.finfo(vectors.dtype).eps if eps is None else eps)
    return np.ascontiguousarray(u[:, s > tol])


def masked_ids(ids: np.ndarray, n: int, mask_token_id: int) -> np.ndarray:
    """(n, L): the prompt's ids (L,) with real token i (position i + 1) replaced by ``mask_token_id`` in row i."""
    rows = np.repeat(ids[None, :], n, axis=0)
    rows[np.arange(n), np.arange(n) + 1] = mask_token_id
    return rows


def pooled_rows(hidden: np.ndarray, ids: np.ndarray, settings: SafreeSettings) -> np.ndarray:
    """(N, D) CLIP's pooled output from its last hidden state (N, L, D): the row at the EOS position."""
    if settings.pooling == "argmax":  # CLIP configs with the legacy eos_token_id 2: the highest id is EOS
        position = ids.argmax(axis=-1)
    else:
        position = (ids == settings.eos_token_id).astype(np.int64).argmax(axis=-1)
    return hidden[np.arange(hidden.shape[0]), position]


def svf_last_step(mean_cosine: float, settings: SafreeSettings) -> int:
    """t' = round(gamma * sigmoid(a (beta - m))), beta = 1 - mean cosine (``core.safree.svf_last_step``)."""
    z = settings.svf_sharpness * (1.0 - float(mean_cosine) - settings.svf_midpoint)
    sig = 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))
    return round(settings.svf_max_step * sig)


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine, with torch's cosine_similarity guard (eps 1e-8 on the product of the norms)."""
    na, nb = (a * a).sum(-1), (b * b).sum(-1)
    return (a * b).sum(-1) / np.sqrt(np.maximum(na * nb, np.float32(1e-16)))


def safree_prompt(tokens: np.ndarray, masked: np.ndarray, active: np.ndarray, settings: SafreeSettings) -> SafreePrompt:
    """One prompt's filtered hidden states (``core.safree.safree_tokens`` in numpy).

    ``tokens`` (L, D) the prompt's hidden states, ``masked`` (n, D) the pooled embeddings of its n leave-one-out
    prompts, ``active`` (L,) its attention mask, ``settings.concept_basis`` (D, r) U_C; unflagged positions keep
    their bits.
    Computed in float64 and rounded to the tokens' dtype once, as the C++ runtime does (cpp_runtime/src/safree.cpp):
    both give the same float32 rows (each library's own float32 rounding would differ); the rank cut-off keeps the
    input precision's eps, the PyTorch side's rule.
    """
    n = masked.shape[0]
    if n == 0:
        return SafreePrompt(tokens, (), 0)
    eps = float(np.finfo(masked.dtype).eps)
    e, masked, u_c = (np.asarray(a, dtype=np.float64) for a in (tokens, masked, settings.concept_basis))
    p_c = u_c @ u_c.T
    d = np.linalg.norm(masked - masked @ p_c, axis=-1)
    if n == 1:
        flags = np.ones(1, dtype=bool)
    else:
        others = (d.sum() - d) / (n - 1)
        flags = ~(d < (1.0 + settings.alpha) * others)
    basis_i = orthonormal_basis(masked, eps)
    x = e @ (basis_i @ basis_i.T)
    projected = x - x @ p_c
    positions = np.zeros(tokens.shape[0], dtype=bool)
    positions[1 : n + 1] = flags
    filtered = np.where(positions[:, None], projected.astype(tokens.dtype), tokens)
    last = svf_last_step(float(_cosine(e, projected)[active.astype(bool)].mean()), settings)
    return SafreePrompt(filtered, tuple(bool(f) for f in flags), last)
