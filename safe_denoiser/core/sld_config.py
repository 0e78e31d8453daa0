"""``SLDConfig``: Safe Latent Diffusion's validated settings and presets, and its default safety concept.

Plain dataclasses without torch, so that a runtime can read an exported bundle's manifest without it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

__all__ = ["DEFAULT_SAFETY_CONCEPT", "SLDConfig"]


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

    @classmethod
    def from_value(cls, value: SLDConfig | str | dict[str, Any] | None) -> SLDConfig:
        """An ``SLDConfig``, a preset name or a dict of fields (None: MEDIUM, diffusers' default)."""
        if value is None:
            return cls.medium()
        if isinstance(value, SLDConfig):
            return value
        if isinstance(value, str):
            return cls.preset(value)
        if isinstance(value, dict):
            unknown = sorted(set(value) - set(cls.__dataclass_fields__))
            if unknown:
                raise ValueError(
                    f"unknown SLDConfig field(s) {unknown}; expected some of {sorted(cls.__dataclass_fields__)}"
                )
            return cls(**value)
        raise TypeError(f"SLD settings must be an SLDConfig, a preset name or a dict, got {type(value).__name__}")

    def with_(self, **changes: Any) -> SLDConfig:
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able settings."""
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
