"""The safe-denoiser correction of Theorem 1, in x0 space and in noise space.

E_safe[x | x_t] = E_data[x | x_t] + beta(x_t) (E_data[x | x_t] - E_unsafe[x | x_t])      (Theorem 1)
eps_safe        = eps + beta (eps - eps_unsafe),  eps_unsafe = (x_t - sqrt(abar) E_unsafe) / sqrt(1 - abar)

The noise-space form is affine in eps with coefficients that depend on x_t only, so it commutes with
classifier-free guidance (docs/method.md section 1). On any Gaussian path and for any prediction p that is affine
in x0 at fixed x_t (eps, x0, v, the flow velocity u = eps - x0; ``core.paths``) the theorem reads
p_safe = p + beta (p - p_unsafe) (``safe_prediction``).
"""

from __future__ import annotations

from torch import Tensor

from safe_denoiser.core.parameterization import broadcast_to_sample, eps_from_x0
from safe_denoiser.core.paths import GaussianPath, Prediction, prediction_from_x0

__all__ = ["cfg_combine", "safe_eps", "safe_prediction", "safe_x0"]


def safe_x0(x0_data: Tensor, x0_unsafe: Tensor, beta: float | Tensor) -> Tensor:
    """Theorem 1 in x0 space: x0_safe = x0_data + beta (x0_data - x0_unsafe)."""
    b = broadcast_to_sample(beta, x0_data)
    return x0_data + b * (x0_data - x0_unsafe)


def safe_eps(eps: Tensor, x_t: Tensor, alpha_bar: float | Tensor, x0_unsafe: Tensor, beta: float | Tensor) -> Tensor:
    """Theorem 1 in noise space: eps_safe = eps + beta (eps - eps_unsafe)."""
    eps_unsafe = eps_from_x0(x_t, x0_unsafe.to(x_t.dtype), alpha_bar)
    b = broadcast_to_sample(beta, eps)
    return eps + b * (eps - eps_unsafe)


def safe_prediction(
    pred: Tensor, x_t: Tensor, path: GaussianPath, prediction: Prediction, x0_unsafe: Tensor, beta: float | Tensor
) -> Tensor:
    """Theorem 1 for a model predicting ``prediction`` on ``path``: p_safe = p + beta (p - p_unsafe)."""
    p_unsafe = prediction_from_x0(x_t, x0_unsafe.to(x_t.dtype), path, prediction)
    b = broadcast_to_sample(beta, pred)
    return pred + b * (pred - p_unsafe)


def cfg_combine(eps_uncond: Tensor, eps_cond: Tensor, guidance_scale: float | Tensor) -> Tensor:
    """Classifier-free guidance: eps_u + w (eps_c - eps_u)."""
    w = broadcast_to_sample(guidance_scale, eps_cond)
    return eps_uncond + w * (eps_cond - eps_uncond)
