"""Conversions between the eps, v and x0 predictions of a VP model, and the sigma (VE / Euler) form.

VP forward process: x_t = sqrt(abar) x0 + sqrt(1 - abar) eps; v = sqrt(abar) eps - sqrt(1 - abar) x0.
Sigma form (EDM, Euler): x = x_t / sqrt(abar) = x0 + sigma eps, sigma^2 = (1 - abar) / abar.
``alpha_bar`` and ``sigma`` are floats or (B,) tensors, broadcast over the trailing sample dimensions.
"""

from __future__ import annotations

from torch import Tensor

__all__ = [
    "alpha_bar_from_sigma",
    "broadcast_to_sample",
    "eps_from_v",
    "eps_from_x0",
    "eps_from_x0_sigma",
    "sigma_from_alpha_bar",
    "v_from_eps",
    "x0_from_eps",
    "x0_from_eps_sigma",
    "x0_from_v",
]


def broadcast_to_sample(value: float | Tensor, like: Tensor) -> float | Tensor:
    """A float stays a float; a (B,) or scalar tensor becomes (B, 1, ..., 1) on ``like``'s device."""
    if not isinstance(value, Tensor):
        return float(value)
    value = value.to(like.device)
    if value.dim() == 0:
        return value
    return value.reshape(value.shape[0], *([1] * (like.dim() - 1)))


def _sqrt(value: float | Tensor) -> float | Tensor:
    return value.sqrt() if isinstance(value, Tensor) else float(value) ** 0.5


def x0_from_eps(x_t: Tensor, eps: Tensor, alpha_bar: float | Tensor) -> Tensor:
    """Tweedie's denoiser: x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar)."""
    ab = broadcast_to_sample(alpha_bar, x_t)
    return (x_t - _sqrt(1.0 - ab) * eps) / _sqrt(ab)


def eps_from_x0(x_t: Tensor, x0: Tensor, alpha_bar: float | Tensor) -> Tensor:
    """eps = (x_t - sqrt(abar) x0) / sqrt(1 - abar)."""
    ab = broadcast_to_sample(alpha_bar, x_t)
    return (x_t - _sqrt(ab) * x0) / _sqrt(1.0 - ab)


def x0_from_v(x_t: Tensor, v: Tensor, alpha_bar: float | Tensor) -> Tensor:
    """x0 = sqrt(abar) x_t - sqrt(1 - abar) v."""
    ab = broadcast_to_sample(alpha_bar, x_t)
    return _sqrt(ab) * x_t - _sqrt(1.0 - ab) * v


def eps_from_v(x_t: Tensor, v: Tensor, alpha_bar: float | Tensor) -> Tensor:
    """eps = sqrt(1 - abar) x_t + sqrt(abar) v."""
    ab = broadcast_to_sample(alpha_bar, x_t)
    return _sqrt(1.0 - ab) * x_t + _sqrt(ab) * v


def v_from_eps(x_t: Tensor, eps: Tensor, alpha_bar: float | Tensor) -> Tensor:
    """v = sqrt(abar) eps - sqrt(1 - abar) x0, with x0 from Tweedie."""
    ab = broadcast_to_sample(alpha_bar, x_t)
    return _sqrt(ab) * eps - _sqrt(1.0 - ab) * x0_from_eps(x_t, eps, alpha_bar)


def sigma_from_alpha_bar(alpha_bar: float | Tensor) -> float | Tensor:
    """sigma = sqrt((1 - abar) / abar)."""
    return _sqrt((1.0 - alpha_bar) / alpha_bar)


def alpha_bar_from_sigma(sigma: float | Tensor) -> float | Tensor:
    """abar = 1 / (1 + sigma^2)."""
    return 1.0 / (1.0 + sigma * sigma)


def x0_from_eps_sigma(x: Tensor, eps: Tensor, sigma: float | Tensor) -> Tensor:
    """Sigma-form denoiser: x0 = x - sigma eps."""
    return x - broadcast_to_sample(sigma, x) * eps


def eps_from_x0_sigma(x: Tensor, x0: Tensor, sigma: float | Tensor) -> Tensor:
    """eps = (x - x0) / sigma."""
    return (x - x0) / broadcast_to_sample(sigma, x)
