"""UCE (Gandikota et al. 2024, "Unified Concept Editing in Diffusion Models") on the miniature: a closed-form edit
of every cross-attention key and value projection, computed at load time.

For each projection W (``attn2.to_k`` / ``attn2.to_v``, out x 64) the edit minimises

    erase_scale * sum_i |W c_i - W_orig g_i|^2 + preserve_scale * sum_j |W p_j - W_orig p_j|^2 + lam |W - W_orig|_F^2

over the text-state vectors c_i of the concept's prompts (each mapped onto the aligned vector g_i of the guide
prompt) and p_j of the preserved prompts: the normal equations give

    W = (erase_scale sum W_orig g_i c_i^T + preserve_scale sum W_orig p_j p_j^T + lam W_orig)
        (erase_scale sum c_i c_i^T + preserve_scale sum p_j p_j^T + lam I)^-1        (``closed_form_edit``)

solved in float64 and cast back. The vectors of a prompt are the text encoder's states from its last word token to
the end of the 77 positions (the concept word and everything after it; the causal text tower puts the concept's
information only there), aligned position by position with the guide's states from the guide's last word token (the
start token for the empty guide), both cut to the shorter length: the UCE authors' alignment. Preserved prompts'
vectors are taken the same way (they map onto themselves).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from safe_denoiser.mini_sd.data import MAX_TOKENS, Concept
from safe_denoiser.mini_sd.erasure.prompts import drawn_captions, last_word_index, text_states

__all__ = ["UceSettings", "apply_uce", "closed_form_edit", "edit_vectors"]


@dataclass(frozen=True)
class UceSettings:
    """UCE's knobs: ``guide`` (the prompt the concept is mapped onto), ``lam`` (the pull toward W_orig),
    ``erase_scale`` / ``preserve_scale`` (the weights of the two sums), ``concept_prompts`` / ``preserve_prompts``
    (how many grammar captions are drawn, seeded by ``seed``, of the concept digit / of the other digits). The
    defaults were chosen on validation seeds (docs/mini_sd.md, "Erased models"): the concept is mapped onto "a digit",
    the grammar's word for any digit, which did as well as the paper's empty prompt."""

    guide: str = "a digit"
    lam: float = 1.0
    erase_scale: float = 1.0
    preserve_scale: float = 1.0
    concept_prompts: int = 64
    preserve_prompts: int = 256
    seed: int = 0
    concept: Concept = field(default_factory=Concept)

    def __post_init__(self) -> None:
        if not self.lam > 0 or self.erase_scale < 0 or self.preserve_scale < 0:
            raise ValueError(f"lam must be > 0 and the scales >= 0, got {self}")


def closed_form_edit(
    weight: Tensor,
    erase_keys: Tensor,
    erase_values: Tensor,
    preserve_keys: Tensor,
    lam: float,
    erase_scale: float = 1.0,
    preserve_scale: float = 1.0,
) -> Tensor:
    """UCE's W (module docstring) for ``weight`` (out, d): ``erase_keys`` (n, d) mapped onto ``erase_values``
    (n, out), ``preserve_keys`` (m, d) kept at ``weight``'s outputs. Solved in float64, returned in weight's dtype."""
    w0 = weight.double()
    c, v, p = erase_keys.double(), erase_values.double(), preserve_keys.double()
    d = w0.shape[1]
    gram = lam * torch.eye(d, dtype=torch.float64) + erase_scale * c.T @ c + preserve_scale * p.T @ p
    cross = lam * w0 + erase_scale * v.T @ c + preserve_scale * (w0 @ p.T) @ p
    # W gram = cross, gram symmetric positive definite: solve gram W^T = cross^T.
    solved = torch.linalg.solve(gram, cross.T).T
    return solved.to(weight.dtype)


def _aligned(states: Tensor, start: int, length: int) -> Tensor:
    return states[start : start + length]


def edit_vectors(pipe: Any, settings: UceSettings) -> tuple[Tensor, Tensor, Tensor]:
    """(concept keys (n, d), guide keys aligned with them (n, d), preserved keys (m, d)), in float64."""
    concept = drawn_captions((settings.concept.digit,), settings.concept_prompts, settings.seed)
    guide_states = text_states(pipe, [settings.guide])[0]
    guide_start = last_word_index(pipe, settings.guide)
    keys, guides = [], []
    for text, states in zip(concept, text_states(pipe, concept), strict=True):
        start = last_word_index(pipe, text)
        length = MAX_TOKENS - max(start, guide_start)
        keys.append(_aligned(states, start, length))
        guides.append(_aligned(guide_states, guide_start, length))
    kept: list[Tensor] = []
    if settings.preserve_prompts > 0:
        others = drawn_captions(settings.concept.safe_digits, settings.preserve_prompts, settings.seed + 1)
        for text, states in zip(others, text_states(pipe, others), strict=True):
            kept.append(states[last_word_index(pipe, text) :])
    width = guide_states.shape[-1]
    preserved = torch.cat(kept) if kept else torch.zeros((0, width))
    return torch.cat(keys).double(), torch.cat(guides).double(), preserved.double()


def _projections(unet: Any) -> list[tuple[str, torch.nn.Linear]]:
    return [(n, m) for n, m in unet.named_modules() if n.endswith(("attn2.to_k", "attn2.to_v"))]


@torch.no_grad()
def apply_uce(pipe: Any, settings: UceSettings) -> list[str]:
    """Edit ``pipe.unet``'s cross-attention keys and values in place; returns the edited weights' names."""
    keys, guides, preserved = edit_vectors(pipe, settings)
    edited = []
    for name, linear in _projections(pipe.unet):
        w0 = linear.weight.detach()
        targets = guides @ w0.double().T  # what the original layer gives the guide
        new = closed_form_edit(
            w0, keys, targets, preserved, settings.lam, settings.erase_scale, settings.preserve_scale
        )
        linear.weight.copy_(new)
        edited.append(f"{name}.weight")
    return edited
