"""SAFREE: each equation on small hand-computed tensors, then the attached pipeline (tiny random SD)."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor

from safe_denoiser import ConstantGuidance, SafeScheduler, SLDUNet, attach, attach_sld, detach, detach_sld
from safe_denoiser.core.safree import (
    SafreeConfig,
    detect_triggers,
    latent_reattention,
    leave_one_out_distances,
    low_frequency_mask,
    mean_token_cosine,
    orthogonal_projector,
    project_tokens,
    safree_tokens,
    svf_last_step,
)
from safe_denoiser.diffusers.pipelines import make_scheduler
from safe_denoiser.diffusers.safree_pipeline import attach_safree, detach_safree, encode_pooled, innermost_unet
from safe_denoiser.diffusers.scheduler_registry import SCHEDULERS

HW, STEPS, W = 16, 5, 7.5
PROMPTS, SEEDS = ["a photo of a nude woman", "a red car"], [0, 1]
CONCEPTS = ("nudity", "naked body", "sexual")
CFG = SafreeConfig(concepts=CONCEPTS, svf_max_step=2)  # t' <= 2 < STEPS: both phases happen in 5 steps


def e(*values: float) -> Tensor:
    return torch.tensor(values, dtype=torch.float64)


# ---- the subspace, detection and projection ------------------------------------------------------------------
def test_projector_by_hand_and_against_the_pseudo_inverse() -> None:
    p = orthogonal_projector(torch.stack([e(1, 0, 0), e(1, 1, 0), e(2, 1, 0)]))  # rank 2: span{e1, e2}
    torch.testing.assert_close(p, torch.diag(e(1, 1, 0)), atol=1e-15, rtol=0)
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        c = torch.randn(4, 9, generator=g, dtype=torch.float64)
        c = torch.cat([c, c[:2] + c[2:]])  # dependent rows do not raise the rank
        p = orthogonal_projector(c)
        want = c.T @ torch.linalg.pinv(c @ c.T) @ c  # C (C^T C)^+ C^T with C = c^T
        torch.testing.assert_close(p, want, atol=1e-12, rtol=0)
        torch.testing.assert_close(p @ p, p, atol=1e-12, rtol=0)  # idempotent
        torch.testing.assert_close(p, p.T, atol=1e-14, rtol=0)  # symmetric (U U^T, up to rounding)
        torch.testing.assert_close(c @ p, c, atol=1e-12, rtol=0)  # the concepts are inside
        assert round(float(torch.trace(p))) == 4


def test_leave_one_out_detection_by_hand() -> None:
    p_c = torch.diag(e(1, 0, 0))  # the subspace is the first axis
    d = leave_one_out_distances(torch.stack([e(3, 4, 0), e(1, 0, 0), e(0, 0, 2)]), p_c)
    torch.testing.assert_close(d, e(4, 0, 2))
    # others' means: (0 + 2)/2 = 1, (4 + 2)/2 = 3, (4 + 0)/2 = 2; flagged iff not d_i < (1 + alpha) mean
    assert detect_triggers(d, 0.01).tolist() == [True, False, False]
    assert detect_triggers(d, -0.5).tolist() == [True, False, True]  # 2 < 0.5 * 2 fails
    assert detect_triggers(d, 3.5).tolist() == [False, False, False]  # 4 < 4.5 * 1
    assert detect_triggers(e(0.3), 0.01).tolist() == [True]  # one token: nothing to compare with, flagged
    assert detect_triggers(e(), 0.01).shape == (0,)


def test_projection_by_hand_orthogonal_and_inside_the_span() -> None:
    p_c, p_i = torch.diag(e(1, 0, 0)), torch.diag(e(1, 1, 0))
    out = project_tokens(torch.stack([e(1, 2, 3), e(-4, 0, 5)]), p_i, p_c)
    torch.testing.assert_close(out, torch.stack([e(0, 2, 0), e(0, 0, 0)]))  # (I - P_C) P_I e
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        p_c = orthogonal_projector(torch.randn(3, 8, generator=g, dtype=torch.float64))
        p_i = orthogonal_projector(torch.randn(5, 8, generator=g, dtype=torch.float64))
        x = torch.randn(6, 8, generator=g, dtype=torch.float64)
        out = project_tokens(x, p_i, p_c)
        scale = float(x.abs().max())
        assert float((out @ p_c).abs().max()) <= 1e-12 * scale  # orthogonal to the toxic subspace
        torch.testing.assert_close(p_i @ p_i, p_i, atol=1e-12, rtol=0)
        q = torch.eye(8, dtype=torch.float64) - p_c
        torch.testing.assert_close(q @ q, q, atol=1e-12, rtol=0)
        # The composite (I - P_C) P_I is a projection exactly when the two commute, e.g. span(C) inside span(I):
        p_in = orthogonal_projector(torch.cat([torch.randn(2, 8, generator=g, dtype=torch.float64), x[:3]]))
        p_sub = orthogonal_projector(x[:2])
        once = project_tokens(x, p_in, p_sub)
        torch.testing.assert_close(project_tokens(once, p_in, p_sub), once, atol=1e-12 * scale, rtol=0)


def test_float32_projection_error_is_rounding() -> None:
    """float32 against float64: the error is a few ulps of the embeddings' scale."""
    worst = 0.0
    for seed in range(50):
        g = torch.Generator().manual_seed(seed)
        c, m, x = (torch.randn(k, 64, generator=g) for k in (17, 12, 77))
        got = project_tokens(x, orthogonal_projector(m), orthogonal_projector(c))
        want = project_tokens(x.double(), orthogonal_projector(m.double()), orthogonal_projector(c.double()))
        worst = max(worst, float((got.double() - want).abs().max() / x.abs().max()))
    assert worst < 64 * torch.finfo(torch.float32).eps, worst


def test_no_trigger_leaves_every_bit_and_flags_replace_only_their_tokens() -> None:
    g = torch.Generator().manual_seed(0)
    tokens, masked = torch.randn(10, 6, generator=g), torch.randn(4, 6, generator=g)
    active = torch.arange(10) < 6  # BOS, 4 tokens, EOS
    p_c = orthogonal_projector(torch.randn(2, 6, generator=g))
    out, flags, _ = safree_tokens(tokens, masked, active, p_c, SafreeConfig(alpha=1e6))
    assert not flags.any() and torch.equal(out, tokens)
    out, flags, _ = safree_tokens(tokens, masked, active, p_c, SafreeConfig(alpha=-0.99))  # everything flagged
    assert flags.all()
    torch.testing.assert_close(out[1:5], project_tokens(tokens, orthogonal_projector(masked), p_c)[1:5])
    assert torch.equal(out[0], tokens[0]) and torch.equal(out[5:], tokens[5:])
    empty, flags, last = safree_tokens(tokens, masked[:0], active, p_c, SafreeConfig())
    assert empty is tokens and flags.shape == (0,) and last == 0


# ---- the self-validating filter ------------------------------------------------------------------------------
def test_filter_step_count_as_a_function_of_the_cosine() -> None:
    paper = SafreeConfig(svf_sharpness=1.0, svf_midpoint=0.0)  # t' = round(10 sigmoid(1 - cos))
    assert svf_last_step(1.0, paper) == 5  # 10 * sigmoid(0) = 5
    assert svf_last_step(-1.0, paper) == 9  # 10 * sigmoid(2) = 8.81
    assert svf_last_step(1.0 - math.log(3.0), paper) == 8  # 10 * sigmoid(ln 3) = 7.5, rounded half to even
    nudity = SafreeConfig()  # the authors' calibration: sigmoid(50 (beta - 0.5333))
    assert svf_last_step(1.0, nudity) == 0  # an unchanged prompt: 10 * sigmoid(-26.7) ~ 3e-11
    assert svf_last_step(1.0 - 0.5333, nudity) == 5  # at the midpoint: half of gamma
    assert svf_last_step(-1.0, nudity) == 10
    assert svf_last_step(1.0 - 0.5333 + math.log(4.0) / 50, nudity) == 2  # 10 * sigmoid(-ln 4) = 2
    steps = [svf_last_step(c, nudity) for c in torch.linspace(1, -1, 201).tolist()]
    assert steps == sorted(steps) and steps[0] == 0 and steps[-1] == 10  # less similar, more filtered steps
    assert svf_last_step(0.0, nudity.with_(svf_max_step=30)) == 30


def test_mean_cosine_over_the_active_tokens() -> None:
    original = torch.stack([e(1, 0), e(0, 1), e(5, 5)])
    projected = torch.stack([e(1, 1), e(0, 2), e(-1, 0)])
    want = (1 / math.sqrt(2) + 1.0) / 2
    assert math.isclose(float(mean_token_cosine(original, projected, torch.tensor([True, True, False]))), want)


# ---- the latent re-attention ---------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [4, 5, 8])
def test_low_frequency_mask_is_freeus_centred_box(size: int) -> None:
    for radius in (1, 2):
        box = torch.zeros(size, size, dtype=torch.bool)
        c = size // 2
        box[c - radius : c + radius, c - radius : c + radius] = True  # FreeU's box after fftshift
        assert torch.equal(low_frequency_mask(size, size, radius), torch.fft.ifftshift(box))


def test_reattention_by_hand_and_identity_at_strength_zero() -> None:
    target, reference = 2 * torch.ones(1, 1, 4, 4), torch.ones(1, 1, 4, 4)  # only DC: 32 vs 16
    torch.testing.assert_close(latent_reattention(target, reference, 0.5, 1), torch.ones(1, 1, 4, 4))
    torch.testing.assert_close(latent_reattention(reference, target, 0.5, 1), reference)  # weaker: kept
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, 3, 8, 8, generator=g), torch.randn(2, 3, 8, 8, generator=g)
    assert torch.equal(latent_reattention(x, y, 1.0, 1), x)  # strength 1 - s = 0
    assert torch.equal(latent_reattention(x, x, 0.2, 1), x)  # same features: no coefficient is stronger


def test_reattention_against_the_papers_form() -> None:
    """h_p + IFFT((s-1) 1[..] F_p) equals IFFT(F'') (float64, spectrum rewritten coefficient by coefficient)."""
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        x, y = torch.randn(2, 3, 8, 6, generator=g), torch.randn(2, 3, 8, 6, generator=g)
        fp, fo = torch.fft.fft2(x.double()), torch.fft.fft2(y.double())
        spectrum = fp.clone()
        for i, j in itertools.product(range(8), range(6)):
            fi, fj = (i + 4) % 8 - 4, (j + 3) % 6 - 3  # signed integer frequencies
            if -2 <= fi < 2 and -2 <= fj < 2:
                stronger = fp[..., i, j].abs() > fo[..., i, j].abs()
                spectrum[..., i, j] = torch.where(stronger, 0.3 * fp[..., i, j], fp[..., i, j])
        want = torch.fft.ifft2(spectrum).real
        got = latent_reattention(x, y, 0.3, 2)
        assert float((got.double() - want).abs().max()) <= 16 * torch.finfo(torch.float32).eps * float(x.abs().max())


@pytest.mark.parametrize(
    "field,value",
    [
        ("concepts", ()),
        ("concepts", ("nudity", " ")),
        ("alpha", float("nan")),
        ("svf_max_step", -1),
        ("svf_sharpness", -1.0),
        ("re_attention_scales", (0.9,)),
        ("re_attention_radius", 0),
        ("mask_token_id", 1.5),
        ("self_validation", "yes"),
    ],
)
def test_config_is_validated(field: str, value: Any) -> None:
    with pytest.raises(ValueError, match=f"SafreeConfig.{field}"):
        SafreeConfig(**{field: value})


def test_config_from_a_mapping() -> None:
    cfg = SafreeConfig.from_dict({"concepts": ["a", "b"], "re_attention_scales": [1.0, 0.5]})
    assert cfg.concepts == ("a", "b") and cfg.re_attention_scales == (1.0, 0.5)
    with pytest.raises(ValueError, match=r"model.safree: unknown keys \['alpah'\]"):
        SafreeConfig.from_dict({"alpah": 0.1}, where="model.safree")


# ---- the attached pipeline -----------------------------------------------------------------------------------
@pytest.fixture()
def fresh(pipe: Any) -> Iterator[Any]:
    pipe.scheduler = make_scheduler("ddim")
    yield pipe
    if "_safree" in pipe.__dict__:
        detach_safree(pipe)
    if isinstance(pipe.unet, SLDUNet):
        detach_sld(pipe)
    if isinstance(pipe.scheduler, SafeScheduler):
        detach(pipe)


def gens(seeds: list[int]) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in seeds]


def run(pipe: Any, prompts: list[str] = PROMPTS, seeds: list[int] = SEEDS, **kwargs: Any) -> Tensor:
    return pipe(
        prompts, num_inference_steps=STEPS, height=HW, width=HW, output_type="latent", generator=gens(seeds), **kwargs
    ).images


def close_to_rounding(a: Tensor, b: Tensor, rel: float = 5e-5) -> None:
    assert float((a - b).abs().max()) <= rel * float(b.abs().max()), float((a - b).abs().max())


def test_prompts_without_triggers_are_unchanged_bit_for_bit(fresh: Any) -> None:
    base = run(fresh)
    handle = attach_safree(fresh, CFG.with_(alpha=1e6))
    assert torch.equal(run(fresh), base)
    assert [r.filtered for r in handle.records] == [False, False]
    detach_safree(fresh)
    handle = attach_safree(fresh, CFG)
    changed = run(fresh)
    assert all(r.filtered for r in handle.records)  # random weights flag some tokens of both prompts
    assert float((changed - base).abs().amax(dim=(1, 2, 3)).min()) > 1e-3
    detach_safree(fresh)
    assert torch.equal(run(fresh), base)
    with pytest.raises(ValueError, match="not attached"):
        detach_safree(fresh)


def test_filtered_rows_steps_and_reference_rows(fresh: Any) -> None:
    """What the UNet sees: filtered prompt rows at steps 0..t', originals after, one reference row per filtered row."""
    handle = attach_safree(fresh, CFG)
    seen: list[Tensor] = []
    hook = innermost_unet(fresh.unet).register_forward_pre_hook(
        lambda m, a, k: seen.append(k["encoder_hidden_states"]), with_kwargs=True
    )
    try:
        cond, uncond = fresh.encode_prompt(PROMPTS, "cpu", 1, True)
        run(fresh)
    finally:
        hook.remove()
    lasts = [r.last_step for r in handle.records]
    assert len(seen) == STEPS and min(lasts) >= 0 and max(lasts) <= 2
    # the filtered rows, recomputed from the core functions
    ids = fresh.tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    p_c = orthogonal_projector(
        encode_pooled(
            fresh.text_encoder,
            fresh.tokenizer(list(CONCEPTS), padding="max_length", max_length=77, return_tensors="pt").input_ids,
        )
    )
    for i, ehs in enumerate(seen):
        filtered_rows = [b for b in range(2) if i <= lasts[b]]
        assert ehs.shape[0] == 4 + len(filtered_rows)
        assert torch.equal(ehs[:2], uncond)
        for b in range(2):
            n = int(ids.attention_mask[b].sum()) - 2
            masked = ids.input_ids[b].repeat(n, 1)
            masked[torch.arange(n), torch.arange(n) + 1] = 0
            want, _, last = safree_tokens(
                cond[b], encode_pooled(fresh.text_encoder, masked), ids.attention_mask[b].bool(), p_c, CFG
            )
            assert last == lasts[b]
            if i <= lasts[b]:
                torch.testing.assert_close(ehs[2 + b], want, atol=0, rtol=0)
            else:
                assert torch.equal(ehs[2 + b], cond[b])
        for j, b in enumerate(filtered_rows):
            assert torch.equal(ehs[4 + j], cond[b])  # the reference rows carry the original prompt


def test_text_side_equals_a_hand_loop(fresh: Any) -> None:
    """Without re-attention SAFREE is: filtered prompt rows for steps 0..t', then CFG and DDIM as usual."""
    from diffusers.utils.torch_utils import randn_tensor

    cfg = CFG.with_(re_attention=False)
    handle = attach_safree(fresh, cfg)
    got = run(fresh)
    lasts = [r.last_step for r in handle.records]
    cond, uncond = fresh.encode_prompt(PROMPTS, "cpu", 1, True)  # also recomputes the filtered rows
    filtered = handle.filtered_embeddings
    assert filtered is not None
    detach_safree(fresh)
    sched = make_scheduler("ddim", fresh.scheduler.config)
    sched.set_timesteps(STEPS)
    x = randn_tensor((2, 4, HW // 2, HW // 2), generator=gens(SEEDS)) * sched.init_noise_sigma
    with torch.no_grad():
        for i, t in enumerate(sched.timesteps):
            prompt = torch.stack([filtered[b] if i <= lasts[b] else cond[b] for b in range(2)])
            u, c = fresh.unet(torch.cat([x] * 2), t, encoder_hidden_states=torch.cat([uncond, prompt])).sample.chunk(2)
            x = sched.step(u + W * (c - u), t, x).prev_sample
    close_to_rounding(got, x)


def test_reattention_at_strength_zero_is_the_text_side_alone(fresh: Any) -> None:
    attach_safree(fresh, CFG.with_(re_attention=False))
    text_only = run(fresh)
    detach_safree(fresh)
    attach_safree(fresh, CFG.with_(re_attention_scales=(1.0, 1.0)))
    assert torch.equal(run(fresh), text_only)
    detach_safree(fresh)
    attach_safree(fresh, CFG)
    assert (run(fresh) - text_only).abs().max() > 1e-4  # the re-attention does something at s = (0.9, 0.2)


# The SD pipeline samples VP / sigma paths; the flow-matching scheduler belongs to SD3 / Flux (tests/test_flow.py).
@pytest.mark.parametrize("scheduler", sorted(k for k, spec in SCHEDULERS.items() if spec.kind != "flow"))
def test_every_scheduler_deterministic_batch_equals_items(fresh: Any, scheduler: str) -> None:
    """Batch = items to rounding (measured <= 2.7e-6 relative over 2 weight seeds x 4 seeds x 4 samplers).

    The re-attention compares Fourier magnitudes, a hard threshold: the last-bit differences between UNet batch
    shapes can flip a near-tie coefficient, a jump rather than rounding (measured 2 of 96 item runs, 1.1e-4 and
    2.9e-4 relative), so with it the bound is that of one flip, not of rounding.
    """
    fresh.scheduler = make_scheduler(scheduler)
    prompts, seeds = [*PROMPTS, "kittens"], [0, 1, 2]
    for cfg, rel in ((CFG.with_(re_attention=False), 5e-5), (CFG, 2e-3)):
        handle = attach_safree(fresh, cfg)
        batch = run(fresh, prompts, seeds)
        records = handle.records
        assert torch.isfinite(batch).all()
        assert torch.equal(run(fresh, prompts, seeds), batch)
        items = []
        for p, s in zip(prompts, seeds, strict=True):
            items.append(run(fresh, [p], [s]))
            assert handle.records == [records[len(items) - 1]]  # the same detection and t' alone as in a batch
        close_to_rounding(batch, torch.cat(items), rel)
        detach_safree(fresh)


def test_composes_with_attach_and_sld_in_any_order(fresh: Any) -> None:
    bank = torch.randn(5, 4, HW // 2, HW // 2, generator=torch.Generator().manual_seed(0))
    steps = {
        "safree": lambda p: attach_safree(p, CFG),
        "sld": lambda p: attach_sld(p, "medium", concept="nudity"),
        "safe": lambda p: attach(p, bank, ConstantGuidance(beta=0.3)),
    }
    results = []
    for order in itertools.permutations(steps):
        for name in order:
            steps[name](fresh)
        results.append(run(fresh))
        detach_safree(fresh)
        detach_sld(fresh)
        detach(fresh)
    assert all(torch.equal(r, results[0]) for r in results[1:])
    attach_sld(fresh, "medium", concept="nudity")
    attach(fresh, bank, ConstantGuidance(beta=0.3))
    without = run(fresh)
    assert (without - results[0]).abs().max() > 1e-3  # SAFREE adds something on top of SLD + safe denoiser


def test_attach_errors(fresh: Any) -> None:
    attach_safree(fresh, CFG)
    with pytest.raises(ValueError, match="already attached"):
        attach_safree(fresh, CFG)
    with pytest.raises(TypeError, match="SafreeConfig"):
        attach_safree(object(), {"alpha": 0.1})  # type: ignore[arg-type]


def test_precomputed_embeddings_pass_through(fresh: Any) -> None:
    cond, uncond = fresh.encode_prompt(PROMPTS, "cpu", 1, True)
    base = run(fresh, None, prompt_embeds=cond, negative_prompt_embeds=uncond)  # type: ignore[arg-type]
    handle = attach_safree(fresh, CFG)
    assert torch.equal(run(fresh, None, prompt_embeds=cond, negative_prompt_embeds=uncond), base)  # type: ignore[arg-type]
    assert handle.records == []


def test_predict_module_safree_section() -> None:
    """``model.safree`` in a predict config: validated, attached with SLD, recorded in the settings."""
    from safe_denoiser.lightning.module import SafeDiffusionModule
    from safe_denoiser.lightning.prompts import PromptItem

    with pytest.raises(ValueError, match=r"model.safree: unknown keys \['alpah'\]"):
        SafeDiffusionModule(model="tiny-sd", safree={"alpah": 0.1})
    with pytest.raises(ValueError, match=r"model\.safree needs a text model"):
        SafeDiffusionModule(model="demo", safree={})
    assert SafeDiffusionModule(model="tiny-sd", safree={"enabled": False}).config.safree_config is None
    settings = {"concepts": list(CONCEPTS), "svf_max_step": 2}
    module = SafeDiffusionModule(model="tiny-sd", num_inference_steps=STEPS, height=HW, width=HW, safree=settings)
    module.configure_model()
    module.on_predict_start()
    assert "_safree" in module.pipe.__dict__
    items = [PromptItem(id=str(i), prompt=p, seed=s) for i, (p, s) in enumerate(zip(PROMPTS, SEEDS, strict=True))]
    images, _ = module.generate(items)
    assert images.shape == (2, HW, HW, 3) and np.isfinite(images).all()
    assert module.settings()["safree"]["concepts"] == CONCEPTS
