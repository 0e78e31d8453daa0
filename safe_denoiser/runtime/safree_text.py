"""SAFREE's text side in numpy, for bundles (no torch): trigger detection, projection and the filter's step count.

The same equations as ``safe_denoiser.core.safree`` (see its docstring), on what a bundle's graphs give: the masked
prompts' pooled embeddings are rows of ``text_encoder.onnx``'s ``last_hidden_state`` (CLIP pools the final hidden
state at the EOS position, ``pooled_rows``), and the toxic subspace ships as its orthonormal basis U_C (D, r) in
``manifest.safree["concept_basis"]``, computed at export from the concept phrases. The prompt's own span needs an SVD
of its n <= 75 masked embeddings, which ONNX has no operator for: ``numpy.linalg.svd`` here, with the same rank
cut-off as the PyTorch side (numpy's max(n, D) eps sigma_max).

A runtime then passes the filtered ``prompt_embeds`` to the unchanged denoiser graph for steps 0..t' and the original
ones after (``Bundle.sample`` does it when the manifest has a ``safree`` section and the prompts are given as text).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "SafreePrompt",
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


def orthonormal_basis(vectors: np.ndarray) -> np.ndarray:
    """(D, r) orthonormal basis of the span of the K rows of ``vectors`` (K, D) (numpy's rank cut-off)."""
    u, s, _ = np.linalg.svd(vectors.T, full_matrices=False)
    tol = s.max() * max(vectors.shape) * np.finfo(vectors.dtype).eps
    return np.ascontiguousarray(u[:, s > tol])


def masked_ids(ids: np.ndarray, n: int, mask_token_id: int) -> np.ndarray:
    """(n, L): the prompt's ids (L,) with real token i (position i + 1) replaced by ``mask_token_id`` in row i."""
    rows = np.repeat(ids[None, :], n, axis=0)
    rows[np.arange(n), np.arange(n) + 1] = mask_token_id
    return rows


def pooled_rows(hidden: np.ndarray, ids: np.ndarray, settings: Mapping[str, Any]) -> np.ndarray:
    """(N, D) CLIP's pooled output from its last hidden state (N, L, D): the row at the EOS position."""
    if settings["pooling"] == "argmax":  # CLIP configs with the legacy eos_token_id 2: the highest id is EOS
        position = ids.argmax(axis=-1)
    else:
        position = (ids == int(settings["eos_token_id"])).astype(np.int64).argmax(axis=-1)
    return hidden[np.arange(hidden.shape[0]), position]


def svf_last_step(mean_cosine: float, settings: Mapping[str, Any]) -> int:
    """t' = round(gamma * sigmoid(a (beta - m))), beta = 1 - mean cosine (``core.safree.svf_last_step``)."""
    z = float(settings["svf_sharpness"]) * (1.0 - float(mean_cosine) - float(settings["svf_midpoint"]))
    sig = 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))
    return round(int(settings["svf_max_step"]) * sig)


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine, with torch's cosine_similarity guard (eps 1e-8 on the product of the norms)."""
    na, nb = (a * a).sum(-1), (b * b).sum(-1)
    return (a * b).sum(-1) / np.sqrt(np.maximum(na * nb, np.float32(1e-16)))


def safree_prompt(
    tokens: np.ndarray, masked: np.ndarray, active: np.ndarray, concept_basis: np.ndarray, settings: Mapping[str, Any]
) -> SafreePrompt:
    """One prompt's filtered hidden states (``core.safree.safree_tokens`` in numpy).

    ``tokens`` (L, D) the prompt's hidden states, ``masked`` (n, D) the pooled embeddings of its n leave-one-out
    prompts, ``active`` (L,) its attention mask, ``concept_basis`` (D, r) U_C; unflagged positions keep their bits.
    """
    n = masked.shape[0]
    if n == 0:
        return SafreePrompt(tokens, (), 0)
    p_c = concept_basis @ concept_basis.T
    d = np.linalg.norm(masked - masked @ p_c, axis=-1)
    if n == 1:
        flags = np.ones(1, dtype=bool)
    else:
        others = (d.sum() - d) / (n - 1)
        flags = ~(d < (1.0 + float(settings["alpha"])) * others)
    basis_i = orthonormal_basis(masked)
    x = tokens @ (basis_i @ basis_i.T)
    projected = x - x @ p_c
    positions = np.zeros(tokens.shape[0], dtype=bool)
    positions[1 : n + 1] = flags
    filtered = np.where(positions[:, None], projected.astype(tokens.dtype), tokens)
    last = svf_last_step(float(_cosine(tokens, projected)[active.astype(bool)].mean()), settings)
    return SafreePrompt(filtered, tuple(bool(f) for f in flags), last)
