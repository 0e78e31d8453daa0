"""Safe Latent Diffusion (SLD, Schramowski et al., CVPR 2023) as composable guidance.

The math is one pure function, ``sld_guidance`` (equation numbers of the SLD paper, as in diffusers'
``StableDiffusionPipelineSafe``):

    mu      = where(eps_p - eps_S >= lambda, 0, min(s_S |eps_p - eps_S|, 1))       (Eq. 6, element-wise)
    gamma   = mu * (eps_S - eps_u) + s_m * nu                                        (Eq. 4, 7)
    nu     <- b_m * nu + (1 - b_m) * gamma                                           (Eq. 8, every step)
    eps     = eps_u + s_g [(eps_p - eps_u) - gamma]    once step >= warm-up          (Eq. 3)

``append_safety_branch`` builds SLD's one UNet batch [uncond; cond; safety] from a CFG batch. Both
``safe_denoiser.diffusers.sld_unet.SLDUNet`` (text pipelines and the class-conditional demo) and the exported step graph
use it: one UNet call of batch 3B, then [eps_u, eps_p - gamma], so a pipeline's own CFG combination equals SLD's
guided prediction. The settings, ``SLDConfig``, live in ``safe_denoiser.core.sld_config`` (no torch).
"""

from __future__ import annotations

import torch
from torch import Tensor

from safe_denoiser.core.sld_config import DEFAULT_SAFETY_CONCEPT, SLDConfig

__all__ = ["DEFAULT_SAFETY_CONCEPT", "SLDConfig", "append_safety_branch", "sld_guidance", "sld_noise_pred"]


def _active(step_index: int | Tensor, warmup_steps: int, like: Tensor) -> Tensor | bool:
    """Whether SLD acts: a host bool for an int step, else a bool tensor broadcastable to ``like`` (graph logic)."""
    if not isinstance(step_index, Tensor):
        return step_index >= warmup_steps
    if step_index.is_floating_point() or step_index.dim() > 1:
        raise ValueError(
            f"step_index must be an int or a 0-d / (B,) int tensor, got {step_index.dtype} {tuple(step_index.shape)}"
        )
    per_sample = (-1,) + (1,) * (like.dim() - 1)
    return (step_index.to(like.device) >= warmup_steps).reshape(per_sample)


def sld_guidance(
    eps_uncond: Tensor,
    eps_text: Tensor,
    eps_safety: Tensor,
    momentum: Tensor | None,
    step_index: int | Tensor,
    config: SLDConfig,
) -> tuple[Tensor, Tensor]:
    """SLD's safety term gamma (Eq. 4, 6, 7; zero during warm-up) and the updated momentum nu (Eq. 8).

    The guided prediction is eps_u + s_g [(eps_text - eps_u) - gamma]. ``momentum=None`` starts from zero.
    ``step_index`` is a Python int, or a 0-d or (B,) int tensor (per-sample steps; the warm-up test is then a
    ``torch.where``, so a traced graph takes the real step as an input). The operations follow diffusers' order so
    that both agree to rounding.
    """
    diff = eps_text - eps_safety
    scale = torch.clamp(diff.abs() * config.guidance_scale, max=1.0)  # Eq. 6: min(s_S |eps_p - eps_S|, 1)
    mu = torch.where(diff >= config.threshold, torch.zeros_like(scale), scale)  # only where eps_p - eps_S < lambda
    nu = torch.zeros_like(eps_text) if momentum is None else momentum
    gamma = (eps_safety - eps_uncond) * mu + config.momentum_scale * nu  # Eq. 4 + Eq. 7
    new_momentum = config.mom_beta * nu + (1 - config.mom_beta) * gamma  # Eq. 8: accumulates during warm-up too
    active = _active(step_index, config.warmup_steps, gamma)
    if isinstance(active, bool):
        return (gamma if active else torch.zeros_like(gamma)), new_momentum
    return torch.where(active, gamma, torch.zeros_like(gamma)), new_momentum


def sld_noise_pred(
    eps_uncond: Tensor,
    eps_text: Tensor,
    eps_safety: Tensor,
    guidance_scale: float,
    momentum: Tensor | None,
    step_index: int | Tensor,
    config: SLDConfig,
) -> tuple[Tensor, Tensor]:
    """SLD's guided prediction eps_u + s_g [(eps_text - eps_u) - gamma] (Eq. 3) and the new momentum."""
    term, new_momentum = sld_guidance(eps_uncond, eps_text, eps_safety, momentum, step_index, config)
    return eps_uncond + guidance_scale * ((eps_text - eps_uncond) - term), new_momentum


def append_safety_branch(cfg_batch: Tensor, safety: Tensor | None = None) -> Tensor:
    """SLD's UNet batch from a CFG batch [uncond (B); cond (B)]: [uncond; cond; safety branch (B)].

    With ``safety=None`` the safety branch repeats the cond half (inputs it shares with the cond branch: the
    sample, per-sample timesteps). Otherwise ``safety`` is the safety concept's conditioning (a text embedding
    (1 or B, L, D), or class labels (1 or B,)), broadcast to B items and cast to ``cfg_batch``'s device and dtype.
    """
    b = cfg_batch.shape[0] // 2
    if safety is None:
        return torch.cat([cfg_batch, cfg_batch[b:]])
    if safety.shape[1:] != cfg_batch.shape[1:]:
        raise ValueError(
            f"the safety conditioning has item shape {tuple(safety.shape[1:])}, the CFG batch"
            f" {tuple(cfg_batch.shape[1:])}"
        )
    if safety.shape[0] != 1 and safety.shape[0] != b:
        raise ValueError(f"the safety conditioning has {safety.shape[0]} items for a batch of {b} (expected 1 or {b})")
    third = safety.to(device=cfg_batch.device, dtype=cfg_batch.dtype).expand(b, *safety.shape[1:])
    return torch.cat([cfg_batch, third])
