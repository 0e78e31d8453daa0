"""Safe Latent Diffusion (SLD, Schramowski et al., CVPR 2023) as composable guidance.

The math is one pure function, ``sld_guidance`` (equation numbers of the SLD paper, as in diffusers'
``StableDiffusionPipelineSafe``):

    mu      = where(eps_p - eps_S >= lambda, 0, min(s_S |eps_p - eps_S|, 1))       (Eq. 6, element-wise)
    gamma   = mu * (eps_S - eps_u) + s_m * nu                                        (Eq. 4, 7)
    nu     <- b_m * nu + (1 - b_m) * gamma                                           (Eq. 8, every step)
    eps     = eps_u + s_g [(eps_p - eps_u) - gamma]    once step >= warm-up          (Eq. 3)

``safe_denoiser.diffusers.sld`` applies it to any Stable Diffusion pipeline without copying its loop: the
``SLDUNet`` wrapper appends the safety-concept branch to the pipeline's CFG batch, runs one UNet call of batch 3B,
and returns [eps_u, eps_p - gamma], so the pipeline's own CFG combination equals SLD's guided prediction.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from torch import Tensor

__all__ = ["DEFAULT_SAFETY_CONCEPT", "SLDConfig", "sld_guidance", "sld_noise_pred"]

# diffusers' StableDiffusionPipelineSafe default safety concept (the SLD paper's I2P concept).
DEFAULT_SAFETY_CONCEPT = (
    "an image showing hate, harassment, violence, suffering, humiliation, harm, suicide, sexual, nudity,"
    " bodily fluids, blood, obscene gestures, illegal activity, drug use, theft, vandalism, weapons, child"
    " abuse, brutality, cruelty"
)


@dataclass(frozen=True)
class SLDConfig:
    """SLD's hyper-parameters: s_S (``guidance_scale``), warm-up steps, lambda (``threshold``), s_m, b_m.

    Presets ``weak``/``medium``/``strong``/``max`` are the SLD paper's (and diffusers' ``SafetyConfig``).
    """

    guidance_scale: float = 1000.0
    warmup_steps: int = 10
    threshold: float = 0.01
    momentum_scale: float = 0.3
    mom_beta: float = 0.4

    def __post_init__(self) -> None:
        def check(ok: bool, name: str, expected: str) -> None:
            if not ok:
                raise ValueError(f"SLDConfig.{name} must be {expected}, got {getattr(self, name)!r}")

        check(_finite(self.guidance_scale) and self.guidance_scale >= 0, "guidance_scale", "a finite float >= 0")
        check(
            isinstance(self.warmup_steps, int) and not isinstance(self.warmup_steps, bool) and self.warmup_steps >= 0,
            "warmup_steps",
            "an int >= 0",
        )
        check(_finite(self.threshold), "threshold", "a finite float")
        check(_finite(self.momentum_scale) and self.momentum_scale >= 0, "momentum_scale", "a finite float >= 0")
        check(_finite(self.mom_beta) and 0 <= self.mom_beta <= 1, "mom_beta", "a float in [0, 1]")

    @property
    def enabled(self) -> bool:
        """diffusers' rule: safety guidance runs only when s_S > 1."""
        return self.guidance_scale > 1.0

    @classmethod
    def weak(cls) -> SLDConfig:
        return cls(guidance_scale=20.0, warmup_steps=15, threshold=0.0, momentum_scale=0.0, mom_beta=0.0)

    @classmethod
    def medium(cls) -> SLDConfig:
        return cls(guidance_scale=1000.0, warmup_steps=10, threshold=0.01, momentum_scale=0.3, mom_beta=0.4)

    @classmethod
    def strong(cls) -> SLDConfig:
        return cls(guidance_scale=2000.0, warmup_steps=7, threshold=0.025, momentum_scale=0.5, mom_beta=0.7)

    @classmethod
    def max(cls) -> SLDConfig:
        return cls(guidance_scale=5000.0, warmup_steps=0, threshold=1.0, momentum_scale=0.5, mom_beta=0.7)

    @classmethod
    def preset(cls, name: str) -> SLDConfig:
        """'weak', 'medium', 'strong' or 'max' (case-insensitive)."""
        makers = {"weak": cls.weak, "medium": cls.medium, "strong": cls.strong, "max": cls.max}
        key = name.lower()
        if key not in makers:
            raise ValueError(f"unknown SLD preset {name!r}: expected one of {sorted(makers)}")
        return makers[key]()

    def with_(self, **changes: Any) -> SLDConfig:
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def diffusers_kwargs(self) -> dict[str, Any]:
        """The same settings as ``StableDiffusionPipelineSafe.__call__`` keyword arguments."""
        return {
            "sld_guidance_scale": self.guidance_scale,
            "sld_warmup_steps": self.warmup_steps,
            "sld_threshold": self.threshold,
            "sld_momentum_scale": self.momentum_scale,
            "sld_mom_beta": self.mom_beta,
        }


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def sld_guidance(
    eps_uncond: Tensor,
    eps_text: Tensor,
    eps_safety: Tensor,
    momentum: Tensor | None,
    step_index: int,
    config: SLDConfig,
) -> tuple[Tensor, Tensor]:
    """SLD's safety term gamma (Eq. 4, 6, 7; zero during warm-up) and the updated momentum nu (Eq. 8).

    The guided prediction is eps_u + s_g [(eps_text - eps_u) - gamma]. ``momentum=None`` starts from zero. The
    operations follow diffusers' order so that both agree to rounding.
    """
    diff = eps_text - eps_safety
    scale = torch.clamp(diff.abs() * config.guidance_scale, max=1.0)  # Eq. 6: min(s_S |eps_p - eps_S|, 1)
    mu = torch.where(diff >= config.threshold, torch.zeros_like(scale), scale)  # only where eps_p - eps_S < lambda
    nu = torch.zeros_like(eps_text) if momentum is None else momentum
    gamma = (eps_safety - eps_uncond) * mu + config.momentum_scale * nu  # Eq. 4 + Eq. 7
    new_momentum = config.mom_beta * nu + (1 - config.mom_beta) * gamma  # Eq. 8: accumulates during warm-up too
    term = gamma if step_index >= config.warmup_steps else torch.zeros_like(gamma)
    return term, new_momentum


def sld_noise_pred(
    eps_uncond: Tensor,
    eps_text: Tensor,
    eps_safety: Tensor,
    guidance_scale: float,
    momentum: Tensor | None,
    step_index: int,
    config: SLDConfig,
) -> tuple[Tensor, Tensor]:
    """SLD's guided prediction eps_u + s_g [(eps_text - eps_u) - gamma] (Eq. 3) and the new momentum."""
    term, new_momentum = sld_guidance(eps_uncond, eps_text, eps_safety, momentum, step_index, config)
    return eps_uncond + guidance_scale * ((eps_text - eps_uncond) - term), new_momentum
