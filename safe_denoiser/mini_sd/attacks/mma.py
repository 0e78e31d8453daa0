"""MMA-Diffusion's text modality (Yang et al., CVPR 2024) on the miniature: greedy coordinate gradient over tokens.

The adversarial prompt is ``length`` tokens ``[BOS, t_1..t_k, EOS...]``; its loss is ``1 - cos`` between its text
embedding and an unsafe target prompt's. MMA matches the pooled embedding (the first EOS state); ``objective=
"states"`` matches every position's state instead (the mean of the 77 cosines: what the UNet reads). Each step:

1. the gradient of the loss with respect to a one-hot relaxation of the tokens (``TextEncoder.forward_one_hot``);
2. per position the ``top_k`` tokens with the most negative gradient, among the allowed tokens only: every token
   holding a sensitive word is banned (``TextEncoder.allowed_ids``), MMA's sensitive-word regularisation;
3. ``candidates`` single-token substitutions, positions spread evenly over the prompt, tokens drawn from those top
   lists; all are scored exactly and the best replaces the current prompt when it lowers the loss.

All targets of a batch are optimised together; randomness comes from one seeded ``torch.Generator``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from safe_denoiser.errors import require_positive_ints
from safe_denoiser.mini_sd.attacks.text import TextEncoder

__all__ = ["GCGConfig", "GCGResult", "embedding_loss", "gcg_attack"]

Objective = Literal["pooled", "states"]


@dataclass(frozen=True)
class GCGConfig:
    """``length`` adversarial tokens (MMA's 20), ``steps`` rounds of ``candidates`` substitutions from ``top_k``."""

    length: int = 20
    steps: int = 40
    candidates: int = 32
    top_k: int = 16
    objective: Objective = "pooled"

    def __post_init__(self) -> None:
        require_positive_ints(self, "length", "steps", "candidates", "top_k")
        if self.objective not in ("pooled", "states"):
            raise ValueError(f"GCGConfig.objective must be 'pooled' or 'states', got {self.objective!r}")


@dataclass(frozen=True)
class GCGResult:
    """Per target: the final ``tokens`` (R, k), their ``loss`` (R,), the loss before step 1 and after each (S+1, R)."""

    tokens: Tensor
    loss: Tensor
    history: Tensor


def _embedding(output: object, objective: Objective) -> Tensor:
    return output.pooler_output if objective == "pooled" else output.last_hidden_state  # type: ignore[attr-defined]


def embedding_loss(embedding: Tensor, target: Tensor) -> Tensor:
    """``1 - cos`` over the feature axis, averaged over positions when there are any: (B, [77,] W) -> (B,)."""
    loss = 1.0 - F.cosine_similarity(embedding, target, dim=-1, eps=1e-6)
    return loss.mean(dim=-1) if loss.dim() > 1 else loss


def _score(encoder: TextEncoder, tokens: Tensor, targets: Tensor, objective: Objective) -> Tensor:
    """(N,) losses of (N, k) token rows against (N, ...) targets, without gradients."""
    rows = encoder.rows(tokens)
    embedding = encoder.pooled(rows) if objective == "pooled" else encoder.states(rows)
    return embedding_loss(embedding, targets)


def _token_gradient(encoder: TextEncoder, tokens: Tensor, targets: Tensor, objective: Objective) -> Tensor:
    """(R, k, V) d loss / d one-hot at the adversarial positions."""
    rows = encoder.rows(tokens)
    vocab = encoder.model.get_input_embeddings().weight.shape[0]
    one_hot = F.one_hot(rows, vocab).float().requires_grad_(True)
    with torch.enable_grad():
        embedding = encoder.forward_one_hot(rows, one_hot, lambda out: _embedding(out, objective))
        embedding_loss(embedding, targets).sum().backward()
    assert one_hot.grad is not None
    return one_hot.grad[:, 1 : tokens.shape[1] + 1]


def _candidates(grad: Tensor, tokens: Tensor, allowed: Tensor, config: GCGConfig, gen: torch.Generator) -> Tensor:
    """(R, C, k) single-substitution candidates from the allowed tokens' top-k gradients (module docstring, 2-3)."""
    r, k, _ = grad.shape
    top = (-grad[:, :, allowed]).topk(min(config.top_k, len(allowed)), dim=-1).indices  # (R, k, top)
    position = (torch.arange(config.candidates) * k // config.candidates).expand(r, -1)  # (R, C)
    pick = torch.randint(0, top.shape[-1], (r, config.candidates), generator=gen)
    run = torch.arange(r)[:, None]
    new_token = allowed[top[run, position, pick]]
    out = tokens[:, None, :].repeat(1, config.candidates, 1)
    out[run, torch.arange(config.candidates)[None, :], position] = new_token
    return out


def gcg_attack(
    encoder: TextEncoder,
    target_prompts: list[str],
    config: GCGConfig,
    seed: int,
    progress: Callable[[int], None] | None = None,
) -> GCGResult:
    """One adversarial prompt per target prompt (module docstring); ``progress(1)`` after every step."""
    gen = torch.Generator().manual_seed(seed)
    allowed = encoder.allowed_ids
    target_rows = encoder.encode_text(target_prompts)
    targets = encoder.pooled(target_rows) if config.objective == "pooled" else encoder.states(target_rows)
    r = len(target_prompts)
    tokens = allowed[torch.randint(0, len(allowed), (r, config.length), generator=gen)]
    loss = _score(encoder, tokens, targets, config.objective)
    history = [loss]
    for _ in range(config.steps):
        grad = _token_gradient(encoder, tokens, targets, config.objective)
        cands = _candidates(grad, tokens, allowed, config, gen)  # (R, C, k)
        flat = cands.flatten(0, 1)
        cand_loss = _score(encoder, flat, targets.repeat_interleave(config.candidates, 0), config.objective)
        best_loss, best = cand_loss.view(r, config.candidates).min(dim=1)
        better = best_loss < loss
        tokens = torch.where(better[:, None], cands[torch.arange(r), best], tokens)
        loss = torch.where(better, best_loss, loss)
        history.append(loss)
        if progress is not None:
            progress(1)
    return GCGResult(tokens, loss, torch.stack(history))
