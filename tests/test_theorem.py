"""Theorem 1 and the kernel estimator against closed-form Gaussian mixtures (float64)."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator

import pytest
import torch

from safe_denoiser import (
    GaussianMixture,
    eps_from_x0,
    path_kernel_estimate,
    safe_eps,
    safe_x0,
    vp_path,
    x0_from_eps,
)

from helpers import U64, assert_within, forward_reference


@pytest.fixture(autouse=True)
def _float64() -> Iterator[None]:
    """Every tensor in this module is float64 (the references are exact); restored afterwards."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def mixture(dim: int, point_mass_unsafe: bool = False) -> GaussianMixture:
    g = torch.Generator().manual_seed(dim)
    means = 2.0 * torch.randn(5, dim, generator=g, dtype=torch.float64)
    stds = torch.tensor([0.3, 0.5, 0.4, 0.2, 0.35], dtype=torch.float64)
    unsafe = torch.tensor([False, False, False, True, True])
    if point_mass_unsafe:
        stds = torch.where(unsafe, torch.zeros_like(stds), stds)
    weights = torch.tensor([0.3, 0.2, 0.2, 0.15, 0.15], dtype=torch.float64)
    return GaussianMixture(means, stds, weights, unsafe)


def test_mixture_posterior_mean_matches_quadrature() -> None:
    """The closed form itself, checked by brute-force quadrature of x0 p(x0) q(x_t|x0) on a 2-D grid."""
    gm = mixture(2)
    ab = 0.6
    grid_1d = torch.linspace(-9, 9, 601, dtype=torch.float64)
    xx, yy = torch.meshgrid(grid_1d, grid_1d, indexing="ij")
    pts = torch.stack([xx.flatten(), yy.flatten()], 1)
    # log p_data(x0) at t = 0 (abar -> 1 uses the component variances exactly)
    log_p0 = gm.log_density(pts, 1.0)
    x_t = torch.tensor([[0.3, -0.7], [1.5, 2.0], [-2.0, 0.5]], dtype=torch.float64)
    d2 = (x_t[:, None, :] - math.sqrt(ab) * pts[None]).square().sum(-1)
    logw = log_p0[None] - d2 / (2 * (1 - ab))
    w = torch.softmax(logw, dim=1)
    quad = w @ pts
    # No random input: the error is the quadrature's. The grid step 0.03 is under a sixth of the narrowest
    # posterior component's std (about 0.19) and the box reaches 8 std past every mean, so the trapezoid rule is
    # exact to far below 1e-6 (measured: 4e-14, float64 rounding of the 360k-term sums).
    assert torch.allclose(gm.posterior_mean(x_t, ab), quad, rtol=0, atol=1e-6)


@pytest.mark.parametrize("dim", [2, 16])
@pytest.mark.parametrize("alpha_bar", [0.02, 0.3, 0.9, 0.999])
def test_theorem_identity_float64(dim: int, alpha_bar: float) -> None:
    """E_safe = E_data + beta (E_data - E_unsafe) with the exact beta = Z_u p_u,t / (Z_s p_s,t)."""
    gm = mixture(dim)
    x_t = gm.sample(64) * math.sqrt(alpha_bar) + math.sqrt(1 - alpha_bar) * torch.randn(64, dim)
    e_data = gm.posterior_mean(x_t, alpha_bar, "data")
    e_safe = gm.posterior_mean(x_t, alpha_bar, "safe")
    e_unsafe = gm.posterior_mean(x_t, alpha_bar, "unsafe")
    beta = gm.exact_beta(x_t, alpha_bar)
    lhs = safe_x0(e_data, e_unsafe, beta)
    # Float64 rounding: each component's log-joint sums D positive terms (relative error <= (D + 3) u64) and
    # exp() turns that absolute error, u64 (D + 3) |log-joint|, into the responsibilities' relative error; beta
    # and the three posterior means each carry it into values of size `scale`. Hence 4 (D + 4) u64 per unit of
    # |log-joint| and of scale (measured over 200 seeds: at most 0.4 u64 (1 + max |log-joint|) scale).
    scale = 1.0 + e_safe.abs().max().item() * (1.0 + beta.max().item())
    var = alpha_bar * gm.stds.square() + (1 - alpha_bar)
    d2 = (x_t[:, None] - math.sqrt(alpha_bar) * gm.means[None]).square().sum(-1)
    log_joint = 1.0 + (d2 / (2 * var)).max().item() + 0.5 * dim * abs(math.log(2 * math.pi * var.min().item()))
    assert_within(lhs, e_safe, 4 * (dim + 4) * U64 * log_joint * scale, "Theorem 1")


@pytest.mark.parametrize("dim", [2, 16])
def test_bank_of_point_masses_is_exact(dim: int) -> None:
    """An unsafe part made of equally weighted point masses is recovered exactly by the bank estimator."""
    gm = mixture(dim, point_mass_unsafe=True)
    bank = gm.means[gm.unsafe]  # the two point masses, equal weights 0.15 / 0.15
    for ab in (0.05, 0.5, 0.95):
        x_t = math.sqrt(ab) * gm.sample(32) + math.sqrt(1 - ab) * torch.randn(32, dim)
        est = path_kernel_estimate(x_t, bank, vp_path(ab)).mean
        # two float64 evaluations of one softmax (expanded and direct distances): the sum of their bounds
        bound = forward_reference(x_t, bank, ab).mean_bound + forward_reference(x_t, bank, ab, direct=True).mean_bound
        assert_within(est, gm.posterior_mean(x_t, ab, "unsafe"), bound, f"abar {ab}")


def test_bank_estimator_converges_to_exact_unsafe_mean() -> None:
    """Self-normalised importance sampling: the error shrinks as the bank grows (about 1/sqrt(N))."""
    dim, ab = 2, 0.5
    gm = mixture(dim)
    g = torch.Generator().manual_seed(1)
    x_t = math.sqrt(ab) * gm.sample(200, "unsafe", generator=g) + math.sqrt(1 - ab) * torch.randn(200, dim, generator=g)
    exact = gm.posterior_mean(x_t, ab, "unsafe")
    errors = []
    for n in (100, 1_000, 10_000, 100_000):
        bank = gm.sample(n, "unsafe", generator=g)
        errors.append(
            (path_kernel_estimate(x_t, bank, vp_path(ab), chunk_size=8192).mean - exact).norm(dim=1).mean().item()
        )
    assert errors[-1] < 0.01
    assert errors[-1] < errors[0] / 10  # 1000x more points: about 30x smaller error expected
    assert all(b < a for a, b in itertools.pairwise(errors))


@pytest.mark.parametrize("alpha_bar", [0.01, 0.5, torch.tensor([0.1, 0.7, 0.99])])
def test_x0_and_eps_space_corrections_agree(alpha_bar: float | torch.Tensor) -> None:
    x_t = torch.randn(3, 4, 5, 5)
    eps = torch.randn(3, 4, 5, 5)
    bank = torch.randn(20, 4, 5, 5)
    beta = torch.tensor([0.0, 0.5, 2.0])
    x0_unsafe = path_kernel_estimate(x_t, bank, vp_path(alpha_bar)).mean
    via_eps = x0_from_eps(x_t, safe_eps(eps, x_t, alpha_bar, x0_unsafe, beta), alpha_bar)
    via_x0 = safe_x0(x0_from_eps(x_t, eps, alpha_bar), x0_unsafe, beta)
    # About a dozen float64 operations per side, each off by u64 times a value below `scale` (the inputs, with
    # the 1/sqrt(abar), 1/sqrt(1 - abar) and 1 + 2 beta that the later operations multiply them by).
    ab = torch.as_tensor(alpha_bar).reshape(-1, 1, 1, 1)
    b = beta.reshape(-1, 1, 1, 1)
    inputs = x_t.abs() + eps.abs() + x0_unsafe.abs()
    scale = (1 + 2 * b.abs()) * inputs / (ab * (1 - ab)).sqrt()
    assert_within(via_eps, via_x0, 16 * U64 * scale, "x0 vs eps space")
    # and back: eps of the corrected x0 is the corrected eps
    assert torch.allclose(eps_from_x0(x_t, via_x0, alpha_bar), safe_eps(eps, x_t, alpha_bar, x0_unsafe, beta))
