"""Validated settings: ``SafeGuidance`` (the safe denoiser, two named presets) and ``SLDConfig`` (SLD's presets).

Plain dataclasses without torch, so that a runtime can read an exported bundle's manifest without it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

__all__ = ["DEFAULT_SAFETY_CONCEPT", "BetaMode", "Mode", "ReferenceKind", "SLDConfig", "SafeGuidance"]

Mode = Literal["theorem", "reference"]
BetaMode = Literal["constant", "mass", "odds"]
ReferenceKind = Literal["safe", "data"]


def _check(cond: bool, name: str, expected: str, got: Any) -> None:
    if not cond:
        raise ValueError(f"SafeGuidance.{name} must be {expected}, got {got!r}")


@dataclass(frozen=True)
class SafeGuidance:
    """How and when the correction is applied.

    mode="theorem" (docs/method.md section 1): kernel on x_t with the forward kernel N(sqrt(abar) x0, h I),
      h = 1 - abar unless ``kernel_sigma`` fixes h = kernel_sigma^2; eps <- eps + beta (eps - eps_unsafe) with
      beta = eta (``beta_mode="constant"``), eta * mean kernel value (``"mass"``), or eta * the theorem's own
      beta(x_t) = Z_u p_unsafe,t / (Z_s p_safe,t) from the negative bank and a reference bank (``"odds"``,
      ``core.beta``: ``reference_kind`` says whether the reference bank holds safe data or unlabelled data,
      ``prior_unsafe`` is Z_u (None: from the banks' sizes), ``log_beta_max`` caps log beta); applied where the
      kernel log-mass is >= ``gate_log_mass`` (no gate when None). ``bank_sigma`` (None: point masses) makes both
      banks kernel density estimates, each item the centre of N(x_n, bank_sigma^2 I): the exact posterior of that
      smoother density, whose kernel stays soft and whose correction fades as the noise vanishes (docs/method.md
      sections 2 and 4). ``odds_sigma`` (odds only; None: at x_t) evaluates the odds at the model's denoised
      estimate x0_hat instead, both banks as kernel densities of bandwidth odds_sigma in x0 space: the estimate
      then sees the prompt, through x0_hat (the conditional odds, docs/method.md section 2).
    mode="reference" (the authors' code, docs/method.md section 3): kernel exp(-||x0_hat - x_n|| / (2 sigma^2)) on the
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
    reference_kind: ReferenceKind = "safe"
    prior_unsafe: float | None = None
    log_beta_max: float = 4.605170185988092  # log(100)
    bank_sigma: float | None = None
    odds_sigma: float | None = None

    def __post_init__(self) -> None:
        _check(self.mode in ("theorem", "reference"), "mode", "'theorem' or 'reference'", self.mode)
        _check(
            self.beta_mode in ("constant", "mass", "odds"), "beta_mode", "'constant', 'mass' or 'odds'", self.beta_mode
        )
        _check(self.reference_kind in ("safe", "data"), "reference_kind", "'safe' or 'data'", self.reference_kind)
        if self.prior_unsafe is not None:
            _check(
                _finite(self.prior_unsafe) and 0 < self.prior_unsafe < 1,
                "prior_unsafe",
                "a float in (0, 1) or None (estimated from the banks' sizes)",
                self.prior_unsafe,
            )
        _check(_finite(self.log_beta_max), "log_beta_max", "a finite float", self.log_beta_max)
        _check(_finite(self.eta) and self.eta >= 0, "eta", "a finite float >= 0", self.eta)
        if self.kernel_sigma is not None:
            _check(
                _finite(self.kernel_sigma) and self.kernel_sigma > 0,
                "kernel_sigma",
                "a float > 0 or None",
                self.kernel_sigma,
            )
        if self.bank_sigma is not None:
            _check(
                _finite(self.bank_sigma) and self.bank_sigma > 0,
                "bank_sigma",
                "a float > 0 or None (point-mass bank)",
                self.bank_sigma,
            )
            _check(
                self.kernel_sigma is None,
                "bank_sigma",
                "None when kernel_sigma fixes the bandwidth (they are two ways to set it)",
                self.bank_sigma,
            )
        if self.odds_sigma is not None:
            _check(
                _finite(self.odds_sigma) and self.odds_sigma > 0,
                "odds_sigma",
                "a float > 0 or None (the odds at x_t)",
                self.odds_sigma,
            )
            _check(self.beta_mode == "odds", "odds_sigma", "None unless beta_mode is 'odds'", self.odds_sigma)
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
    def odds(cls, eta: float = 1.0, **overrides: Any) -> SafeGuidance:
        """The theorem's beta: posterior odds of "unsafe" from the negative bank and a reference bank.

        The window closes at t = 300: below it the kernel is a hard nearest-bank-item choice and beta a hard
        decision, so float32 rounding can flip which item wins and an image would differ alone and in a batch
        (measured on the demo model: up to 0.58 with t >= 0, 5e-5 with t >= 300; docs/method.md section 4).
        ``window=(0, 1000)`` acts more strongly and is the toy's exact match, at that cost.
        """
        settings: dict[str, Any] = {"window": (300.0, 1000.0)}
        settings.update(overrides)
        return cls(mode="theorem", eta=eta, beta_mode="odds", **settings)

    @classmethod
    def reference(cls, **overrides: Any) -> SafeGuidance:
        """The authors' nudity settings: sigma 3.15, scale 0.33, margin 1.6, t in [780, 1000]."""
        settings: dict[str, Any] = {"kernel_sigma": 3.15, "eta": 0.33, "margin": 1.6, "window": (780.0, 1000.0)}
        settings.update(overrides)
        return cls(mode="reference", **settings)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> SafeGuidance:
        """A named preset: 'theorem', 'odds' or 'reference'."""
        if name == "theorem":
            return cls.theorem(**overrides)
        if name == "odds":
            return cls.odds(**overrides)
        if name == "reference":
            return cls.reference(**overrides)
        raise ValueError(f"unknown SafeGuidance preset {name!r}: expected 'theorem', 'odds' or 'reference'")

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
