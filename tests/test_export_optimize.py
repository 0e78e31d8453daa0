"""``export --optimize``: graphs stored as ONNX Runtime's ORT_ENABLE_ALL optimisation of them (CPU provider).

Bounds. ORT's fusions (FusedMatMul, QuickGelu, NCHWc convolutions) reorder and regroup float32 operations, so an
optimised graph is another float32 evaluation of the same network: the float32 analysis of ``step_bounds`` covers
it unchanged. At graph level the export-time parity (optimised graph vs PyTorch) must lie within twice the float32
step bound (``check_graph_parity``). For the sampling loop, a float32 loop lies within r = rel_err(perturbed, exact)
of the exact loop (``step_bounds.perturbed``: every UNet output moved by +-NETWORK_DEPTH u32 max|output|), so the
optimised bundle lies within 2 r of PyTorch's float32 loop and within 2 r of the plain bundle's loop: no tolerance
here is fitted to the observed differences.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import test_export as plain
import torch
from test_cpp_runtime import PARITY_RTOL, cpp, run
from test_export import DEMO_STEPS, _demo_loop, demo, demo_args, demo_bank, rel_err, tiny_args, tiny_bank, work

from safe_denoiser.export.exporter import ExportOptions, ExportSource, export_bundle, load_source
from safe_denoiser.export.onnx_graph import OPTIMIZE_PROVIDER
from safe_denoiser.runtime.bundle import Bundle, make_session
from safe_denoiser.runtime.manifest import MANIFEST_NAME, GraphOptimization, Manifest

from step_bounds import check_graph_parity

__all__ = ["cpp", "demo", "demo_bank", "tiny_bank", "work"]  # fixtures shared with test_export / test_cpp_runtime

OPTIMIZE = ExportOptions(optimize=True)
Exported = tuple[ExportSource, Manifest, Path]


@pytest.fixture(scope="module")
def demo_optimized(work: Path, demo_bank: Path) -> Exported:
    source = load_source(demo_args(demo_bank))
    out = work / "demo_optimized"
    return source, export_bundle(source, out, OPTIMIZE), out


@pytest.fixture(scope="module")
def tiny_optimized(work: Path, tiny_bank: Path) -> Exported:
    source = load_source(tiny_args(tiny_bank))
    out = work / "tiny_optimized"
    return source, export_bundle(source, out, OPTIMIZE), out


def test_manifest_records_the_optimisation(demo_optimized: Exported, demo: Exported) -> None:
    _, manifest, out = demo_optimized
    want = GraphOptimization("all", OPTIMIZE_PROVIDER, ort.__version__, ("ConstantFolding",))
    assert {name: g.optimization for name, g in manifest.graphs.items()} == {"denoiser": want}
    raw = json.loads((out / MANIFEST_NAME).read_text())["graphs"]["denoiser"]["optimization"]
    assert raw == {
        "level": "all",
        "provider": OPTIMIZE_PROVIDER,
        "onnxruntime": ort.__version__,
        "disabled_optimizers": ["ConstantFolding"],
    }
    assert Manifest.load(out).graphs["denoiser"].optimization == want  # files re-hashed, bank constant kept
    _, plain_manifest, plain_out = demo
    assert "optimization" not in json.loads((plain_out / MANIFEST_NAME).read_text())["graphs"]["denoiser"]
    assert plain_manifest.files["denoiser.onnx"] != manifest.files["denoiser.onnx"]
    ops = {n.domain for n in _onnx_nodes(out / "denoiser.onnx")}
    assert "com.microsoft.nchwc" in ops  # ENABLE_ALL's layout pass really ran


def _onnx_nodes(path: Path) -> list[Any]:
    import onnx

    return list(onnx.load(str(path), load_external_data=False).graph.node)


def test_runtime_skips_reoptimisation(demo_optimized: Exported, demo: Exported) -> None:
    level = ort.GraphOptimizationLevel
    optimized = Bundle(demo_optimized[2]).session("denoiser").get_session_options()
    assert optimized.graph_optimization_level == level.ORT_DISABLE_ALL
    assert Bundle(demo[2]).session("denoiser").get_session_options().graph_optimization_level == level.ORT_ENABLE_ALL
    # Optimised for another provider: this session optimises as usual.
    other = GraphOptimization("all", "CUDAExecutionProvider", ort.__version__)
    session = make_session(demo_optimized[2] / "denoiser.onnx", optimization=other)
    assert session.get_session_options().graph_optimization_level == level.ORT_ENABLE_ALL


def test_demo_optimized_parity(demo_optimized: Exported, demo: Exported) -> None:
    source, manifest, out = demo_optimized
    check_graph_parity(source, manifest)  # the optimised graph vs PyTorch, as recorded at export
    labels = [7, 1, 0]
    got, ref, moved, ref_applied = _demo_loop(source, out, labels)
    noise = torch.randn(len(labels), 1, 8, 8, generator=torch.Generator().manual_seed(0)).numpy()
    base = Bundle(demo[2]).sample(labels, noise=noise)
    bound = 2 * rel_err(moved, ref)
    vs_torch, vs_plain = rel_err(got.sample, ref), rel_err(got.sample, base.sample)
    print(f"demo optimised: rel err vs torch {vs_torch:.2e}, vs plain bundle {vs_plain:.2e} (bound {bound:.2e})")
    assert vs_torch <= bound and vs_plain <= bound
    assert got.applied is not None and np.array_equal(got.applied, ref_applied)
    assert manifest.num_inference_steps == DEMO_STEPS


def test_tiny_sd_optimized_parity(tiny_optimized: Exported) -> None:
    source, manifest, _ = tiny_optimized
    assert all(g.optimization is not None for g in manifest.graphs.values())
    assert set(manifest.graphs) == {"denoiser", "text_encoder", "vae_decoder"}
    check_graph_parity(source, manifest)
    # The plain bundle's loop test, on the optimised bundle: reference preset with re-noise and SLD, the loop
    # within 2 r of PyTorch's (as the plain bundle is), the gate's decisions equal, the VAE graph within its bound.
    plain.test_tiny_sd_loop_parity_reference_and_sld(tiny_optimized)


def test_cpp_runs_an_optimized_bundle(cpp: Path, tiny_optimized: Exported, tmp_path: Path) -> None:
    _, manifest, out = tiny_optimized
    prompt, seed, steps = "a photo of a cat", 5, manifest.num_inference_steps
    want = Bundle(out, threads=1).sample([prompt], seed=seed, steps=steps).sample
    args = ["--prompt", prompt, "--seed", str(seed), "--steps", str(steps), "--threads", "1"]
    run(
        cpp,
        "generate",
        "--bundle",
        str(out),
        *args,
        "--out",
        str(tmp_path / "x.png"),
        "--sample-out",
        str(tmp_path / "x.npy"),
    )
    got = np.load(tmp_path / "x.npy")
    print(f"C++ vs Python on the optimised tiny SD bundle: rel err {rel_err(got, want):.2e}")
    assert rel_err(got, want) <= PARITY_RTOL  # the same graphs, both loaded without re-optimising
