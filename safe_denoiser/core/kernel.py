"""Kernel estimates of the unsafe posterior mean E_unsafe[x0 | x_t] over a negative bank.

Pure tensor functions (METHOD.md section 1). Everything is computed in log space with an online
logsumexp over bank chunks, so memory is O(B*N + N*D) (O(B*chunk + chunk*D) when chunked) and no
(B, N, D) tensor is ever built. No host synchronisation: safe inside traced or compiled graphs.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "KernelEstimate",
    "as_batch_column",
    "kernel_estimate",
    "kernel_log_mass",
    "log_kernel",
    "unsafe_posterior_mean",
]


class KernelEstimate(NamedTuple):
    """The kernel-weighted bank mean and the log of the mean kernel value, per sample."""

    mean: Tensor  # (B, ...) same shape as the query
    log_mass: Tensor  # (B,) log( (1/N) sum_n k_n )


def as_batch_column(value: float | Tensor, batch: int, like: Tensor) -> Tensor:
    """A float or (B,) / (B, 1) / () tensor as a (B, 1) float tensor on ``like``'s device and dtype."""
    if isinstance(value, Tensor):
        v = value.to(device=like.device, dtype=like.dtype).reshape(-1, 1)
        if v.shape[0] == 1:
            return v.expand(batch, 1)
        if v.shape[0] != batch:
            raise ValueError(f"expected a scalar or a ({batch},) tensor, got shape {tuple(value.shape)}")
        return v
    return torch.full((batch, 1), float(value), device=like.device, dtype=like.dtype)


def log_kernel(x: Tensor, bank: Tensor, scale: Tensor, variance: Tensor, squared: bool = True) -> tuple[Tensor, Tensor]:
    """log k_n = -d_n^p / (2 v), d_n = ||x - scale * bank_n||, p = 2 (Gaussian) or 1 (reference code).

    ``x`` is (B, D), ``bank`` (N, D), ``scale`` and ``variance`` (B, 1). Returns (logits (B, N), offset (B, 1))
    with log k = logits + offset. The squared distance is expanded as ||x||^2 - 2 s <x, y> + s^2 ||y||^2 so that
    one matmul does the work; for p = 2 the term ||x||^2, the same for every n, goes to ``offset`` instead of
    being added and then cancelled in the softmax, which would cost float32 digits when ||x||^2 >> the spread.
    """
    # vector_norm reduces without a bank-sized temporary (square().sum() would allocate N x D).
    x_sq = torch.linalg.vector_norm(x, dim=1, keepdim=True).square()  # (B, 1)
    y_sq = torch.linalg.vector_norm(bank, dim=1).square().unsqueeze(0)  # (1, N)
    cross = 2.0 * scale * (x @ bank.T) - scale.square() * y_sq  # (B, N): ||x||^2 - d^2
    if squared:
        return cross / (2.0 * variance), -x_sq / (2.0 * variance)
    dist = (x_sq - cross).clamp_min(0.0).sqrt()
    return -dist / (2.0 * variance), torch.zeros_like(x_sq)


def kernel_estimate(
    x: Tensor,
    bank: Tensor,
    scale: float | Tensor = 1.0,
    variance: float | Tensor = 1.0,
    squared: bool = True,
    chunk_size: int | None = None,
) -> KernelEstimate:
    """Self-normalised kernel mean sum_n softmax(log k)_n bank_n and log mean kernel value.

    Online logsumexp over chunks of the bank (the flash-attention recurrence): for each chunk the running
    maximum m, normaliser s and weighted sum acc are rescaled by exp(m_old - m_new).
    Half-precision inputs are accumulated in float32 and the mean is returned in the input dtype.
    """
    if x.dim() < 2 or bank.dim() < 2:
        raise ValueError("x must be (B, ...) and bank (N, ...), each with at least 2 dimensions")
    if x.shape[1:] != bank.shape[1:]:
        raise ValueError(f"bank item shape {tuple(bank.shape[1:])} does not match sample shape {tuple(x.shape[1:])}")
    n = bank.shape[0]
    if n == 0:
        raise ValueError("the bank is empty")
    if chunk_size is not None and chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size}")
    out_dtype = x.dtype
    acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    b = x.shape[0]
    xf = x.reshape(b, -1).to(acc_dtype)
    yf = bank.reshape(n, -1).to(device=x.device, dtype=acc_dtype)
    s = as_batch_column(scale, b, xf)
    v = as_batch_column(variance, b, xf)

    step = n if chunk_size is None else min(chunk_size, n)
    run_max = torch.full((b, 1), -math.inf, device=xf.device, dtype=acc_dtype)
    run_sum = torch.zeros((b, 1), device=xf.device, dtype=acc_dtype)
    acc = torch.zeros_like(xf)
    for start in range(0, n, step):
        y = yf[start : start + step]
        logits, offset = log_kernel(xf, y, s, v, squared)  # (B, chunk), (B, 1)
        new_max = torch.maximum(run_max, logits.amax(dim=1, keepdim=True))
        rescale = torch.exp(run_max - new_max)  # exp(-inf) = 0 on the first chunk
        w = torch.exp(logits - new_max)
        run_sum = run_sum * rescale + w.sum(dim=1, keepdim=True)
        acc = acc * rescale + w @ y
        run_max = new_max
    mean = (acc / run_sum).reshape(x.shape).to(out_dtype)
    log_mass = (offset + run_max + run_sum.log()).squeeze(1) - math.log(n)
    return KernelEstimate(mean, log_mass)


def _forward_kernel(alpha_bar: float | Tensor, bandwidth: float | Tensor | None, like: Tensor) -> tuple[Tensor, Tensor]:
    """(sqrt(abar), h) as (B, 1) columns in the accumulation dtype; h = 1 - abar unless overridden."""
    acc = like.new_empty(()).to(torch.float64 if like.dtype == torch.float64 else torch.float32)
    ab = as_batch_column(alpha_bar, like.shape[0], acc)
    variance = (1.0 - ab) if bandwidth is None else as_batch_column(bandwidth, like.shape[0], acc)
    # abar == 1 (no noise) would divide by zero; 1e-12 keeps -d^2/(2h) finite in float32.
    return ab.sqrt(), variance.clamp_min(1e-12)


def unsafe_posterior_mean(
    x_t: Tensor,
    bank: Tensor,
    alpha_bar: float | Tensor,
    bandwidth: float | Tensor | None = None,
    chunk_size: int | None = None,
) -> Tensor:
    """E_unsafe[x0 | x_t] ~ sum_n w_n x^(n), w = softmax_n(-||x_t - sqrt(abar) x^(n)||^2 / (2 h)).

    h is the forward process's variance 1 - abar (the exact posterior for a bank of point masses)
    unless ``bandwidth`` overrides it. ``x_t`` is (B, ...), ``bank`` (N, ...), ``alpha_bar`` a float or (B,).
    """
    scale, variance = _forward_kernel(alpha_bar, bandwidth, x_t)
    return kernel_estimate(x_t, bank, scale, variance, squared=True, chunk_size=chunk_size).mean


def kernel_log_mass(
    x_t: Tensor,
    bank: Tensor,
    alpha_bar: float | Tensor,
    bandwidth: float | Tensor | None = None,
    chunk_size: int | None = None,
) -> Tensor:
    """log (1/N) sum_n exp(-||x_t - sqrt(abar) x^(n)||^2 / (2 h)), per sample: (B,).

    The kernel is the unnormalised Gaussian (1 at distance 0), so the mass lies in (0, 1]; in high
    dimension it is tiny, which is why gates and thresholds work on its logarithm.
    """
    scale, variance = _forward_kernel(alpha_bar, bandwidth, x_t)
    return kernel_estimate(x_t, bank, scale, variance, squared=True, chunk_size=chunk_size).log_mass
