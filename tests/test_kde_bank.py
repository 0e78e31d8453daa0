"""A kernel-density bank (``bank_sigma``): each bank item the centre of N(x_n, s^2 I), so the bank is a Gaussian
mixture and its posterior mean and diffused density are known in closed form (``demo.mixture.GaussianMixture``)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from safe_denoiser.core.banks import PreparedBanks
from safe_denoiser.core.beta import log_beta
from safe_denoiser.core.guidance import ConstantGuidance, OddsGuidance
from safe_denoiser.core.kernel import path_kernel_estimate
from safe_denoiser.core.paths import vp_path
from safe_denoiser.core.step import theorem_correction
from safe_denoiser.demo.mixture import GaussianMixture

from helpers import U32, assert_within, kernel_reference


def _mixture(bank: torch.Tensor, sigma: float) -> GaussianMixture:
    """The bank as an equal-weight isotropic mixture (one extra far component so that 'unsafe' marks some)."""
    n, d = bank.shape
    means = torch.cat([bank.double(), torch.full((1, d), 1e3, dtype=torch.float64)])
    stds = torch.full((n + 1,), sigma, dtype=torch.float64)
    weights = torch.cat([torch.full((n,), 1.0 / n, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)])
    unsafe = torch.cat([torch.ones(n, dtype=torch.bool), torch.zeros(1, dtype=torch.bool)])
    return GaussianMixture(means, stds, weights, unsafe)


@pytest.mark.parametrize("seed", range(10))
@pytest.mark.parametrize("alpha_bar", [0.02, 0.5, 0.97, 0.9999])
def test_kde_bank_is_the_mixture_posterior(seed: int, alpha_bar: float) -> None:
    g = torch.Generator().manual_seed(seed)
    sigma = float(torch.empty(1).uniform_(0.05, 1.0, generator=g))
    bank, x = torch.randn(9, 5, generator=g, dtype=torch.float64), torch.randn(6, 5, generator=g, dtype=torch.float64)
    est = path_kernel_estimate(x, bank, vp_path(alpha_bar), bank_sigma=sigma)
    mix = _mixture(bank, sigma)
    torch.testing.assert_close(est.mean, mix.posterior_mean(x, alpha_bar, "unsafe"), rtol=0, atol=1e-10)
    # the log-mass is the diffused density without its Gaussian normaliser (which cancels in every ratio)
    h = 1 - alpha_bar + alpha_bar * sigma**2
    want = mix.log_density(x, alpha_bar, "unsafe") + 0.5 * 5 * math.log(2 * math.pi * h)
    torch.testing.assert_close(est.log_mass, want, rtol=0, atol=1e-10)


@pytest.mark.parametrize("seed", range(10))
def test_kde_bank_float32_within_rounding_of_float64(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    bank, x = torch.randn(40, 64, generator=g), torch.randn(3, 64, generator=g)
    sigma = 0.3
    for ab in (0.1, 0.9, 0.999):
        got = path_kernel_estimate(x, bank, vp_path(ab), bank_sigma=sigma).mean
        want = path_kernel_estimate(x.double(), bank.double(), vp_path(ab), bank_sigma=sigma).mean
        # m's error from the kernel analysis (h as the float32 code rounds it), then m + g (x - a m): |1 - g a| <= 1
        # on m's error, a few roundings of g, of x - a m and of the sum (8 u of each magnitude, generously).
        ab32 = torch.full((1, 1), ab, dtype=torch.float32)
        h32 = 1.0 - ab32 + ab32 * sigma**2
        ref = kernel_reference(x, bank, ab32.sqrt().double(), h32.double(), dtype=torch.float32)
        gain = math.sqrt(ab) * sigma**2 / float(h32)
        m = ref.mean.abs()
        bound = 2 * ref.mean_bound + 8 * U32 * (gain * (x.abs() + m) + m + want.double().abs())
        assert_within(got, want, bound, f"alpha_bar {ab}")


def test_kde_bank_correction_vanishes_with_the_noise() -> None:
    """At abar -> 1 the KDE posterior mean tends to x_t, so E_data - E_unsafe and the correction tend to 0."""
    g = torch.Generator().manual_seed(0)
    bank = torch.randn(30, 16, generator=g, dtype=torch.float64)
    x = torch.randn(4, 16, generator=g, dtype=torch.float64)
    gaps = [
        float((path_kernel_estimate(x, bank, vp_path(ab), bank_sigma=0.3).mean - x / math.sqrt(ab)).norm())
        for ab in (0.9, 0.99, 0.999, 0.9999)
    ]
    assert all(b < a for a, b in itertools.pairwise(gaps)), gaps
    point_mass = float((path_kernel_estimate(x, bank, vp_path(0.9999)).mean - x / math.sqrt(0.9999)).norm())
    assert gaps[-1] < 0.01 * point_mass  # a point-mass bank keeps pulling to the nearest item instead


def test_kde_odds_beta_matches_the_mixture_odds() -> None:
    """Both banks as KDEs with one sigma: log beta = log(Z_u / Z_s) + the mixtures' log-density ratio."""
    g = torch.Generator().manual_seed(3)
    unsafe, safe = torch.randn(6, 4, generator=g, dtype=torch.float64), torch.randn(14, 4, generator=g) + 1.0
    safe = safe.double()
    x, ab, sigma = torch.randn(5, 4, generator=g, dtype=torch.float64), 0.7, 0.4
    # log_beta_max must be finite: 1e300 caps nothing here (|log beta| <= ~20)
    guidance = OddsGuidance(bank_sigma=sigma, log_beta_max=1e300)
    banks = PreparedBanks.prepare(unsafe, guidance, safe)
    got = log_beta(x, banks, ab, guidance, bank_sigma=guidance.bank_sigma)
    want = (
        math.log(6 / 14)
        + _mixture(unsafe, sigma).log_density(x, ab, "unsafe")
        - _mixture(safe, sigma).log_density(x, ab, "unsafe")
    )
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


def test_theorem_correction_uses_bank_sigma() -> None:
    g = torch.Generator().manual_seed(1)
    bank, x, eps = (torch.randn(8, 2, 3, 3, generator=g, dtype=torch.float64) for _ in range(3))
    eps = eps[:2]
    x = x[:2]
    ab, sigma = 0.6, 0.5
    guidance = ConstantGuidance(beta=1.0, bank_sigma=sigma)
    out, _ = theorem_correction(eps, x, ab, 500.0, PreparedBanks.prepare(bank, guidance), guidance)
    mean = _mixture(bank.flatten(1), sigma).posterior_mean(x.flatten(1), ab, "unsafe").reshape(x.shape)
    eps_unsafe = (x - math.sqrt(ab) * mean) / math.sqrt(1 - ab)
    torch.testing.assert_close(out, eps + (eps - eps_unsafe), rtol=0, atol=1e-10)


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"bank_sigma": 0.0}, r"ConstantGuidance\.bank_sigma must be a float > 0"),
        ({"bank_sigma": float("nan")}, r"ConstantGuidance\.bank_sigma must be a float > 0"),
        ({"bank_sigma": 0.3, "kernel_sigma": 1.0}, r"ConstantGuidance\.bank_sigma must be None when kernel_sigma"),
    ],
)
def test_bank_sigma_validation(changes: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ConstantGuidance(beta=1.0, **changes)


def test_bank_sigma_and_bandwidth_are_exclusive() -> None:
    with pytest.raises(ValueError, match="not both"):
        path_kernel_estimate(torch.randn(2, 3), torch.randn(4, 3), vp_path(0.5), bandwidth=0.2, bank_sigma=0.3)
