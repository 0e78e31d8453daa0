"""Export of the odds preset (Theorem 1's beta from the negative and a reference bank) and of float16-stored banks.

Tolerances as in tests/test_export.py (``step_bounds``): a graph output within twice the float32 bound of the float64
step; a DDIM loop through onnxruntime within twice the relative change that rounding-sized UNet perturbations cause,
correcting at the same steps. A float16-stored bank is a float32 graph of the rounded bank: it meets the same bounds
against PyTorch run with that rounded bank. Against the float32 bank, its loop moves by the loop's response to the
rounding: at most four times the change that a bank perturbation of U16 max |bank| per entry (random signs, larger
than any rounding) causes, plus the float32 noise between two runs.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from safe_denoiser import NegativeBank, attach, detach
from safe_denoiser.core.guidance import OddsGuidance
from safe_denoiser.core.kernel import bank_sq_norms
from safe_denoiser.export.exporter import (
    ExportOptions,
    ExportSource,
    build_denoiser,
    export_bundle,
    load_source,
)
from safe_denoiser.runtime.bundle import Bundle
from safe_denoiser.runtime.manifest import (
    BANK_INITIALIZER,
    BANK_NORMS_INITIALIZER,
    REFERENCE_BANK_INITIALIZER,
    REFERENCE_NORMS_INITIALIZER,
    ROUNDED_FROM,
    Manifest,
    ManifestError,
    read_initializer,
)

from step_bounds import U16, U32, check_graph_parity, check_step_graph, perturbed

STEPS = 10
ODDS = {"preset": "odds", "odds_scale": 1.0}


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def odds_args(**changes: Any) -> dict[str, Any]:
    """The demo model with its bundled bank (eights) and reference bank (the other digits), odds preset."""
    args: dict[str, Any] = {
        "model": "demo",
        "scheduler": "ddim",
        "num_inference_steps": STEPS,
        "guidance_scale": 2.0,
        "bank": "bundled",
        "reference_bank": "bundled",
        "safe_denoiser": ODDS,
    }
    args.update(changes)
    return args


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("export_odds")


@pytest.fixture(scope="module")
def odds(work: Path) -> tuple[ExportSource, Manifest, Path]:
    source = load_source(odds_args())
    out = work / "odds"
    return source, export_bundle(source, out), out


def _loop(source: ExportSource, labels: list[int], noise: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(PyTorch float32 loop, its loop under rounding-sized UNet perturbations, applied per step) with the odds beta."""
    assert source.bank is not None
    handle = attach(source.pipe, source.bank, source.guidance, record=True, reference=source.reference_bank)
    kw: dict[str, Any] = {"guidance_scale": 2.0, "num_inference_steps": STEPS, "output_type": "latent"}
    try:
        ref = source.pipe(class_labels=labels, latents=noise, **kw).images.numpy()
        applied = torch.stack([tr.record.applied for tr in handle.records]).numpy()
        with perturbed(source.pipe.unet):
            moved = source.pipe(class_labels=labels, latents=noise, **kw).images.numpy()
    finally:
        detach(source.pipe)
    return ref, moved, applied


# ---- the odds preset ----------------------------------------------------------------------------------------------
def test_odds_graph_parity_and_constants(odds: tuple[ExportSource, Manifest, Path]) -> None:
    source, manifest, out = odds
    check_graph_parity(source, manifest)
    assert source.reference_bank is not None and source.bank is not None
    spec = manifest.graphs["denoiser"]
    assert "noise" not in spec.input_names  # same runtime inputs as the theorem preset: runtimes need no change
    assert set(spec.constants) >= {REFERENCE_BANK_INITIALIZER, REFERENCE_NORMS_INITIALIZER}
    ref = read_initializer(out / "denoiser.onnx", REFERENCE_BANK_INITIALIZER)
    np.testing.assert_array_equal(ref, source.reference_bank.data.numpy())
    norms = read_initializer(out / "denoiser.onnx", REFERENCE_NORMS_INITIALIZER)
    np.testing.assert_allclose(norms, (source.reference_bank.data.double() ** 2).sum((1, 2, 3)).numpy(), rtol=1e-6)
    info = manifest.reference_bank
    assert info is not None and info.reference_kind == "safe" and info.dtype == "float32"
    assert (info.count, info.sample_shape) == (len(source.reference_bank), (1, 8, 8))
    assert info.sha256 == source.reference_bank.sha256() and info.initializer == REFERENCE_BANK_INITIALIZER


def test_odds_loop_parity(odds: tuple[ExportSource, Manifest, Path]) -> None:
    source, _, out = odds
    labels = [8, 1, 0]
    noise = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    got = Bundle(out, threads=1).sample(labels, noise=noise.numpy())
    ref, moved, applied = _loop(source, labels, noise)
    err, tol = rel_err(got.sample, ref), 2 * rel_err(moved, ref)
    print(f"odds loop: rel err {err:.2e} (bound {tol:.2e}), max abs {np.abs(got.sample - ref).max():.2e}")
    assert err <= tol
    assert got.applied is not None and np.array_equal(got.applied, applied)
    assert got.applied.any() and not got.applied.all()  # the window [300, 1000] closes before the end


def _variant(odds: tuple[ExportSource, Manifest, Path], out: Path, **changes: Any) -> ExportSource:
    """The odds source with some guidance fields changed, exported to ``out``; its graph checked against PyTorch
    and its guidance kept in the manifest."""
    source = odds[0]
    assert source.guidance is not None
    changed = dataclasses.replace(source, guidance=source.guidance.with_(**changes))
    check_graph_parity(changed, export_bundle(changed, out))
    assert Manifest.load(out).guidance == changed.guidance
    return changed


def test_odds_with_bank_sigma_graph_parity(odds: tuple[ExportSource, Manifest, Path], work: Path) -> None:
    """``bank_sigma`` (the bank as a kernel density) is traced into the graph and kept in the manifest."""
    _variant(odds, work / "odds_kde", bank_sigma=0.3)


def test_conditional_odds_graph_and_loop_parity(odds: tuple[ExportSource, Manifest, Path], work: Path) -> None:
    """``odds_sigma`` (the odds at the denoised estimate) is traced into the graph: one step and a whole loop match
    PyTorch, and the steps where the correction fired are the same."""
    cond = _variant(odds, work / "odds_x0", odds_sigma=1.0)
    labels = [8, 9, 3]
    noise = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    got = Bundle(work / "odds_x0", threads=1).sample(labels, noise=noise.numpy())
    ref, moved, applied = _loop(cond, labels, noise)
    err, tol = rel_err(got.sample, ref), 2 * rel_err(moved, ref)
    assert err <= tol, (err, tol)
    assert got.applied is not None and np.array_equal(got.applied, applied)


def test_odds_manifest_round_trip_and_checks(odds: tuple[ExportSource, Manifest, Path], tmp_path: Path) -> None:
    _, manifest, out = odds
    loaded = Manifest.load(out)
    assert loaded == manifest and loaded.reference_bank == manifest.reference_bank
    assert Manifest.from_dict(json.loads(json.dumps(loaded.to_dict()))) == manifest
    assert "reference_kind" not in loaded.to_dict()["bank"]  # the negative bank's entry keeps its keys
    # every OddsGuidance field survives the manifest (including ones a runtime never reads)
    assert isinstance(manifest.guidance, OddsGuidance)
    every = manifest.guidance.with_(
        window=(350.0, 900.0),
        chunk_size=64,
        bank_sigma=0.25,
        gate_log_mass=-50.0,
        odds_scale=2.5,
        prior_unsafe=0.2,
        reference_kind="data",
        log_beta_max=3.0,
        odds_sigma=0.7,
    )
    again = dataclasses.replace(manifest, guidance=every)
    assert Manifest.from_dict(json.loads(json.dumps(again.to_dict()))).guidance == every
    assert set(again.to_dict()["guidance"]) == {f.name for f in dataclasses.fields(OddsGuidance)} | {"preset"}
    assert again.to_dict()["guidance"]["preset"] == "odds"

    def edited(name: str, key: str, value: Any) -> Path:
        root = tmp_path / name
        shutil.copytree(out, root)
        data = json.loads((root / "manifest.json").read_text())
        node = data
        *parents, last = key.split(".")
        for p in parents:
            node = node[p]
        node[last] = value
        (root / "manifest.json").write_text(json.dumps(data))
        return root

    with pytest.raises(ManifestError, match="reference bank hash mismatch"):
        Manifest.load(edited("hash", "reference_bank.sha256", "0" * 64))
    with pytest.raises(ManifestError, match=r"reference_bank must be set exactly when guidance\.preset is 'odds'"):
        Manifest.load(edited("missing", "reference_bank", None))
    with pytest.raises(ManifestError, match="reference_kind must be 'safe' or 'data'"):
        Manifest.load(edited("kind", "reference_bank.reference_kind", "unsafe"))
    with pytest.raises(ManifestError, match=r"reference_bank item shape \(1, 8, 7\)"):
        Manifest.load(edited("shape", "reference_bank.sample_shape", [1, 8, 7]))


def test_odds_refusals(odds: tuple[ExportSource, Manifest, Path]) -> None:
    source = odds[0]
    with pytest.raises(ValueError, match=r"model\.reference_bank is required with the odds preset"):
        load_source(odds_args(reference_bank=None))
    with pytest.raises(ValueError, match="bank_dtype must be one of"):
        ExportOptions(bank_dtype="bfloat16")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="DenoiserStep: a reference bank is required with the odds preset"):
        build_denoiser(dataclasses.replace(source, reference_bank=None))


# ---- float16-stored banks -----------------------------------------------------------------------------------------
def _jittered(bank: NegativeBank, seed: int) -> NegativeBank:
    """The bank plus small noise: digits / 8 - 1 are exact in float16, these values are not."""
    gen = torch.Generator().manual_seed(seed)
    return NegativeBank.from_tensor(bank.data + 0.01 * torch.randn(bank.data.shape, generator=gen))


@pytest.fixture(scope="module")
def fp16_pair(odds: tuple[ExportSource, Manifest, Path], work: Path) -> tuple[ExportSource, Path, Path]:
    """(source with jittered banks, its float32-bank bundle, its float16-bank bundle)."""
    source = odds[0]
    assert source.bank is not None and source.reference_bank is not None
    jit = dataclasses.replace(
        source, bank=_jittered(source.bank, 1), reference_bank=_jittered(source.reference_bank, 2)
    )
    export_bundle(jit, work / "b32", ExportOptions(verify=False))
    export_bundle(jit, work / "b16", ExportOptions(bank_dtype="float16"))
    return jit, work / "b32", work / "b16"


def test_fp16_bank_storage_and_manifest(fp16_pair: tuple[ExportSource, Path, Path], tmp_path: Path) -> None:
    import onnx

    source, b32, b16 = fp16_pair
    assert source.bank is not None and source.reference_bank is not None
    m16 = Manifest.load(b16)
    assert m16.bank is not None and m16.reference_bank is not None
    assert m16.bank.dtype == m16.reference_bank.dtype == "float16" and m16.precision == "fp32"
    assert m16.bank.metadata[ROUNDED_FROM] == source.bank.sha256() != m16.bank.sha256
    m16.check_bank_file(source.bank.save(tmp_path / "bank.safetensors"))  # the bank file it was exported from
    pairs = (
        (BANK_INITIALIZER, BANK_NORMS_INITIALIZER, source.bank),
        (REFERENCE_BANK_INITIALIZER, REFERENCE_NORMS_INITIALIZER, source.reference_bank),
    )
    for name, norms_name, bank in pairs:
        stored = read_initializer(b16 / "denoiser.onnx", name)
        assert stored.dtype == np.float16
        np.testing.assert_array_equal(stored, bank.data.numpy().astype(np.float16))  # round to nearest, as numpy
        norms = read_initializer(b16 / "denoiser.onnx", norms_name)
        assert norms.dtype == np.float32  # of the rounded values (float32 accumulation, as the kernel does it)
        np.testing.assert_array_equal(norms, bank_sq_norms(torch.from_numpy(stored.astype(np.float32))).numpy())
    # the bank bytes halve: the float16 graph holds exactly half the bank bytes; the file shrinks by that much
    sizes = {}
    for root in (b32, b16):
        model = onnx.load(str(root / "denoiser.onnx"))
        sizes[root] = sum(
            len(t.raw_data) for t in model.graph.initializer if t.name in (BANK_INITIALIZER, REFERENCE_BANK_INITIALIZER)
        )
    n = (len(source.bank) + len(source.reference_bank)) * 64
    assert sizes[b32] == 4 * n and sizes[b16] == 2 * n
    saved = (b32 / "denoiser.onnx").stat().st_size - (b16 / "denoiser.onnx").stat().st_size
    print(
        f"bank bytes {sizes[b32]} -> {sizes[b16]}; denoiser.onnx {(b32 / 'denoiser.onnx').stat().st_size} -> "
        f"{(b16 / 'denoiser.onnx').stat().st_size}"
    )
    assert 2 * n - 1024 <= saved <= 2 * n + 1024  # the Cast nodes cost a few bytes
    with pytest.raises(ManifestError, match=r"bank inside .* is float16, the manifest says float32"):
        dataclasses.replace(m16, bank=dataclasses.replace(m16.bank, dtype="float32")).check_bank(b16)


def test_fp16_bank_graph_parity(fp16_pair: tuple[ExportSource, Path, Path]) -> None:
    """The float16-bank graph against PyTorch with the same rounded bank: within the float32 bounds."""
    source, _, b16 = fp16_pair
    step = build_denoiser(source, bank_dtype="float16")
    assert step.bank.dtype == torch.float16
    worst = check_step_graph(source, step, b16 / "denoiser.onnx", range(4))
    print(f"fp16-bank graph vs PyTorch (same rounded bank): max abs diff {worst:.2e}")


def test_fp16_bank_loop_error_vs_float32_bank(fp16_pair: tuple[ExportSource, Path, Path]) -> None:
    source, b32, b16 = fp16_pair
    assert source.bank is not None and source.reference_bank is not None
    labels = [8, 1, 0]
    noise = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    a = Bundle(b16, threads=1).sample(labels, noise=noise.numpy())
    b = Bundle(b32, threads=1).sample(labels, noise=noise.numpy())
    ref, moved, _ = _loop(source, labels, noise)
    gen = torch.Generator().manual_seed(3)

    def nudged(bank: NegativeBank) -> NegativeBank:
        signs = torch.randint(0, 2, bank.data.shape, generator=gen).float() * 2 - 1
        return NegativeBank.from_tensor(bank.data + U16 * bank.data.abs().max() * signs)

    far, _, _ = _loop(
        dataclasses.replace(source, bank=nudged(source.bank), reference_bank=nudged(source.reference_bank)),
        labels,
        noise,
    )
    err = rel_err(a.sample, b.sample)
    bound = 4 * rel_err(far, ref) + 2 * rel_err(moved, ref)
    print(
        f"fp16 bank vs float32 bank, 10-step loop: rel err {err:.2e} (bound {bound:.2e}, float32 noise"
        f" {rel_err(moved, ref):.2e}, U16/U32 = {U16 / U32:.0f})"
    )
    assert 0 < err <= bound
