"""One general Gaussian path x_t = a_t x0 + s_t eps, its three instances, and conversions between predictions.

Instances (docs/method.md section 1):

* ``"vp"``, level = abar: a = sqrt(abar), s = sqrt(1 - abar) (DDPM, DDIM, PNDM, DPM-Solver; SD-1.x, SD-2.x, SDXL);
* ``"sigma"``, level = sigma: a = 1, s = sigma (Euler, LMS, EDM: x = x0 + sigma eps);
* ``"flow"``, level = sigma in [0, 1]: a = 1 - sigma, s = sigma (rectified flow; SD3, Flux).

A model predicts one of (names as in diffusers): ``"epsilon"``; ``"sample"`` (x0); ``"v_prediction"``
(v = a eps - s x0); ``"flow"``, the rectified-flow velocity u = eps - x0 = dx_t/dsigma on the flow path. At a fixed
x_t each is affine in x0 (``prediction_from_x0``), so Theorem 1, x0_safe = x0 + beta (x0 - E_unsafe), reads
p_safe = p + beta (p - p_unsafe) in every one of them, with p_unsafe the prediction that x0 = E_unsafe implies
(``core.correction.safe_prediction``).

Every path is a variance-preserving path after a rescaling: c x_t = (c a) x0 + (c s) eps with c = 1 / sqrt(a^2 +
s^2) has (c a)^2 + (c s)^2 = 1, so abar = a^2 / (a^2 + s^2) and eps is unchanged (``GaussianPath.to_vp``). The kernel
of the theorem's estimator is the same function in both coordinates (||c x - c a x_n||^2 / (c s)^2 =
||x - a x_n||^2 / s^2), which is how one kernel (``core.kernel.path_kernel_estimate``) serves every path; a fixed
bandwidth ``kernel_sigma`` is a variance in those VP coordinates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from torch import Tensor

from safe_denoiser.core.parameterization import _sqrt, broadcast_to_sample

__all__ = [
    "PATH_KINDS",
    "PREDICTIONS",
    "GaussianPath",
    "PathKind",
    "Prediction",
    "convert_prediction",
    "flow_path",
    "prediction_from_x0",
    "sigma_path",
    "vp_path",
    "x0_from_prediction",
]

PathKind = Literal["vp", "sigma", "flow"]
Prediction = Literal["epsilon", "sample", "v_prediction", "flow"]
PATH_KINDS: tuple[str, ...] = ("vp", "sigma", "flow")
PREDICTIONS: tuple[str, ...] = ("epsilon", "sample", "v_prediction", "flow")


@dataclass(frozen=True)
class GaussianPath:
    """x_t = a x0 + s eps at one noise level: ``kind`` and its ``level`` (abar for "vp", sigma otherwise).

    ``level`` is a float or a (B,) tensor (one level per sample).
    """

    kind: PathKind
    level: float | Tensor

    def __post_init__(self) -> None:
        if self.kind not in PATH_KINDS:
            raise ValueError(f"GaussianPath.kind must be one of {PATH_KINDS}, got {self.kind!r}")

    @property
    def a(self) -> float | Tensor:
        """The signal coefficient a_t."""
        if self.kind == "vp":
            return _sqrt(self.level)
        return 1.0 if self.kind == "sigma" else 1.0 - self.level

    @property
    def s(self) -> float | Tensor:
        """The noise coefficient s_t."""
        return _sqrt(1.0 - self.level) if self.kind == "vp" else self.level

    def to_vp(self) -> tuple[float | Tensor, float | Tensor]:
        """(c, abar): the equivalent VP sample is c * x_t at abar = a^2 / (a^2 + s^2); c = 1.0 exactly for "vp"."""
        if self.kind == "vp":
            return 1.0, self.level
        level = self.level
        if self.kind == "sigma":
            # The same float operations as the sigma-form schedulers have always used (bit-for-bit results).
            ab = 1.0 / (1.0 + level * level)
            return (math.sqrt(ab) if isinstance(ab, float) else ab.sqrt()), ab
        r2 = (1.0 - level) * (1.0 - level) + level * level
        return 1.0 / _sqrt(r2), (1.0 - level) * (1.0 - level) / r2


def vp_path(alpha_bar: float | Tensor) -> GaussianPath:
    """The variance-preserving path at abar."""
    return GaussianPath("vp", alpha_bar)


def sigma_path(sigma: float | Tensor) -> GaussianPath:
    """The sigma (VE / EDM / Euler) path x = x0 + sigma eps."""
    return GaussianPath("sigma", sigma)


def flow_path(sigma: float | Tensor) -> GaussianPath:
    """The rectified-flow path x = (1 - sigma) x0 + sigma eps."""
    return GaussianPath("flow", sigma)


def _coefficients(path: GaussianPath, like: Tensor) -> tuple[float | Tensor, float | Tensor]:
    return broadcast_to_sample(path.a, like), broadcast_to_sample(path.s, like)


def prediction_from_x0(x_t: Tensor, x0: Tensor, path: GaussianPath, prediction: Prediction) -> Tensor:
    """The prediction that the denoised estimate ``x0`` implies at ``x_t`` (affine in x0)."""
    a, s = _coefficients(path, x_t)
    if prediction == "sample":
        return x0
    if prediction == "epsilon":
        return (x_t - a * x0) / s
    if prediction == "flow":  # u = eps - x0 = (x_t - (a + s) x0) / s
        return (x_t - (a + s) * x0) / s
    if prediction == "v_prediction":  # v = a eps - s x0 = (a x_t - (a^2 + s^2) x0) / s
        return (a * x_t - (a * a + s * s) * x0) / s
    raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")


def x0_from_prediction(x_t: Tensor, pred: Tensor, path: GaussianPath, prediction: Prediction) -> Tensor:
    """The denoised estimate x0 from a model's prediction (the inverse of ``prediction_from_x0``)."""
    a, s = _coefficients(path, x_t)
    if prediction == "sample":
        return pred
    if prediction == "epsilon":
        return (x_t - s * pred) / a
    if prediction == "flow":
        return (x_t - s * pred) / (a + s)
    if prediction == "v_prediction":
        return (a * x_t - s * pred) / (a * a + s * s)
    raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")


def convert_prediction(x_t: Tensor, pred: Tensor, path: GaussianPath, source: Prediction, target: Prediction) -> Tensor:
    """One prediction as another, through x0 (e.g. a flow model's u as eps: eps = (x_t + a u) / (a + s))."""
    if source == target:
        return pred
    return prediction_from_x0(x_t, x0_from_prediction(x_t, pred, path, source), path, target)
