"""ONNX export: graph and whole-loop parity with PyTorch, manifest validation, graph logic, CLI, TensorRT stubs.

Tolerances (fp32) come from float64 references and rounding analysis (``step_bounds``): a graph's output lies
within the float32 error bound of the float64 PyTorch value (the network's rounding, propagated through CFG, SLD
and the correction), so onnxruntime and PyTorch's float32 agree within twice that bound. A whole DDIM loop through
onnxruntime (with ``safe_denoiser.attach``'s PyTorch pipeline as reference, same initial noise) stays within twice
the relative L2 change that rounding-sized UNet perturbations cause, and corrects at the same steps. The
SD-1.4-architecture test lives in ``test_export_sd14.py``.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers.utils.torch_utils import randn_tensor

from safe_denoiser import (
    ConstantGuidance,
    NegativeBank,
    PreparedBanks,
    attach,
    attach_sld,
    cfg_combine,
    detach,
    theorem_correction,
)
from safe_denoiser.cli import main as cli_main
from safe_denoiser.core.guidance import TheoremGuidance
from safe_denoiser.demo.digits import NULL_CLASS, NUM_LABELS
from safe_denoiser.export.exporter import (
    ExportOptions,
    ExportSource,
    build_denoiser,
    denoiser_inputs,
    export_bundle,
    load_source,
)
from safe_denoiser.export.tensorrt import (
    EngineProfile,
    TensorRTUnavailableError,
    build_engines,
    polygraphy_compare,
    profile_shapes,
    require_tensorrt,
)
from safe_denoiser.runtime.bundle import Bundle, ProviderUnavailableError, ddim_timesteps, resolve_providers, run_bundle
from safe_denoiser.runtime.manifest import (
    BANK_INITIALIZER,
    BANK_NORMS_INITIALIZER,
    Manifest,
    ManifestError,
    read_initializer,
)
from safe_denoiser.testing import tiny_sd_pipeline

from step_bounds import U16, U32, check_graph_parity, network_bound, perturbed, step_inputs, step_reference, within

DEMO_STEPS = 10
TINY_STEPS = 4
TINY_HW = 16  # pixels; the tiny VAE halves it: 4 x 8 x 8 latents


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# ---- the demo model (class labels, pixel space) --------------------------------------------------------------
def demo_args(bank_path: Path, **changes: Any) -> dict[str, Any]:
    args: dict[str, Any] = {
        "model": "demo",
        "scheduler": "ddim",
        "num_inference_steps": DEMO_STEPS,
        "guidance_scale": 2.0,
        "bank": str(bank_path),
        "safe_denoiser": {"preset": "constant", "beta": 0.5, "window": [300, 800], "gate_log_mass": -200.0},
    }
    args.update(changes)
    return args


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("export")


@pytest.fixture(scope="module")
def demo_bank(work: Path) -> Path:
    from sklearn.datasets import load_digits

    digits = load_digits()
    sevens = digits.images[digits.target == 7][:16]  # the "unsafe" class: sevens, in the model's [-1, 1] space
    data = torch.from_numpy(sevens / 8.0 - 1.0).float().unsqueeze(1)
    return NegativeBank.from_tensor(data, source="sklearn-digits-7").save(work / "demo_bank.safetensors")


@pytest.fixture(scope="module")
def demo(work: Path, demo_bank: Path) -> tuple[ExportSource, Manifest, Path]:
    source = load_source(demo_args(demo_bank))
    out = work / "demo_bundle"
    return source, export_bundle(source, out), out


@pytest.fixture(scope="module")
def demo_cfg_only(work: Path, demo_bank: Path) -> tuple[ExportSource, Manifest, Path]:
    source = load_source(demo_args(demo_bank, safe_denoiser=None, bank=None))
    out = work / "demo_cfg_only"
    return source, export_bundle(source, out), out


def test_demo_graph_parity_and_io(demo: tuple[ExportSource, Manifest, Path]) -> None:
    source, manifest, _ = demo
    check_graph_parity(source, manifest)
    spec = manifest.graphs["denoiser"]
    assert spec.input_names == [
        "sample",
        "timestep",
        "alpha_bar",
        "class_labels",
        "negative_class_labels",
        "guidance_scale",
    ]
    assert spec.output_names == ["noise_pred", "sample_corrected", "x0_hat", "correction_applied", "kernel_log_mass"]
    assert spec.input("sample").shape == ("batch", 1, 8, 8)
    assert spec.input("class_labels").dtype == "int64"
    assert manifest.model_kind == "class-conditional" and manifest.sample_shape == (1, 8, 8)
    assert manifest.scheduler.num_train_timesteps == 1000 and manifest.opset == 17 and manifest.precision == "fp32"


def _demo_loop(
    source: ExportSource, out: Path, labels: list[Any], negative: list[Any] | None = None
) -> tuple[Any, np.ndarray, np.ndarray, np.ndarray]:
    """Bundle.sample vs ``attach``'s PyTorch pipeline, same noise: (result, reference, perturbed, ref. applied)."""
    noise = torch.randn(len(labels), 1, 8, 8, generator=torch.Generator().manual_seed(0))
    got = Bundle(out).sample(labels, noise=noise.numpy(), negative=negative)
    handle = attach(source.pipe, source.bank, source.guidance, record=True)
    kw: dict[str, Any] = {"guidance_scale": 2.0, "num_inference_steps": DEMO_STEPS, "output_type": "latent"}
    kw.update(class_labels=labels, negative_class_labels=negative, latents=noise)
    try:
        ref = source.pipe(**kw).images.numpy()
        ref_applied = torch.stack([tr.record.applied for tr in handle.records]).numpy()
        with perturbed(source.pipe.unet):  # the loop's sensitivity to rounding-sized UNet errors (step_bounds)
            moved = source.pipe(**kw).images.numpy()
    finally:
        detach(source.pipe)
    return got, ref, moved, ref_applied


def test_demo_loop_parity(demo: tuple[ExportSource, Manifest, Path]) -> None:
    source, _, out = demo
    got, ref, moved, ref_applied = _demo_loop(source, out, [7, 1, 0])
    err, tol = rel_err(got.sample, ref), 2 * rel_err(moved, ref)
    print(f"demo loop: rel err {err:.2e} (bound {tol:.2e}), max abs {np.abs(got.sample - ref).max():.2e}")
    assert err <= tol
    assert got.applied is not None and np.array_equal(got.applied, ref_applied)
    assert got.applied.any() and not got.applied.all()  # the window opens and closes along the trajectory
    # Batch 1 (traced with 2): the batch axis is dynamic.
    noise = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    one = run_bundle(out, [7], noise=noise[:1].numpy())
    assert rel_err(one, ref[:1]) <= 2 * rel_err(moved[:1], ref[:1])


def test_super_class_labels(demo: tuple[ExportSource, Manifest, Path]) -> None:
    """Labels 0..num_class_labels-1 (super-classes 11, 12), as class and negative, equal PyTorch; 13 and -1 refused."""
    source, manifest, out = demo
    assert manifest.null_class == NULL_CLASS and manifest.num_class_labels == NUM_LABELS == 13
    got, ref, moved, ref_applied = _demo_loop(source, out, [11, 12, 3], negative=[12, None, 11])
    err, tol = rel_err(got.sample, ref), 2 * rel_err(moved, ref)
    print(f"super-class loop: rel err {err:.2e} (bound {tol:.2e})")
    assert err <= tol and got.applied is not None and np.array_equal(got.applied, ref_applied)
    noise = np.zeros((1, 1, 8, 8), np.float32)
    bundle = Bundle(out)
    for bad in (13, -1):
        with pytest.raises(
            ValueError, match=rf"class labels\[0\] must be an int in 0\.\.12 \(10 = no class\) or None, got {bad}"
        ):
            bundle.sample([bad], noise=noise)
        with pytest.raises(ValueError, match=rf"negative class labels\[0\] must be an int in 0\.\.12 .* got {bad}"):
            bundle.sample([3], noise=noise, negative=[bad])


def test_old_manifest_keeps_the_old_label_range(demo: tuple[ExportSource, Manifest, Path], tmp_path: Path) -> None:
    """A bundle exported before num_class_labels was recorded accepts 0..null_class as before; bad counts refused."""
    root = _copy(demo[2], tmp_path)
    data = json.loads((root / "manifest.json").read_text())
    del data["num_class_labels"]
    (root / "manifest.json").write_text(json.dumps(data))
    bundle = Bundle(root)
    assert bundle.manifest.num_class_labels is None and bundle.manifest.class_label_max() == NULL_CLASS
    noise = np.zeros((1, 1, 8, 8), np.float32)
    assert np.isfinite(bundle.sample([10], noise=noise).sample).all()
    with pytest.raises(
        ValueError, match=r"class labels\[0\] must be an int in 0\.\.10 \(10 = no class\) or None, got 11"
    ):
        bundle.sample([11], noise=noise)
    for count in (10, 12.5, "13", True):
        _edit_manifest(root, num_class_labels=count)
        with pytest.raises(ManifestError, match=r"num_class_labels must be an int > null_class \(10\)"):
            Manifest.load(root)


def _demo_feeds(manifest: Manifest, sample: np.ndarray, t: list[int]) -> dict[str, np.ndarray]:
    b = sample.shape[0]
    ac = np.asarray(manifest.scheduler.alphas_cumprod, dtype=np.float32)
    return {
        "sample": sample.astype(np.float32),
        "timestep": np.asarray(t, dtype=np.float32),
        "alpha_bar": ac[t],
        "class_labels": np.full((b,), 7, dtype=np.int64),
        "negative_class_labels": np.full((b,), 10, dtype=np.int64),
        "guidance_scale": np.full((b,), 2.0, dtype=np.float32),
    }


def test_window_and_gate_are_graph_logic(
    demo: tuple[ExportSource, Manifest, Path], demo_cfg_only: tuple[ExportSource, Manifest, Path]
) -> None:
    """One graph, per-sample decisions at run time: inside/outside the window, kernel mass above/below the gate."""
    source, manifest, out = demo
    assert source.bank is not None and source.guidance is not None
    bank = source.bank.data.numpy()
    ac = np.asarray(manifest.scheduler.alphas_cumprod)
    rng = np.random.default_rng(0)
    z = rng.standard_normal(bank.shape[1:])
    t_in, t_out_lo, t_out_hi = 550, 200, 900
    near = math.sqrt(ac[t_in]) * bank[0]  # x_t = sqrt(abar) x^(0): log-mass >= -log N, gate (-200) open
    far = math.sqrt(ac[t_in]) * bank[0] + 5 * math.sqrt(1 - ac[t_in]) * z  # log-mass ~ -25 * 32: gate closed
    x = np.stack([near, far, math.sqrt(ac[t_out_lo]) * bank[0], math.sqrt(ac[t_out_hi]) * bank[0]])
    t = [t_in, t_in, t_out_lo, t_out_hi]
    feeds = _demo_feeds(manifest, x, t)
    names = manifest.graphs["denoiser"].output_names
    got = dict(zip(names, Bundle(out).session("denoiser").run(names, feeds), strict=True))
    assert got["correction_applied"].tolist() == [True, False, False, False]
    base = Bundle(demo_cfg_only[2]).session("denoiser").run(["noise_pred"], feeds)[0]
    step, cfg_step = build_denoiser(source), build_denoiser(demo_cfg_only[0])
    ref, bound = step_reference(step, step_inputs(step, feeds))  # float64 values, float32 error bounds
    ref_cfg, bound_cfg = step_reference(cfg_step, step_inputs(cfg_step, feeds))
    for name in ("noise_pred", "kernel_log_mass"):
        assert within(got[name], ref[name], bound[name]), name
    assert np.array_equal(got["correction_applied"], ref["correction_applied"])
    closed = ~got["correction_applied"]
    assert np.array_equal(ref["noise_pred"][closed], ref_cfg["noise_pred"][closed])  # beta = 0: exactly CFG
    assert within(got["noise_pred"][closed], base[closed], (bound["noise_pred"] + bound_cfg["noise_pred"])[closed])
    assert np.abs(got["noise_pred"][0] - base[0]).max() > 1e-3
    # The graph's correction is PyTorch's theorem correction applied to the CFG-only eps (in float64: the same
    # operations, so equal up to float64 rounding of values of this size).
    assert isinstance(source.guidance, TheoremGuidance)
    eps, rec = theorem_correction(
        torch.from_numpy(ref_cfg["noise_pred"]), torch.from_numpy(feeds["sample"]).double(),
        torch.from_numpy(feeds["alpha_bar"]).double(), torch.from_numpy(feeds["timestep"]),
        PreparedBanks.prepare(source.bank.data.double(), source.guidance), source.guidance,
    )  # fmt: skip
    assert rec.applied.tolist() == [True, False, False, False]
    f64_rounding = 2.0**-53 * 1e3  # relative to max |value|: a thousand roundings' worth
    for name, value in (("noise_pred", eps), ("kernel_log_mass", rec.log_mass)):
        assert np.abs(value.numpy() - ref[name]).max() <= f64_rounding * np.abs(ref[name]).max(), name


def test_correction_off_equals_cfg_only_unet(demo_cfg_only: tuple[ExportSource, Manifest, Path]) -> None:
    """Exported without the safe denoiser: no bank, no correction outputs, exactly UNet + CFG."""
    source, manifest, out = demo_cfg_only
    assert manifest.bank is None and manifest.guidance is None
    spec = manifest.graphs["denoiser"]
    assert spec.output_names == ["noise_pred", "sample_corrected", "x0_hat"]
    import onnx

    model = onnx.load(str(out / spec.file))
    assert BANK_INITIALIZER not in {t.name for t in model.graph.initializer}
    x = np.random.default_rng(1).standard_normal((2, 1, 8, 8)).astype(np.float32)
    feeds = _demo_feeds(manifest, x, [550, 120])
    eps = Bundle(out).session("denoiser").run(["noise_pred"], feeds)[0]
    unet64 = copy.deepcopy(source.pipe.unet).double()
    with torch.no_grad():  # the float64 reference: the UNet on [uncond; cond], then CFG
        both = unet64(
            torch.from_numpy(np.concatenate([x, x])).double(),
            torch.tensor([550, 120, 550, 120]),
            class_labels=torch.tensor([10, 10, 7, 7]),
        ).sample
    eps_u, eps_c = both.chunk(2)
    ref = cfg_combine(eps_u, eps_c, torch.full((2,), 2.0, dtype=torch.float64)).numpy()
    # The UNet's float32 rounding, amplified by CFG (|1 - w| + |w| = 3), plus CFG's own rounding.
    bound = 3 * network_bound(both) + network_bound(ref)
    assert np.abs(eps - ref).max() <= bound


def test_bank_in_graph_equals_bank_file(demo: tuple[ExportSource, Manifest, Path], demo_bank: Path) -> None:
    _, manifest, out = demo
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(out / "denoiser.onnx"))
    (tensor,) = [t for t in model.graph.initializer if t.name == BANK_INITIALIZER]
    in_graph = numpy_helper.to_array(tensor)
    bank = NegativeBank.load(demo_bank)
    assert in_graph.dtype == np.float32
    assert np.array_equal(in_graph, bank.data.float().numpy())
    assert manifest.bank is not None and manifest.bank.sha256 == bank.sha256()
    assert manifest.bank.count == 16 and manifest.bank.sample_shape == (1, 8, 8)
    manifest.check_bank_file(demo_bank)
    assert np.array_equal(read_initializer(out / "denoiser.onnx", BANK_INITIALIZER), in_graph)
    # The bank's squared norms travel as a constant too (computed once at export, not per step): float32 sums of
    # D = 64 squares, within 64 u32 of the float64 values (each term's rounding and the sum's).
    norms = read_initializer(out / "denoiser.onnx", BANK_NORMS_INITIALIZER)
    exact = (in_graph.astype(np.float64).reshape(len(in_graph), -1) ** 2).sum(1)
    assert norms.shape == (16,) and norms.dtype == np.float32
    assert np.all(np.abs(norms - exact) <= 64 * 2.0**-24 * exact)


# ---- manifest ---------------------------------------------------------------------------------------------------
def test_manifest_round_trip(demo: tuple[ExportSource, Manifest, Path], tmp_path: Path) -> None:
    _, manifest, out = demo
    loaded = Manifest.load(out)
    assert loaded == manifest
    assert Manifest.from_dict(json.loads(json.dumps(loaded.to_dict()))) == manifest
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    manifest.save(copy)
    assert Manifest.load(copy) == manifest
    assert loaded.guidance == manifest.guidance and loaded.guidance is not None and loaded.guidance.window == (300, 800)
    # the manifest records the guidance as its preset's to_dict(): the preset's name and every field of its type
    recorded = json.loads((out / "manifest.json").read_text())["guidance"]
    want = ConstantGuidance(beta=0.5, window=(300.0, 800.0), gate_log_mass=-200.0)
    assert recorded == want.to_dict() and recorded["preset"] == "constant" and loaded.guidance == want


def _copy(out: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "bundle"
    shutil.copytree(out, dst)
    return dst


def _edit_manifest(root: Path, **changes: Any) -> None:
    path = root / "manifest.json"
    data = json.loads(path.read_text())
    for key, value in changes.items():
        node = data
        *parents, last = key.split(".")
        for p in parents:
            node = node[p]
        node[last] = value
    path.write_text(json.dumps(data))


def test_manifest_rejects_wrong_version(demo: tuple[ExportSource, Manifest, Path], tmp_path: Path) -> None:
    root = _copy(demo[2], tmp_path)
    _edit_manifest(root, format_version=99)
    with pytest.raises(ManifestError, match="format_version 99 is not supported"):
        Manifest.load(root)
    # a bundle of the previous format (guidance as one class with mode/eta) is refused, not misread
    _edit_manifest(root, format_version=1)
    with pytest.raises(ManifestError, match=r"format_version 1 is not supported.*re-export the bundle"):
        Manifest.load(root)
    _edit_manifest(root, format="something-else")
    with pytest.raises(ManifestError, match="format is 'something-else'"):
        Bundle(root)


def test_manifest_rejects_missing_file(demo: tuple[ExportSource, Manifest, Path], tmp_path: Path) -> None:
    root = _copy(demo[2], tmp_path)
    (root / "denoiser.onnx").unlink()
    with pytest.raises(ManifestError, match=r"file 'denoiser\.onnx' of graph 'denoiser' is missing"):
        Manifest.load(root)
    with pytest.raises(ManifestError, match=r"has no manifest\.json"):
        Manifest.load(tmp_path)


def test_manifest_rejects_bank_hash_mismatch(
    demo: tuple[ExportSource, Manifest, Path], demo_bank: Path, tmp_path: Path
) -> None:
    root = _copy(demo[2], tmp_path)
    _edit_manifest(root, **{"bank.sha256": "0" * 64})
    with pytest.raises(ManifestError, match="bank hash mismatch"):
        Manifest.load(root)
    Manifest.load(root, check_bank=False)  # opt-out for quick inspection
    # A graph whose bank was swapped (same shape) after export is caught as well.
    import onnx
    from onnx import numpy_helper

    root2 = _copy(demo[2], tmp_path / "second")
    model = onnx.load(str(root2 / "denoiser.onnx"))
    for i, t in enumerate(model.graph.initializer):
        if t.name == BANK_INITIALIZER:
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) + 1, t.name))
    onnx.save(model, str(root2 / "denoiser.onnx"))
    with pytest.raises(ManifestError, match=r"file 'denoiser\.onnx' does not match the manifest"):
        Manifest.load(root2)  # the file hashes come first
    with pytest.raises(ManifestError, match="bank hash mismatch"):
        Manifest.load(root2, check_files=False)  # the bank's own hash holds without them
    other = NegativeBank.from_tensor(torch.zeros(16, 1, 8, 8)).save(tmp_path / "other.safetensors")
    with pytest.raises(ManifestError, match="bank hash mismatch"):
        demo[1].check_bank_file(other)


def test_out_dir_is_written_atomically(demo_cfg_only: tuple[ExportSource, Manifest, Path], tmp_path: Path) -> None:
    source = demo_cfg_only[0]
    out = tmp_path / "b"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    opts = ExportOptions(verify=False)
    with pytest.raises(FileExistsError, match="not empty; choose another folder or set overwrite=True"):
        export_bundle(source, out, opts)
    assert (out / "keep.txt").exists()
    export_bundle(source, out, ExportOptions(verify=False, overwrite=True))
    assert sorted(p.name for p in out.iterdir()) == ["denoiser.onnx", "manifest.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]  # no staging or backup folders left behind


def test_fp16_export(demo: tuple[ExportSource, Manifest, Path], tmp_path: Path) -> None:
    import onnx

    source, _, out32 = demo
    manifest = export_bundle(source, tmp_path / "fp16", ExportOptions(fp16=True, verify=False))
    assert manifest.precision == "fp16"
    model = onnx.load(str(tmp_path / "fp16" / "denoiser.onnx"))
    types = {t.name: t.data_type for t in model.graph.initializer}
    assert types[BANK_INITIALIZER] == onnx.TensorProto.FLOAT  # the correction stays in float32
    big = [t for t in model.graph.initializer if np.prod(t.dims) >= 1024 and t.name != BANK_INITIALIZER]
    assert big and all(t.data_type == onnx.TensorProto.FLOAT16 for t in big)
    assert all(s.dtype in ("float32", "int64") for s in manifest.graphs["denoiser"].inputs)
    labels, noise = [7, 3], np.random.default_rng(0).standard_normal((2, 1, 8, 8)).astype(np.float32)
    a = run_bundle(tmp_path / "fp16", labels, noise=noise, steps=4)
    b = run_bundle(out32, labels, noise=noise, steps=4)
    # Rounding errors scale with the unit roundoff (to first order; the trajectory's amplification is the same), so
    # float16 weights and activations (2^-11) leave (u16 / u32) times float32's error: measured here as PyTorch's
    # float32 loop against its float64 loop, with a factor 4 for the second order. Close, not equal.
    from safe_denoiser.demo.pipeline import DigitsPipeline

    pipe64 = DigitsPipeline.from_bundled("ddim")
    pipe64.unet.to(torch.float64)
    kw: dict[str, Any] = {"guidance_scale": 2.0, "num_inference_steps": 4, "output_type": "latent"}
    x32, x64 = torch.from_numpy(noise), torch.from_numpy(noise).double()
    assert source.bank is not None
    attach(source.pipe, source.bank, source.guidance)
    attach(pipe64, source.bank.data.double(), source.guidance)
    try:
        ref32 = source.pipe(class_labels=labels, latents=x32, **kw).images.numpy()
        ref64 = pipe64(class_labels=labels, latents=x64, **kw).images.numpy()
    finally:
        detach(source.pipe)
    bound = 4 * (U16 / U32) * rel_err(ref32, ref64)
    print(f"fp16 loop: rel err {rel_err(a, b):.2e} (bound {bound:.2e})")
    assert 0 < rel_err(a, b) <= bound


# ---- tiny Stable Diffusion: text, latents, VAE, reference preset with re-noise, SLD ---------------------------------
SLD = {"guidance_scale": 1000.0, "warmup_steps": 1, "threshold": 0.01, "momentum_scale": 0.3, "mom_beta": 0.4}


@pytest.fixture(scope="module")
def tiny_bank(work: Path) -> Path:
    """Final latents of the uncorrected tiny pipeline: the trajectories come near them, so the gate opens."""
    pipe = tiny_sd_pipeline(seed=0)
    gens = [torch.Generator().manual_seed(s) for s in (0, 1, 2, 3)]
    lat = pipe(
        ["a photo of a cat"] * 4,
        num_inference_steps=TINY_STEPS,
        height=TINY_HW,
        width=TINY_HW,
        generator=gens,
        output_type="latent",
    ).images
    return NegativeBank.from_tensor(lat).save(work / "tiny_bank.safetensors")


def tiny_args(bank_path: Path, **changes: Any) -> dict[str, Any]:
    args: dict[str, Any] = {
        "model": "tiny-sd",
        "scheduler": "ddim",
        "num_inference_steps": TINY_STEPS,
        "guidance_scale": 7.5,
        "height": TINY_HW,
        "width": TINY_HW,
        "bank": str(bank_path),
        "safe_denoiser": {"preset": "reference", "window": [400, 1000]},
        "sld": SLD,
    }
    args.update(changes)
    return args


@pytest.fixture(scope="module")
def tiny(work: Path, tiny_bank: Path) -> tuple[ExportSource, Manifest, Path]:
    source = load_source(tiny_args(tiny_bank))
    out = work / "tiny_bundle"
    return source, export_bundle(source, out), out


def test_tiny_sd_graph_parity_and_layout(tiny: tuple[ExportSource, Manifest, Path]) -> None:
    source, manifest, out = tiny
    check_graph_parity(source, manifest)
    assert set(manifest.graphs) == {"denoiser", "text_encoder", "vae_decoder"}
    assert (out / "tokenizer").is_dir() and manifest.tokenizer == "tokenizer"
    spec = manifest.graphs["denoiser"]
    assert spec.input_names[-4:] == ["guidance_scale", "noise", "sld_momentum", "sld_step"]
    assert spec.output_names[-1] == "sld_momentum_out"
    assert spec.input("prompt_embeds").shape == ("batch", 77, 32)
    assert set(spec.constants) == {
        BANK_INITIALIZER,
        BANK_NORMS_INITIALIZER,
        "reference_threshold",
        "sld_safety_embedding",
    }
    assert manifest.reference_threshold is not None and manifest.sld is not None
    assert manifest.vae_scaling_factor == pytest.approx(0.18215)


def test_tiny_sd_loop_parity_reference_and_sld(tiny: tuple[ExportSource, Manifest, Path]) -> None:
    source, manifest, out = tiny
    bundle = Bundle(out)
    b, seeds = 2, [0, 5]
    emb = bundle.encode(["a photo of a cat", "a red car"])
    neg = bundle.encode(["", ""])
    noise = torch.randn(b, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    assert source.guidance is not None
    w0, w1 = source.guidance.window
    # The pipeline draws the re-noise from the per-image generators at each in-window step: replay those draws.
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    step_noise = [
        randn_tensor((b, 4, 8, 8), generator=gens).numpy() if w0 <= t <= w1 else None
        for t in ddim_timesteps(manifest.scheduler, TINY_STEPS)
    ]
    got = bundle.sample(emb, noise=noise.numpy(), negative=neg, step_noise=step_noise)

    pipe = source.pipe
    unet = pipe.unet
    assert source.sld is not None
    attach_sld(pipe, source.sld, source.sld_concept)
    handle = attach(pipe, source.bank, source.guidance, record=True)

    def sample() -> np.ndarray:
        return pipe(
            prompt_embeds=torch.from_numpy(emb),
            negative_prompt_embeds=torch.from_numpy(neg),
            guidance_scale=7.5,
            num_inference_steps=TINY_STEPS,
            latents=noise,
            generator=[torch.Generator().manual_seed(s) for s in seeds],
            height=TINY_HW,
            width=TINY_HW,
            output_type="latent",
        ).images.numpy()

    try:
        ref = sample()
        ref_applied = torch.stack([tr.record.applied for tr in handle.records]).numpy()
        with perturbed(unet):  # all three branches (SLD wraps this UNet): the loop's sensitivity to rounding
            moved = sample()
    finally:
        from safe_denoiser import detach_sld

        detach(pipe)
        detach_sld(pipe)
    err, tol = rel_err(got.sample, ref), 2 * rel_err(moved, ref)
    print(f"tiny-sd loop (reference + SLD): rel err {err:.2e} (bound {tol:.2e}), applied {got.applied.T.tolist()}")
    assert err <= tol
    assert got.applied is not None and np.array_equal(got.applied, ref_applied)
    assert got.applied.any()  # the re-noise really ran
    # The VAE graph decodes like the pipeline's VAE.
    with torch.no_grad():
        img = pipe.vae.decode(torch.from_numpy(got.sample) / pipe.vae.config.scaling_factor).sample.numpy()
    assert np.abs(bundle.decode(got.sample) - img).max() <= 2 * network_bound(img)  # two float32 VAE decoders


def test_tiny_sd_polygraphy_matches_pytorch(tiny: tuple[ExportSource, Manifest, Path]) -> None:
    """polygraphy's onnxruntime runner + Comparator against the float64 PyTorch step (TensorRT's runner on a GPU).

    The tolerance of each output is the float32 error bound of ``step_bounds.step_reference``: the UNet's rounding
    propagated through CFG (w = 7.5) and SLD (s_S = 1000 amplifies eps_c - eps_S where s_S |eps_c - eps_S| < 1),
    so it scales with the values and the guidance; PyTorch's own float32 step must meet it too.
    """
    source, _, out = tiny
    step = build_denoiser(source)
    inputs = denoiser_inputs(source, step, 3, seed=7)
    feeds = {n: v.numpy() for n, v in zip(step.input_names, inputs, strict=True)}
    ref, bound = step_reference(step, inputs)
    with torch.no_grad():
        torch32 = {n: v.numpy() for n, v in zip(step.output_names, step(*inputs), strict=True)}
    # The comparator takes float32 references (rounding them adds 2^-24 relative) and one atol per output.
    expected = {n: v.astype(torch32[n].dtype) for n, v in ref.items()}
    atol = {n: float(bound[n].max()) + U32 * float(np.abs(ref[n]).max()) if n in bound else 0.0 for n in ref}
    ok, diffs = polygraphy_compare(out / "denoiser.onnx", [feeds], [expected], atol=atol, rtol=0.0)
    print(f"polygraphy: {diffs}, bounds {atol}")
    assert ok and all(diffs["onnxruntime"][n] <= atol[n] for n in ref)
    # Element by element (where SLD's amplification is small, so is the bound): onnxruntime and PyTorch float32.
    names = list(ref)
    got = dict(zip(names, Bundle(out).session("denoiser").run(names, feeds), strict=True))
    for n in bound:
        assert within(got[n], ref[n], bound[n]) and within(torch32[n], ref[n], bound[n]), n


def test_tensorrt_profile_shapes(tiny: tuple[ExportSource, Manifest, Path]) -> None:
    manifest = tiny[1]
    shapes = profile_shapes(manifest.graphs["denoiser"], (8, 8), EngineProfile(batch=(1, 2, 8)))
    assert shapes["sample"] == ((1, 4, 8, 8), (2, 4, 8, 8), (8, 4, 8, 8))
    assert shapes["prompt_embeds"] == ((1, 77, 32), (2, 77, 32), (8, 77, 32))
    vae = profile_shapes(manifest.graphs["vae_decoder"], (8, 8), EngineProfile(size=((4, 4), (8, 8), (16, 16))))
    assert vae["latents"] == ((1, 4, 4, 4), (2, 4, 8, 8), (4, 4, 16, 16))
    with pytest.raises(ValueError, match="1 <= min <= opt <= max"):
        EngineProfile(batch=(2, 1, 4))


def _tensorrt_importable() -> bool:
    try:
        require_tensorrt()
    except TensorRTUnavailableError:
        return False
    return True


@pytest.mark.skipif(_tensorrt_importable(), reason="TensorRT is installed: the missing-TensorRT error cannot occur")
def test_tensorrt_missing_gives_clear_error(demo: tuple[ExportSource, Manifest, Path]) -> None:
    with pytest.raises(TensorRTUnavailableError, match="pip install tensorrt"):
        require_tensorrt()
    with pytest.raises(TensorRTUnavailableError, match="TensorRT's Python package is not importable"):
        build_engines(demo[2])
    feeds = _demo_feeds(demo[1], np.zeros((1, 1, 8, 8), np.float32), [500])
    with pytest.raises(TensorRTUnavailableError):
        polygraphy_compare(demo[2] / "denoiser.onnx", [feeds], [{}], tensorrt=True)


def test_providers_resolve_or_explain() -> None:
    import onnxruntime as ort

    assert resolve_providers(None) == ["CPUExecutionProvider"]
    assert resolve_providers("cpu") == ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(ProviderUnavailableError, match="install onnxruntime-gpu"):
            resolve_providers(["cuda"])
    if "TensorrtExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(ProviderUnavailableError, match="TensorrtExecutionProvider"):
            resolve_providers("tensorrt")


# ---- the command line ------------------------------------------------------------------------------------------------
def test_cli_export_external_data_and_errors(
    tiny_bank: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import yaml

    config = tmp_path / "tiny.yaml"
    model = tiny_args(tiny_bank, sld=None, safe_denoiser={"preset": "constant", "beta": 0.3, "window": [0, 600]})
    config.write_text(yaml.safe_dump({"model": model, "data": {"prompts": "unused.txt"}}))
    out = tmp_path / "bundle"
    argv = ["export", "--config", str(config), "--out", str(out), "--opset", "18", "--external-data", "always"]
    assert cli_main(argv) == 0
    assert "denoiser.onnx + denoiser.onnx.data" in capsys.readouterr().out
    manifest = Manifest.load(out)
    assert manifest.opset == 18 and manifest.graphs["denoiser"].external_data == "denoiser.onnx.data"
    import onnx
    from onnx.external_data_helper import uses_external_data

    proto = onnx.load(str(out / "denoiser.onnx"), load_external_data=False)
    big = [t for t in proto.graph.initializer if np.prod(t.dims) * 4 >= 1024]
    assert big and all(uses_external_data(t) for t in big)  # weights and bank live in the one .data file
    assert {e.value for t in big for e in t.external_data if e.key == "location"} == {"denoiser.onnx.data"}
    assert isinstance(manifest.guidance, ConstantGuidance) and manifest.guidance.beta == 0.3
    check_graph_parity(load_source(model), manifest)
    noise = np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(np.float32)
    assert np.isfinite(Bundle(out).sample(["a cat"], noise=noise).sample).all()

    assert cli_main(argv) == 2  # the bundle exists now
    assert "--overwrite" in capsys.readouterr().err
    if not _tensorrt_importable():
        assert cli_main([*argv, "--overwrite", "--tensorrt"]) == 2
        assert "pip install tensorrt" in capsys.readouterr().err
    assert cli_main(["export", "--config", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "x")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_denoiser_rejects_v_prediction(tiny_bank: Path) -> None:
    from safe_denoiser.export.exporter import build_denoiser

    source = load_source(tiny_args(tiny_bank, sld=None))
    source.pipe.scheduler = source.pipe.scheduler.from_config(
        source.pipe.scheduler.config, prediction_type="v_prediction"
    )
    with pytest.raises(ValueError, match="epsilon-prediction"):
        build_denoiser(source)
