"""SLD: the pure guidance function by hand, the UNet wrapper against diffusers' StableDiffusionPipelineSafe."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor

from safe_denoiser import (
    ConstantGuidance,
    PreparedBanks,
    SLDConfig,
    attach,
    attach_sld,
    detach,
    detach_sld,
    sld_guidance,
)
from safe_denoiser.core.sld import append_safety_branch, sld_noise_pred
from safe_denoiser.core.step import theorem_correction
from safe_denoiser.diffusers.pipelines import make_scheduler
from safe_denoiser.diffusers.sld_unet import SLDUNet, encode_concept

from helpers import generators
from step_bounds import perturbed

HW, STEPS, W = 16, 5, 7.5
PROMPTS, SEEDS = ["a photo of a cat", "a red car"], [0, 1]
CONCEPT = "nudity, violence"
# Two implementations of the same guided loop run the same UNet calls and differ in the order of the roundings
# after them (SLD's and CFG's arithmetic, the correction: about a dozen operations on values up to max |eps|). Model
# that as every UNet output moving by +-POST_UNET_ROUNDINGS u32 max|eps| (step_bounds.perturbed); the two loops then
# differ by at most twice the change this perturbation causes. (Measured: the actual differences are 5 to 18 times
# below that bound for the MEDIUM, STRONG and MAX presets, whose s_S up to 5000 magnifies eps_c - eps_S.)
POST_UNET_ROUNDINGS = 16


def run(pipe: Any, **kwargs: Any) -> Tensor:
    return pipe(
        PROMPTS,
        num_inference_steps=STEPS,
        height=HW,
        width=HW,
        output_type="latent",
        generator=generators(SEEDS),
        **kwargs,
    ).images


def rounding_bound(unet: Any, sample: Any) -> float:
    """Twice the max change of ``sample()`` when ``unet``'s outputs move by POST_UNET_ROUNDINGS roundings."""
    reference = sample()
    with perturbed(unet, depth=POST_UNET_ROUNDINGS):
        return 2 * float((sample() - reference).abs().max())


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
        generator=generators(SEEDS),
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
    assert float((got - want).abs().max()) <= rounding_bound(
        handle.unet, lambda: run(fresh, negative_prompt=negative_prompt)
    )
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

    config, g = SLDConfig.medium().with_(warmup_steps=1), ConstantGuidance(beta=0.3)
    bank = torch.randn(5, 4, HW // 2, HW // 2, generator=torch.Generator().manual_seed(0))
    sld_only = attach_sld(fresh, config, concept=CONCEPT)
    alone = run(fresh)
    attach(fresh, bank, ConstantGuidance(beta=0.0))
    assert torch.equal(run(fresh), alone)  # beta = 0 adds nothing on top of SLD
    detach(fresh)
    attach(fresh, bank, g)
    both = run(fresh)
    bound = rounding_bound(sld_only.unet, lambda: run(fresh))
    assert (both - alone).abs().max() > 0.1

    sched = make_scheduler("ddim", fresh.scheduler.config)
    sched.set_timesteps(STEPS)
    cond, uncond = fresh.encode_prompt(PROMPTS, "cpu", 1, True)
    emb = torch.cat([uncond, cond, sld_only.safety_embedding.expand(len(PROMPTS), -1, -1)])
    x = randn_tensor((2, 4, HW // 2, HW // 2), generator=generators(SEEDS)) * sched.init_noise_sigma
    momentum, banks = None, PreparedBanks.prepare(bank, g)
    with torch.no_grad():
        for i, t in enumerate(sched.timesteps):
            u, c, s = sld_only.unet(torch.cat([x] * 3), t, encoder_hidden_states=emb).sample.chunk(3)
            eps, momentum = sld_noise_pred(u, c, s, W, momentum, i, config)
            eps, _ = theorem_correction(eps, x, sched.alphas_cumprod[int(t)], t, banks, g)
            x = sched.step(eps, t, x).prev_sample
    assert float((both - x).abs().max()) <= bound


# ---- tensor step index, the shared batching helper ------------------------------------------------------------------
def test_tensor_step_index_equals_the_int_one() -> None:
    """A (B,) step tensor (the exported graph's input) gives, per sample, what the Python int gives."""
    gen = torch.Generator().manual_seed(0)
    u, p, s, nu = (torch.randn(3, 2, 4, 4, generator=gen) for _ in range(4))
    cfg = SLDConfig(guidance_scale=10.0, warmup_steps=2, threshold=0.05, momentum_scale=0.5, mom_beta=0.25)
    steps = torch.tensor([0, 2, 5])
    term, mom = sld_guidance(u, p, s, nu, steps, cfg)
    for i, step in enumerate(steps.tolist()):
        want_term, want_mom = sld_guidance(u[i : i + 1], p[i : i + 1], s[i : i + 1], nu[i : i + 1], step, cfg)
        assert torch.equal(term[i : i + 1], want_term) and torch.equal(mom[i : i + 1], want_mom)
    assert torch.equal(term[0], torch.zeros_like(term[0])) and bool(term[1].abs().max() > 0)
    for step in (1, 2):  # a 0-d tensor acts like the int
        assert torch.equal(
            sld_guidance(u, p, s, nu, torch.tensor(step), cfg)[0], sld_guidance(u, p, s, nu, step, cfg)[0]
        )
    with pytest.raises(ValueError, match="step_index"):
        sld_guidance(u, p, s, nu, torch.tensor(1.0), cfg)


def test_append_safety_branch() -> None:
    x = torch.arange(4.0).reshape(4, 1)  # [uncond (2); cond (2)]
    assert append_safety_branch(x).flatten().tolist() == [0, 1, 2, 3, 2, 3]  # shared inputs: the cond half again
    emb = torch.randn(4, 3, 5)
    one = torch.randn(1, 3, 5)
    out = append_safety_branch(emb, one)
    assert out.shape == (6, 3, 5) and torch.equal(out[:4], emb) and torch.equal(out[4:], one.expand(2, 3, 5))
    labels = torch.tensor([10, 10, 3, 5])
    assert append_safety_branch(labels, torch.tensor([8])).tolist() == [10, 10, 3, 5, 8, 8]
    assert append_safety_branch(labels, torch.tensor([8, 1])).tolist() == [10, 10, 3, 5, 8, 1]
    with pytest.raises(ValueError, match="3 items for a batch of 2"):
        append_safety_branch(labels, torch.tensor([8, 1, 2]))
    with pytest.raises(ValueError, match="item shape"):
        append_safety_branch(emb, torch.randn(1, 3, 4))


# ---- class-label conditioning (the demo model) -------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits() -> Any:
    from safe_denoiser.demo.pipeline import DigitsPipeline

    return DigitsPipeline.from_bundled("ddim")


def test_class_sld_uses_the_pipelines_cfg_flag(digits: Any) -> None:
    """Two identical images at guidance scale 1 (one branch, batch 2 with equal halves) are not a CFG call."""
    from safe_denoiser.demo.class_sld import ClassSLDUNet, attach_class_sld, detach_class_sld

    noise = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(4)).expand(2, 1, 8, 8).clone()
    kw: dict[str, Any] = {"num_inference_steps": 3, "output_type": "latent", "latents": noise}
    plain = digits([3, 3], guidance_scale=1.0, **kw).images
    handle = attach_class_sld(digits, 8, SLDConfig.max())
    try:
        assert (
            isinstance(handle, SLDUNet) and isinstance(handle, ClassSLDUNet) and handle.conditioning == "class_labels"
        )
        assert torch.equal(digits([3, 3], guidance_scale=1.0, **kw).images, plain) and handle.step_index == 0
        digits([3, 3], guidance_scale=2.0, **kw)  # a CFG call: SLD runs (3 steps)
        assert handle.step_index == 3
        with pytest.raises(ValueError, match="already attached"):
            attach_sld(digits, "max")  # any SLD wrapper counts
    finally:
        detach_class_sld(digits)
    attach_class_sld(digits, [8, 1])  # one safety class per image: the batch must have two
    try:
        with pytest.raises(ValueError, match="2 items for a batch of 3"):
            digits([3, 3, 3], guidance_scale=2.0, num_inference_steps=1, output_type="latent")
    finally:
        detach_class_sld(digits)
