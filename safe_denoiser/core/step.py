"""One sampling step's safe-denoiser correction, for either preset of ``SafeGuidance``.

Pure functions over tensors: the window test on a traced tensor timestep is graph logic (torch.where),
so nothing here synchronises with the host.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from safe_denoiser.core.config import SafeGuidance
from safe_denoiser.core.correction import safe_eps
from safe_denoiser.core.kernel import as_batch_column, kernel_estimate
from safe_denoiser.core.parameterization import x0_from_eps

__all__ = ["StepRecord", "reference_correction", "reference_threshold", "theorem_correction", "window_mask"]


class StepRecord(NamedTuple):
    """What the correction did at one step, per sample: fired or not, kernel log-mass, size of the change."""

    applied: Tensor  # (B,) bool
    log_mass: Tensor  # (B,) float32
    delta_norm: Tensor  # (B,) float32, L2 norm of the change to eps (theorem) or to x_t (reference)


def window_mask(t: float | Tensor, window: tuple[float, float], batch: int, device: torch.device) -> Tensor:
    """(B,) bool: window[0] <= t <= window[1], for a float or a scalar/(B,) tensor timestep."""
    if not isinstance(t, torch.Tensor):  # decided on the host: a fill, no host-to-device copy
        return torch.full((batch,), window[0] <= float(t) <= window[1], device=device, dtype=torch.bool)
    tt = t.to(device=device, dtype=torch.float32).reshape(-1)
    return ((tt >= window[0]) & (tt <= window[1])).expand(batch)


def _delta_norm(new: Tensor, old: Tensor) -> Tensor:
    return (new.float() - old.float()).flatten(1).norm(dim=1)


def theorem_correction(
    eps: Tensor,
    x_t: Tensor,
    alpha_bar: float | Tensor,
    t: float | Tensor,
    bank: Tensor,
    guidance: SafeGuidance,
) -> tuple[Tensor, StepRecord]:
    """Theorem 1 in noise space with the bank's kernel estimate of E_unsafe[x0 | x_t] and a gated beta."""
    b = x_t.shape[0]
    acc = torch.float64 if x_t.dtype == torch.float64 else torch.float32
    ab = as_batch_column(alpha_bar, b, x_t.new_empty((), dtype=acc))
    variance = (1.0 - ab) if guidance.kernel_sigma is None else torch.full_like(ab, guidance.kernel_sigma**2)
    est = kernel_estimate(x_t, bank, ab.sqrt(), variance.clamp_min(1e-12), True, guidance.chunk_size)
    beta = torch.full((b,), guidance.eta, device=x_t.device, dtype=acc)
    if guidance.beta_mode == "mass":
        beta = beta * est.log_mass.exp()
    applied = window_mask(t, guidance.window, b, x_t.device)
    if guidance.gate_log_mass is not None:
        applied = applied & (est.log_mass >= guidance.gate_log_mass)
    beta = torch.where(applied, beta, torch.zeros_like(beta))
    # Done in the accumulation dtype so that fp16 models do not lose the correction to rounding.
    out = safe_eps(eps.to(acc), x_t.to(acc), ab.squeeze(1), est.mean.to(acc), beta).to(eps.dtype)
    return out, StepRecord(applied, est.log_mass.float(), _delta_norm(out, eps))


def reference_correction(
    eps: Tensor,
    x_t: Tensor,
    alpha_bar: float | Tensor,
    t: float | Tensor,
    bank: Tensor,
    guidance: SafeGuidance,
    threshold: float | Tensor,
    noise: Tensor,
) -> tuple[Tensor, StepRecord]:
    """The authors' correction: x0_hat -= eta * E_unsafe(x0_hat), gated, then x_t re-noised with ``noise``.

    Returns the new x_t (unchanged where the gate or window is closed); the caller then runs its usual
    scheduler step with the unchanged ``eps``. The gate fires where sum_n k_n > threshold - margin.
    """
    if guidance.kernel_sigma is None:
        raise ValueError("reference_correction needs SafeGuidance.kernel_sigma")
    b = x_t.shape[0]
    acc = torch.float64 if x_t.dtype == torch.float64 else torch.float32
    ab = as_batch_column(alpha_bar, b, x_t.new_empty((), dtype=acc)).squeeze(1)
    x0_hat = x0_from_eps(x_t.to(acc), eps.to(acc), ab)
    est = kernel_estimate(x0_hat, bank, 1.0, guidance.kernel_sigma**2, False, guidance.chunk_size)
    log_sum = est.log_mass + math.log(bank.shape[0])
    if isinstance(threshold, torch.Tensor):
        floor = threshold.to(device=x_t.device, dtype=acc) - guidance.margin
    else:
        floor = torch.full((), float(threshold) - guidance.margin, device=x_t.device, dtype=acc)
    # log of a non-positive floor is -inf or nan; "sum > floor" then always holds.
    applied = window_mask(t, guidance.window, b, x_t.device) & ((floor <= 0) | (log_sum > floor.clamp_min(1e-30).log()))
    x0_new = x0_hat - guidance.eta * est.mean
    per_sample = (b,) + (1,) * (x_t.dim() - 1)
    abb = ab.reshape(per_sample)
    x_new = (abb.sqrt() * x0_new + (1.0 - abb).sqrt() * noise.to(acc)).to(x_t.dtype)
    out = torch.where(applied.reshape(per_sample), x_new, x_t)
    return out, StepRecord(applied, est.log_mass.float(), _delta_norm(out, x_t))


def reference_threshold(
    bank: Tensor, kernel_sigma: float, alpha_bar_last: float, generator: torch.Generator | None = None
) -> float:
    """Minimum over bank items of the kernel sum of that item noised to the last timestep (METHOD.md 3).

    A one-off set-up computation (it returns a Python float), not part of the sampling loop. The noise comes from
    ``generator``, or from a CPU generator seeded with 0 so that the gate is the same on every run.
    """
    y = bank.float()
    gen = torch.Generator().manual_seed(0) if generator is None else generator
    z = torch.randn(y.shape, generator=gen, device=gen.device).to(y.device)
    noised = math.sqrt(alpha_bar_last) * y + math.sqrt(1.0 - alpha_bar_last) * z
    est = kernel_estimate(noised, y, 1.0, kernel_sigma**2, False, chunk_size=4096)
    return float((est.log_mass + math.log(y.shape[0])).exp().min())
