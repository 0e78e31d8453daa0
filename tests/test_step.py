"""One step's correction (both presets) against hand computations; CFG commutation; config validation."""

from __future__ import annotations

import math

import pytest
import torch

from safe_denoiser import (
    ConstantGuidance,
    MassGuidance,
    PreparedBanks,
    ReferenceGuidance,
    SafeGuidance,
    cfg_combine,
    path_kernel_estimate,
    reference_correction,
    reference_threshold,
    safe_eps,
    theorem_correction,
    vp_path,
)
from safe_denoiser.core.parameterization import eps_from_v, eps_from_x0, v_from_eps, x0_from_eps, x0_from_v

from helpers import U32, U64, assert_within, forward_reference


def test_correction_commutes_with_cfg() -> None:
    """beta and E_unsafe depend on x_t only, so correct-then-combine == combine-then-correct."""
    x_t, bank = torch.randn(3, 4, 8, 8, dtype=torch.float64), torch.randn(25, 4, 8, 8, dtype=torch.float64)
    eps_u, eps_c = torch.randn_like(x_t), torch.randn_like(x_t)
    ab, w = torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64), 7.5
    g = MassGuidance(beta_per_mass=0.8, kernel_sigma=1.5)
    banks = PreparedBanks.prepare(bank, g)

    def corr(e: torch.Tensor) -> torch.Tensor:
        return theorem_correction(e, x_t, ab, 900.0, banks, g)[0]

    combine_then_correct = corr(cfg_combine(eps_u, eps_c, w))
    correct_then_combine = cfg_combine(corr(eps_u), corr(eps_c), w)
    # beta and E_unsafe are the same bits on both sides (functions of x_t); only the affine maps' rounding differs:
    # at most 12 float64 operations, each off by u64 times a value that, carried through the later products by w
    # and beta <= beta_per_mass, stays below (1 + 2w)(1 + 2 beta_per_mass)(|eps_u| + |eps_c| + |eps_unsafe|).
    eps_unsafe = eps_from_x0(x_t, path_kernel_estimate(x_t, bank, vp_path(ab), bandwidth=1.5**2).mean, ab)
    scale = (1 + 2 * w) * (1 + 2 * g.beta_per_mass) * (eps_u.abs() + eps_c.abs() + eps_unsafe.abs())
    assert_within(combine_then_correct, correct_then_combine, 16 * U64 * scale, "CFG commutation")


def test_theorem_correction_matches_hand_computation() -> None:
    x_t, eps, bank = torch.randn(2, 6), torch.randn(2, 6), torch.randn(9, 6)
    ab = torch.tensor([0.3, 0.6])
    g = ConstantGuidance(beta=0.5)
    out, rec = theorem_correction(eps, x_t, ab, 500.0, PreparedBanks.prepare(bank, g), g)
    xd, yd, abd = x_t.double(), bank.double(), ab.double()[:, None]
    logk = -((xd[:, None] - abd.sqrt()[..., None] * yd[None]) ** 2).sum(-1) / (2 * (1 - abd))
    e_u = torch.softmax(logk, 1) @ yd
    eps_unsafe = (xd - abd.sqrt() * e_u) / (1 - abd).sqrt()
    ref = eps.double() + 0.5 * (eps.double() - eps_unsafe)
    assert torch.allclose(out.double(), ref, atol=1e-5)
    assert rec.applied.tolist() == [True, True]
    assert torch.allclose(rec.delta_norm.double(), (ref - eps.double()).norm(dim=1), rtol=1e-4)


def test_window_and_gate_switch_the_correction_off() -> None:
    x_t, eps, bank = torch.randn(2, 6), torch.randn(2, 6), torch.randn(9, 6)
    g = ConstantGuidance(beta=1.0, window=(200.0, 800.0))
    banks = PreparedBanks.prepare(bank, g)
    for t in (100.0, 900.0, torch.tensor(900.0)):
        out, rec = theorem_correction(eps, x_t, 0.5, t, banks, g)
        assert torch.equal(out, eps) and not rec.applied.any()
    # gate: mass below threshold on the far item only
    x_far = torch.stack([bank[0] * math.sqrt(0.5), torch.full((6,), 50.0)])
    gated = g.with_(gate_log_mass=-20.0)
    out, rec = theorem_correction(eps, x_far, 0.5, 500.0, banks, gated)
    assert rec.applied.tolist() == [True, False]
    assert torch.equal(out[1], eps[1]) and not torch.equal(out[0], eps[0])


def test_mass_beta_is_beta_per_mass_times_mean_kernel_value() -> None:
    x_t, eps, bank = (
        torch.randn(1, 3, dtype=torch.float64),
        torch.randn(1, 3, dtype=torch.float64),
        torch.randn(4, 3, dtype=torch.float64),
    )
    ab = 0.7
    g = MassGuidance(beta_per_mass=2.0)
    out, rec = theorem_correction(eps, x_t, ab, 500.0, PreparedBanks.prepare(bank, g), g)
    d2 = ((x_t - math.sqrt(ab) * bank) ** 2).sum(-1)
    mass = torch.exp(-d2 / (2 * (1 - ab))).mean()
    x0_unsafe = path_kernel_estimate(x_t, bank, vp_path(ab)).mean  # the same bits as inside theorem_correction
    ref = safe_eps(eps, x_t, ab, x0_unsafe, 2.0 * mass)
    # Both log-masses are float64 evaluations of the same sum (expanded vs direct differences), each within the
    # rounding bound of helpers.kernel_reference; beta = 2 mass inherits that relative error, the rest is the same
    # three operations on both sides (u64 each).
    log_mass_bound = 2 * forward_reference(x_t, bank, ab, direct=True).log_mass_bound
    gap = (eps - eps_from_x0(x_t, x0_unsafe, ab)).abs()
    bound = 2.0 * mass * torch.expm1(log_mass_bound) * gap + 4 * U64 * (eps.abs() + 2.0 * gap)
    assert_within(out, ref, bound, "mass-scaled correction")
    # the record holds the log-mass in float32: one more rounding
    assert_within(rec.log_mass, mass.log().reshape(1), U32 * mass.log().abs() + log_mass_bound, "recorded log-mass")


def test_reference_correction_matches_hand_computation() -> None:
    """x0_hat -= scale * sum k_n x_n / sum k_n with k_n = exp(-||x0_hat - x_n|| / (2 sigma^2)); re-noise."""
    x_t, eps, bank, noise = torch.randn(2, 8), torch.randn(2, 8), torch.randn(15, 8), torch.randn(2, 8)
    g = ReferenceGuidance()
    banks = PreparedBanks.prepare(bank, g)
    ab = 0.1
    out, rec = reference_correction(eps, x_t, ab, 900, banks, g, threshold=0.0, noise=noise)
    x0 = (x_t.double() - math.sqrt(1 - ab) * eps.double()) / math.sqrt(ab)
    k = torch.exp(-torch.cdist(x0, bank.double()) / (2 * 3.15**2))
    e_u = (k @ bank.double()) / (k.sum(1, keepdim=True) + 1e-8)
    ref = math.sqrt(ab) * (x0 - 0.33 * e_u) + math.sqrt(1 - ab) * noise.double()
    assert torch.allclose(out.double(), ref, atol=1e-5)
    assert rec.applied.all()
    # outside the window [780, 1000] nothing changes
    out, rec = reference_correction(eps, x_t, ab, 500, banks, g, threshold=0.0, noise=noise)
    assert torch.equal(out, x_t) and not rec.applied.any()


def test_reference_gate_uses_kernel_sum_against_threshold_minus_margin() -> None:
    bank = torch.zeros(4, 3)
    eps, noise = torch.zeros(2, 3), torch.zeros(2, 3)
    x_t = torch.stack([torch.zeros(3), torch.full((3,), 100.0)])  # x0_hat = x_t when abar = 1 - tiny
    g = ReferenceGuidance(margin=1.0)
    banks = PreparedBanks.prepare(bank, g)
    # kernel sums: item 0 at distance 0 -> 4.0; item 1 far -> ~0. Threshold 4.5 - margin 1 = 3.5.
    _, rec = reference_correction(eps, x_t, 1 - 1e-9, 900, banks, g, threshold=4.5, noise=noise)
    assert rec.applied.tolist() == [True, False]
    _, rec = reference_correction(eps, x_t, 1 - 1e-9, 900, banks, g, threshold=5.5, noise=noise)
    assert rec.applied.tolist() == [False, False]


def test_reference_threshold_is_min_kernel_sum_of_noised_bank() -> None:
    bank = torch.randn(6, 5)
    gen = torch.Generator().manual_seed(0)
    thr = reference_threshold(bank, 3.15, 0.99, generator=gen)
    z = torch.randn(bank.shape, generator=torch.Generator().manual_seed(0))
    noised = math.sqrt(0.99) * bank + math.sqrt(0.01) * z
    ref = torch.exp(-torch.cdist(noised.double(), bank.double()) / (2 * 3.15**2)).sum(1).min()
    assert thr == pytest.approx(float(ref), rel=1e-5)


def test_v_prediction_round_trip() -> None:
    x_t, eps = torch.randn(3, 5, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    ab = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    v = v_from_eps(x_t, eps, ab)
    assert torch.allclose(eps_from_v(x_t, v, ab), eps)
    assert torch.allclose(x0_from_v(x_t, v, ab), x0_from_eps(x_t, eps, ab))
    # definition: v = sqrt(ab) eps - sqrt(1-ab) x0, x_t = sqrt(ab) x0 + sqrt(1-ab) eps
    x0 = torch.randn(3, 5, dtype=torch.float64)
    abc = ab[:, None]
    xt = abc.sqrt() * x0 + (1 - abc).sqrt() * eps
    assert torch.allclose(v_from_eps(xt, eps, ab), abc.sqrt() * eps - (1 - abc).sqrt() * x0)


def test_sigma_form_matches_vp_form() -> None:
    from safe_denoiser import alpha_bar_from_sigma, sigma_from_alpha_bar, x0_from_eps_sigma

    x_t, eps = torch.randn(2, 4, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64)
    ab = torch.tensor([0.25, 0.8], dtype=torch.float64)
    sigma = sigma_from_alpha_bar(ab)
    assert torch.allclose(alpha_bar_from_sigma(sigma), ab)
    x = x_t / ab.sqrt()[:, None]  # the sigma-form sample
    assert torch.allclose(x0_from_eps_sigma(x, eps, sigma), x0_from_eps(x_t, eps, ab))


@pytest.mark.parametrize(
    ("cls", "kwargs", "field"),
    [
        (ConstantGuidance, {"beta": -1.0}, "beta"),
        (ConstantGuidance, {"beta": float("nan")}, "beta"),
        (MassGuidance, {"beta_per_mass": -1.0}, "beta_per_mass"),
        (ConstantGuidance, {"window": (900.0, 100.0)}, "window"),
        (ConstantGuidance, {"window": (1.0,)}, "window"),
        (ConstantGuidance, {"kernel_sigma": 0.0}, "kernel_sigma"),
        (ConstantGuidance, {"chunk_size": 0}, "chunk_size"),
        (ReferenceGuidance, {"kernel_sigma": None}, "kernel_sigma"),
    ],
)
def test_config_errors_name_the_field(cls: type[SafeGuidance], kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=rf"{cls.__name__}\.{field} must be"):
        cls(**kwargs)


def test_unknown_preset_and_renamed_fields_name_the_replacement() -> None:
    """What the old ``mode``/``beta_mode`` settings were: an unknown preset or a renamed field is refused by name."""
    with pytest.raises(ValueError, match=r"safe_denoiser\.preset must be one of .*'magic'"):
        SafeGuidance.from_dict({"preset": "magic"})
    with pytest.raises(ValueError, match=r"\['beta_mode'\].*'beta_mode' is now the preset itself"):
        SafeGuidance.from_dict({"preset": "constant", "beta_mode": "x"})


def test_presets_and_round_trip() -> None:
    ref = SafeGuidance.from_dict({"preset": "reference"})
    assert isinstance(ref, ReferenceGuidance)
    assert (ref.kernel_sigma, ref.step_size, ref.margin, ref.window) == (3.15, 0.33, 1.6, (780.0, 1000.0))
    th = SafeGuidance.from_dict({"preset": "constant", "beta": 0.5})
    assert type(th) is ConstantGuidance and th.beta == 0.5
    assert SafeGuidance.from_dict(ref.to_dict()) == ref
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['etaa'\] for safe_denoiser preset 'constant'"):
        SafeGuidance.from_dict({"preset": "constant", "etaa": 1.0})
    with pytest.raises(ValueError, match=r"safe_denoiser\.preset must be one of .*'strong'"):
        SafeGuidance.from_dict({"preset": "strong"})
