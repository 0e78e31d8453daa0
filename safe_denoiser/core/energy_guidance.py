"""Energy-based negative guidance on the denoised estimate: SGF's MMD gradient and Shielded Diffusion's repellency.

Pure tensor functions (k-diffusion style) over an (N, ...) bank, for a (B, ...) denoised estimate x0_hat. Both
presets are one gradient step on a potential sum_n k(x0_hat, x_n) that repels x0_hat from the bank
(docs/method.md section 7), delta = -c grad_x sum_n k = sum_n w_n (x0_hat - x_n), with per-item weights w_n:

* SGF (Kim, Kim & Park, ICLR 2026), Gaussian kernel k = exp(-d^2 / (2 h)) and c = h: w_n = k_n;
* SPELL (Kirchhof et al., ICML 2025), k = (r - d)_+^2 / 2 and c = 1: w_n = (r - d_n)_+ / d_n, zero outside the
  balls of radius r (sparse).

Each reads the bank twice in chunks (the squared distances, then the weighted rows), never builds a (B, N, D)
tensor, accumulates in float32 at least and has no host synchronisation, so it traces into ONNX graphs.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from safe_denoiser.core.beta import nearest_neighbour_distance
from safe_denoiser.core.kernel import MAX_TRACED_CHUNKS, accumulation_dtype, auto_chunk_size, bank_sq_norms

__all__ = [
    "EXACT_NEAREST",
    "RADIUS_FRACTION",
    "mmd_weights",
    "neighbour_bandwidth",
    "repulsion",
    "sparse_repellency_weights",
    "squared_distances",
    "suggest_radius",
    "window_weight",
]

# ShieldedGuidance.radius as a fraction of the bank's median nearest-neighbour distance: a starting point only
# (on the 2-D toy's unsafe cluster this is ~0.05; the toy study uses radius 1, about three cluster deviations).
RADIUS_FRACTION = 0.5
# Items nearest to x0_hat whose distance and difference are taken exactly rather than by the expansion
# ||x||^2 - 2 x.y + ||y||^2, which loses sqrt(u) |x| of a near-zero distance: SPELL's weight (r - d) / d would then
# push an estimate that sits on a bank item to the wrong distance.
EXACT_NEAREST = 8


def _chunk_rows(n: int, batch: int, d: int, device: torch.device) -> int:
    """Bank rows per chunk (``kernel.auto_chunk_size``); in a trace, where the loop is unrolled, few chunks."""
    step = min(n, auto_chunk_size(batch, n, d, device))
    if torch.jit.is_tracing() or torch.compiler.is_compiling():
        step = max(step, math.ceil(n / MAX_TRACED_CHUNKS))
    return step


def squared_distances(x: Tensor, bank: Tensor, sq_norms: Tensor | None = None) -> Tensor:
    """||x_b - x_n||^2, (B, N), in the accumulation dtype; the bank read in chunks (a half bank widened per chunk)."""
    acc = accumulation_dtype(x.dtype)
    xf = x.reshape(x.shape[0], -1).to(acc)
    y = bank.reshape(bank.shape[0], -1)
    norms = (bank_sq_norms(y) if sq_norms is None else sq_norms).to(device=xf.device, dtype=acc)
    step = _chunk_rows(y.shape[0], xf.shape[0], xf.shape[1], xf.device)
    cross = torch.cat([xf @ y[i : i + step].to(acc).T for i in range(0, y.shape[0], step)], dim=1)
    x_sq = torch.linalg.vector_norm(xf, dim=1, keepdim=True).square()
    return (x_sq - 2.0 * cross + norms.unsqueeze(0)).clamp_min(0.0)


def nearest_exact(x: Tensor, bank: Tensor, sq_dist: Tensor, k: int = EXACT_NEAREST) -> tuple[Tensor, Tensor, Tensor]:
    """(``sq_dist`` with the k nearest items' distances exact, their indices (B, k), their x - x_n (B, k, D))."""
    acc = accumulation_dtype(x.dtype)
    idx = torch.topk(sq_dist, min(k, sq_dist.shape[1]), dim=1, largest=False).indices
    y = bank.reshape(bank.shape[0], -1)
    diff = x.reshape(x.shape[0], 1, -1).to(acc) - y[idx].to(acc)
    return sq_dist.scatter(1, idx, diff.square().sum(dim=-1)), idx, diff


def repulsion(x: Tensor, bank: Tensor, weights: Tensor, nearest: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """sum_n w_n (x - x_n), shaped like ``x``, in the accumulation dtype: (sum_n w_n) x - w @ bank, except for the
    items in ``nearest`` = (indices (B, k), x - x_n (B, k, D)), whose terms are summed from the exact differences."""
    acc = accumulation_dtype(x.dtype)
    xf = x.reshape(x.shape[0], -1).to(acc)
    exact = torch.zeros_like(xf)
    if nearest is not None:
        idx, diff = nearest
        exact = (weights.gather(1, idx).unsqueeze(-1) * diff).sum(dim=1)
        weights = weights.scatter(1, idx, 0.0)
    y = bank.reshape(bank.shape[0], -1)
    step = _chunk_rows(y.shape[0], xf.shape[0], xf.shape[1], xf.device)
    pulled = sum(weights[:, i : i + step] @ y[i : i + step].to(acc) for i in range(0, y.shape[0], step))
    assert isinstance(pulled, Tensor)
    return (weights.sum(dim=1, keepdim=True) * xf - pulled + exact).reshape(x.shape)


def neighbour_bandwidth(sq_dist: Tensor, rank: int, kernel_at_rank: float) -> Tensor:
    """SGF's per-sample bandwidth h, (B,): k = exp(-d^2 / (2 h)) equals ``kernel_at_rank`` at the rank-th nearest."""
    k = min(rank, sq_dist.shape[1])
    d2_k = torch.topk(sq_dist, k, dim=1, largest=False).values[:, k - 1]
    tiny = torch.finfo(sq_dist.dtype).tiny  # a sample on top of its k nearest items: no NaN, the kernel is 1 there
    return (d2_k / (2.0 * math.log(1.0 / kernel_at_rank))).clamp_min(tiny)


def mmd_weights(sq_dist: Tensor, bandwidth: Tensor | float) -> tuple[Tensor, Tensor]:
    """SGF: (Gaussian kernel k_n = exp(-d_n^2 / (2 h)) (B, N), log mean kernel (B,)); ``bandwidth`` h (B,) or float."""
    h = bandwidth.unsqueeze(1) if isinstance(bandwidth, Tensor) else bandwidth
    log_k = -sq_dist / (2.0 * h)
    return log_k.exp(), torch.logsumexp(log_k, dim=1) - math.log(sq_dist.shape[1])


def sparse_repellency_weights(sq_dist: Tensor, radius: float) -> tuple[Tensor, Tensor]:
    """SPELL: (w_n = (r - d_n)_+ / d_n (B, N), log mean of the normalised kernel (1 - d_n / r)_+^2 (B,)).

    An item at distance 0 gets no weight (its direction is undefined); the log-mass is floored at float32's
    smallest normal number's log, so that a sample near no item records a finite value.
    """
    d = sq_dist.sqrt()
    inside = (d < radius) & (d > 0)
    w = torch.where(inside, (radius - d) / d.clamp_min(torch.finfo(d.dtype).tiny), torch.zeros_like(d))
    mass = (1.0 - d / radius).clamp_min(0.0).square().mean(dim=1)
    return w, mass.clamp_min(torch.finfo(torch.float32).tiny).log()


def window_weight(t: float | Tensor, window: tuple[float, float], ramp: float, batch: int, like: Tensor) -> Tensor:
    """SGF's critical-window schedule, (B,): 1 on [t_min + ramp, t_max], a half-cosine from 1 down to 0 over
    [t_min, t_min + ramp], 0 outside the window; ``t`` a float or a scalar / (B,) tensor (graph logic)."""
    tt = torch.as_tensor(t, dtype=like.dtype, device=like.device).reshape(-1).expand(batch)
    inside = (tt >= window[0]) & (tt <= window[1])
    if ramp <= 0.0:
        return inside.to(like.dtype)
    rising = ((tt - window[0]) / ramp).clamp(0.0, 1.0)
    return torch.where(inside, 0.5 - 0.5 * torch.cos(math.pi * rising), torch.zeros_like(tt))


def suggest_radius(bank: Tensor, fraction: float = RADIUS_FRACTION) -> float:
    """A starting ``ShieldedGuidance.radius``: ``fraction`` x the bank's median nearest-neighbour distance."""
    return fraction * nearest_neighbour_distance(bank)
