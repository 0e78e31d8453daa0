"""SLD: the pure guidance function by hand, the UNet wrapper against diffusers' StableDiffusionPipelineSafe."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import Tensor

from safe_denoiser import SafeGuidance, SafeScheduler, SLDConfig, attach, attach_sld, detach, detach_sld, sld_guidance
from safe_denoiser.core.sld import sld_noise_pred
from safe_denoiser.core.step import theorem_correction
from safe_denoiser.diffusers.pipelines import make_scheduler
from safe_denoiser.diffusers.sld import SLDUNet, encode_concept

HW, STEPS, W = 16, 5, 7.5
PROMPTS, SEEDS = ["a photo of a cat", "a red car"], [0, 1]
CONCEPT = "nudity, violence"


@pytest.fixture()
def fresh(pipe: Any) -> Iterator[Any]:
    pipe.scheduler = make_scheduler("ddim")
    yield pipe
    if isinstance(pipe.unet, SLDUNet):
        detach_sld(pipe)
    if isinstance(pipe.scheduler, SafeScheduler):
        detach(pipe)


def gens(seeds: list[int]) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in seeds]


def run(pipe: Any, **kwargs: Any) -> Tensor:
    return pipe(
        PROMPTS, num_inference_steps=STEPS, height=HW, width=HW, output_type="latent", generator=gens(SEEDS), **kwargs
    ).images


def close_to_rounding(a: Tensor, b: Tensor, rel: float = 5e-5) -> None:
    """Equal up to float rounding, measured against the samples' scale (the random tiny UNet outputs O(10))."""
    assert float((a - b).abs().max()) <= rel * float(b.abs().max()), float((a - b).abs().max())


# ---- the math --------------------------------------------------------------------------------------------------
def test_presets_are_diffusers_safety_configs() -> None:
    from diffusers.pipelines.deprecated.stable_diffusion_safe import SafetyConfig

    for name in ("weak", "medium", "strong", "max"):
        assert SLDConfig.preset(name).diffusers_kwargs() == getattr(SafetyConfig, name.upper())
    assert SLDConfig() == SLDConfig.medium()  # diffusers' __call__ defaults
    with pytest.raises(ValueError, match="unknown SLD preset"):
        SLDConfig.preset("extreme")


@pytest.mark.parametrize(
    "field,value",
    [
        ("guidance_scale", -1.0),
        ("warmup_steps", 1.5),
        ("threshold", float("nan")),
        ("mom_beta", 1.5),
        ("momentum_scale", -0.1),
    ],
)
def test_config_is_validated(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=f"SLDConfig.{field}"):
        SLDConfig(**{field: value})


def test_sld_guidance_against_a_hand_computation() -> None:
    """Two steps on three elements, each written out as SLD's equations 3-8 with Python floats."""
    cfg = SLDConfig(guidance_scale=10.0, warmup_steps=1, threshold=0.05, momentum_scale=0.5, mom_beta=0.25)
    u = torch.tensor([0.10, -0.20, 0.30])
    p = torch.tensor([0.50, 0.00, 0.25])  # eps_p - eps_S = [0.45, -0.02, 0.04]: only the last two are < lambda
    s = torch.tensor([0.05, 0.02, 0.21])
    # step 0 (warm-up): mu = [0, min(10*0.02, 1), min(10*0.04, 1)] = [0, 0.2, 0.4]; no momentum yet
    gamma0 = [0.0, 0.2 * (0.02 + 0.20), 0.4 * (0.21 - 0.30)]
    nu1 = [0.75 * g for g in gamma0]
    term, nu = sld_guidance(u, p, s, None, 0, cfg)
    assert torch.equal(term, torch.zeros(3))
    torch.testing.assert_close(nu, torch.tensor(nu1))
    # step 1 (active): gamma = mu (eps_S - eps_u) + s_m nu; nu <- b_m nu + (1 - b_m) gamma
    gamma1 = [g + 0.5 * n for g, n in zip(gamma0, nu1, strict=True)]
    term, nu2 = sld_guidance(u, p, s, nu, 1, cfg)
    torch.testing.assert_close(term, torch.tensor(gamma1))
    torch.testing.assert_close(nu2, torch.tensor([0.25 * n + 0.75 * g for n, g in zip(nu1, gamma1, strict=True)]))
    pred, _ = sld_noise_pred(u, p, s, 7.5, nu, 1, cfg)
    torch.testing.assert_close(pred, u + 7.5 * ((p - u) - torch.tensor(gamma1)))
    # a large s_S saturates the scale at 1
    term, _ = sld_guidance(u, p, s, None, 0, cfg.with_(guidance_scale=1e6, warmup_steps=0, momentum_scale=0.0))
    torch.testing.assert_close(term, torch.tensor([0.0, 0.22, -0.09]))


# ---- the UNet wrapper in a pipeline -------------------------------------------------------------------------------
def diffusers_sld(pipe: Any, config: SLDConfig, negative_prompt: list[str] | None) -> Tensor:
    """The same components in diffusers' StableDiffusionPipelineSafe; final latents via its step callback."""
    from diffusers import StableDiffusionPipelineSafe

    unet = pipe.unet.unet if isinstance(pipe.unet, SLDUNet) else pipe.unet
    reference = StableDiffusionPipelineSafe(
        vae=pipe.vae,
        text_encoder=pipe.text_encoder,
        tokenizer=pipe.tokenizer,
        unet=unet,
        scheduler=make_scheduler("ddim", pipe.scheduler.config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    reference.set_progress_bar_config(disable=True)
    reference.safety_concept = CONCEPT
    latents: list[Tensor] = []
    reference(
        PROMPTS,
        height=HW,
        width=HW,
        num_inference_steps=STEPS,
        guidance_scale=W,
        negative_prompt=negative_prompt,
        generator=gens(SEEDS),
        output_type="np",
        callback=lambda i, t, x: latents.append(x),
        callback_steps=1,
        **config.diffusers_kwargs(),
    )
    return latents[-1]


@pytest.mark.parametrize(
    "config,negative_prompt",
    [
        (SLDConfig.medium().with_(warmup_steps=2), None),
        (SLDConfig.strong().with_(warmup_steps=1), ["blurry", "ugly"]),
        (SLDConfig.max(), None),
    ],
)
def test_matches_stable_diffusion_pipeline_safe(fresh: Any, config: SLDConfig, negative_prompt: Any) -> None:
    want = diffusers_sld(fresh, config, negative_prompt)
    plain = run(fresh, negative_prompt=negative_prompt)
    handle = attach_sld(fresh, config, concept=CONCEPT)
    got = run(fresh, negative_prompt=negative_prompt)
    close_to_rounding(got, want)
    assert (got - plain).abs().max() > 0.1  # SLD changed the samples
    assert handle.step_index == STEPS
    assert torch.equal(run(fresh, negative_prompt=negative_prompt), got)  # state resets between calls


def test_disabled_sld_and_detach_are_bit_exact(fresh: Any) -> None:
    base = run(fresh)
    attach_sld(fresh, SLDConfig.max().with_(guidance_scale=1.0), concept=CONCEPT)  # s_S <= 1: off, as in diffusers
    assert torch.equal(run(fresh), base)
    detach_sld(fresh)
    handle = attach_sld(fresh, "max", concept=CONCEPT)
    no_cfg = fresh(PROMPTS, num_inference_steps=2, height=HW, width=HW, output_type="latent", guidance_scale=1.0)
    assert no_cfg.images.shape == base.shape and handle.step_index == 0  # no CFG batch: SLD stays out of the way
    with pytest.raises(ValueError, match="already attached"):
        attach_sld(fresh, "max")
    assert detach_sld(fresh) is handle.unet and fresh.unet is handle.unet
    assert torch.equal(run(fresh), base)
    with pytest.raises(ValueError, match="not attached"):
        detach_sld(fresh)


def test_wrapper_delegates_unet_attributes(fresh: Any) -> None:
    inner = fresh.unet
    handle = attach_sld(fresh, "medium", concept=CONCEPT)
    assert handle.config is inner.config and handle.dtype == inner.dtype and handle.device == inner.device
    assert fresh.config["unet"] == ("diffusers", "UNet2DConditionModel")
    assert handle.safety_embedding.shape == (1, fresh.tokenizer.model_max_length, inner.config.cross_attention_dim)
    torch.testing.assert_close(handle.safety_embedding, encode_concept(fresh, CONCEPT))


def test_sld_with_safe_denoiser_equals_hand_loop(fresh: Any) -> None:
    """SLD's guided eps, then the theorem correction in scheduler.step (how the paper combines them)."""
    from diffusers.utils.torch_utils import randn_tensor

    config, g = SLDConfig.medium().with_(warmup_steps=1), SafeGuidance.theorem(eta=0.3)
    bank = torch.randn(5, 4, HW // 2, HW // 2, generator=torch.Generator().manual_seed(0))
    sld_only = attach_sld(fresh, config, concept=CONCEPT)
    alone = run(fresh)
    attach(fresh, bank, SafeGuidance.theorem(eta=0.0))
    assert torch.equal(run(fresh), alone)  # eta = 0 adds nothing on top of SLD
    detach(fresh)
    attach(fresh, bank, g)
    both = run(fresh)
    assert (both - alone).abs().max() > 0.1

    sched = make_scheduler("ddim", fresh.scheduler.config)
    sched.set_timesteps(STEPS)
    cond, uncond = fresh.encode_prompt(PROMPTS, "cpu", 1, True)
    emb = torch.cat([uncond, cond, sld_only.safety_embedding.expand(len(PROMPTS), -1, -1)])
    x = randn_tensor((2, 4, HW // 2, HW // 2), generator=gens(SEEDS)) * sched.init_noise_sigma
    momentum = None
    with torch.no_grad():
        for i, t in enumerate(sched.timesteps):
            u, c, s = sld_only.unet(torch.cat([x] * 3), t, encoder_hidden_states=emb).sample.chunk(3)
            eps, momentum = sld_noise_pred(u, c, s, W, momentum, i, config)
            eps, _ = theorem_correction(eps, x, sched.alphas_cumprod[int(t)], t, bank, g)
            x = sched.step(eps, t, x).prev_sample
    close_to_rounding(both, x)
