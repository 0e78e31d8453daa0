"""The general Gaussian path (VP, sigma, rectified flow), its closed forms, and SDXL / SD3 / Flux pipelines."""

from __future__ import annotations

import inspect
import math
from typing import Any

import pytest
import torch
from torch import Tensor

from safe_denoiser import ConstantGuidance, MassGuidance, OddsGuidance, PreparedBanks, ReferenceGuidance, attach, detach
from safe_denoiser.core import parameterization as vp
from safe_denoiser.core.correction import safe_prediction
from safe_denoiser.core.guidance import SGFGuidance, ShieldedGuidance
from safe_denoiser.core.kernel import forward_kernel, kernel_estimate, path_kernel_estimate
from safe_denoiser.core.paths import (
    PREDICTIONS,
    convert_prediction,
    flow_path,
    prediction_from_x0,
    sigma_path,
    vp_path,
    x0_from_prediction,
)
from safe_denoiser.core.step import path_correction, theorem_correction
from safe_denoiser.demo.mixture import GaussianMixture
from safe_denoiser.diffusers.families import img2img_pipeline
from safe_denoiser.testing import tiny_pipeline

from helpers import (
    U32,
    U64,
    assert_close_to_rounding,
    assert_within,
    forward_reference,
    generators,
    kernel_reference,
)

# ---- the general form reproduces today's VP and sigma results bit for bit --------------------------------------


@pytest.mark.parametrize("alpha_bar", [0.02, 0.5, 0.97, torch.tensor([0.1, 0.6, 0.9])])
def test_vp_and_sigma_paths_are_todays_conversions_bit_for_bit(alpha_bar: float | Tensor) -> None:
    x, eps, x0 = (torch.randn(3, 4, 5, 5) for _ in range(3))
    p = vp_path(alpha_bar)
    assert torch.equal(x0_from_prediction(x, eps, p, "epsilon"), vp.x0_from_eps(x, eps, alpha_bar))
    assert torch.equal(prediction_from_x0(x, x0, p, "epsilon"), vp.eps_from_x0(x, x0, alpha_bar))
    sigma = vp.sigma_from_alpha_bar(alpha_bar)
    s = sigma_path(sigma)
    assert torch.equal(x0_from_prediction(x, eps, s, "epsilon"), vp.x0_from_eps_sigma(x, eps, sigma))
    assert torch.equal(prediction_from_x0(x, x0, s, "epsilon"), vp.eps_from_x0_sigma(x, x0, sigma))
    bank = torch.randn(9, 4, 5, 5)
    got, want = path_kernel_estimate(x, bank, p), kernel_estimate(x, bank, *forward_kernel(x, alpha_bar))
    assert torch.equal(got.mean, want.mean) and torch.equal(got.log_mass, want.log_mass)


@pytest.mark.parametrize(
    "guidance",
    [ConstantGuidance(beta=2.0, window=(0.0, 600.0)), MassGuidance(beta_per_mass=2.0, window=(0.0, 600.0))],
    ids=["constant", "mass"],
)
@pytest.mark.parametrize("alpha_bar", [0.02, 0.5, 0.97])
def test_path_correction_is_todays_correction_bit_for_bit(
    alpha_bar: float, guidance: ConstantGuidance | MassGuidance
) -> None:
    x, eps, bank = torch.randn(3, 4, 5, 5), torch.randn(3, 4, 5, 5), torch.randn(9, 4, 5, 5)
    g, banks = guidance, PreparedBanks.prepare(bank, guidance)
    for t in (500.0, 700.0):
        want = theorem_correction(eps, x, alpha_bar, t, banks, g)
        got = path_correction(eps, x, vp_path(alpha_bar), "epsilon", t, banks, g)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1].log_mass, want[1].log_mass)
        # the sigma form: what the Euler/LMS adapter has always done (VP sample c x, abar = 1 / (1 + sigma^2))
        sigma = math.sqrt((1 - alpha_bar) / alpha_bar)
        ab = 1.0 / (1.0 + sigma * sigma)
        want = theorem_correction(eps, x * math.sqrt(ab), ab, t, banks, g)
        got = path_correction(eps, x, sigma_path(sigma), "epsilon", t, banks, g)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1].applied, want[1].applied)


def test_mixture_vp_path_is_todays_closed_form_bit_for_bit() -> None:
    gm = _mixture(torch.float64)
    x = torch.randn(16, 3, dtype=torch.float64)
    for ab in (0.05, 0.5, 0.95):
        assert torch.equal(gm.posterior_mean(x, vp_path(ab), "safe"), gm.posterior_mean(x, ab, "safe"))
        assert torch.equal(gm.exact_beta(x, vp_path(ab)), gm.exact_beta(x, ab))


# ---- conversions on every path -----------------------------------------------------------------------------------
@pytest.mark.parametrize("path", [vp_path(0.3), sigma_path(2.5), flow_path(0.4), flow_path(1.0), flow_path(0.05)])
def test_predictions_round_trip_and_flow_velocity_is_eps_minus_x0(path: Any) -> None:
    x0, eps = torch.randn(4, 6, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64)
    x = path.a * x0 + path.s * eps
    preds = {p: prediction_from_x0(x, x0, path, p) for p in PREDICTIONS}
    scale = 8 * U64 * (x.abs() + x0.abs() + eps.abs()).max() / min(path.s, 1.0)
    assert_within(preds["epsilon"], eps, scale, "eps")
    assert_within(preds["flow"], eps - x0, 2 * scale, "u = eps - x0")
    assert_within(preds["v_prediction"], path.a * eps - path.s * x0, 2 * scale, "v = a eps - s x0")
    for src in PREDICTIONS:
        if src == "epsilon" and path.a == 0.0:
            continue  # at sigma = 1 eps = x_t says nothing about x0
        assert_within(x0_from_prediction(x, preds[src], path, src), x0, 16 * scale / max(path.a, path.s), src)
    if path.kind == "flow" and path.a > 0:
        assert_within(convert_prediction(x, preds["flow"], path, "flow", "epsilon"), eps, 16 * scale / path.a, "u->eps")


def test_flow_kernel_in_path_coordinates_equals_the_vp_form() -> None:
    """N(x; (1 - sigma) x_n, sigma^2) and its VP rescaling are one kernel (float64 algebra, then float32 bounds)."""
    x, bank = torch.randn(3, 4, 6, 6), torch.randn(7, 4, 6, 6)
    for sigma in (0.05, 0.5, 0.95, 1.0):
        p = flow_path(sigma)
        c, ab = p.to_vp()
        direct = kernel_reference(x, bank, 1 - sigma, sigma**2)
        vp_form = kernel_reference(x.double() * c, bank, math.sqrt(ab), 1 - ab)
        assert_within(direct.mean, vp_form.mean, direct.mean_bound + vp_form.mean_bound, f"float64, sigma {sigma}")
        est = path_kernel_estimate(x, bank, p)
        ref = forward_reference(x * c, bank, ab)  # the estimator's own float32 input c x
        assert_within(est.mean, ref.mean, ref.mean_bound, f"sigma {sigma}")


# ---- closed form: Gaussian mixture, point-mass bank, rectified flow -------------------------------------------------
def _mixture(dtype: torch.dtype, point_masses: bool = False) -> GaussianMixture:
    g = torch.Generator().manual_seed(3)
    means = 1.5 * torch.randn(5, 3, generator=g, dtype=dtype)
    stds = torch.tensor([0.3, 0.5, 0.4, 0.25, 0.35], dtype=dtype)
    unsafe = torch.tensor([False, False, False, True, True])
    weights = torch.tensor([0.7 / 3] * 3 + [0.15, 0.15], dtype=dtype)
    return GaussianMixture(means, torch.zeros_like(stds) if point_masses else stds, weights, unsafe)


def test_flow_posterior_mean_matches_quadrature() -> None:
    """The mixture's closed form under the flow path, by quadrature of x0 p(x0) N(x; (1 - sigma) x0, sigma^2)."""
    g = torch.Generator().manual_seed(0)
    gm = GaussianMixture(
        torch.randn(3, 2, generator=g, dtype=torch.float64),
        torch.tensor([0.4, 0.5, 0.6], dtype=torch.float64),
        torch.tensor([0.3, 0.3, 0.4], dtype=torch.float64),
        torch.tensor([False, True, False]),
    )
    grid = torch.linspace(-7, 7, 501, dtype=torch.float64)
    xx, yy = torch.meshgrid(grid, grid, indexing="ij")
    pts = torch.stack([xx.flatten(), yy.flatten()], 1)
    log_p0 = gm.log_density(pts, 1.0)
    x = torch.tensor([[0.3, -0.7], [1.5, 0.4]], dtype=torch.float64)
    for sigma in (0.3, 0.7):
        d2 = (x[:, None, :] - (1 - sigma) * pts[None]).square().sum(-1)
        quad = torch.softmax(log_p0[None] - d2 / (2 * sigma**2), dim=1) @ pts
        # grid step 0.028 < 1/6 of the narrowest posterior std, box 7 std past every mean (measured error 1e-13)
        torch.testing.assert_close(gm.posterior_mean(x, flow_path(sigma)), quad, rtol=0, atol=1e-6)


@pytest.mark.parametrize("sigma", [0.1, 0.5, 0.9, 1.0])
def test_corrected_velocity_is_the_exact_safe_velocity(sigma: float) -> None:
    """Point masses for both parts: the unsafe bank and a safe reference bank make the kernel estimate and the odds
    beta exact, so the corrected velocity is the velocity of the exact E_safe[x0 | x_t] (float64)."""
    gm = _mixture(torch.float64, point_masses=True)
    p = flow_path(sigma)
    x = (1 - sigma) * gm.sample(64, generator=torch.Generator().manual_seed(1)) + sigma * torch.randn(
        64, 3, dtype=torch.float64
    )
    u_data = prediction_from_x0(x, gm.posterior_mean(x, p, "data"), p, "flow")
    u_safe = prediction_from_x0(x, gm.posterior_mean(x, p, "safe"), p, "flow")
    bank, ref = gm.means[gm.unsafe], gm.means[~gm.unsafe]
    g = OddsGuidance(odds_scale=1.0, prior_unsafe=0.3, log_beta_max=700.0, window=(0.0, 1000.0))
    got, rec = path_correction(u_data, x, p, "flow", 1000 * sigma, PreparedBanks.prepare(bank, g, ref), g)
    # and the theorem written directly with the exact beta and E_unsafe
    direct = safe_prediction(u_data, x, p, "flow", gm.posterior_mean(x, p, "unsafe"), gm.exact_beta(x, p))
    # Float64: log-joints of size L enter exp() with absolute error ~ (D + 4) u64 L; beta, both means and the
    # division by sigma carry it (the same analysis as test_theorem's identity, times 1 / sigma). Measured over 100
    # seeds x these 4 sigmas: error / bound <= 0.015.
    d2 = (x[:, None] - (1 - sigma) * gm.means[None]).square().sum(-1)
    log_joint = 1.0 + float((d2 / (2 * sigma**2)).max())
    beta = gm.exact_beta(x, p)
    scale = (1.0 + float(x.abs().max()) + float(gm.means.abs().max())) * (1.0 + float(beta.max())) / sigma
    bound = 4 * (3 + 4) * U64 * log_joint * scale
    assert_within(direct, u_safe, bound, "theorem with exact beta")
    assert_within(got, u_safe, bound, "path_correction (odds beta, point-mass banks)")
    assert bool(rec.applied.all())


# ---- SDXL, SD3 and Flux pipelines --------------------------------------------------------------------------------
PROMPTS, SEEDS, HW, STEPS = ["a photo of a cat", "a red car"], [0, 1], 16, 3
CASES = ["sdxl-euler", "sdxl-dpmpp", "sd3", "flux", "flux-static"]


@pytest.fixture(scope="module")
def pipes() -> dict[str, Any]:
    out = {"sdxl": tiny_pipeline("sdxl"), "sd3": tiny_pipeline("sd3"), "flux": tiny_pipeline("flux")}
    return out


def _pipe(pipes: dict[str, Any], case: str) -> Any:
    from safe_denoiser.diffusers.families import FLUX_SCHEDULER_CONFIG
    from safe_denoiser.diffusers.pipelines import make_scheduler

    family = case.split("-")[0]
    pipe = pipes[family]
    if family == "sdxl":
        pipe.scheduler = make_scheduler(case.split("-")[1], pipe.scheduler.config)
    elif case == "flux-static":
        pipe.scheduler = make_scheduler("flow_euler", {**FLUX_SCHEDULER_CONFIG, "use_dynamic_shifting": False})
    elif family == "flux":
        pipe.scheduler = make_scheduler("flow_euler", FLUX_SCHEDULER_CONFIG)
    return pipe


def _run(pipe: Any, prompts: list[str], seeds: list[int], img2img: bool = False) -> Tensor:
    flux = "Flux" in type(pipe).__name__
    kw: dict[str, Any] = {"max_sequence_length": 16, "height": HW, "width": HW} if flux else {}
    if img2img:
        kw.update(image=torch.linspace(-1, 1, 3 * HW * HW).reshape(1, 3, HW, HW).expand(len(prompts), -1, -1, -1))
        kw["strength"] = 0.7
    elif not flux:
        kw.update(height=HW, width=HW)
    return pipe(prompts, num_inference_steps=STEPS, output_type="latent", generator=generators(seeds), **kw).images


def _bank(pipe: Any, n: int = 5) -> Tensor:
    channels = 4 if "XL" in type(pipe).__name__ else 16
    return torch.randn(n, channels, HW // 2, HW // 2, generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("img2img", [False, True])
@pytest.mark.parametrize("case", CASES)
def test_zero_strength_is_bit_exact_and_nonzero_acts(pipes: dict[str, Any], case: str, img2img: bool) -> None:
    pipe = _pipe(pipes, case)
    pipe = img2img_pipeline(pipe) if img2img else pipe
    base = _run(pipe, PROMPTS, SEEDS, img2img)
    zero = (SGFGuidance(mmd_scale=0.0, window=(0.0, 1000.0)), ShieldedGuidance(overcompensation=0.0, radius=1e3))
    for g in (ConstantGuidance(beta=0.0), ConstantGuidance(beta=1.0, window=(2000.0, 3000.0)), *zero):
        attach(pipe, _bank(pipe), g)
        out = _run(pipe, PROMPTS, SEEDS, img2img)
        detach(pipe)
        assert torch.equal(out, base), (case, g)
    handle = attach(pipe, _bank(pipe), ConstantGuidance(beta=0.5), record=True)
    moved = _run(pipe, PROMPTS, SEEDS, img2img)
    detach(pipe)
    assert (moved - base).abs().max() > 1e-2
    assert len(handle.records) >= 2 and all(bool(r.record.applied.all()) for r in handle.records)


@pytest.mark.parametrize("case", CASES)
def test_moves_away_from_a_bank_of_its_own_outputs(pipes: dict[str, Any], case: str) -> None:
    pipe = _pipe(pipes, case)
    prompts, seeds = ["a photo of a cat"] * 3, [0, 1, 2]
    negatives = _run(pipe, prompts, seeds)  # Flux: packed latents, taken as they are

    def distance(beta: float) -> float:
        attach(pipe, negatives, ConstantGuidance(beta=beta))
        x = _run(pipe, prompts, seeds)
        detach(pipe)
        return float(torch.cdist(x.flatten(1), negatives.flatten(1)).min(dim=1).values.mean())

    d = [distance(beta) for beta in (0.0, 0.2, 1.0)]
    assert d[0] == 0.0 and d[0] < d[1] < d[2], d


@pytest.mark.parametrize("case", ["sdxl-euler", "sd3", "flux"])
def test_batch_equals_items(pipes: dict[str, Any], case: str) -> None:
    pipe = _pipe(pipes, case)
    attach(pipe, _bank(pipe), MassGuidance(beta_per_mass=0.5))
    batch = _run(pipe, PROMPTS, SEEDS)
    items = torch.cat([_run(pipe, [p], [s]) for p, s in zip(PROMPTS, SEEDS, strict=True)])
    detach(pipe)
    # Only the networks' batch-size-dependent float32 rounding separates them (measured below 2e-6 of the samples'
    # scale, with or without the correction); the correction itself moves samples by O(1).
    assert_close_to_rounding(items, batch, 2e-5)


def test_flux_bank_is_packed_like_the_sample(pipes: dict[str, Any]) -> None:
    """An unpacked (16, h, w) bank is packed with Flux's own layout: the result equals attaching it pre-packed."""
    from diffusers import FluxPipeline

    from safe_denoiser.diffusers.bank_layout import sample_space_bank

    pipe = _pipe(pipes, "flux")
    bank = _bank(pipe)
    packed = FluxPipeline._pack_latents(bank, 5, 16, HW // 2, HW // 2)
    assert torch.equal(sample_space_bank(pipe, bank), packed) and packed.shape == (5, 16, 64)
    outs = []
    for b in (bank, packed):
        attach(pipe, b, ConstantGuidance(beta=0.5))
        outs.append(_run(pipe, PROMPTS, SEEDS))
        detach(pipe)
    assert torch.equal(outs[0], outs[1])
    with pytest.raises(ValueError, match="packed latents"):
        attach(pipe, torch.randn(3, 4, 8, 8))
    with pytest.raises(ValueError, match="even"):
        attach(pipe, torch.randn(3, 16, 7, 8))


def test_flow_single_step_is_the_theorem_in_x0_space(pipes: dict[str, Any]) -> None:
    """x0_safe = x0 + beta (x0 - E_unsafe), E_unsafe under N(x; (1 - sigma) x_n, sigma^2), then the Euler step."""
    from safe_denoiser.diffusers.pipelines import make_scheduler
    from safe_denoiser.diffusers.safe_scheduler import SafeScheduler

    plain, inner = make_scheduler("flow_euler"), make_scheduler("flow_euler")
    bank, beta = _bank(pipes["sd3"]), 0.7
    safe = SafeScheduler(inner, bank, ConstantGuidance(beta=beta))
    for s in (plain, safe):
        s.set_timesteps(4)
    for i in range(2):
        t = plain.timesteps[i]
        sigma, sigma_next = float(plain.sigmas[i]), float(plain.sigmas[i + 1])
        x, u = torch.randn(2, 16, 8, 8), torch.randn(2, 16, 8, 8)
        x0 = x - sigma * u
        e_unsafe = kernel_reference(x, bank, 1 - sigma, sigma**2).mean.float()
        x0_safe = x0 + beta * (x0 - e_unsafe)
        want = x + (sigma_next - sigma) * (x - x0_safe) / sigma
        got = safe.step(u, t, x).prev_sample
        plain.step(u, t, x)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_flow_errors_and_signature(pipes: dict[str, Any]) -> None:
    from safe_denoiser.diffusers.pipelines import make_scheduler

    pipe = _pipe(pipes, "flux")
    with pytest.raises(
        ValueError,
        match=r"the reference preset is defined on the DDPM schedule; with flow matching "
        r"\(FlowMatchEulerDiscreteScheduler\) use another preset \(constant, mass, odds, sgf, shielded\)",
    ):
        attach(pipe, _bank(pipe), ReferenceGuidance())
    handle = attach(pipe, _bank(pipe))
    params = inspect.signature(handle.set_timesteps).parameters
    assert {"sigmas", "mu", "timesteps"} <= set(params)  # what retrieve_timesteps and Flux look for
    with pytest.raises(ValueError, match="per_token_timesteps"):
        handle.step(torch.zeros(1, 16, 64), 1000.0, torch.zeros(1, 16, 64), per_token_timesteps=torch.ones(1, 16))
    detach(pipe)
    sd3 = pipes["sd3"]
    original = sd3.scheduler
    sd3.scheduler = make_scheduler("flow_euler", invert_sigmas=True)
    with pytest.raises(ValueError, match="invert_sigmas"):
        attach(sd3, _bank(sd3))
    sd3.scheduler = original


def test_sd3_vae_bank_uses_scaling_and_shift(pipes: dict[str, Any]) -> None:
    from safe_denoiser.diffusers.vae import latent_factors, vae_encoder

    vae = pipes["sd3"].vae
    assert latent_factors(vae) == (1.5305, 0.0609)
    images = torch.rand(2, 3, HW, HW) * 2 - 1
    z = vae_encoder(vae)(images)
    with torch.no_grad():
        mean = vae.encode(images).latent_dist.mean
    # one subtraction and one product: two float32 roundings of values below |mean| + shift
    assert_within(z, (mean.double() - 0.0609) * 1.5305, 4 * U32 * 1.5305 * (mean.abs() + 0.0609), "bank latents")
    assert latent_factors(pipes["sdxl"].vae) == (0.13025, None)
