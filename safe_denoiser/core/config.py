"""``SafeGuidance``: the safe denoiser's settings, validated, with the two named presets."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

__all__ = ["BetaMode", "Mode", "SafeGuidance"]

Mode = Literal["theorem", "reference"]
BetaMode = Literal["constant", "mass"]


def _check(cond: bool, name: str, expected: str, got: Any) -> None:
    if not cond:
        raise ValueError(f"SafeGuidance.{name} must be {expected}, got {got!r}")


@dataclass(frozen=True)
class SafeGuidance:
    """How and when the correction is applied.

    mode="theorem" (METHOD.md section 1): kernel on x_t with the forward kernel N(sqrt(abar) x0, h I),
      h = 1 - abar unless ``kernel_sigma`` fixes h = kernel_sigma^2; eps <- eps + beta (eps - eps_unsafe) with
      beta = eta (``beta_mode="constant"``) or eta * mean kernel value (``"mass"``); applied where the kernel
      log-mass is >= ``gate_log_mass`` (no gate when None).
    mode="reference" (the authors' code, METHOD.md section 3): kernel exp(-||x0_hat - x_n|| / (2 sigma^2)) on the
      denoised estimate with a fixed ``kernel_sigma`` and unsquared distance; x0_hat <- x0_hat - eta * E_unsafe when
      the bank's kernel sum exceeds ``threshold - margin``; then x_t is re-noised from the corrected x0_hat.
      ``threshold=None`` means: computed from the bank (``step.reference_threshold``) at the sampling schedule's
      last, least noisy timestep, as the authors' code does.
    Both apply only for timesteps t with window[0] <= t <= window[1] (training-step units, 0..1000 for SD).
    """

    mode: Mode = "theorem"
    eta: float = 1.0
    beta_mode: BetaMode = "constant"
    kernel_sigma: float | None = None
    gate_log_mass: float | None = None
    window: tuple[float, float] = (0.0, 1000.0)
    margin: float = 1.6
    threshold: float | None = None
    chunk_size: int | None = None

    def __post_init__(self) -> None:
        _check(self.mode in ("theorem", "reference"), "mode", "'theorem' or 'reference'", self.mode)
        _check(self.beta_mode in ("constant", "mass"), "beta_mode", "'constant' or 'mass'", self.beta_mode)
        _check(_finite(self.eta) and self.eta >= 0, "eta", "a finite float >= 0", self.eta)
        if self.kernel_sigma is not None:
            _check(
                _finite(self.kernel_sigma) and self.kernel_sigma > 0,
                "kernel_sigma",
                "a float > 0 or None",
                self.kernel_sigma,
            )
        if self.mode == "reference":
            _check(self.kernel_sigma is not None, "kernel_sigma", "set (a float > 0) in reference mode", None)
        if self.gate_log_mass is not None:
            _check(_finite(self.gate_log_mass), "gate_log_mass", "a finite float or None", self.gate_log_mass)
        w = self.window
        _check(
            isinstance(w, (tuple, list)) and len(w) == 2 and all(_finite(v) for v in w) and w[0] <= w[1],
            "window",
            "a pair (t_min, t_max) of finite numbers with t_min <= t_max",
            w,
        )
        object.__setattr__(self, "window", (float(w[0]), float(w[1])))
        _check(_finite(self.margin), "margin", "a finite float", self.margin)
        if self.threshold is not None:
            _check(_finite(self.threshold), "threshold", "a finite float or None", self.threshold)
        if self.chunk_size is not None:
            _check(
                isinstance(self.chunk_size, int) and self.chunk_size > 0,
                "chunk_size",
                "a positive int or None",
                self.chunk_size,
            )

    @classmethod
    def theorem(cls, eta: float = 1.0, **overrides: Any) -> SafeGuidance:
        """The theorem's form: forward kernel on x_t, constant beta = eta, whole trajectory."""
        return cls(mode="theorem", eta=eta, **overrides)

    @classmethod
    def reference(cls, **overrides: Any) -> SafeGuidance:
        """The authors' nudity settings: sigma 3.15, scale 0.33, margin 1.6, t in [780, 1000]."""
        settings: dict[str, Any] = {"kernel_sigma": 3.15, "eta": 0.33, "margin": 1.6, "window": (780.0, 1000.0)}
        settings.update(overrides)
        return cls(mode="reference", **settings)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> SafeGuidance:
        """A named preset: 'theorem' or 'reference'."""
        if name == "theorem":
            return cls.theorem(**overrides)
        if name == "reference":
            return cls.reference(**overrides)
        raise ValueError(f"unknown SafeGuidance preset {name!r}: expected 'theorem' or 'reference'")

    def in_window(self, t: float) -> bool:
        """Whether timestep ``t`` lies in the correction window (host-side check)."""
        return self.window[0] <= float(t) <= self.window[1]

    def with_(self, **changes: Any) -> SafeGuidance:
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able settings."""
        d = asdict(self)
        d["window"] = list(self.window)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SafeGuidance:
        """Inverse of ``to_dict``; unknown keys raise a clear error."""
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown SafeGuidance field(s) {unknown}; expected some of {sorted(known)}")
        values = dict(data)
        if "window" in values and isinstance(values["window"], list):
            values["window"] = tuple(values["window"])
        return cls(**values)


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
