"""Flow-matching export (SD3, Flux): step graph vs PyTorch, the numpy schedule vs diffusers, whole loops vs ``attach``
(constant preset, and the odds preset with a reference bank).

Tolerances as in ``test_export`` (``step_bounds``): each graph output within twice the float32 error bound of the
float64 step; a whole flow-Euler loop through onnxruntime within twice the relative change that rounding-sized
transformer perturbations cause in the PyTorch loop, with the correction firing at the same steps.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor

from safe_denoiser import ConstantGuidance, NegativeBank, OddsGuidance, attach, detach
from safe_denoiser.diffusers.bank_layout import sample_space_bank
from safe_denoiser.diffusers.families import FLUX_SCHEDULER_CONFIG
from safe_denoiser.diffusers.pipelines import make_scheduler
from safe_denoiser.export.exporter import ExportOptions, ExportSource, build_denoiser, export_bundle, load_source
from safe_denoiser.runtime.bundle import Bundle
from safe_denoiser.runtime.flow_sampler import calculate_shift, flow_euler_step, flow_schedule
from safe_denoiser.runtime.manifest import (
    BANK_INITIALIZER,
    REFERENCE_BANK_INITIALIZER,
    REFERENCE_NORMS_INITIALIZER,
    Manifest,
    array_sha256,
    read_initializer,
)
from safe_denoiser.testing import tiny_pipeline

from step_bounds import check_graph_parity, check_step_graph, perturbed

HW, STEPS, W_SD3, W_FLUX, TEXT = 16, 4, 5.0, 3.5, 16
PROMPTS = ["a photo of a cat", "a red car"]


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _run(pipe: Any, noise: Tensor, **kw: Any) -> np.ndarray:
    flux = "Flux" in type(pipe).__name__
    extra = {"max_sequence_length": TEXT} if flux else {}
    scale = W_FLUX if flux else W_SD3
    out = pipe(
        PROMPTS,
        num_inference_steps=STEPS,
        height=HW,
        width=HW,
        guidance_scale=scale,
        latents=noise,
        output_type="latent",
        **extra,
        **kw,
    ).images
    return out.numpy()


def _unguided_bank(pipe: Any, prompts: list[str], seeds: list[int], path: Path) -> Path:
    """A bank file of the pipeline's own unguided outputs (unpacked latents, as banks are)."""
    flux = "Flux" in type(pipe).__name__
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    kw: dict[str, Any] = {"max_sequence_length": TEXT} if flux else {}
    lat = pipe(prompts, num_inference_steps=STEPS, height=HW, width=HW, generator=gens, output_type="latent", **kw)
    lat = lat.images
    if flux:
        lat = pipe._unpack_latents(lat, HW, HW, pipe.vae_scale_factor)
    return NegativeBank.from_tensor(lat).save(path)


@pytest.fixture(scope="module", params=["sd3", "flux"])
def flow(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[ExportSource, Manifest, Path]:
    """A bundle of the tiny pipeline with a bank of its own unguided outputs (unpacked latents, as banks are)."""
    family = request.param
    work = tmp_path_factory.mktemp(f"flow-{family}")
    bank = _unguided_bank(tiny_pipeline(family), ["a photo of a cat"] * 3, [0, 1, 2], work / "bank.safetensors")
    args = {
        "model": f"tiny-{family}",
        "scheduler": "flow_euler",
        "num_inference_steps": STEPS,
        "guidance_scale": W_FLUX if family == "flux" else W_SD3,
        "height": HW,
        "width": HW,
        "bank": str(bank),
        "safe_denoiser": {"preset": "constant", "beta": 1.0, "window": [0, 1000]},
    }
    source = load_source(args)
    assert source.guidance == ConstantGuidance(beta=1.0, window=(0, 1000))
    out = work / "bundle"
    return source, export_bundle(source, out), out


def test_flow_graph_parity_and_manifest(flow: tuple[ExportSource, Manifest, Path]) -> None:
    source, manifest, out = flow
    check_graph_parity(source, manifest)
    assert manifest.path == "flow" and manifest.prediction_type == "flow"
    assert manifest.flow is not None and manifest.flow["family"] == source.family
    # text side and decoder: tests/test_flow_bundle_text.py
    assert set(manifest.graphs) == {"denoiser", "text_encoder", "vae_decoder"} and manifest.tokenizer is None
    spec = manifest.graphs["denoiser"]
    assert spec.input_names[:3] == ["sample", "timestep", "sigma"]
    assert spec.output_names == ["noise_pred", "x0_hat", "correction_applied", "kernel_log_mass"]
    in_graph = read_initializer(out / spec.file, BANK_INITIALIZER)
    assert source.bank is not None
    want = sample_space_bank(source.pipe, source.bank.data).numpy()
    assert np.array_equal(in_graph, want)  # Flux: packed at export, bit for bit as attach packs it
    if source.family == "flux":
        assert in_graph.shape == (3, (HW // 4) ** 2, 64) and manifest.sample_shape == (16, 64)
        assert manifest.bank is not None and manifest.bank.metadata["packed_from_sha256"] == source.bank.sha256()
    Bundle(out)  # loads: hashes of the graph, the packed bank and every file check out


@pytest.mark.parametrize("steps", [1, 4, 28, 50])
@pytest.mark.parametrize("case", ["sd3", "sd3-shift1", "flux", "flux-static"])
def test_flow_schedule_is_the_schedulers_bit_for_bit(case: str, steps: int) -> None:
    """The numpy schedule equals FlowMatchEulerDiscreteScheduler.set_timesteps as each pipeline calls it."""
    flux = case.startswith("flux")
    if flux:
        cfg = {**FLUX_SCHEDULER_CONFIG, "use_dynamic_shifting": case == "flux"}
    else:
        cfg = {"num_train_timesteps": 1000, "shift": 1.0 if case.endswith("shift1") else 3.0}
    sched = make_scheduler("flow_euler", cfg)
    settings = {
        "num_train_timesteps": 1000,
        "shift": float(sched.config.shift),
        "use_dynamic_shifting": bool(sched.config.use_dynamic_shifting),
        "base_shift": float(sched.config.base_shift),
        "max_shift": float(sched.config.max_shift),
        "base_image_seq_len": int(sched.config.base_image_seq_len),
        "max_image_seq_len": int(sched.config.max_image_seq_len),
        "sigma_min": float(sched.sigma_min),
        "sigma_max": float(sched.sigma_max),
        "pipeline_sigmas": "linspace" if flux else None,
        "image_seq_len": 1024,
    }
    mu = calculate_shift(1024, settings) if settings["use_dynamic_shifting"] else None
    sigmas = np.linspace(1.0, 1 / steps, steps) if flux else None
    sched.set_timesteps(steps, sigmas=sigmas, mu=mu)
    timesteps, got = flow_schedule(settings, steps)
    assert np.array_equal(timesteps, sched.timesteps.numpy()) and np.array_equal(got, sched.sigmas.numpy())
    x, u = np.random.default_rng(0).standard_normal((2, 2, 3, 3)).astype(np.float32)
    sched.set_begin_index(0)
    want = sched.step(torch.from_numpy(u), sched.timesteps[0], torch.from_numpy(x)).prev_sample.numpy()
    assert np.array_equal(flow_euler_step(u, x, got[0], got[1]), want)


@pytest.fixture(scope="module")
def flow_odds(
    flow: tuple[ExportSource, Manifest, Path], tmp_path_factory: pytest.TempPathFactory
) -> tuple[ExportSource, Manifest, Path]:
    """The odds preset on the same pipeline and bank, with a reference bank of outputs for other prompts."""
    source = flow[0]
    work = tmp_path_factory.mktemp(f"flow-odds-{source.family}")
    prompts = ["a red car", "a dog", "a house", "a tree"]
    reference = _unguided_bank(source.pipe, prompts, [3, 4, 5, 6], work / "reference.safetensors")
    odds = {"preset": "odds", "odds_scale": 1.0, "window": [0, 1000]}
    odds_source = load_source({**source.model_args, "reference_bank": str(reference), "safe_denoiser": odds})
    assert odds_source.guidance == OddsGuidance(window=(0, 1000))
    out = work / "bundle"
    return odds_source, export_bundle(odds_source, out), out


def test_flow_odds_graph_parity_and_manifest(flow_odds: tuple[ExportSource, Manifest, Path]) -> None:
    """The reference bank and its norms are initializers (Flux: packed as ``attach`` packs it); the manifest's
    ``reference_bank`` records the array the graph holds."""
    source, manifest, out = flow_odds
    check_graph_parity(source, manifest)
    spec = manifest.graphs["denoiser"]
    assert spec.output_names == ["noise_pred", "x0_hat", "correction_applied", "kernel_log_mass"]
    assert set(spec.constants) >= {BANK_INITIALIZER, REFERENCE_BANK_INITIALIZER, REFERENCE_NORMS_INITIALIZER}
    ref = source.reference_bank
    assert ref is not None
    want = sample_space_bank(source.pipe, ref.data, "reference bank").numpy()
    in_graph = read_initializer(out / spec.file, REFERENCE_BANK_INITIALIZER)
    assert np.array_equal(in_graph, want)
    norms = read_initializer(out / spec.file, REFERENCE_NORMS_INITIALIZER)
    want_norms = (torch.from_numpy(want).double() ** 2).flatten(1).sum(1).numpy()
    np.testing.assert_allclose(norms, want_norms, rtol=1e-6)  # float32 sums of float32 squares: ~1e-7 relative
    info = manifest.reference_bank
    assert info is not None and info.initializer == REFERENCE_BANK_INITIALIZER and info.reference_kind == "safe"
    assert (info.count, info.sample_shape, info.dtype) == (4, manifest.sample_shape, "float32")
    assert info.sha256 == array_sha256(want)
    if source.family == "flux":
        assert in_graph.shape == (4, (HW // 4) ** 2, 64) and info.metadata["packed_from_sha256"] == ref.sha256()
    else:
        assert info.sha256 == ref.sha256()
    assert Manifest.load(out) == manifest
    Bundle(out)  # loads: the hashes of both banks inside the graph check out


def test_flow_float16_bank(flow: tuple[ExportSource, Manifest, Path], tmp_path: Path) -> None:
    """A float16-stored bank in an SD3 / Flux graph (Flux: packed, then rounded): the initializer is float16, the
    manifest records its hash and the bank file it came from, and the graph matches PyTorch with the same rounded
    bank within the float32 bounds of the float64 step (``step_bounds``), as a float32 bank does."""
    source, manifest32, _ = flow
    assert source.bank is not None
    bank_file = source.bank.save(tmp_path / "bank.safetensors")
    manifest32.check_bank_file(bank_file)  # the float32 bundle names the same file (Flux: its hash before packing)
    out = tmp_path / "b16"
    manifest = export_bundle(source, out, ExportOptions(bank_dtype="float16"))
    graph = out / manifest.graphs["denoiser"].file
    stored = read_initializer(graph, BANK_INITIALIZER)
    want = sample_space_bank(source.pipe, source.bank.data).numpy().astype(np.float16)  # round to nearest
    assert stored.dtype == np.float16 and np.array_equal(stored, want)
    assert manifest.bank is not None and manifest.bank.dtype == "float16"
    assert manifest.bank.sha256 == array_sha256(want)
    manifest.check_bank_file(bank_file)
    Bundle(out)  # loads: the float16 bank's hash inside the graph checks out
    step = build_denoiser(source, bank_dtype="float16")
    assert step.bank.dtype == torch.float16
    worst = check_step_graph(source, step, graph, range(3), batch=2)
    print(f"{source.family} float16-bank graph vs PyTorch (same rounded bank): max abs diff {worst:.2e}")


def test_flow_loop_parity(flow: tuple[ExportSource, Manifest, Path]) -> None:
    _check_loop_parity(*flow)


def test_flow_odds_loop_parity(flow_odds: tuple[ExportSource, Manifest, Path]) -> None:
    _check_loop_parity(*flow_odds)


def _check_loop_parity(source: ExportSource, manifest: Manifest, out: Path) -> None:
    """Bundle.sample_flow vs the PyTorch pipeline with ``attach`` (same noise), as the module docstring says."""
    pipe, b = source.pipe, len(PROMPTS)
    noise = torch.randn((b, *manifest.sample_shape), generator=torch.Generator().manual_seed(11))
    assert source.bank is not None and source.guidance is not None
    handle = attach(pipe, source.bank, source.guidance, record=True, reference=source.reference_bank)
    try:
        want = _run(pipe, noise)
        applied_pt = np.stack([r.record.applied.numpy() for r in handle.records])
        with perturbed(pipe.transformer):
            moved = _run(pipe, noise)
    finally:
        detach(pipe)
    with torch.no_grad():
        if source.family == "flux":
            pe, pooled, _ = pipe.encode_prompt(PROMPTS, None, max_sequence_length=TEXT)
            negatives: dict[str, np.ndarray] = {}
        else:
            pe, npe, pooled, npooled = pipe.encode_prompt(PROMPTS, None, None, do_classifier_free_guidance=True)
            negatives = {"negative_prompt_embeds": npe.numpy(), "negative_pooled_prompt_embeds": npooled.numpy()}
    got = Bundle(out).sample_flow(pe.numpy(), pooled.numpy(), noise=noise.numpy(), steps=STEPS, **negatives)
    r = rel_err(moved, want)
    err = rel_err(got.sample, want)
    preset = source.guidance.preset
    print(f"{source.family} ({preset}): onnxruntime vs PyTorch loop rel err {err:.3g}, rounding-sized change {r:.3g}")
    assert 0 < r < 1e-3 and err <= 2 * r
    assert got.applied is not None and np.array_equal(got.applied, applied_pt) and applied_pt.any()
    assert rel_err(_run(pipe, noise), want) > 10 * r  # unguided: the correction moved the samples beyond rounding


def test_flow_export_refusals(flow: tuple[ExportSource, Manifest, Path], tmp_path: Path) -> None:
    source, _, out = flow
    args = dict(source.model_args)
    refused = r"model\.safe_denoiser: flow matching supports the constant, mass, odds, sgf and shielded presets, not"
    refused += r" 'reference'"
    with pytest.raises(ValueError, match=refused):
        export_bundle(load_source({**args, "safe_denoiser": {"preset": "reference"}}), tmp_path / "x")
    with pytest.raises(ValueError, match=r"sample it with Bundle\.sample_flow"):
        Bundle(out).sample(np.zeros((1, 4, 4), np.float32))
    if source.family == "sd3":
        with pytest.raises(ValueError, match="negative_prompt_embeds"):
            Bundle(out).sample_flow(np.zeros((1, 333, 64), np.float32), np.zeros((1, 64), np.float32))
