"""The numpy DDPM sampler (``safe_denoiser/runtime/ddpm_sampler.py``, ``Bundle.sample(sampler="ddpm")``) vs diffusers.

Step: diffusers' ``DDPMScheduler.step`` run in float64 (its alphas_cumprod promoted) is the reference; the numpy
float32 step and diffusers' own float32 step both lie within a bound derived from float32 rounding (``step_bound``),
so they agree with each other within twice it. Loop: a whole DDPM loop through an exported demo bundle against the
PyTorch DigitsPipeline with its DDPM scheduler (``safe_denoiser.attach``), fed the same Philox noises, within twice
the change that rounding-sized UNet perturbations cause (``step_bounds.perturbed``), correcting at the same steps.
"""

from __future__ import annotations

import copy
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from diffusers.schedulers import scheduling_ddpm

from safe_denoiser import attach, detach
from safe_denoiser.export.exporter import _scheduler_info, export_bundle, load_source
from safe_denoiser.runtime.bundle import Bundle, ddim_timesteps
from safe_denoiser.runtime.ddpm_sampler import ddpm_step
from safe_denoiser.runtime.manifest import SchedulerInfo
from safe_denoiser.runtime.noise import INITIAL_STREAM, ddpm_stream, gaussian_noise

from step_bounds import U32, perturbed

SD_CONFIG = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "clip_sample": False}


def schedulers() -> list[DDPMScheduler]:
    """The demo's DDPM scheduler (cosine, trailing, clipped) and SD's (scaled linear, leading + offset, linspace)."""
    from safe_denoiser.demo.pipeline import DigitsPipeline

    demo = DDPMScheduler.from_config(DigitsPipeline.from_bundled("ddpm").scheduler.config)
    sd = [DDPMScheduler(**SD_CONFIG, timestep_spacing=s, steps_offset=o) for s, o in (("leading", 1), ("linspace", 0))]
    return [demo, *sd]


def step_bound(info: SchedulerInfo, t: int, prev_t: int, x: np.ndarray, eps: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Element-wise bound on |float32 DDPM step - exact step| (inputs exact in float32; first order, doubled).

    Each float32 operation rounds by at most u relative (powf: 2u). x0 = (x - sqrt(1 - a) eps) / sqrt(a): 8u on its
    terms; clipping is 1-Lipschitz. beta = 1 - a / a_prev cancels: its absolute error is u (a / a_prev + beta) = u.
    c0 = sqrt(a_prev) beta / (1 - a): 5u relative plus sqrt(a_prev) / (1 - a) u. cx = sqrt(a / a_prev) (1 - a_prev)
    / (1 - a): 7u. var = (1 - a_prev) / (1 - a) beta: 4u var + (1 - a_prev) / (1 - a) u; std = sqrt(var): half that
    over std, plus 2u std (3u when var is the 1e-20 floor). The sum c0 x0 + cx x + std z: 3u on its terms.
    """
    u = U32
    a = float(np.float32(info.alphas_cumprod[t]))
    ap = float(np.float32(info.alphas_cumprod[prev_t])) if prev_t >= 0 else 1.0
    x, eps, z = (np.abs(v.astype(np.float64)) for v in (x, eps, z))
    beta = 1 - a / ap
    c0, cx = ap**0.5 * beta / (1 - a), (a / ap) ** 0.5 * (1 - ap) / (1 - a)
    x0 = np.minimum((x + (1 - a) ** 0.5 * eps) / a**0.5, 1.0 if info.ddpm["clip_sample"] else np.inf)
    d_x0 = 8 * u * (x + (1 - a) ** 0.5 * eps) / a**0.5
    d_c0, d_cx = 5 * u * c0 + ap**0.5 / (1 - a) * u, 7 * u * cx
    var = (1 - ap) / (1 - a) * beta
    std = max(var, 1e-20) ** 0.5 if t > 0 else 0.0
    d_std = (
        0.0
        if t == 0
        else (3 * u * std if ap == 1.0 else (4 * u * var + (1 - ap) / (1 - a) * u) / (2 * std) + 2 * u * std)
    )
    terms = c0 * x0 + cx * x + std * z
    return 2 * (d_c0 * x0 + c0 * d_x0 + d_cx * x + d_std * z + 3 * u * terms)


def diffusers_step(sched: DDPMScheduler, eps: Any, t: int, x: Any, z: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    """``DDPMScheduler.step`` with its variance noise replaced by ``z``."""
    monkeypatch.setattr(scheduling_ddpm, "randn_tensor", lambda shape, **kw: z.to(kw.get("dtype") or z.dtype))
    return sched.step(eps, t, x).prev_sample


def test_ddpm_step_equals_diffusers_within_float32_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    worst = 0.0
    for sched32 in schedulers():
        info = _scheduler_info(SimpleNamespace(scheduler=sched32))
        assert info.ddpm["variance_type"] == "fixed_small"
        sched64 = copy.deepcopy(sched32)
        sched64.alphas_cumprod, sched64.one = sched32.alphas_cumprod.double(), sched32.one.double()
        for steps in (1, 4, 10, 50, 999):  # leading + offset 1 at 1000 steps passes T (diffusers too)
            sched32.set_timesteps(steps)
            sched64.set_timesteps(steps)
            ts = ddim_timesteps(info, steps, info.ddpm)
            assert np.array_equal(ts, sched32.timesteps.numpy())
            rng = np.random.default_rng(steps)
            for i, t in enumerate(ts.tolist()):
                prev_t = int(ts[i + 1]) if i + 1 < steps else -1
                x, eps, z = (rng.standard_normal((2, 1, 8, 8)).astype(np.float32) * s for s in (1.5, 1.0, 1.0))
                got = ddpm_step(eps, t, prev_t, x, z, info)
                want = diffusers_step(
                    sched64,
                    *(torch.from_numpy(v).double() for v in (eps,)),
                    t,
                    torch.from_numpy(x).double(),
                    torch.from_numpy(z).double(),
                    monkeypatch,
                ).numpy()
                theirs = diffusers_step(
                    sched32, torch.from_numpy(eps), t, torch.from_numpy(x), torch.from_numpy(z), monkeypatch
                ).numpy()
                bound = step_bound(info, t, prev_t, x, eps, z)
                for value in (got, theirs):
                    err = np.abs(value.astype(np.float64) - want)
                    assert (err <= bound).all(), (steps, t, float((err / bound).max()))
                    worst = max(worst, float((err / bound).max()))
    print(f"DDPM step: worst |float32 - float64| / bound {worst:.3f}")


def test_ddpm_step_needs_settings_and_noise() -> None:
    info = _scheduler_info(SimpleNamespace(scheduler=DDPMScheduler(**SD_CONFIG)))
    x = np.zeros((1, 1, 2, 2), np.float32)
    with pytest.raises(ValueError, match="needs noise"):
        ddpm_step(x, 10, 0, x, None, info)
    old = SchedulerInfo(info.type, info.config, info.alphas_cumprod, info.sigmas, info.final_alpha_cumprod, info.ddim)
    with pytest.raises(ValueError, match=r"scheduler\.ddpm"):
        ddpm_step(x, 10, 0, x, x, old)
    learned = SchedulerInfo(**{**info.__dict__, "ddpm": {**info.ddpm, "variance_type": "learned"}})
    with pytest.raises(ValueError, match="variance_type"):
        ddpm_step(x, 10, 0, x, x, learned)


@pytest.fixture(scope="module")
def demo_ddpm(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    args = {
        "model": "demo",
        "scheduler": "ddpm",
        "num_inference_steps": 10,
        "guidance_scale": 2.0,
        "bank": "bundled",
        "safe_denoiser": {"preset": "constant", "beta": 0.5, "window": [300, 800], "gate_log_mass": -200.0},
    }
    source = load_source(args)
    out = tmp_path_factory.mktemp("ddpm") / "demo"
    export_bundle(source, out)
    return source, out


def test_ddpm_loop_equals_pytorch_pipeline(demo_ddpm: tuple[Any, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """Bundle.sample(sampler="ddpm", seed=...) vs DigitsPipeline + DDPMScheduler given the same Philox noises."""
    source, out = demo_ddpm
    labels, seed, steps = [7, 1, 0], 5, 10
    got = Bundle(out).sample(labels, seed=seed, steps=steps, sampler="ddpm")
    init = np.stack([gaussian_noise(seed, i, INITIAL_STREAM, 64).reshape(1, 8, 8) for i in range(3)])
    step_noise = [
        torch.from_numpy(np.stack([gaussian_noise(seed, i, ddpm_stream(s), 64).reshape(1, 8, 8) for i in range(3)]))
        for s in range(steps)
    ]

    def run() -> np.ndarray:
        queue = list(step_noise)
        monkeypatch.setattr(scheduling_ddpm, "randn_tensor", lambda shape, **kw: queue.pop(0))
        images = source.pipe(
            class_labels=labels,
            latents=torch.from_numpy(init),
            guidance_scale=2.0,
            num_inference_steps=steps,
            output_type="latent",
        ).images
        return images.numpy()

    assert isinstance(source.pipe.scheduler, DDPMScheduler)
    handle = attach(source.pipe, source.bank, source.guidance, record=True)
    try:
        ref = run()
        ref_applied = torch.stack([tr.record.applied for tr in handle.records]).numpy()
        with perturbed(source.pipe.unet):
            moved = run()
    finally:
        detach(source.pipe)
    rel = float(np.linalg.norm(got.sample - ref) / np.linalg.norm(ref))
    tol = 2 * float(np.linalg.norm(moved - ref) / np.linalg.norm(ref))
    print(f"DDPM demo loop: rel err {rel:.2e} (bound {tol:.2e})")
    assert rel <= tol
    assert got.applied is not None and np.array_equal(got.applied, ref_applied) and got.applied.any()
    ddim = Bundle(out).sample(labels, seed=seed, steps=steps).sample
    assert np.abs(ddim - got.sample).max() > 1e-2  # the DDPM noise made a difference
    with pytest.raises(ValueError, match="sampler"):
        Bundle(out).sample(labels, seed=seed, sampler="euler")
