"""The estimates that bench/correction.py times, at SD-latent size: the inputs, and each method as a closure.

Every closure returns (eps_safe, kernel sums or None) for fixed inputs, so the harness can time it, measure its
memory and check its output the same way (bench/correction.py's docstring says what each method is).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from safe_denoiser.core.banks import PreparedBanks
from safe_denoiser.core.correction import safe_eps
from safe_denoiser.core.guidance import OddsGuidance
from safe_denoiser.core.kernel import bank_sq_norms, path_kernel_estimate
from safe_denoiser.core.paths import vp_path
from safe_denoiser.core.step import theorem_correction

LATENT_SHAPE: tuple[int, int, int] = (4, 64, 64)
ALPHA_BAR = 0.5
BETA = 0.5
BASELINE_EPS = 1e-8
POOL_SIZE = 4096
FLOAT_BYTES = 4

Call = Callable[[], tuple[Tensor, Tensor | None]]


# --------------------------------------------------------------------------------------------------- inputs


def make_bank(n: int, shape: tuple[int, ...], seed: int) -> Tensor:
    """N latents with each spatial position's channel vector L2-normalised; tiles a random pool for large N."""
    gen = torch.Generator().manual_seed(seed)
    pool = torch.randn((min(n, POOL_SIZE), *shape), generator=gen)
    pool.mul_(torch.rsqrt(pool.square().sum(dim=1, keepdim=True)))
    if n <= POOL_SIZE:
        return pool
    bank = torch.empty((n, *shape))
    for start in range(0, n, POOL_SIZE):
        stop = min(n, start + POOL_SIZE)
        bank[start:stop].copy_(pool[: stop - start])
    return bank


def make_inputs(bank: Tensor, batch: int, alpha_bar: float, seed: int, queries: str = "near") -> tuple[Tensor, Tensor]:
    """x_t = sqrt(abar) x^(n) + sqrt(1 - abar) z for random bank items n (``near``) or x_t = z (``noise``), and a
    random eps prediction."""
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, bank.shape[0], (batch,), generator=gen)
    z = torch.randn((batch, *bank.shape[1:]), generator=gen)
    x_t = z if queries == "noise" else math.sqrt(alpha_bar) * bank[idx] + math.sqrt(1.0 - alpha_bar) * z
    eps = torch.randn((batch, *bank.shape[1:]), generator=gen)
    return x_t, eps


# ---------------------------------------------------------------------------------------------- the methods


def baseline_posterior_mean(x_t: Tensor, bank: Tensor, alpha_bar: float) -> tuple[Tensor, Tensor]:
    """The research code's estimate: (B, N, D) differences, plain exp, epsilon normalisation. Returns (mean, k_sum)."""
    b, n = x_t.shape[0], bank.shape[0]
    y = bank.reshape(n, -1)
    x_rep = x_t.reshape(b, 1, -1).repeat(1, n, 1)  # (B, N, D)
    diff = x_rep - math.sqrt(alpha_bar) * y.unsqueeze(0)  # (B, N, D)
    dist = (diff**2).sum(dim=2)  # (B, N, D) temporary -> (B, N)
    k = torch.exp(-dist / (2.0 * (1.0 - alpha_bar)))  # plain exp: underflows to 0 in high dimension
    k_sum = k.sum(dim=1, keepdim=True)
    mean = (k @ y) / (k_sum + BASELINE_EPS)
    return mean.reshape(x_t.shape), k_sum.squeeze(1)


def ours_call(bank: Tensor, x_t: Tensor, eps: Tensor, chunk: int | None, alpha_bar: float) -> Call:
    """path_kernel_estimate's mean (norms precomputed, as NegativeBank holds them) + safe_eps: (eps_safe, None)."""
    norms, path = bank_sq_norms(bank), vp_path(alpha_bar)

    def call() -> tuple[Tensor, Tensor | None]:
        x0_unsafe = path_kernel_estimate(x_t, bank, path, chunk_size=chunk, bank_sq_norms=norms).mean
        return safe_eps(eps, x_t, alpha_bar, x0_unsafe, BETA), None

    return call


def odds_call(bank: Tensor, reference: Tensor, x_t: Tensor, eps: Tensor, chunk: int | None, alpha_bar: float) -> Call:
    """theorem_correction with the conditional odds (banks, norms and data variance prepared once, as ``attach``
    does)."""
    guidance = OddsGuidance(odds_scale=BETA, odds_sigma=1.0, window=(0.0, 1000.0), chunk_size=chunk)
    banks = PreparedBanks.prepare(bank, guidance, reference)  # validating the banks computes their norms

    def call() -> tuple[Tensor, Tensor | None]:
        out, _ = theorem_correction(eps, x_t, alpha_bar, 500.0, banks, guidance)
        return out, None

    return call


def sdpa_call(bank: Tensor, x_t: Tensor, eps: Tensor, alpha_bar: float) -> Call:
    """E_unsafe by ``scaled_dot_product_attention`` (logits = <x s / h, y> - s^2 ||y||^2 / 2h) + safe_eps."""
    b, n = x_t.shape[0], bank.shape[0]
    scale, h = math.sqrt(alpha_bar), 1.0 - alpha_bar
    keys = bank.reshape(1, 1, n, -1)
    mask = (-0.5 * scale * scale / h * bank_sq_norms(bank)).expand(b, n).reshape(1, 1, b, n)

    def call() -> tuple[Tensor, Tensor | None]:
        query = (x_t.reshape(1, 1, b, -1) * (scale / h)).contiguous()
        mean = F.scaled_dot_product_attention(query, keys, keys, attn_mask=mask, scale=1.0)
        return safe_eps(eps, x_t, alpha_bar, mean.reshape(x_t.shape), BETA), None

    return call


def baseline_call(bank: Tensor, x_t: Tensor, eps: Tensor, alpha_bar: float) -> Call:
    """baseline_posterior_mean + safe_eps, as a closure returning (eps_safe, kernel sums)."""

    def call() -> tuple[Tensor, Tensor | None]:
        x0_unsafe, k_sum = baseline_posterior_mean(x_t, bank, alpha_bar)
        return safe_eps(eps, x_t, alpha_bar, x0_unsafe, BETA), k_sum

    return call


def estimate_extra_bytes(method: str, b: int, n: int, d: int, chunk: int | None) -> int:
    """Rough extra working set of one call beyond bank and inputs (decides whether a row is run)."""
    if method == "baseline":
        return (3 * b * n * d + n * d) * FLOAT_BYTES
    rows = n if chunk is None else min(chunk, n)
    if method == "ours-odds":  # two query rows per sample; the reference bank is counted as resident, not extra
        b = 2 * b
    return (4 * b * rows + 4 * b * d) * FLOAT_BYTES  # logits/weights per chunk, accumulators; no (N, D) temporary
