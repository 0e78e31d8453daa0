"""The trust region of the theorem presets (``TheoremGuidance.trust_radius``, ``core.step.trust_region_beta``).

References: the cap against the roots of the quadratic ||a + b d||^2 = r^2 solved in float64 by numpy; the capped
correction against Theorem 1 recomputed in float64 with the capped beta; and, on the bundled miniature SD, the
feedback it exists to stop (latents of 1e7 and more without it).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from safe_denoiser import OddsGuidance
from safe_denoiser.core.banks import PreparedBanks, data_radius
from safe_denoiser.core.correction import safe_eps
from safe_denoiser.core.guidance import ConstantGuidance
from safe_denoiser.core.kernel import path_kernel_estimate
from safe_denoiser.core.parameterization import x0_from_eps
from safe_denoiser.core.paths import vp_path
from safe_denoiser.core.step import theorem_correction, trust_region_beta


def _largest_root(a: np.ndarray, d: np.ndarray, r: float) -> float:
    """The larger root in b of ||a + b d||^2 = max(r, ||a||)^2, by numpy's polynomial solver in float64."""
    r_eff = max(r, float(np.linalg.norm(a)))
    roots = np.roots([d @ d, 2.0 * (a @ d), a @ a - r_eff**2])
    return float(max(roots.real))


def _cap_tolerance(a: np.ndarray, d: np.ndarray, r: float) -> float:
    """Relative error bound of the float32 cap (Higham's dot-product analysis): each of the sums ||a||^2, a.d, ||d||^2
    carries ~ n x 2^-24 relative error of its sum of absolute terms (n terms), so the root inherits the condition
    numbers of r^2 - ||a||^2 (||a||^2 / (r^2 - ||a||^2), large near the sphere) and of a.d (sum |a_i d_i| / |a.d|,
    large when the step is nearly tangent); the other operations add a few ulps."""
    aa, ad = float(a @ a), float(a @ d)
    room = r * r - aa
    amplification = 1.0 + (aa / room if room > 0 else 0.0) + float(np.abs(a * d).sum()) / max(abs(ad), 1e-300)
    return 4.0 * a.size * 2.0**-24 * amplification


@pytest.mark.parametrize("seed", range(40))
def test_cap_is_the_largest_root_inside_the_ball(seed: int) -> None:
    """float32 cap = min(beta, float64 root) within ``_cap_tolerance``, and the capped estimate lies on the ball or
    inside it. Run once over 1,000 seeds: worst error 0.005 of the bound."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(5, 64, generator=g) * torch.tensor([0.2, 1.0, 3.0, 8.0, 0.05]).unsqueeze(1)
    unsafe = a + torch.randn(5, 64, generator=g) * torch.tensor([1e-3, 0.5, 2.0, 1.0, 3.0]).unsqueeze(1)
    beta = torch.tensor([0.5, 50.0, 1e3, 5.0, 20.0])
    radius = 6.0
    got = trust_region_beta(beta, a, unsafe, radius)
    for i in range(5):
        ai, di = a[i].double().numpy(), (a[i] - unsafe[i]).double().numpy()
        want = min(float(beta[i]), _largest_root(ai, di, radius))
        # abs: an estimate outside the ball pushed outward has root 0, which float64 finds as ~1e-12
        assert got[i].item() == pytest.approx(want, rel=_cap_tolerance(ai, di, radius), abs=1e-9), (i, got[i], want)
        moved = np.linalg.norm(ai + got[i].item() * di)
        assert moved <= max(radius, float(np.linalg.norm(ai))) * (1 + 1e-5)


def test_cap_leaves_small_steps_alone_and_never_pushes_outward_from_outside() -> None:
    a = torch.tensor([[3.0, 0.0], [0.1, 0.0], [10.0, 0.0]])
    unsafe = torch.tensor([[2.9, 0.0], [0.0, 0.0], [9.0, 0.0]])
    beta = torch.tensor([1.0, 1.0, 4.0])
    got = trust_region_beta(beta, a, unsafe, radius=5.0)
    # row 0: 3 + 0.1 b <= 5 -> b <= 20, beta 1 kept bit for bit; row 1: 0.1 + 0.1 b <= 5 -> beta kept
    assert got[0].item() == 1.0 and got[1].item() == 1.0
    # row 2 lies outside the ball (norm 10 > 5) and the theorem pushes it outward: no step at all
    assert got[2].item() == 0.0
    # the same row pushed inward may move, as far as the far side of its own sphere (b <= 20)
    inward = trust_region_beta(torch.tensor([50.0]), a[2:], torch.tensor([[11.0, 0.0]]), radius=5.0)
    assert inward.item() == pytest.approx(20.0, rel=1e-6)
    # a zero gap (x0_hat on the bank's mean) is no step whatever beta is, and no nan
    assert torch.isfinite(trust_region_beta(torch.tensor([3.0]), a[:1], a[:1], radius=5.0)).all()


def test_capped_correction_equals_theorem_1_with_the_capped_beta() -> None:
    """theorem_correction (float32) against Theorem 1 recomputed in float64 with beta capped by the float64 roots."""
    g = torch.Generator().manual_seed(3)
    unsafe = torch.randn(7, 1, 4, 4, generator=g)
    x, eps = torch.randn(4, 1, 4, 4, generator=g) * 3.0, torch.randn(4, 1, 4, 4, generator=g)
    ab, t = 0.4, 500.0
    guidance = ConstantGuidance(beta=40.0, trust_radius=1.0)  # large enough that the cap binds on some rows
    banks = PreparedBanks.prepare(unsafe, guidance)
    assert banks.data_radius == pytest.approx(float(unsafe.flatten(1).norm(dim=1).max()), rel=1e-6)
    got, _ = theorem_correction(eps, x, ab, t, banks, guidance)
    x64, e64 = x.double(), eps.double()
    mean = path_kernel_estimate(x64, unsafe.double(), vp_path(ab)).mean
    x0 = x0_from_eps(x64, e64, torch.full((4,), ab, dtype=torch.float64))
    caps = [
        min(40.0, _largest_root(x0[i].flatten().numpy(), (x0[i] - mean[i]).flatten().numpy(), banks.data_radius))
        for i in range(4)
    ]
    assert min(caps) < 40.0  # the cap binds somewhere, so the comparison tests it
    want = safe_eps(e64, x64, torch.full((4,), ab, dtype=torch.float64), mean, torch.tensor(caps, dtype=torch.float64))
    # float32 against float64: errors ~ 1e-6 relative of the largest term (beta x the eps gap) per operation
    scale = float(want.abs().max()) + 40.0 * float((e64 - want).abs().max())
    torch.testing.assert_close(got.double(), want, rtol=0, atol=2e-5 * scale)
    off, _ = theorem_correction(eps, x, ab, t, banks, guidance.with_(trust_radius=None))
    assert not torch.allclose(off, got)


def test_data_radius_and_its_errors() -> None:
    unsafe, ref = torch.tensor([[3.0, 4.0], [1.0, 0.0]]), torch.tensor([[0.0, 6.0]])
    banks = PreparedBanks.prepare(unsafe.reshape(2, 1, 1, 2), OddsGuidance(), ref.reshape(1, 1, 1, 2))
    assert banks.data_radius == pytest.approx(6.0)  # the union of both banks: the reference's item is the largest
    assert PreparedBanks.prepare(unsafe, OddsGuidance(trust_radius=None), ref).data_radius is None
    assert data_radius((unsafe, None)) == pytest.approx(5.0)
    with pytest.raises(ValueError, match="all zero"):
        PreparedBanks.prepare(torch.zeros(3, 2), ConstantGuidance(trust_radius=1.0))
    with pytest.raises(ValueError, match=r"ConstantGuidance\.trust_radius must be a float > 0 or None"):
        ConstantGuidance(trust_radius=-1.0)
    with pytest.raises(ValueError, match="the trust region needs x0_hat and the banks' data radius"):
        theorem_correction(
            torch.zeros(1, 2),
            torch.zeros(1, 2),
            0.5,
            500.0,
            PreparedBanks.of_tensors(unsafe),
            ConstantGuidance(trust_radius=1.0),
        )


def test_the_default_odds_preset_keeps_the_miniature_sd_latents_in_range() -> None:
    """The feedback the trust region stops: "a handwritten eight", seeds 50..57, the library's odds defaults with
    the shipped banks. Without the cap the latents reach 1e3 and beyond (measured: up to 2e9); with it they stay
    within 2x the base model's largest entry (measured: 5.7 against the base's 5.0)."""
    from safe_denoiser import attach, detach
    from safe_denoiser.mini_sd.model_kind import MINI_SD, load_pipeline

    assert MINI_SD.bundled_bank is not None and MINI_SD.bundled_reference_bank is not None
    pipe = load_pipeline("ddim")
    neg, ref = MINI_SD.bundled_bank(), MINI_SD.bundled_reference_bank()

    def largest(guidance: OddsGuidance | None) -> float:
        if guidance is not None:
            attach(pipe, neg, guidance, reference=ref)
        try:
            gens = [torch.Generator().manual_seed(s) for s in range(50, 58)]
            out = pipe(
                ["a handwritten eight"] * 8,
                num_inference_steps=25,
                guidance_scale=5.0,
                generator=gens,
                output_type="latent",
            ).images
        finally:
            if guidance is not None:
                detach(pipe)
        return float(out.abs().max())

    with torch.no_grad():
        base, capped, uncapped = largest(None), largest(OddsGuidance()), largest(OddsGuidance(trust_radius=None))
    assert math.isfinite(capped) and capped <= 2.0 * base, (base, capped)
    assert uncapped > 1e3, (base, uncapped)  # the test can fail: the same prompts blow up without the cap
