"""attach/detach on real diffusers pipelines (tiny random weights, CPU, a few steps)."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor

from safe_denoiser import (
    ConstantGuidance,
    MassGuidance,
    OddsGuidance,
    PreparedBanks,
    ReferenceGuidance,
    attach,
    detach,
    reference_correction,
    theorem_correction,
)
from safe_denoiser.core.guidance import SGFGuidance, ShieldedGuidance
from safe_denoiser.diffusers.pipelines import make_scheduler
from safe_denoiser.diffusers.safe_scheduler import SafeScheduler

from helpers import HW, assert_close_to_rounding, generators, kernel_reference, latent_bank, sample_latents

SCHEDULERS = ["ddim", "ddpm", "pndm", "euler", "euler_a", "lms", "dpmpp"]
PREDICTIONS = ["epsilon", "v_prediction"]
STEPS = 4


def run(pipe: Any, prompts: list[str], seeds: list[int], steps: int = STEPS, **kwargs: Any) -> Tensor:
    return sample_latents(pipe, prompts, seeds, steps, **kwargs)


PROMPTS = ["a photo of a cat", "a red car"]
SEEDS = [0, 1]


# ---- no-op settings are exactly the untouched pipeline -------------------------------------------------------
@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("name", SCHEDULERS)
def test_noop_settings_are_bit_exact(pipe: Any, name: str, prediction: str) -> None:
    pipe.scheduler = make_scheduler(name, prediction_type=prediction)
    base = run(pipe, PROMPTS, SEEDS)
    zero = (SGFGuidance(mmd_scale=0.0, window=(0.0, 1000.0)), ShieldedGuidance(overcompensation=0.0, radius=1e3))
    for guidance in (ConstantGuidance(beta=0.0), ReferenceGuidance(window=(2000.0, 3000.0)), *zero):
        attach(pipe, latent_bank(), guidance)
        out = run(pipe, PROMPTS, SEEDS)
        detach(pipe)
        assert torch.equal(out, base), (name, prediction, guidance.preset)
    for acting in (SGFGuidance(window=(0.0, 1000.0)), ShieldedGuidance(radius=1e3)):
        attach(pipe, latent_bank(), acting)
        assert not torch.equal(run(pipe, PROMPTS, SEEDS), base), (name, prediction, acting.preset)
        detach(pipe)
    corrected = attach(pipe, latent_bank(), ConstantGuidance(beta=0.5))
    assert not torch.equal(run(pipe, PROMPTS, SEEDS), base)
    assert detach(pipe) is corrected.scheduler


# ---- one step against the theorem written in x0 space, in each scheduler's own parameterisation -----------------
def _kernel_mean(x: Tensor, bank: Tensor, scale: float, var: float) -> Tensor:
    return kernel_reference(x, bank, scale, var).mean.float()


@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("name", SCHEDULERS)
def test_single_step_is_theorem_in_x0_space(name: str, prediction: str) -> None:
    """x0_safe = x0 + beta (x0 - E_unsafe), E_unsafe under the sampler's forward kernel (docs/method.md section 1)."""
    torch.manual_seed(0)
    plain, inner = (make_scheduler(name, prediction_type=prediction) for _ in range(2))
    beta, b = 0.7, latent_bank(5)
    safe = SafeScheduler(inner, b, ConstantGuidance(beta=beta))
    for s in (plain, safe):
        s.set_timesteps(STEPS)
    t = plain.timesteps[0]
    x = torch.randn(2, 4, 8, 8) * plain.init_noise_sigma
    out = torch.randn(2, 4, 8, 8)
    if name in ("euler", "euler_a", "lms"):  # sigma form: x = x0 + sigma eps, kernel N(x; x_n, sigma^2)
        sigma = float(plain.sigmas[0])
        x0 = (
            x - sigma * out
            if prediction == "epsilon"
            else out * (-sigma / math.sqrt(sigma**2 + 1)) + x / (sigma**2 + 1)
        )
        x0_safe = x0 + beta * (x0 - _kernel_mean(x, b, 1.0, sigma**2))
    else:  # VP: x = sqrt(abar) x0 + sqrt(1 - abar) eps
        ab = float(plain.alphas_cumprod[int(t)])
        x0 = (
            (x - math.sqrt(1 - ab) * out) / math.sqrt(ab)
            if prediction == "epsilon"
            else math.sqrt(ab) * x - math.sqrt(1 - ab) * out
        )
        x0_safe = x0 + beta * (x0 - _kernel_mean(x, b, math.sqrt(ab), 1 - ab))
    kw: dict[str, Any] = {"generator": torch.Generator().manual_seed(3)} if name in ("ddpm", "euler_a") else {}
    for s in (plain, safe):
        s.scale_model_input(x, t)  # sigma schedulers warn (LMS) unless it was called before step
    got = safe.step(out, t, x, **kw)
    if (
        name == "pndm"
    ):  # first PLMS step, no x0 output: feed the plain scheduler the eps that x0_safe implies and compare x_{t-1}
        eps_safe = (x - math.sqrt(ab) * x0_safe) / math.sqrt(1 - ab)
        want_in = eps_safe if prediction == "epsilon" else (math.sqrt(ab) * eps_safe - math.sqrt(1 - ab) * x0_safe)
        torch.testing.assert_close(got.prev_sample, plain.step(want_in, t, x).prev_sample, rtol=1e-4, atol=1e-4)
        return
    x0_got = safe.scheduler.model_outputs[-1] if name == "dpmpp" else got.pred_original_sample
    torch.testing.assert_close(x0_got, x0_safe, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(x0_got, x0, atol=1e-3)


# ---- the integration equals the math applied by hand -----------------------------------------------------------
def hand_loop(
    pipe: Any,
    prompts: list[str],
    seeds: list[int],
    finish: Callable[[Tensor, Tensor, Tensor, Tensor, Any, list[torch.Generator]], Tensor],
    negative_prompt: list[str] | None = None,
) -> Tensor:
    """StableDiffusionPipeline's loop written out; ``finish(u, c, t, latents, scheduler, gens)`` -> next latents."""
    from diffusers.utils.torch_utils import randn_tensor

    sched = pipe.scheduler.__class__.from_config(pipe.scheduler.config)  # the wrapped class, if attached
    cond, uncond = pipe.encode_prompt(prompts, "cpu", 1, True, negative_prompt)
    emb = torch.cat([uncond, cond])
    sched.set_timesteps(STEPS)
    g = generators(seeds)
    latents = randn_tensor((len(prompts), 4, HW // 2, HW // 2), generator=g, dtype=emb.dtype) * sched.init_noise_sigma
    with torch.no_grad():
        for t in sched.timesteps:
            out = pipe.unet(sched.scale_model_input(torch.cat([latents] * 2), t), t, encoder_hidden_states=emb).sample
            u, c = out.chunk(2)
            latents = finish(u, c, t, latents, sched, g)
    return latents


W = 7.5  # the pipeline's default guidance scale


@pytest.mark.parametrize("negative_prompt", [None, ["blurry, ugly", "low quality"]])
def test_theorem_through_pipeline_equals_hand_loop(fresh: Any, negative_prompt: list[str] | None) -> None:
    g, b = ConstantGuidance(beta=0.4, window=(300.0, 1000.0)), latent_bank()
    banks = PreparedBanks.prepare(b, g)

    def finish(u: Tensor, c: Tensor, t: Tensor, x: Tensor, sched: Any, _: Any) -> Tensor:
        eps = u + W * (c - u)
        eps, _rec = theorem_correction(eps, x, sched.alphas_cumprod[int(t)], t, banks, g)
        return sched.step(eps, t, x).prev_sample

    want = hand_loop(fresh, PROMPTS, SEEDS, finish, negative_prompt)
    attach(fresh, b, g)
    got = run(fresh, PROMPTS, SEEDS, negative_prompt=negative_prompt)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    detach(fresh)
    plain = run(fresh, PROMPTS, SEEDS, negative_prompt=negative_prompt)
    assert (got - plain).abs().max() > 1e-2  # the correction did something (only in 300..1000)
    if negative_prompt is not None:
        assert (plain - run(fresh, PROMPTS, SEEDS)).abs().max() > 1e-3  # and so does the negative prompt


def test_reference_through_pipeline_equals_hand_loop(pipe: Any) -> None:
    """DDPM (the authors' sampler): x0_hat corrected, re-noised with the pipeline's generator, then the usual step."""
    from diffusers.utils.torch_utils import randn_tensor

    pipe.scheduler = make_scheduler("ddpm")
    g = ReferenceGuidance(kernel_sigma=20.0, step_size=0.5, threshold=0.0, window=(500.0, 1000.0))
    b = latent_bank()
    banks = PreparedBanks.prepare(b, g)

    def finish(u: Tensor, c: Tensor, t: Tensor, x: Tensor, sched: Any, gs: list[torch.Generator]) -> Tensor:
        eps = u + W * (c - u)
        if g.in_window(float(t)):
            noise = randn_tensor(x.shape, generator=gs, dtype=x.dtype)
            x, _rec = reference_correction(eps, x, sched.alphas_cumprod[int(t)], t, banks, g, 0.0, noise)
        return sched.step(eps, t, x, generator=gs).prev_sample

    want = hand_loop(pipe, PROMPTS, SEEDS, finish)
    handle = attach(pipe, b, g, record=True)
    got = run(pipe, PROMPTS, SEEDS)
    detach(pipe)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    applied = torch.stack([r.record.applied for r in handle.records])
    assert applied.any() and not applied.all()  # fired in the window only
    assert not torch.allclose(got, run(pipe, PROMPTS, SEEDS), atol=1e-3)


def test_cfg_correct_after_combination_equals_correcting_each_branch(fresh: Any) -> None:
    """Theorem preset: eps + beta (eps - eps_unsafe) is affine in eps with x_t-only coefficients, so it commutes
    with CFG (docs/method.md section 1), also with the kernel-mass beta."""
    b = latent_bank()
    for guidance in (ConstantGuidance(beta=0.3), MassGuidance(beta_per_mass=50.0)):
        banks = PreparedBanks.prepare(b, guidance)

        def per_branch(
            u: Tensor, c: Tensor, t: Tensor, x: Tensor, sched: Any, _: Any, gd: Any = guidance, bk: Any = banks
        ) -> Tensor:
            ab = sched.alphas_cumprod[int(t)]
            u2, _ = theorem_correction(u, x, ab, t, bk, gd)
            c2, _ = theorem_correction(c, x, ab, t, bk, gd)
            return sched.step(u2 + W * (c2 - u2), t, x).prev_sample

        want = hand_loop(fresh, PROMPTS, SEEDS, per_branch)
        attach(fresh, b, guidance)
        got = run(fresh, PROMPTS, SEEDS)
        detach(fresh)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


# ---- batches, generators, moving away from the bank ----------------------------------------------------------------
@pytest.mark.parametrize("preset,name", [("constant", "euler_a"), ("reference", "euler_a"), ("reference", "lms")])
def test_batch_equals_items_one_by_one(pipe: Any, preset: str, name: str) -> None:
    """Per-image generators: Euler-a draws from them every step; LMS's step takes none, so the re-noise noise
    can only match item by item if the wrapper still receives the pipeline's generators."""
    pipe.scheduler = make_scheduler(name)
    g: ConstantGuidance | ReferenceGuidance
    if preset == "constant":
        g = ConstantGuidance(beta=0.3)
    else:
        g = ReferenceGuidance(kernel_sigma=20.0, threshold=0.0, window=(400.0, 1000.0))
    attach(pipe, latent_bank(), g)
    batch = run(pipe, PROMPTS, SEEDS)
    items = torch.cat([run(pipe, [p], [s]) for p, s in zip(PROMPTS, SEEDS, strict=True)])
    detach(pipe)
    # The UNet's own batch-size-dependent rounding (about 4e-6 of the sample's scale here, present without the
    # correction too) is all that separates them; the correction itself moves samples by O(1).
    assert_close_to_rounding(items, batch, 2e-5)
    assert (batch - run(pipe, PROMPTS, SEEDS)).abs().max() > 1.0


def test_correction_moves_samples_away_from_the_bank(fresh: Any) -> None:
    prompts, seeds = ["a photo of a cat"] * 3, [0, 1, 2]
    negatives = run(fresh, prompts, seeds, steps=5)  # the bank: the pipeline's own unguided samples

    def distance(beta: float, seeds_: list[int]) -> float:
        attach(fresh, negatives, ConstantGuidance(beta=beta))
        x = run(fresh, prompts, seeds_, steps=5)
        detach(fresh)
        return float(torch.cdist(x.flatten(1), negatives.flatten(1)).min(dim=1).values.mean())

    for seeds_ in (seeds, [10, 11, 12]):
        d = [distance(beta, seeds_) for beta in (0.0, 0.1, 0.5)]
        assert d[0] < d[1] < d[2], d
    assert distance(0.0, seeds) == 0.0


# ---- records, errors, detach -------------------------------------------------------------------------------------
def test_records_are_optional_and_do_not_change_the_samples(fresh: Any) -> None:
    g = ConstantGuidance(beta=0.3, window=(500.0, 1000.0))
    handle = attach(fresh, latent_bank(), g)
    quiet = run(fresh, PROMPTS, SEEDS)
    assert handle.records == []
    detach(fresh)
    handle = attach(fresh, latent_bank(), g, record=True)
    loud = run(fresh, PROMPTS, SEEDS)
    assert torch.equal(quiet, loud)
    times = [r.timestep for r in handle.records]
    assert times == [float(t) for t in fresh.scheduler.timesteps]
    for r in handle.records:
        assert r.record.applied.shape == (2,) and r.record.log_mass.shape == (2,)
        assert bool(r.record.applied.all()) == g.in_window(r.timestep)
        assert bool((r.record.delta_norm > 0).all()) == g.in_window(r.timestep)
    run(fresh, PROMPTS[:1], SEEDS[:1])
    assert len(handle.records) == STEPS  # reset per sampling call


def test_unsupported_scheduler_and_prediction_type_raise(fresh: Any) -> None:
    from diffusers import HeunDiscreteScheduler

    fresh.scheduler = HeunDiscreteScheduler.from_config(fresh.scheduler.config)
    with pytest.raises(ValueError, match=r"unsupported scheduler .*HeunDiscreteScheduler"):
        attach(fresh, latent_bank())
    fresh.scheduler = make_scheduler("ddim", prediction_type="sample")
    with pytest.raises(ValueError, match="unsupported prediction_type 'sample'"):
        attach(fresh, latent_bank())
    fresh.scheduler = make_scheduler("ddim")
    with pytest.raises(ValueError, match="3 channels"):
        attach(fresh, torch.randn(2, 3, 8, 8))
    with pytest.raises(ValueError, match="no safe denoiser is attached"):
        detach(fresh)
    with pytest.raises(
        ValueError, match=r"the odds preset needs a reference bank: attach\(pipe, bank, guidance, refer"
    ):
        attach(fresh, latent_bank(), OddsGuidance())
    with pytest.raises(ValueError, match=r"safe_denoiser\.preset must be one of .*got 'theorem' \('theorem' with"):
        attach(fresh, latent_bank(), "theorem")
    assert not isinstance(fresh.scheduler, SafeScheduler)  # nothing attached by the refusals
    attach(fresh, latent_bank())
    with pytest.raises(ValueError, match="already attached"):
        attach(fresh, latent_bank())


def test_detach_restores_scheduler_and_outputs(fresh: Any) -> None:
    original, config = fresh.scheduler, dict(fresh.config)
    base = run(fresh, PROMPTS, SEEDS)
    handle = attach(fresh, latent_bank(), ConstantGuidance(beta=0.5))
    assert fresh.scheduler is handle and dict(fresh.config) == config  # pipe.config still names DDIMScheduler
    assert not torch.equal(run(fresh, PROMPTS, SEEDS), base)
    assert detach(fresh) is original and fresh.scheduler is original
    assert torch.equal(run(fresh, PROMPTS, SEEDS), base)


def test_wrapper_delegates_like_the_scheduler(fresh: Any, tmp_path: Any) -> None:
    import json

    from diffusers import DDIMScheduler

    handle = attach(fresh, latent_bank().double(), ConstantGuidance())
    assert isinstance(handle, DDIMScheduler) and isinstance(handle, SafeScheduler)
    assert handle.config is handle.scheduler.config and handle.order == 1
    assert handle.banks.negative.data.dtype == torch.float32  # follows the pipeline's dtype
    params = inspect.signature(handle.step).parameters
    assert "eta" in params and "generator" in params  # so the pipeline passes both
    handle.set_timesteps(3)
    assert torch.equal(handle.timesteps, handle.scheduler.timesteps)
    handle.custom_flag = 1  # writes go to the wrapped scheduler
    assert handle.scheduler.custom_flag == 1
    fresh.save_pretrained(tmp_path)  # an attached pipeline saves as the plain one
    assert json.loads((tmp_path / "model_index.json").read_text())["scheduler"] == ["diffusers", "DDIMScheduler"]
    assert json.loads((tmp_path / "scheduler" / "scheduler_config.json").read_text())["_class_name"] == "DDIMScheduler"


@pytest.mark.parametrize("name", SCHEDULERS)
def test_host_timestep_without_device_reads(pipe: Any, name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """On accelerators the wrapper never reads the timestep tensor: it looks the current position up in a host
    copy of the schedule. Check that lookup against float(t) at every step, for txt2img and img2img."""
    from diffusers import StableDiffusionImg2ImgPipeline

    seen: list[float] = []
    orig = SafeScheduler._host_timestep

    def checked(self: SafeScheduler, timestep: Any) -> float:
        value = orig(self, timestep)
        assert self._host_timesteps is not None
        assert float(self._host_timesteps[self._position(timestep)]) == value
        seen.append(value)
        return value

    monkeypatch.setattr(SafeScheduler, "_host_timestep", checked)
    pipe.scheduler = make_scheduler(name)
    attach(pipe, latent_bank(), ConstantGuidance(beta=0.1))
    run(pipe, PROMPTS[:1], SEEDS[:1], steps=3)
    detach(pipe)
    img2img = StableDiffusionImg2ImgPipeline(**pipe.components, requires_safety_checker=False)
    img2img.set_progress_bar_config(disable=True)
    attach(img2img, latent_bank(), ConstantGuidance(beta=0.1))
    image = torch.zeros(1, 3, HW, HW)
    img2img("a cat", image=image, strength=0.5, num_inference_steps=4, output_type="latent", generator=generators([0]))
    detach(img2img)
    assert len(seen) >= 3 + 2


def test_reference_preset_default_threshold_and_window(pipe: Any) -> None:
    """Without ReferenceGuidance.threshold: the bank's minimum kernel sum at the schedule's last timestep (seeded)."""
    from safe_denoiser import reference_threshold

    pipe.scheduler = make_scheduler("ddpm")
    b = latent_bank()
    handle = attach(pipe, b, ReferenceGuidance(), record=True)
    run(pipe, PROMPTS, SEEDS, steps=10)
    detach(pipe)
    ab_last = float(handle.scheduler.alphas_cumprod[int(handle.timesteps[-1])])
    assert handle._threshold == pytest.approx(reference_threshold(b, 3.15, ab_last, torch.Generator().manual_seed(0)))
    inside = [r for r in handle.records if 780 <= r.timestep <= 1000]
    assert len(inside) == 2 and len(handle.records) == 10
    assert not any(bool(r.record.applied.any()) for r in handle.records if r not in inside)
