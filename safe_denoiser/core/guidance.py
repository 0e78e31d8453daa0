"""The safe denoiser's settings: one frozen type per preset family, each strength under its own name.

- ``ConstantGuidance``: Theorem 1 with a constant beta (``beta``).
- ``MassGuidance``: beta = ``beta_per_mass`` x the bank's mean kernel value at x_t.
- ``OddsGuidance``: Theorem 1's own beta, the posterior odds of "unsafe" from the negative bank and a reference bank,
  times ``odds_scale`` (``core.beta``; docs/method.md section 2).
- ``ReferenceGuidance``: the authors' research code (docs/method.md section 3): x0_hat <- x0_hat - ``step_size``
  E_unsafe(x0_hat) when the kernel sum passes a gate, then x_t re-noised.
- ``SGFGuidance``: Safety-Guided Flow, a gradient step on an MMD potential between x0_hat and the bank, strong in an
  early critical window (``core.energy_guidance``; docs/method.md section 7).
- ``ShieldedGuidance``: Shielded Diffusion's sparse repellency (SPELL): x0_hat pushed out of the balls of radius
  ``radius`` around the bank items (``core.energy_guidance``).

The first three share the forward kernel (``TheoremGuidance``: bandwidth, kernel density bank, log-mass gate), the
last two correct the denoised estimate by an energy gradient (``EnergyGuidance``); all share the window of training
timesteps where they apply. Plain dataclasses without torch, so that a runtime
reads a bundle's manifest without it; the tensor math of each preset lives in ``core.step``. YAML and the command
line name a preset and its fields (``{"preset": "odds", "odds_scale": 3}``: ``SafeGuidance.from_dict``).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, ClassVar, Literal, Self, TypeAlias

__all__ = [
    "MAX_STRENGTH",
    "ConstantGuidance",
    "EnergyGuidance",
    "MassGuidance",
    "OddsGuidance",
    "PredictionGuidance",
    "ReferenceGuidance",
    "ReferenceKind",
    "SGFGuidance",
    "SafeGuidance",
    "ShieldedGuidance",
    "TheoremGuidance",
    "preset_grid",
]

ReferenceKind = Literal["safe", "data"]

# A strength multiplies a difference of unit-scale predictions: past 1e3 the corrected prediction is thousands of
# standard deviations off and every image saturates, so a larger value is a mistake, not a setting.
MAX_STRENGTH = 1e3


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass(frozen=True, kw_only=True)
class SafeGuidance:
    """Base of the presets: the window of training timesteps t with window[0] <= t <= window[1] (0..1000 for SD)
    where the correction applies, and the kernel's bank rows per chunk (None: automatic)."""

    preset: ClassVar[str] = ""
    strength_field: ClassVar[str] = ""  # the field that scales the correction (0: off); a strength sweep varies it
    needs_reference_bank: ClassVar[bool] = False  # the odds preset reads a reference bank as well
    renoises: ClassVar[bool] = False  # the reference preset changes x_t (re-noised), the others the prediction

    window: tuple[float, float] = (0.0, 1000.0)
    chunk_size: int | None = None

    def __post_init__(self) -> None:
        if type(self) in (SafeGuidance, TheoremGuidance, EnergyGuidance):
            raise TypeError(f"{type(self).__name__} is abstract: use one of {', '.join(sorted(_PRESETS))}")
        w = self.window
        self._require(
            isinstance(w, (tuple, list)) and len(w) == 2 and all(_finite(v) for v in w) and w[0] <= w[1],
            "window",
            "a pair [t_min, t_max] of finite numbers with t_min <= t_max",
        )
        object.__setattr__(self, "window", (float(w[0]), float(w[1])))
        c = self.chunk_size
        self._require(
            c is None or (isinstance(c, int) and not isinstance(c, bool) and c > 0), "chunk_size", "a positive int"
        )

    def _require(self, ok: bool, name: str, expected: str) -> None:
        if not ok:
            raise ValueError(f"{type(self).__name__}.{name} must be {expected}, got {getattr(self, name)!r}")

    def _strength(self, name: str) -> None:
        v = getattr(self, name)
        self._require(_finite(v) and 0 <= v <= MAX_STRENGTH, name, f"a float in [0, {MAX_STRENGTH:g}]")

    def _positive_or_none(self, name: str, none_means: str) -> None:
        v = getattr(self, name)
        self._require(v is None or (_finite(v) and v > 0), name, f"a float > 0 or None ({none_means})")

    def in_window(self, t: float) -> bool:
        """Whether timestep ``t`` lies in the correction window (host-side check)."""
        return self.window[0] <= float(t) <= self.window[1]

    def with_(self, **changes: Any) -> Self:
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able settings, with the preset's name under ``preset``."""
        return {"preset": self.preset, **asdict(self), "window": list(self.window)}

    @staticmethod
    def preset_names() -> tuple[str, ...]:
        """The names of every preset the library ships, sorted (what ``from_dict`` accepts under ``preset``)."""
        return tuple(sorted(_PRESETS))

    @staticmethod
    def from_dict(data: Mapping[str, Any]) -> SafeGuidance:
        """``{"preset": name, **fields}`` -> that preset's type (the inverse of ``to_dict``); bad names say why."""
        values = dict(data)
        name = values.pop("preset", None)
        if name not in _PRESETS:
            hint = _LEGACY_PRESETS.get(name, "") if isinstance(name, str) else ""
            raise ValueError(f"safe_denoiser.preset must be one of {', '.join(sorted(_PRESETS))}, got {name!r}{hint}")
        cls = _PRESETS[name]
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(values) - set(known))
        if unknown:
            renamed = [_LEGACY_FIELDS[k] for k in unknown if k in _LEGACY_FIELDS]
            raise ValueError(
                f"unknown field(s) {unknown} for safe_denoiser preset {name!r}; expected some of {known}"
                + (f" ({'; '.join(renamed)})" if renamed else "")
            )
        if isinstance(values.get("window"), list):
            values["window"] = tuple(values["window"])
        return cls(**values)


@dataclass(frozen=True, kw_only=True)
class TheoremGuidance(SafeGuidance):
    """Theorem 1 in the model's prediction space with the forward kernel N(sqrt(abar) x0, h I) on x_t.

    h = 1 - abar (the exact posterior of a bank of point masses) unless ``kernel_sigma`` fixes h = kernel_sigma^2;
    ``bank_sigma`` instead makes the bank a kernel density estimate, each item the centre of N(x_n, bank_sigma^2 I),
    whose kernel stays soft as the noise vanishes (docs/method.md section 4); the two are exclusive. The correction
    applies where the bank's kernel log-mass is >= ``gate_log_mass`` (None: no gate).

    ``trust_radius``: the trust region. beta is capped per sample so that the corrected estimate stays within
    ``trust_radius`` x the banks' data radius (their largest item norm, ``PreparedBanks.data_radius``) of the origin,
    or, for an estimate already outside, moves no farther out (``core.step.trust_region_beta``). Without it a sample
    that leaves the data is pushed further each step (x0_hat grows with x_t and beta stays large): a feedback that
    took the miniature SD's latents to 1e9 (docs/method.md section 4). None: no cap, the default here; the odds
    preset, whose reference bank spans the data, defaults to 1. A negative bank alone need not: the 2-D toy's unsafe
    cluster sits at the data's centre, and a ball around it would stop every sample from leaving it.
    """

    kernel_sigma: float | None = None
    bank_sigma: float | None = None
    gate_log_mass: float | None = None
    trust_radius: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self._positive_or_none("kernel_sigma", "the forward variance 1 - abar")
        self._positive_or_none("bank_sigma", "a bank of point masses")
        self._require(
            self.bank_sigma is None or self.kernel_sigma is None,
            "bank_sigma",
            "None when kernel_sigma fixes the bandwidth (two ways to set one bandwidth)",
        )
        self._require(self.gate_log_mass is None or _finite(self.gate_log_mass), "gate_log_mass", "a finite float")
        self._positive_or_none("trust_radius", "no trust region")


@dataclass(frozen=True, kw_only=True)
class ConstantGuidance(TheoremGuidance):
    """eps <- eps + beta (eps - eps_unsafe) with a constant ``beta`` (a building block: without a window or a gate
    it pushes every sample, unsafe or not)."""

    preset: ClassVar[str] = "constant"
    strength_field: ClassVar[str] = "beta"
    beta: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        self._strength(self.strength_field)


@dataclass(frozen=True, kw_only=True)
class MassGuidance(TheoremGuidance):
    """beta = ``beta_per_mass`` x the bank's mean kernel value at x_t: strong near the bank, vanishing far from it."""

    preset: ClassVar[str] = "mass"
    strength_field: ClassVar[str] = "beta_per_mass"
    beta_per_mass: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        self._strength(self.strength_field)


@dataclass(frozen=True, kw_only=True)
class OddsGuidance(TheoremGuidance):
    """Theorem 1's own beta(x_t) = Z_u p_unsafe,t / (Z_s p_safe,t), times ``odds_scale`` (``core.beta``).

    ``reference_kind``: the reference bank holds safe data ("safe") or unlabelled data ("data"); ``prior_unsafe``
    is Z_u (None: from the banks' sizes); ``log_beta_max`` caps log beta. ``odds_sigma = s`` evaluates the odds at
    the model's denoised estimate x0_hat instead of x_t, both banks as kernel densities of bandwidth s in x0 space,
    so that the odds see the prompt (the conditional odds, docs/method.md section 2).

    The window closes at t = 300: below it the kernel is a hard nearest-item choice and beta a hard decision, so
    float32 rounding can flip which item wins and an image would differ alone and in a batch (measured on the demo
    model: up to 0.58 with t >= 0, 5e-5 with t >= 300; docs/results.md, stability).
    """

    preset: ClassVar[str] = "odds"
    strength_field: ClassVar[str] = "odds_scale"
    needs_reference_bank: ClassVar[bool] = True
    window: tuple[float, float] = (300.0, 1000.0)
    odds_scale: float = 1.0
    reference_kind: ReferenceKind = "safe"
    prior_unsafe: float | None = None
    log_beta_max: float = 4.605170185988092  # log(100)
    odds_sigma: float | None = None
    trust_radius: float | None = 1.0  # on by default here: the union of both banks spans the data

    def __post_init__(self) -> None:
        super().__post_init__()
        self._strength(self.strength_field)
        self._require(self.reference_kind in ("safe", "data"), "reference_kind", "'safe' or 'data'")
        p = self.prior_unsafe
        self._require(p is None or (_finite(p) and 0 < p < 1), "prior_unsafe", "a float in (0, 1) or None")
        self._require(_finite(self.log_beta_max), "log_beta_max", "a finite float")
        self._positive_or_none("odds_sigma", "the odds at x_t")


@dataclass(frozen=True, kw_only=True)
class ReferenceGuidance(SafeGuidance):
    """The authors' correction with their SD-1.4 nudity defaults (docs/method.md section 3).

    Kernel exp(-||x0_hat - x_n|| / (2 kernel_sigma^2)) on the denoised estimate (distance not squared);
    x0_hat <- x0_hat - step_size E_unsafe when the bank's kernel sum exceeds ``threshold - margin``; then x_t is
    re-noised from the corrected x0_hat. ``threshold=None``: computed from the bank at the sampling schedule's last
    timestep (``core.step.reference_threshold``), as the authors' code does.
    """

    preset: ClassVar[str] = "reference"
    strength_field: ClassVar[str] = "step_size"
    renoises: ClassVar[bool] = True
    window: tuple[float, float] = (780.0, 1000.0)
    step_size: float = 0.33
    kernel_sigma: float = 3.15
    margin: float = 1.6
    threshold: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self._strength(self.strength_field)
        self._require(_finite(self.kernel_sigma) and self.kernel_sigma > 0, "kernel_sigma", "a float > 0")
        self._require(_finite(self.margin), "margin", "a finite float")
        self._require(self.threshold is None or _finite(self.threshold), "threshold", "a finite float or None")


@dataclass(frozen=True, kw_only=True)
class EnergyGuidance(SafeGuidance):
    """Negative guidance as an energy gradient on the denoised estimate: x0_hat <- x0_hat + delta(x0_hat), mapped to
    the model's prediction at fixed x_t (``core.step.energy_correction``); the SGF paper's family."""


@dataclass(frozen=True, kw_only=True)
class SGFGuidance(EnergyGuidance):
    """Safety-Guided Flow (Kim, Kim & Park, ICLR 2026): x0_hat <- x0_hat + ``mmd_scale`` w(t) sum_n k_n (x0_hat - x_n),
    a gradient step (in units of the bandwidth h) on the MMD potential -sum_n k(x0_hat, x_n), Gaussian kernel
    k = exp(-||x0_hat - x_n||^2 / (2 h)).

    Bandwidth: ``kernel_sigma`` fixes h = kernel_sigma^2; None picks h per sample so that the kernel at its
    ``bandwidth_rank``-th nearest bank item is ``kernel_at_rank`` (the authors' nearest-neighbour rule, made per
    sample so that an image does not depend on its batch). Schedule w(t): the critical window ``window``
    (t/1000 in [0.8, 1] as the authors run it), with a half-cosine ``ramp`` of that many timesteps at its lower end
    down to 0 (0: the hard window).
    """

    preset: ClassVar[str] = "sgf"
    strength_field: ClassVar[str] = "mmd_scale"
    window: tuple[float, float] = (800.0, 1000.0)
    mmd_scale: float = 1.0
    ramp: float = 0.0
    kernel_sigma: float | None = None
    bandwidth_rank: int = 5
    kernel_at_rank: float = 0.05

    def __post_init__(self) -> None:
        super().__post_init__()
        self._strength(self.strength_field)
        r = self.ramp
        width = self.window[1] - self.window[0]
        self._require(_finite(r) and 0 <= r <= width, "ramp", f"a float in [0, {width:g}] (the window's width)")
        self._positive_or_none("kernel_sigma", "the nearest-neighbour bandwidth")
        k = self.bandwidth_rank
        self._require(isinstance(k, int) and not isinstance(k, bool) and k >= 1, "bandwidth_rank", "an int >= 1")
        e = self.kernel_at_rank
        self._require(_finite(e) and 0 < e < 1, "kernel_at_rank", "a float in (0, 1)")


@dataclass(frozen=True, kw_only=True)
class ShieldedGuidance(EnergyGuidance):
    """Shielded Diffusion's sparse repellency (SPELL; Kirchhof et al., ICML 2025): x0_hat <- x0_hat +
    ``overcompensation`` sum_n max(0, r - d_n) / d_n (x0_hat - x_n), d_n = ||x0_hat - x_n||, r = ``radius``.

    Zero unless some bank item lies within ``radius`` of x0_hat; with one such item and overcompensation 1 the
    estimate lands on that ball's surface. ``radius`` is in the data's units (``core.energy_guidance.suggest_radius``
    gives a starting point from the bank).
    """

    preset: ClassVar[str] = "shielded"
    strength_field: ClassVar[str] = "overcompensation"
    radius: float = 1.0
    overcompensation: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        self._require(_finite(self.radius) and self.radius > 0, "radius", "a float > 0 (in the data's units)")
        self._strength(self.strength_field)


# The presets that correct the model's prediction at fixed x_t (every one but the re-noising reference preset).
PredictionGuidance: TypeAlias = TheoremGuidance | EnergyGuidance

_PRESETS: dict[str, type[SafeGuidance]] = {
    cls.preset: cls
    for cls in (ConstantGuidance, MassGuidance, OddsGuidance, ReferenceGuidance, SGFGuidance, ShieldedGuidance)
}
# Names of the earlier single-class settings, so that an old config says what replaced it.
_LEGACY_PRESETS = {"theorem": " ('theorem' with beta_mode constant/mass/odds is now the preset constant/mass/odds)"}
_LEGACY_FIELDS = {
    "eta": "'eta' is now beta (constant), beta_per_mass (mass), odds_scale (odds) or step_size (reference)",
    "beta_mode": "'beta_mode' is now the preset itself: constant, mass or odds",
    "mode": "'mode' is now the preset itself",
}


def preset_grid(preset: str, axes: Mapping[str, Sequence[Any]]) -> list[SafeGuidance]:
    """Every combination of ``axes`` (field -> values; a dict value sets several fields together, e.g. a bandwidth
    and its gate) applied to ``preset``'s defaults, in ``itertools.product`` order: a tuning grid."""
    base = SafeGuidance.from_dict({"preset": preset})
    out = []
    for values in itertools.product(*axes.values()):
        changes: dict[str, Any] = {}
        for name, value in zip(axes, values, strict=True):
            changes.update(value if isinstance(value, dict) else {name: value})
        out.append(base.with_(**changes))
    return out
