"""beta(x_t) from Theorem 1 itself: the posterior odds that x_t is unsafe, from two kernel densities.

Theorem 1's weight is beta(x_t) = Z_u p_unsafe,t(x_t) / (Z_s p_safe,t(x_t)) (docs/method.md section 1). Both
densities are estimated with the same forward kernel (the diffused empirical distribution of a bank,
p_t(x_t) ~ (1/N) sum_n N(x_t; sqrt(abar) x^(n), (1 - abar) I)): the negative bank for p_unsafe, and a *reference
bank* for the rest. The Gaussian's normalising constant is the same for both banks and cancels, so

    log beta = log(Z_u / Z_s) + log-mass(x_t; unsafe bank) - log-mass(x_t; safe bank)

with the log-masses of ``core.kernel.path_kernel_estimate`` on the VP path. When the reference bank is unlabelled
data (safe and unsafe mixed, ``reference_kind="data"``), its kernel density estimates p_data,t = Z_s p_safe,t +
Z_u p_unsafe,t, the posterior probability of "unsafe" is w = Z_u p_unsafe,t / p_data,t and beta = w / (1 - w).

Z_u is the unsafe share of the data. ``prior_unsafe=None`` estimates it from the banks' sizes, which is right when
both banks are complete samples of one data set (a safe reference: N_u / (N_u + N_s); an unlabelled one: N_u / N_d).

At high noise both densities are broad and beta tends to the prior odds Z_u / Z_s; at low noise it becomes a hard
decision (huge near an unsafe datapoint, vanishing elsewhere). ``log_beta_max`` caps it: the theorem's
E_safe = (E_data - w E_unsafe) / (1 - w) is undefined where w = 1, i.e. where x_t is certainly unsafe.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from safe_denoiser.core.bank import nearest_neighbour_distance
from safe_denoiser.core.banks import PreparedBanks
from safe_denoiser.core.guidance import OddsGuidance, ReferenceKind
from safe_denoiser.core.kernel import path_kernel_estimate
from safe_denoiser.core.paths import vp_path

__all__ = [
    "ODDS_SIGMA_FRACTION",
    "log_beta",
    "nearest_neighbour_distance",
    "posterior_variance",
    "prior_log_odds",
    "suggest_odds_sigma",
]


# odds_sigma as a fraction of the negative bank's median nearest-neighbour distance: the demo's tuned 1.0 is 0.4 x
# its bank's 2.51 (docs/method.md section 2); a starting point for a model whose units differ.
ODDS_SIGMA_FRACTION = 0.4


def posterior_variance(alpha_bar: Tensor, data_variance: float) -> Tensor:
    """Var[x0 | x_t] per coordinate for Gaussian data of variance sigma_d^2 on the VP path:
    sigma_d^2 (1 - abar) / (abar sigma_d^2 + 1 - abar): sigma_d^2 at pure noise, 0 without noise."""
    return data_variance * (1.0 - alpha_bar) / (alpha_bar * data_variance + 1.0 - alpha_bar)


def suggest_odds_sigma(bank: Tensor, fraction: float = ODDS_SIGMA_FRACTION) -> float:
    """A starting ``OddsGuidance.odds_sigma`` for a bank: ``fraction`` x its median nearest-neighbour distance."""
    return fraction * nearest_neighbour_distance(bank)


def prior_log_odds(n_unsafe: int, n_reference: int, reference: ReferenceKind, prior_unsafe: float | None) -> float:
    """log(Z_u / Z_s), given or estimated from the banks' sizes."""
    if prior_unsafe is None:
        if reference == "safe":
            prior_unsafe = n_unsafe / (n_unsafe + n_reference)
        elif n_unsafe >= n_reference:
            raise ValueError(
                f"reference='data' needs a reference bank larger than the unsafe bank to estimate Z_u, got "
                f"{n_reference} <= {n_unsafe}; give prior_unsafe"
            )
        else:
            prior_unsafe = n_unsafe / n_reference
    if not 0.0 < prior_unsafe < 1.0:
        raise ValueError(f"prior_unsafe must lie in (0, 1), got {prior_unsafe!r}")
    return math.log(prior_unsafe) - math.log1p(-prior_unsafe)


def log_beta(
    x_t: Tensor,
    banks: PreparedBanks,
    alpha_bar: float | Tensor,
    guidance: OddsGuidance,
    *,
    bandwidth: float | Tensor | None = None,
    bank_sigma: float | None = None,
    unsafe_log_mass: Tensor | None = None,
) -> Tensor:
    """log beta(x_t), (B,), from the negative and reference banks (module docstring), with ``guidance``'s reference
    kind, prior and cap; the kernel's variance ``bandwidth`` (None: 1 - abar) and ``bank_sigma`` as in
    ``kernel.path_kernel_estimate``. ``unsafe_log_mass``: the negative bank's kernel log-mass when the caller
    already has it (the correction's own pass over the bank gives it), so that the bank is not read a second time.
    """
    if banks.reference is None:
        raise ValueError("the odds preset needs a reference bank (PreparedBanks.reference)")
    neg, ref, chunk, path = banks.negative, banks.reference, guidance.chunk_size, vp_path(alpha_bar)
    if unsafe_log_mass is None:
        unsafe_log_mass = path_kernel_estimate(
            x_t, neg.data, path, bandwidth, chunk, bank_sq_norms=neg.sq_norms, bank_sigma=bank_sigma
        ).log_mass
    lp_ref = path_kernel_estimate(
        x_t, ref.data, path, bandwidth, chunk, bank_sq_norms=ref.sq_norms, bank_sigma=bank_sigma
    ).log_mass
    odds = prior_log_odds(len(neg), len(ref), guidance.reference_kind, guidance.prior_unsafe)
    if guidance.reference_kind == "safe":
        out = odds + unsafe_log_mass - lp_ref
    else:
        # log w = log Z_u + lp_u - lp_d ; beta = w / (1 - w), computed as log w - log(1 - w) without cancellation
        log_zu = odds - math.log1p(math.exp(odds))  # log(Z_u) from the log-odds
        log_w = torch.clamp(log_zu + unsafe_log_mass - lp_ref, max=0.0)  # a kernel estimate can exceed 1: clip w to 1
        out = log_w - torch.log(-torch.expm1(log_w))  # log(1 - w) = log(-expm1(log w)); +inf at w = 1 is capped
    return torch.clamp(out, max=guidance.log_beta_max)
