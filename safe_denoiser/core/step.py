"""One sampling step's safe-denoiser correction, for every preset of ``SafeGuidance``.

``theorem_correction`` / ``path_correction`` correct the model's prediction at fixed x_t (Theorem 1's presets and,
through ``energy_correction``, the energy presets SGF and Shielded); ``reference_correction`` re-noises x_t.

Pure functions over tensors: the window test on a traced tensor timestep is graph logic (torch.where),
so nothing here synchronises with the host.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from safe_denoiser.core.banks import PreparedBanks, uses_data_radius
from safe_denoiser.core.beta import log_beta, posterior_variance
from safe_denoiser.core.correction import safe_eps, safe_prediction
from safe_denoiser.core.energy_guidance import (
    mmd_weights,
    nearest_exact,
    neighbour_bandwidth,
    repulsion,
    sparse_repellency_weights,
    squared_distances,
    window_weight,
)
from safe_denoiser.core.guidance import (
    ConstantGuidance,
    EnergyGuidance,
    MassGuidance,
    OddsGuidance,
    PredictionGuidance,
    ReferenceGuidance,
    SGFGuidance,
    ShieldedGuidance,
    TheoremGuidance,
)
from safe_denoiser.core.kernel import (
    KernelEstimate,
    accumulation_dtype,
    as_batch_column,
    forward_kernel,
    kde_posterior_mean,
    kernel_estimate,
    path_kernel_estimate,
)
from safe_denoiser.core.parameterization import broadcast_to_sample, x0_from_eps
from safe_denoiser.core.paths import GaussianPath, Prediction, prediction_from_x0, vp_path, x0_from_prediction

__all__ = [
    "THRESHOLD_SEED",
    "StepRecord",
    "energy_correction",
    "odds_log_beta",
    "path_correction",
    "reference_correction",
    "reference_threshold",
    "theorem_correction",
    "trust_region_beta",
    "window_mask",
]

THRESHOLD_SEED = 0  # seed of reference_threshold's noise: every run (PyTorch or an exported bundle) sees one gate


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
    banks: PreparedBanks,
    guidance: PredictionGuidance,
) -> tuple[Tensor, StepRecord]:
    """Theorem 1 in noise space with the bank's kernel estimate of E_unsafe[x0 | x_t] and the preset's gated beta;
    an energy preset's correction of eps on the VP path (``energy_correction``)."""
    if isinstance(guidance, EnergyGuidance):
        return energy_correction(eps, x_t, vp_path(alpha_bar), "epsilon", t, banks, guidance)
    acc = accumulation_dtype(x_t.dtype)
    ab = as_batch_column(alpha_bar, x_t.shape[0], x_t.new_empty((), dtype=acc)).squeeze(1)
    x0_hat = x0_from_eps(x_t.to(acc), eps.to(acc), ab) if _needs_estimate(guidance) else None
    est, beta, applied = _theorem_terms(x_t, alpha_bar, t, banks, guidance, x0_hat)
    # Done in the accumulation dtype so that fp16 models do not lose the correction to rounding.
    out = safe_eps(eps.to(acc), x_t.to(acc), ab, est.mean.to(acc), beta).to(eps.dtype)
    return out, StepRecord(applied, est.log_mass.float(), _delta_norm(out, eps))


def path_correction(
    pred: Tensor,
    x_t: Tensor,
    path: GaussianPath,
    prediction: Prediction,
    t: float | Tensor,
    banks: PreparedBanks,
    guidance: PredictionGuidance,
) -> tuple[Tensor, StepRecord]:
    """``theorem_correction`` on any Gaussian path, for a model predicting ``prediction`` (``core.paths``); the
    energy presets go to ``energy_correction``.

    Kernel, beta, gate and window are evaluated on the equivalent VP sample; the correction is applied in the
    model's own prediction space (p + beta (p - p_unsafe)), which stays exact where a_t = 0 (the flow path's
    sigma = 1, where eps = x_t carries no correction). An eps prediction is corrected exactly as
    ``theorem_correction`` on the VP sample does, bit for bit.
    """
    if isinstance(guidance, EnergyGuidance):
        return energy_correction(pred, x_t, path, prediction, t, banks, guidance)
    acc = accumulation_dtype(x_t.dtype)
    c, ab = path.to_vp()
    x_vp = x_t if isinstance(c, float) and c == 1.0 else x_t * broadcast_to_sample(c, x_t)
    if prediction == "epsilon":  # eps is the same on the path and on its VP form
        return theorem_correction(pred, x_vp, ab, t, banks, guidance)
    at_estimate = _needs_estimate(guidance)
    x0_hat = x0_from_prediction(x_t.to(acc), pred.to(acc), path, prediction) if at_estimate else None
    est, beta, applied = _theorem_terms(x_vp, ab, t, banks, guidance, x0_hat)
    out = safe_prediction(pred.to(acc), x_t.to(acc), path, prediction, est.mean.to(acc), beta).to(pred.dtype)
    return out, StepRecord(applied, est.log_mass.float(), _delta_norm(out, pred))


def energy_correction(
    pred: Tensor,
    x_t: Tensor,
    path: GaussianPath,
    prediction: Prediction,
    t: float | Tensor,
    banks: PreparedBanks,
    guidance: EnergyGuidance,
) -> tuple[Tensor, StepRecord]:
    """An energy preset (``core.energy_guidance``): x0_hat <- x0_hat + delta(x0_hat), the prediction moved by the
    change that implies at fixed x_t (p is affine in x0 there: p + J delta, J delta = ``prediction_from_x0`` of delta
    at x_t = 0). Where the preset does not fire the prediction comes back bit for bit."""
    acc = accumulation_dtype(x_t.dtype)
    x0_hat = x0_from_prediction(x_t.to(acc), pred.to(acc), path, prediction)
    delta, log_mass, applied = _energy_delta(x0_hat, t, banks, guidance)
    change = prediction_from_x0(torch.zeros_like(delta), delta, path, prediction)
    per_sample = (pred.shape[0],) + (1,) * (pred.dim() - 1)
    out = torch.where(applied.reshape(per_sample), (pred.to(acc) + change).to(pred.dtype), pred)
    return out, StepRecord(applied, log_mass.float(), _delta_norm(out, pred))


def _energy_delta(
    x0_hat: Tensor, t: float | Tensor, banks: PreparedBanks, guidance: EnergyGuidance
) -> tuple[Tensor, Tensor, Tensor]:
    """(delta (B, ...), log-mass (B,), applied (B,) bool) of each energy preset at the denoised estimate."""
    b, bank = x0_hat.shape[0], banks.negative
    sq_dist, near, diff = nearest_exact(x0_hat, bank.data, squared_distances(x0_hat, bank.data, bank.sq_norms))
    applied = window_mask(t, guidance.window, b, x0_hat.device)
    match guidance:
        case SGFGuidance():
            if guidance.kernel_sigma is None:
                h: Tensor | float = neighbour_bandwidth(sq_dist, guidance.bandwidth_rank, guidance.kernel_at_rank)
            else:
                h = guidance.kernel_sigma**2
            weights, log_mass = mmd_weights(sq_dist, h)
            w_t = window_weight(t, guidance.window, guidance.ramp, b, sq_dist)
            scale, strength = guidance.mmd_scale * w_t, guidance.mmd_scale
        case ShieldedGuidance():
            weights, log_mass = sparse_repellency_weights(sq_dist, guidance.radius)
            applied = applied & (weights > 0).any(dim=1)  # sparse: no item within the radius, no correction
            scale, strength = torch.full_like(log_mass, guidance.overcompensation), guidance.overcompensation
        case _:
            raise TypeError(f"no energy correction for {type(guidance).__name__}")
    applied = applied & (scale > 0) if strength > 0 else torch.zeros_like(applied)
    delta = repulsion(x0_hat, bank.data, weights * scale.unsqueeze(1), (near, diff))
    return delta, log_mass, applied


def _needs_estimate(guidance: TheoremGuidance) -> bool:
    """Whether the preset reads the model's denoised estimate: the conditional odds and the trust region do."""
    return (isinstance(guidance, OddsGuidance) and guidance.odds_sigma is not None) or uses_data_radius(guidance)


def trust_region_beta(beta: Tensor, x0_hat: Tensor, unsafe_mean: Tensor, radius: float) -> Tensor:
    """beta (B,) capped per sample so that the corrected estimate x0_hat + beta (x0_hat - E_unsafe) (Theorem 1 at
    fixed x_t) stays in the ball of ``radius`` about the origin, or, for an estimate already outside it, gets no
    farther out: beta <= the larger root of ||a + b d||^2 = r^2 (a = x0_hat, d = a - E_unsafe, r = max(radius,
    ||a||)), computed without cancellation. The direction is the theorem's; only the step is bounded."""
    acc = beta.dtype
    a, d = x0_hat.to(acc).flatten(1), (x0_hat.to(acc) - unsafe_mean.to(acc)).flatten(1)
    aa, ad, dd = a.square().sum(1), (a * d).sum(1), d.square().sum(1).clamp_min(torch.finfo(acc).tiny)
    room = (radius**2 - aa).clamp_min(0.0)  # r^2 - ||a||^2 >= 0
    root = (ad.square() + dd * room).sqrt()
    # ad > 0: b = room / (ad + root) (no cancellation); ad <= 0: b = (root - ad) / dd (a sum of non-negatives)
    largest = torch.where(ad > 0, room / (ad + root).clamp_min(torch.finfo(acc).tiny), (root - ad) / dd)
    return torch.minimum(beta, largest)


def _theorem_terms(
    x_t: Tensor,
    alpha_bar: float | Tensor,
    t: float | Tensor,
    banks: PreparedBanks,
    guidance: TheoremGuidance,
    x0_hat: Tensor | None = None,
) -> tuple[KernelEstimate, Tensor, Tensor]:
    """(kernel estimate, beta (B,) zero where not applied, applied (B,) bool) for a VP sample ``x_t``; ``x0_hat``
    is the model's denoised estimate, which the conditional odds need."""
    b = x_t.shape[0]
    bandwidth = None if guidance.kernel_sigma is None else guidance.kernel_sigma**2
    if isinstance(guidance, OddsGuidance) and guidance.odds_sigma is not None:
        if x0_hat is None:
            raise ValueError("OddsGuidance.odds_sigma: the odds at the denoised estimate need x0_hat")
        est, log_odds = _conditional_odds_terms(x_t, alpha_bar, banks, guidance, bandwidth, x0_hat)
    else:
        # mean and mass in one pass over the bank; the odds at x_t reuse this mass
        neg = banks.negative
        est = path_kernel_estimate(
            x_t,
            neg.data,
            vp_path(alpha_bar),
            bandwidth,
            guidance.chunk_size,
            bank_sq_norms=neg.sq_norms,
            bank_sigma=guidance.bank_sigma,
        )
        log_odds = None
        if isinstance(guidance, OddsGuidance):
            log_odds = log_beta(
                x_t,
                banks,
                alpha_bar,
                guidance,
                bandwidth=bandwidth,
                bank_sigma=guidance.bank_sigma,
                unsafe_log_mass=est.log_mass,
            )
    beta = _beta(guidance, est, log_odds, b, x_t)
    if guidance.trust_radius is not None:
        if x0_hat is None or banks.data_radius is None:
            raise ValueError(
                f"{type(guidance).__name__}.trust_radius: the trust region needs x0_hat and the banks' data radius "
                "(PreparedBanks.prepare computes it)"
            )
        beta = trust_region_beta(beta, x0_hat, est.mean, guidance.trust_radius * banks.data_radius)
    applied = window_mask(t, guidance.window, b, x_t.device)
    if guidance.gate_log_mass is not None:
        applied = applied & (est.log_mass >= guidance.gate_log_mass)
    return est, torch.where(applied, beta, torch.zeros_like(beta)), applied


def _beta(guidance: TheoremGuidance, est: KernelEstimate, log_odds: Tensor | None, batch: int, like: Tensor) -> Tensor:
    """Each theorem preset's beta, (B,), in the accumulation dtype."""
    acc = accumulation_dtype(like.dtype)
    match guidance:
        case ConstantGuidance():
            return torch.full((batch,), guidance.beta, device=like.device, dtype=acc)
        case MassGuidance():
            return guidance.beta_per_mass * est.log_mass.exp().to(acc)
        case OddsGuidance():
            assert log_odds is not None
            return guidance.odds_scale * log_odds.exp().to(acc)
    raise TypeError(f"no beta for {type(guidance).__name__}")


def _conditional_odds_terms(
    x_t: Tensor,
    alpha_bar: float | Tensor,
    banks: PreparedBanks,
    guidance: OddsGuidance,
    bandwidth: float | None,
    x0_hat: Tensor,
) -> tuple[KernelEstimate, Tensor]:
    """(E_unsafe estimate at x_t, log beta at x0_hat) for the conditional odds.

    E_unsafe at x_t and the odds' kernel at x0_hat are two queries of the same bank, stacked into one
    ``kernel_estimate`` (each row its own scale and variance): one pass over the negative bank per step.
    """
    b, acc = x_t.shape[0], accumulation_dtype(x_t.dtype)
    neg = banks.negative
    scale, variance = forward_kernel(x_t, alpha_bar, bandwidth, guidance.bank_sigma)
    odds_variance = _odds_variance(x0_hat, alpha_bar, guidance, banks)
    both = kernel_estimate(
        torch.cat([x_t.to(acc), x0_hat.to(acc)]),
        neg.data,
        torch.cat([scale, torch.ones_like(scale)]),
        torch.cat([variance, odds_variance.unsqueeze(1)]),
        True,
        guidance.chunk_size,
        bank_sq_norms=neg.sq_norms,
    )
    mean = both.mean[:b]
    if guidance.bank_sigma is not None:
        mean = kde_posterior_mean(x_t, mean, scale, variance, guidance.bank_sigma)
    log_odds = log_beta(x0_hat, banks, 1.0, guidance, bandwidth=odds_variance, unsafe_log_mass=both.log_mass[b:])
    return KernelEstimate(mean, both.log_mass[:b]), log_odds


def odds_log_beta(
    x_t: Tensor,
    banks: PreparedBanks,
    alpha_bar: float | Tensor,
    guidance: OddsGuidance,
    x0_hat: Tensor | None = None,
) -> Tensor:
    """log beta of Theorem 1 as the odds preset evaluates it (``core.beta.log_beta``).

    At x_t with the forward kernel, or, with ``guidance.odds_sigma = s``, at the model's denoised estimate ``x0_hat``
    with both banks as kernel densities of variance s^2 + Var[x0 | x_t] in x0 space, the posterior variance of
    Gaussian data of the banks' variance (``core.beta.posterior_variance``: x0_hat is uncertain at high noise, so
    the odds there tend to the prior odds; docs/method.md section 2: the conditional odds).
    """
    if guidance.odds_sigma is None:
        bandwidth = None if guidance.kernel_sigma is None else guidance.kernel_sigma**2
        return log_beta(x_t, banks, alpha_bar, guidance, bandwidth=bandwidth, bank_sigma=guidance.bank_sigma)
    if x0_hat is None:
        raise ValueError("OddsGuidance.odds_sigma: the odds at the denoised estimate need x0_hat")
    variance = _odds_variance(x0_hat, alpha_bar, guidance, banks)
    return log_beta(x0_hat, banks, 1.0, guidance, bandwidth=variance)


def _odds_variance(x0_hat: Tensor, alpha_bar: float | Tensor, guidance: OddsGuidance, banks: PreparedBanks) -> Tensor:
    """(B,) kernel variance of the odds at the denoised estimate: odds_sigma^2 + Var[x0 | x_t]."""
    assert guidance.odds_sigma is not None
    sd2 = banks.data_variance
    if sd2 is None:
        raise ValueError(
            "OddsGuidance.odds_sigma needs the banks' data variance: build them with PreparedBanks.prepare"
        )
    ab = as_batch_column(alpha_bar, x0_hat.shape[0], x0_hat.new_empty((), dtype=accumulation_dtype(x0_hat.dtype)))
    return guidance.odds_sigma**2 + posterior_variance(ab.squeeze(1), sd2)


def reference_correction(
    eps: Tensor,
    x_t: Tensor,
    alpha_bar: float | Tensor,
    t: float | Tensor,
    banks: PreparedBanks,
    guidance: ReferenceGuidance,
    threshold: float | Tensor,
    noise: Tensor,
) -> tuple[Tensor, StepRecord]:
    """The authors' correction: x0_hat -= step_size * E_unsafe(x0_hat), gated, then x_t re-noised with ``noise``.

    Returns the new x_t (unchanged where the gate or window is closed); the caller then runs its usual
    scheduler step with the unchanged ``eps``. The gate fires where sum_n k_n > threshold - margin.
    """
    b = x_t.shape[0]
    acc = accumulation_dtype(x_t.dtype)
    ab = as_batch_column(alpha_bar, b, x_t.new_empty((), dtype=acc)).squeeze(1)
    x0_hat = x0_from_eps(x_t.to(acc), eps.to(acc), ab)
    neg = banks.negative
    est = kernel_estimate(
        x0_hat, neg.data, 1.0, guidance.kernel_sigma**2, False, guidance.chunk_size, bank_sq_norms=neg.sq_norms
    )
    log_sum = est.log_mass + math.log(len(neg))
    if isinstance(threshold, torch.Tensor):
        floor = threshold.to(device=x_t.device, dtype=acc) - guidance.margin
    else:
        floor = torch.full((), float(threshold) - guidance.margin, device=x_t.device, dtype=acc)
    # log of a non-positive floor is -inf or nan; "sum > floor" then always holds.
    applied = window_mask(t, guidance.window, b, x_t.device) & ((floor <= 0) | (log_sum > floor.clamp_min(1e-30).log()))
    x0_new = x0_hat - guidance.step_size * est.mean
    per_sample = (b,) + (1,) * (x_t.dim() - 1)
    abb = ab.reshape(per_sample)
    x_new = (abb.sqrt() * x0_new + (1.0 - abb).sqrt() * noise.to(acc)).to(x_t.dtype)
    out = torch.where(applied.reshape(per_sample), x_new, x_t)
    return out, StepRecord(applied, est.log_mass.float(), _delta_norm(out, x_t))


def reference_threshold(
    bank: Tensor, kernel_sigma: float, alpha_bar_last: float, generator: torch.Generator | None = None
) -> float:
    """Minimum over bank items of the kernel sum of that item noised to the last timestep (docs/method.md section 3).

    A one-off set-up computation (it returns a Python float), not part of the sampling loop. The noise comes from
    ``generator``, or from a CPU generator seeded with ``THRESHOLD_SEED`` so that the gate is the same on every run.
    """
    y = bank.float()
    gen = torch.Generator().manual_seed(THRESHOLD_SEED) if generator is None else generator
    z = torch.randn(y.shape, generator=gen, device=gen.device).to(y.device)
    noised = math.sqrt(alpha_bar_last) * y + math.sqrt(1.0 - alpha_bar_last) * z
    est = kernel_estimate(noised, y, 1.0, kernel_sigma**2, False, chunk_size=4096)
    return float((est.log_mass + math.log(y.shape[0])).exp().min())
