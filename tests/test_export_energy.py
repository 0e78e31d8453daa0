"""The energy presets (SGF's MMD gradient, Shielded Diffusion's sparse repellency) exported and run by both runtimes.

Bundles: the tiny SD-1.x text model with a bank of its own unguided final latents (preset ``sgf`` with a window
whose cosine ramp gives one of the four DDIM steps a partial weight; preset ``shielded`` with a radius of 1.2 x the
bank's median nearest-neighbour distance, ``suggest_radius``, so that the balls reach the trajectories: it fires at
some steps and not at others), and the tiny SD3 with ``sgf`` (rectified flow, FlowMatch Euler in both runtimes).
Neither preset adds a graph input: both read only the bank constant and re-noise nothing.

Tolerances as in test_export.py / test_export_flow.py (``step_bounds``): each denoiser output within twice the
float32 error bound of the float64 step; the whole loop through onnxruntime within twice the relative change that
rounding-sized network perturbations cause in the PyTorch loop (``attach``, same noise), with the correction firing
at the same steps. C++ vs the Python runtime: the same PNG bytes and correction steps (the same graphs in the same
ONNX Runtime; test_cpp_runtime.py's parity rule).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor

from safe_denoiser import NegativeBank, attach, detach
from safe_denoiser.core.energy_guidance import suggest_radius
from safe_denoiser.core.guidance import SGFGuidance, ShieldedGuidance
from safe_denoiser.export.exporter import ExportSource, export_bundle, load_source
from safe_denoiser.runtime.bundle import Bundle
from safe_denoiser.runtime.manifest import Manifest
from safe_denoiser.runtime.png import png_bytes
from safe_denoiser.testing import tiny_pipeline

from step_bounds import check_graph_parity, perturbed

ROOT = Path(__file__).resolve().parents[1]
BINARY = Path(
    os.environ.get("SAFE_DENOISER_CPP_BINARY", ROOT / "cpp_runtime" / "build" / "release" / "safe-denoiser-cpp")
)
HW, STEPS, W_SD, W_SD3 = 16, 4, 7.5, 5.0
PROMPTS = ["a photo of a cat", "a red car"]
# DDIM timesteps 751, 501, 251, 1: full weight at 751, the ramp's 0.51 at 501, nothing below 400.
SGF = {"preset": "sgf", "mmd_scale": 1.0, "window": [400, 1000], "ramp": 200}
RADIUS_FRACTION = 1.2  # x the bank's median nearest-neighbour distance: the balls reach the sampled trajectories
Bundled = tuple[ExportSource, Manifest, Path]


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _unguided(pipe: Any, prompts: list[str], seeds: list[int]) -> Tensor:
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    return pipe(prompts, num_inference_steps=STEPS, height=HW, width=HW, generator=gens, output_type="latent").images


@pytest.fixture(scope="module")
def sd_bank(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, float]:
    """(bank file of the tiny SD's unguided latents for one prompt, the shielded radius from that bank)."""
    lat = _unguided(tiny_pipeline("sd"), ["a photo of a cat"] * 4, [0, 1, 2, 3])
    path = NegativeBank.from_tensor(lat).save(tmp_path_factory.mktemp("energy") / "bank.safetensors")
    return path, suggest_radius(lat, RADIUS_FRACTION)


@pytest.fixture(scope="module", params=["sgf", "shielded"])
def vp(
    request: pytest.FixtureRequest, sd_bank: tuple[Path, float], tmp_path_factory: pytest.TempPathFactory
) -> Bundled:
    bank, radius = sd_bank
    preset = {"sgf": SGF, "shielded": {"preset": "shielded", "radius": radius, "window": [0, 1000]}}[request.param]
    args = {
        "model": "tiny-sd",
        "scheduler": "ddim",
        "num_inference_steps": STEPS,
        "guidance_scale": W_SD,
        "height": HW,
        "width": HW,
        "bank": str(bank),
        "safe_denoiser": preset,
    }
    source = load_source(args)
    out = tmp_path_factory.mktemp(f"energy-{request.param}") / "bundle"
    return source, export_bundle(source, out), out


def _run(pipe: Any, noise: Tensor, scale: float) -> np.ndarray:
    return pipe(
        PROMPTS,
        num_inference_steps=STEPS,
        height=HW,
        width=HW,
        guidance_scale=scale,
        latents=noise,
        output_type="latent",
    ).images.numpy()


def _pytorch_loop(source: ExportSource, noise: Tensor, scale: float) -> tuple[np.ndarray, np.ndarray, float, float]:
    """(final latents with ``attach``, where it fired (steps, B), the rounding-sized relative change r, the relative
    change the correction made against the unguided loop)."""
    pipe, net = source.pipe, getattr(source.pipe, "unet", None) or source.pipe.transformer
    assert source.bank is not None and source.guidance is not None
    handle = attach(pipe, source.bank, source.guidance, record=True)
    try:
        want = _run(pipe, noise, scale)
        applied = np.stack([r.record.applied.numpy() for r in handle.records])
        with perturbed(net):
            moved = _run(pipe, noise, scale)
    finally:
        detach(pipe)
    return want, applied, rel_err(moved, want), rel_err(_run(pipe, noise, scale), want)


def test_vp_graph_parity_and_manifest(vp: Bundled) -> None:
    source, manifest, out = vp
    check_graph_parity(source, manifest)
    assert isinstance(manifest.guidance, (SGFGuidance, ShieldedGuidance)) and manifest.guidance == source.guidance
    spec = manifest.graphs["denoiser"]
    assert "noise" not in spec.input_names  # no re-noise: the inputs of the constant preset
    assert Manifest.load(out) == manifest


def test_vp_loop_equals_pytorch(vp: Bundled) -> None:
    """Bundle.sample (text encoder + denoiser graphs) vs the tiny SD pipeline with ``attach``, same noise."""
    source, manifest, out = vp
    noise = torch.randn((len(PROMPTS), *manifest.sample_shape), generator=torch.Generator().manual_seed(3))
    want, applied_pt, r, moved_by_guidance = _pytorch_loop(source, noise, W_SD)
    got = Bundle(out).sample(PROMPTS, noise=noise.numpy(), steps=STEPS, guidance_scale=W_SD)
    err = rel_err(got.sample, want)
    print(f"{manifest.guidance}: onnxruntime vs PyTorch rel err {err:.3g}, rounding-sized change {r:.3g}")
    print(f"fired (steps x images): {applied_pt.astype(int).tolist()}, change vs unguided {moved_by_guidance:.3g}")
    assert 0 < r < 1e-3 and err <= 2 * r
    assert got.applied is not None and np.array_equal(got.applied, applied_pt)
    assert applied_pt.any() and not applied_pt.all()  # fired, and (window / radius) not everywhere
    assert moved_by_guidance > 10 * r  # the correction changed the samples beyond rounding


@pytest.fixture(scope="module")
def cpp() -> Path:
    if not BINARY.is_file() and "SAFE_DENOISER_CPP_BINARY" not in os.environ:
        subprocess.run(["make", "-C", str(ROOT), "cpp"], check=True, stdout=subprocess.DEVNULL)
    return BINARY


def _cpp_matches_python(cpp: Path, out: Path, tmp_path: Path) -> int:
    """``safe-denoiser-cpp generate`` on bundle ``out`` for each prompt and seed: the Python runtime's PNG bytes, its
    correction steps and the preset's name in the record. Returns how many (step, image) corrections fired."""
    bundle = Bundle(out, threads=1)
    preset = bundle.manifest.guidance.preset if bundle.manifest.guidance is not None else None
    flow = bundle.manifest.path == "flow"
    fired = 0
    for prompt in PROMPTS:
        for seed in (0, 7):
            res = bundle.sample_flow(prompts=[prompt], seed=seed) if flow else bundle.sample([prompt], seed=seed)
            png = tmp_path / f"{seed}.png"
            cmd = ["generate", "--bundle", str(out), "--prompt", prompt, "--seed", str(seed), "--threads", "1"]
            proc = subprocess.run([str(cpp), *cmd, "--out", str(png)], capture_output=True, text=True, timeout=300)
            assert proc.returncode == 0, proc.stderr
            assert png.read_bytes() == png_bytes(Bundle.to_uint8(bundle.decode(res.sample))[0]), (prompt, seed)
            assert res.applied is not None
            steps = [t.item() for t, a in zip(res.timesteps, res.applied[:, 0], strict=True) if a]
            record = json.loads(png.with_suffix(".json").read_text())
            assert record["corrected_steps"] == steps and record["correction"] == preset, (prompt, seed)
            assert record["sampler"] == ("flow_euler" if flow else "ddim")
            fired += len(steps)
    return fired


def test_cpp_generate_same_png_bytes(vp: Bundled, cpp: Path, tmp_path: Path) -> None:
    """``safe-denoiser-cpp generate`` serves the preset: the Python runtime's PNG bytes and correction steps."""
    _, manifest, out = vp
    assert manifest.guidance is not None
    info = subprocess.run([str(cpp), "info", "--bundle", str(out)], capture_output=True, text=True, timeout=120)
    assert info.returncode == 0, info.stderr
    assert json.loads(info.stdout)["correction"] == manifest.guidance.preset
    assert _cpp_matches_python(cpp, out, tmp_path) > 0


@pytest.fixture(scope="module")
def flow_sgf(tmp_path_factory: pytest.TempPathFactory) -> Bundled:
    """The tiny SD3 (rectified flow) with ``sgf``, its bank its own unguided latents; exported with its text
    encoders, so that the C++ runtime can generate from a prompt."""
    tmp = tmp_path_factory.mktemp("energy-flow")
    lat = _unguided(tiny_pipeline("sd3"), ["a photo of a cat"] * 3, [0, 1, 2])
    bank = NegativeBank.from_tensor(lat).save(tmp / "bank.safetensors")
    args = {
        "model": "tiny-sd3",
        "scheduler": "flow_euler",
        "num_inference_steps": STEPS,
        "guidance_scale": W_SD3,
        "height": HW,
        "width": HW,
        "bank": str(bank),
        "safe_denoiser": SGF,
    }
    source = load_source(args)
    return source, export_bundle(source, tmp / "bundle"), tmp / "bundle"


def test_flow_sgf_loop_equals_pytorch(flow_sgf: Bundled) -> None:
    """The tiny SD3 (rectified flow) with ``sgf``: Bundle.sample_flow vs the pipeline with ``attach``."""
    source, manifest, out = flow_sgf
    check_graph_parity(source, manifest)
    noise = torch.randn((len(PROMPTS), *manifest.sample_shape), generator=torch.Generator().manual_seed(11))
    want, applied_pt, r, moved_by_guidance = _pytorch_loop(source, noise, W_SD3)
    with torch.no_grad():
        pe, npe, pooled, npooled = source.pipe.encode_prompt(PROMPTS, None, None, do_classifier_free_guidance=True)
    got = Bundle(out).sample_flow(
        pe.numpy(),
        pooled.numpy(),
        noise=noise.numpy(),
        steps=STEPS,
        negative_prompt_embeds=npe.numpy(),
        negative_pooled_prompt_embeds=npooled.numpy(),
    )
    err = rel_err(got.sample, want)
    print(f"sd3 sgf: onnxruntime vs PyTorch rel err {err:.3g}, rounding-sized change {r:.3g}")
    print(f"fired (steps x images): {applied_pt.astype(int).tolist()}, change vs unguided {moved_by_guidance:.3g}")
    assert 0 < r < 1e-3 and err <= 2 * r
    assert got.applied is not None and np.array_equal(got.applied, applied_pt)
    assert applied_pt.any() and not applied_pt.all()  # the window [400, 1000] covers some of the flow timesteps
    assert moved_by_guidance > 10 * r


def test_cpp_flow_sgf_same_png_bytes(flow_sgf: Bundled, cpp: Path, tmp_path: Path) -> None:
    """``safe-denoiser-cpp generate`` on the SD3 ``sgf`` bundle (FlowMatch Euler): the Python runtime's PNG bytes and
    correction steps, as on the VP bundles above; the window [400, 1000] makes it fire at some steps only."""
    _, manifest, out = flow_sgf
    assert manifest.path == "flow" and manifest.guidance is not None and manifest.guidance.preset == "sgf"
    fired = _cpp_matches_python(cpp, out, tmp_path)
    assert 0 < fired < len(PROMPTS) * 2 * STEPS  # fired somewhere, but not at every step
