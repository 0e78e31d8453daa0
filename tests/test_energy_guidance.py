"""The energy presets (SGF's MMD gradient, Shielded Diffusion's sparse repellency) against independent references.

References: float64 autograd of each potential (SGF: -h grad_x sum_n exp(-d_n^2 / (2 h)); SPELL: -grad_x
sum_n (r - d_n)_+^2 / 2), the closed-form population gradient of a Gaussian cluster (the 2-D toy's unsafe component),
SPELL's geometry (one item in range: the estimate lands on the ball's surface), the schedule's closed form, the same
x0 change from every prediction on every path, and float32 against float64 within a rounding bound (helpers.py).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from safe_denoiser.core.banks import PreparedBanks
from safe_denoiser.core.energy_guidance import squared_distances, suggest_radius, window_weight
from safe_denoiser.core.guidance import SGFGuidance, ShieldedGuidance
from safe_denoiser.core.paths import (
    GaussianPath,
    flow_path,
    prediction_from_x0,
    sigma_path,
    vp_path,
    x0_from_prediction,
)
from safe_denoiser.core.step import energy_correction, path_correction, theorem_correction
from safe_denoiser.demo.toy import default_mixture

from helpers import U32, gamma

PATHS = [vp_path(0.3), sigma_path(1.7), flow_path(0.4)]
PREDICTIONS = ["epsilon", "sample", "v_prediction", "flow"]


def _delta(x0: Tensor, bank: Tensor, guidance: SGFGuidance | ShieldedGuidance, t: float = 900.0) -> Tensor:
    """The x0 change the preset makes (through the "sample" prediction, where p = x0 and J = 1)."""
    path = vp_path(0.5)
    x_t = torch.zeros_like(x0)  # x_t does not enter an x0-space correction
    out, _ = energy_correction(x0, x_t, path, "sample", t, PreparedBanks.prepare(bank, guidance), guidance)
    return out - x0


def _sgf_autograd(x0: Tensor, bank: Tensor, h: Tensor) -> Tensor:
    """-h grad_x sum_n exp(-||x - y_n||^2 / (2 h)) per sample, float64 autograd (h held fixed, as the preset does)."""
    x = x0.detach().double().requires_grad_(True)
    d2 = (x.flatten(1).unsqueeze(1) - bank.double().flatten(1).unsqueeze(0)).square().sum(-1)
    torch.exp(-d2 / (2 * h.double().unsqueeze(1))).sum().backward()
    assert x.grad is not None
    return -h.double().reshape(-1, *([1] * (x0.dim() - 1))) * x.grad


def _reference_bandwidth(x0: Tensor, bank: Tensor, rank: int, at: float) -> Tensor:
    d2 = torch.cdist(x0.double().flatten(1), bank.double().flatten(1)).square()
    return d2.sort(dim=1).values[:, rank - 1] / (2 * math.log(1 / at))


def _spell_autograd(x0: Tensor, bank: Tensor, radius: float) -> Tensor:
    """-grad_x sum_n (r - d_n)_+^2 / 2, float64 autograd."""
    x = x0.detach().double().requires_grad_(True)
    d = (x.flatten(1).unsqueeze(1) - bank.double().flatten(1).unsqueeze(0)).norm(dim=-1)
    (0.5 * (radius - d).clamp_min(0).square().sum()).backward()
    assert x.grad is not None
    return -x.grad


# ---- the potentials' gradients in float64 -------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("shape", [(2,), (3, 4, 4)])
def test_sgf_is_the_mmd_gradient_step(seed: int, shape: tuple[int, ...]) -> None:
    g = torch.Generator().manual_seed(seed)
    x0, bank = torch.randn(4, *shape, generator=g, dtype=torch.float64), torch.randn(9, *shape, generator=g).double()
    for guidance, h in [
        (
            SGFGuidance(mmd_scale=0.7, window=(0.0, 1000.0), kernel_sigma=1.3),
            torch.full((4,), 1.3**2, dtype=torch.float64),
        ),
        (SGFGuidance(mmd_scale=0.7, window=(0.0, 1000.0), bandwidth_rank=3), _reference_bandwidth(x0, bank, 3, 0.05)),
    ]:
        want = 0.7 * _sgf_autograd(x0, bank, h.double())
        torch.testing.assert_close(_delta(x0, bank, guidance), want, rtol=1e-12, atol=1e-13)


def test_sgf_bank_mean_tends_to_the_gaussian_clusters_closed_form() -> None:
    """A bank drawn from the toy's unsafe cluster N(mu, s^2 I): (1/N) sum_n k_n (x - y_n) tends to
    (h / (h + s^2))^(D/2 + 1) exp(-||x - mu||^2 / (2 (h + s^2))) (x - mu); checked within 5 standard errors."""
    mixture = default_mixture()
    mu, s = mixture.means[0], float(mixture.stds[0])
    h, n = 0.2**2, 200_000
    x0 = torch.tensor([[0.1, 0.05], [0.4, -0.3], [-0.6, 0.2], [1.0, 1.0]], dtype=torch.float64)
    for seed in range(3):
        bank = mixture.sample(n, part="unsafe", generator=torch.Generator().manual_seed(seed))
        guidance = SGFGuidance(window=(0.0, 1000.0), kernel_sigma=math.sqrt(h))
        got = _delta(x0, bank, guidance) / n
        r2 = (x0 - mu).square().sum(1, keepdim=True)
        want = (h / (h + s * s)) ** 2 * (-r2 / (2 * (h + s * s))).exp() * (x0 - mu)
        terms = (-(torch.cdist(x0, bank).square()) / (2 * h)).exp().unsqueeze(-1) * (x0[:, None] - bank[None])
        se = terms.std(dim=1) / math.sqrt(n)
        assert bool(((got - want).abs() <= 5 * se + 1e-12).all()), (seed, got, want, se)


@pytest.mark.parametrize("seed", range(5))
def test_shielded_is_the_repellency_gradient_and_sparse(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x0, bank = torch.randn(6, 3, 4, 4, generator=g).double(), torch.randn(12, 3, 4, 4, generator=g).double()
    d = torch.cdist(x0.flatten(1), bank.flatten(1))
    radius = float(d.quantile(0.15))
    got = _delta(x0, bank, ShieldedGuidance(radius=radius, overcompensation=1.5))
    torch.testing.assert_close(got, 1.5 * _spell_autograd(x0, bank, radius), rtol=1e-12, atol=1e-13)
    far = ~(d < radius).any(dim=1)
    assert bool(far.any()) and bool((got[far] == 0).all())  # sparse: zero, bit for bit, with no item in range


def test_shielded_lands_on_the_ball_with_one_item_in_range() -> None:
    bank = torch.tensor([[0.0, 0.0], [5.0, 0.0], [0.0, 5.0]], dtype=torch.float64)
    x0 = torch.tensor([[0.3, 0.4], [-0.1, 0.02], [4.2, 0.1]], dtype=torch.float64)
    new = x0 + _delta(x0, bank, ShieldedGuidance(radius=1.0))
    nearest = bank[torch.cdist(x0, bank).argmin(dim=1)]
    # distances by expansion ||x||^2 - 2 x.y + ||y||^2: error ~ 8 u (|x| + |y|)^2 <= 8 u 100 ~ 1e-13 here
    torch.testing.assert_close((new - nearest).norm(dim=1), torch.ones(3, dtype=torch.float64), rtol=0, atol=1e-13)
    # the direction is kept: the estimate moves straight away from the item
    cos = torch.nn.functional.cosine_similarity(new - nearest, x0 - nearest)
    torch.testing.assert_close(cos, torch.ones(3, dtype=torch.float64), rtol=0, atol=1e-13)


# ---- the critical-window schedule ---------------------------------------------------------------------------------
def test_window_weight_closed_form() -> None:
    like = torch.zeros((), dtype=torch.float64)
    t = torch.tensor([700.0, 799.9, 800.0, 825.0, 850.0, 875.0, 900.0, 1000.0, 1000.1], dtype=torch.float64)
    hard = window_weight(t, (800.0, 1000.0), 0.0, 9, like)
    assert hard.tolist() == [0, 0, 1, 1, 1, 1, 1, 1, 0]
    ramp = window_weight(t, (800.0, 1000.0), 100.0, 9, like)
    want = [0, 0, 0, 0.5 - 0.5 * math.cos(math.pi / 4), 0.5, 0.5 + 0.5 * math.cos(math.pi / 4), 1, 1, 0]
    torch.testing.assert_close(ramp, torch.tensor(want, dtype=torch.float64), rtol=0, atol=1e-15)
    assert float(window_weight(850.0, (800.0, 1000.0), 100.0, 1, like)) == pytest.approx(0.5, abs=1e-15)


def test_sgf_scales_with_the_schedule_and_stops_outside_it() -> None:
    g = torch.Generator().manual_seed(0)
    x0, bank = torch.randn(3, 2, generator=g).double(), torch.randn(5, 2, generator=g).double()
    full = _delta(x0, bank, SGFGuidance(ramp=100.0), t=950.0)
    torch.testing.assert_close(_delta(x0, bank, SGFGuidance(ramp=100.0), t=850.0), 0.5 * full, rtol=1e-14, atol=0)
    assert bool((_delta(x0, bank, SGFGuidance(ramp=100.0), t=799.0) == 0).all())


# ---- any path, any prediction: the same x0 change; strength 0 and closed windows are bit for bit ------------------
@pytest.mark.parametrize("path", PATHS, ids=lambda p: p.kind)
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_every_prediction_on_every_path_moves_x0_alike(path: GaussianPath, prediction: str) -> None:
    g = torch.Generator().manual_seed(1)
    x_t, bank = torch.randn(4, 2, 3, 3, generator=g).double(), torch.randn(7, 2, 3, 3, generator=g).double()
    pred = torch.randn(4, 2, 3, 3, generator=g).double()
    x0 = x0_from_prediction(x_t, pred, path, prediction)  # type: ignore[arg-type]
    radius = float(torch.cdist(x0.flatten(1), bank.flatten(1)).median())
    for guidance in (SGFGuidance(window=(0.0, 1000.0)), ShieldedGuidance(radius=radius)):
        banks = PreparedBanks.prepare(bank, guidance)
        out, rec = path_correction(pred, x_t, path, prediction, 900.0, banks, guidance)  # type: ignore[arg-type]
        moved = x0_from_prediction(x_t, out, path, prediction) - x0  # type: ignore[arg-type]
        torch.testing.assert_close(moved, _delta(x0, bank, guidance), rtol=1e-10, atol=1e-12)
        assert bool(rec.applied.any())
        # strength 0 and a closed window: the prediction itself, bit for bit
        for off in (guidance.with_(window=(0.0, 10.0)), _zero(guidance)):
            same, rec0 = path_correction(pred, x_t, path, prediction, 900.0, banks, off)  # type: ignore[arg-type]
            assert torch.equal(same, pred) and not bool(rec0.applied.any())


def _zero(guidance: SGFGuidance | ShieldedGuidance) -> SGFGuidance | ShieldedGuidance:
    if isinstance(guidance, SGFGuidance):
        return guidance.with_(mmd_scale=0.0)
    return guidance.with_(overcompensation=0.0)


def test_theorem_correction_takes_the_energy_presets_on_the_vp_path() -> None:
    g = torch.Generator().manual_seed(2)
    x_t, eps, bank = (torch.randn(3, 4, generator=g) for _ in range(2)), None, torch.randn(6, 4, generator=g)
    x, e = x_t
    guidance = SGFGuidance(window=(0.0, 1000.0))
    banks = PreparedBanks.prepare(bank, guidance)
    got, _ = theorem_correction(e, x, 0.4, 500.0, banks, guidance)
    want, _ = path_correction(e, x, vp_path(0.4), "epsilon", 500.0, banks, guidance)
    assert eps is None and torch.equal(got, want)


# ---- float32 against float64 --------------------------------------------------------------------------------------
def _float32_bound(x0: Tensor, bank: Tensor, weights: Tensor, dweights: Tensor) -> Tensor:
    """Per-sample bound on |delta_32 - delta_64|: the weights' errors times |x - y_n|, plus the final sums."""
    x, y = x0.flatten(1), bank.flatten(1)
    diff = (x[:, None] - y[None]).norm(dim=-1)
    size = (x.norm(dim=1, keepdim=True) + y.norm(dim=1)[None]) * weights
    return (dweights * diff).sum(1) + gamma(y.shape[0] + 2, U32) * size.sum(1) * math.sqrt(x.shape[1])


@pytest.mark.parametrize("seed", range(40))
def test_float32_is_float64_within_rounding(seed: int) -> None:
    """D = 1024, N = 300: the squared distances' error e_n <= gamma(D) (|x| + |y_n|)^2 moves SGF's weights by
    e_n / (2 h) (+ h's own error through d^2 / (2 h)) and SPELL's by r e_n / (2 d^3); then the two sums."""
    g = torch.Generator().manual_seed(seed)
    x0, bank = torch.randn(3, 4, 16, 16, generator=g).double(), torch.randn(300, 4, 16, 16, generator=g).double()
    x0 = bank[:3] + 0.8 * x0  # near the bank, as an unsafe estimate is
    d2 = torch.cdist(x0.flatten(1), bank.flatten(1)).square()
    e = 2 * gamma(x0[0].numel(), U32) * (x0.flatten(1).norm(dim=1)[:, None] + bank.flatten(1).norm(dim=1)[None]) ** 2

    sgf = SGFGuidance(window=(0.0, 1000.0))
    h = _reference_bandwidth(x0, bank, sgf.bandwidth_rank, sgf.kernel_at_rank)[:, None]
    k = (-d2 / (2 * h)).exp()
    e_k = e.gather(1, d2.sort(dim=1).indices[:, sgf.bandwidth_rank - 1 : sgf.bandwidth_rank])
    dk = k * (e / (2 * h) + d2 / (2 * h) * e_k / d2.sort(dim=1).values[:, sgf.bandwidth_rank - 1 :][:, :1] + 8 * U32)
    got, want = _delta(x0.float(), bank.float(), sgf).double(), _delta(x0, bank, sgf)
    assert bool(((got - want).flatten(1).norm(dim=1) <= _float32_bound(x0, bank, k, dk)).all())

    d = d2.sqrt()
    radius = float(d.quantile(0.02))
    inside = d < radius
    w = torch.where(inside, (radius - d) / d, torch.zeros_like(d))
    dw = torch.where(inside | (d < radius + e / d), radius * e / (2 * d**3) + 8 * U32 * (w + 1), torch.zeros_like(d))
    shield = ShieldedGuidance(radius=radius)
    got, want = _delta(x0.float(), bank.float(), shield).double(), _delta(x0, bank, shield)
    assert bool(((got - want).flatten(1).norm(dim=1) <= _float32_bound(x0, bank, w, dw)).all())


def test_half_bank_matches_its_float32_values() -> None:
    g = torch.Generator().manual_seed(3)
    x0, bank = torch.randn(2, 4, 8, 8, generator=g), torch.randn(40, 4, 8, 8, generator=g).half()
    for guidance in (SGFGuidance(window=(0.0, 1000.0)), ShieldedGuidance(radius=12.0)):
        torch.testing.assert_close(_delta(x0, bank, guidance), _delta(x0, bank.float(), guidance))


def test_batch_equals_items() -> None:
    """The bandwidth is each sample's own: an image does not depend on the rest of its batch."""
    g = torch.Generator().manual_seed(4)
    x0, bank = torch.randn(5, 2, 4, 4, generator=g).double(), torch.randn(30, 2, 4, 4, generator=g).double()
    for guidance in (SGFGuidance(window=(0.0, 1000.0)), ShieldedGuidance(radius=5.0)):
        whole = _delta(x0, bank, guidance)
        alone = torch.cat([_delta(x0[i : i + 1], bank, guidance) for i in range(5)])
        torch.testing.assert_close(whole, alone, rtol=1e-13, atol=1e-14)


def test_squared_distances_and_suggested_radius() -> None:
    g = torch.Generator().manual_seed(5)
    x, bank = torch.randn(3, 5, generator=g).double(), torch.randn(11, 5, generator=g).double()
    torch.testing.assert_close(squared_distances(x, bank), torch.cdist(x, bank).square(), rtol=1e-12, atol=1e-12)
    nn = torch.cdist(bank, bank).fill_diagonal_(math.inf).amin(dim=1).median()
    assert suggest_radius(bank) == pytest.approx(0.5 * float(nn), rel=1e-12)


def test_prediction_change_is_affine() -> None:
    """The correction adds J delta with J delta = prediction_from_x0(0, delta): exact because p is affine in x0."""
    g = torch.Generator().manual_seed(6)
    x_t, x0, delta = (torch.randn(2, 3, generator=g).double() for _ in range(3))
    for path in PATHS:
        for prediction in PREDICTIONS:
            lhs = prediction_from_x0(x_t, x0 + delta, path, prediction)  # type: ignore[arg-type]
            rhs = prediction_from_x0(x_t, x0, path, prediction) + prediction_from_x0(  # type: ignore[arg-type]
                torch.zeros_like(delta),
                delta,
                path,
                prediction,  # type: ignore[arg-type]
            )
            torch.testing.assert_close(lhs, rhs, rtol=1e-14, atol=1e-14)


# ---- settings ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("cls", "changes", "message"),
    [
        (SGFGuidance, {"ramp": 300.0}, r"SGFGuidance\.ramp must be a float in \[0, 200\]"),
        (SGFGuidance, {"ramp": -1.0}, r"SGFGuidance\.ramp must be a float in \[0, 200\]"),
        (SGFGuidance, {"kernel_sigma": 0.0}, r"SGFGuidance\.kernel_sigma must be a float > 0 or None"),
        (SGFGuidance, {"bandwidth_rank": 0}, r"SGFGuidance\.bandwidth_rank must be an int >= 1"),
        (SGFGuidance, {"bandwidth_rank": 2.0}, r"SGFGuidance\.bandwidth_rank must be an int >= 1"),
        (SGFGuidance, {"kernel_at_rank": 1.0}, r"SGFGuidance\.kernel_at_rank must be a float in \(0, 1\)"),
        (SGFGuidance, {"mmd_scale": -1.0}, r"SGFGuidance\.mmd_scale must be a float in \[0, 1000\]"),
        (ShieldedGuidance, {"radius": 0.0}, r"ShieldedGuidance\.radius must be a float > 0"),
        (ShieldedGuidance, {"radius": math.inf}, r"ShieldedGuidance\.radius must be a float > 0"),
        (ShieldedGuidance, {"overcompensation": math.nan}, r"ShieldedGuidance\.overcompensation must be a float"),
    ],
)
def test_fields_are_validated(cls: type, changes: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        cls(**changes)


def test_defaults() -> None:
    sgf = SGFGuidance()
    assert (sgf.window, sgf.mmd_scale, sgf.ramp, sgf.kernel_sigma) == ((800.0, 1000.0), 1.0, 0.0, None)
    assert (sgf.bandwidth_rank, sgf.kernel_at_rank) == (5, 0.05)
    shield = ShieldedGuidance()
    assert (shield.window, shield.radius, shield.overcompensation) == ((0.0, 1000.0), 1.0, 1.0)
    assert not sgf.renoises and not shield.renoises and not sgf.needs_reference_bank
