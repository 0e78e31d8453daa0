"""``export --precision fp16 | int8`` and ``--optimize cuda`` (export/precision.py, export/fusion.py).

Bounds. A float16 network rounds each weight and activation with unit u16 = 2^-11 instead of u32 = 2^-24; the step
graph's float32 bound of ``step_bounds`` (NETWORK_DEPTH roundings of values up to max|output|) therefore becomes
NETWORK_DEPTH u16 max|noise_pred| for the float16 graph against the float32 one (the correction after the network
is float32 in both). For the demo's sampling loop the float16 bundle lies within 2 r16 of the float32 bundle, r16 =
rel_err(PyTorch loop with every UNet output moved by +-NETWORK_DEPTH u16 max|output|, exact loop)
(``step_bounds.perturbed`` at ``U16``). int8 has no such rounding model (per-tensor scales of the activations'
range): its differences are measured and printed, and what is asserted is structural: the network's MatMul / Conv
nodes quantized, every other node and the bank bytes untouched.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from test_export import _demo_loop, demo, demo_args, demo_bank, rel_err, tiny, tiny_bank, work

from safe_denoiser.export.exporter import (
    ExportOptions,
    ExportSource,
    build_denoiser,
    denoiser_inputs,
    export_bundle,
    load_source,
)
from safe_denoiser.runtime.bundle import Bundle, make_session
from safe_denoiser.runtime.graph_records import ProviderMismatchError
from safe_denoiser.runtime.manifest import BANK_INITIALIZER, MANIFEST_NAME, Manifest

from step_bounds import NETWORK_DEPTH, U16, perturbed

__all__ = ["demo", "demo_bank", "tiny", "tiny_bank", "work"]  # fixtures shared with test_export

Exported = tuple[ExportSource, Manifest, Path]
FAST = {"verify": False}


def _export(source: ExportSource, out: Path, **options: Any) -> Exported:
    return source, export_bundle(source, out, ExportOptions(**FAST, **options)), out


@pytest.fixture(scope="module")
def demo16(work: Path, demo_bank: Path) -> Exported:
    return _export(load_source(demo_args(demo_bank)), work / "demo16", precision="fp16")


@pytest.fixture(scope="module")
def tiny16(tiny: Exported, work: Path) -> Exported:
    return _export(tiny[0], work / "tiny16", precision="fp16")


@pytest.fixture(scope="module")
def demo8(work: Path, demo_bank: Path) -> Exported:
    return _export(load_source(demo_args(demo_bank)), work / "demo8", precision="int8")


def _initializer(path: Path, name: str) -> Any:
    return next(t for t in onnx.load(str(path)).graph.initializer if t.name == name)


def _bank_unchanged(out: Path, reference: Path) -> None:
    got, want = (
        _initializer(out / "denoiser.onnx", BANK_INITIALIZER),
        _initializer(reference / "denoiser.onnx", BANK_INITIALIZER),
    )
    assert got.data_type == onnx.TensorProto.FLOAT and got.raw_data == want.raw_data
    assert Manifest.load(out).bank == Manifest.load(reference).bank  # hash recorded and checked on load


def _step_feeds(source: ExportSource, manifest: Manifest) -> dict[str, np.ndarray]:
    step = build_denoiser(source)
    names = manifest.graphs["denoiser"].input_names
    return {n: v.numpy() for n, v in zip(names, denoiser_inputs(source, step, 3, seed=4), strict=True)}


def _outputs(out: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    session = make_session(out / "denoiser.onnx")
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds), strict=True))


def test_fp16_step_within_float16_bound(tiny: Exported, tiny16: Exported, demo: Exported, demo16: Exported) -> None:
    for (source, m32, b32), (_, m16, b16) in ((tiny, tiny16), (demo, demo16)):
        assert m16.precision == "fp16" and m16.graphs["denoiser"].precision is not None
        assert all(s.dtype != "float16" for g in m16.graphs.values() for s in (*g.inputs, *g.outputs))
        _bank_unchanged(b16, b32)
        feeds = _step_feeds(source, m32)
        want, got = _outputs(b32, feeds), _outputs(b16, feeds)
        bound = NETWORK_DEPTH * U16 * float(np.abs(want["noise_pred"]).max())
        worst = float(np.abs(got["noise_pred"] - want["noise_pred"]).max())
        print(f"{m32.source} fp16 step: max |noise_pred - fp32| {worst:.2e} (bound {bound:.2e})")
        assert worst <= bound
        assert np.array_equal(got["correction_applied"], want["correction_applied"])


def test_fp16_demo_loop_and_firing_record(demo: Exported, demo16: Exported) -> None:
    source, _, out = demo16
    labels = [7, 1, 0]
    got, ref, _, ref_applied = _demo_loop(source, out, labels)
    noise = torch.randn(len(labels), 1, 8, 8, generator=torch.Generator().manual_seed(0))
    kw: dict[str, Any] = {"guidance_scale": 2.0, "num_inference_steps": demo[1].num_inference_steps}
    with perturbed(source.pipe.unet, unit=U16):
        moved = source.pipe(class_labels=labels, latents=noise, output_type="latent", **kw).images.numpy()
    base = Bundle(demo[2]).sample(labels, noise=noise.numpy())
    bound, err = 2 * rel_err(moved, ref), rel_err(got.sample, base.sample)
    print(f"demo fp16 loop: rel err vs fp32 bundle {err:.2e} (bound {bound:.2e})")
    assert err <= bound
    assert got.applied is not None and np.array_equal(got.applied, base.applied)
    assert np.array_equal(got.applied, ref_applied)


def test_int8_quantizes_only_the_network(demo: Exported, demo8: Exported) -> None:
    _, manifest, out = demo8
    record = manifest.graphs["denoiser"].precision
    assert manifest.precision == "int8" and record is not None and (record.dtype, record.method) == ("int8", "dynamic")
    _bank_unchanged(out, demo[2])
    nodes = list(onnx.load(str(out / "denoiser.onnx")).graph.node)
    quantized = [n for n in nodes if n.op_type in ("MatMulInteger", "ConvInteger")]
    assert quantized and all(n.name.startswith("/unet/") for n in quantized)
    # Dynamic int8 is for CPU, whose ConvInteger is slower than float32 Conv: the convolutions stay float32.
    assert {n.op_type for n in quantized} == {"MatMulInteger"}
    assert [n for n in nodes if n.op_type == "Conv" and n.name.startswith("/unet/")]
    # The record counts the float graph's network MatMul / Gemm nodes handed to the quantizer; it gives int8 weights
    # to those with a constant weight (not attention's activation x activation products).
    float_nodes = onnx.load(str(demo[2] / "denoiser.onnx")).graph.node
    candidates = [n for n in float_nodes if n.op_type in ("MatMul", "Gemm") and n.name.startswith("/unet/")]
    assert record.nodes == len(candidates) and 0 < len(quantized) < len(candidates)
    # The correction's kernel (x @ bank^T and the weighted sum over the bank) stays float32 MatMul.
    assert [n for n in nodes if n.op_type == "MatMul" and not n.name.startswith("/unet/")]
    feeds = _step_feeds(demo[0], demo[1])
    want, got = _outputs(demo[2], feeds), _outputs(out, feeds)
    scale = float(np.abs(want["noise_pred"]).max())
    worst = float(np.abs(got["noise_pred"] - want["noise_pred"]).max())
    labels = [7, 1, 0, 4]
    a = Bundle(out).sample(labels, seed=1)
    b = Bundle(demo[2]).sample(labels, seed=1)
    print(
        f"demo int8 step: max |noise_pred - fp32| {worst:.3e} of max {scale:.2f};"
        f" loop rel err {rel_err(a.sample, b.sample):.3e}, firing record equal: {np.array_equal(a.applied, b.applied)}"
    )
    assert np.isfinite(got["noise_pred"]).all() and worst < scale


def test_int8_external_data_holds_one_copy_of_the_weights(work: Path, demo_bank: Path) -> None:
    """With external data (SD-size graphs) the quantized graph's .data file holds exactly the bytes its tensors
    point at, from offset 0 (onnx appends to an existing data file: the quantizer's own would stay in front of them,
    which doubled the SD-1.4 int8 bundle), and the graph runs."""
    from onnx.external_data_helper import uses_external_data

    _, manifest, out = _export(
        load_source(demo_args(demo_bank)), work / "demo8ext", precision="int8", external_data="always"
    )
    data = manifest.graphs["denoiser"].external_data
    assert data is not None
    proto = onnx.load(str(out / "denoiser.onnx"), load_external_data=False)
    spans = []
    for t in proto.graph.initializer:
        if uses_external_data(t):
            info = {e.key: int(e.value) for e in t.external_data if e.key in ("offset", "length")}
            spans.append((info.get("offset", 0), info["length"]))
    assert spans and min(o for o, _ in spans) == 0
    assert (out / data).stat().st_size == max(o + n for o, n in spans)
    modes = {f.name: f.stat().st_mode & 0o777 for f in out.iterdir() if f.is_file()}
    assert modes[data] == modes["denoiser.onnx"] == modes["manifest.json"], modes  # readable like the rest
    labels = [7, 1]
    assert np.isfinite(Bundle(out).sample(labels, seed=1).sample).all()


def test_int8_qdq_quantizes_the_network_with_calibrated_ranges(tiny: Exported, work: Path) -> None:
    """``--int8-format qdq`` (TensorRT's form; ONNX Runtime's CPU provider runs it too): the network's MatMul / Conv /
    Gemm nodes get QDQ pairs with scales from the recorded calibration steps; the correction and the bank stay float32.
    Random weights have no smooth activation ranges, so the step's difference is printed, not bounded."""
    source, m32, plain = tiny
    _, manifest, out = _export(source, work / "tiny8qdq", precision="int8", int8_format="qdq")
    record = manifest.graphs["denoiser"].precision
    assert record is not None and (record.dtype, record.method) == ("int8", "qdq")
    assert record.calibration_feeds == 8  # two 4-step DDIM trajectories (precision.calibration_feeds)
    float_nodes = onnx.load(str(plain / "denoiser.onnx")).graph.node
    candidates = [n for n in float_nodes if n.op_type in ("MatMul", "Conv", "Gemm") and n.name.startswith("/unet/")]
    assert record.nodes == len(candidates) > 0
    _bank_unchanged(out, plain)
    nodes = list(onnx.load(str(out / "denoiser.onnx")).graph.node)
    dequantized = {o for n in nodes if n.op_type == "DequantizeLinear" for o in n.output}
    fed = [n for n in nodes if n.op_type in ("MatMul", "Conv", "Gemm") and dequantized & set(n.input)]
    assert fed and all(n.name.startswith("/unet/") for n in fed)  # nothing outside the network is quantized
    assert {"Conv", "MatMul"} <= {n.op_type for n in fed}
    assert [n for n in nodes if n.op_type == "MatMul" and not n.name.startswith("/unet/")]  # the correction's
    feeds = _step_feeds(source, m32)
    want, got = _outputs(plain, feeds), _outputs(out, feeds)
    worst = float(np.abs(got["noise_pred"] - want["noise_pred"]).max())
    print(f"tiny SD int8 qdq step: max |noise_pred - fp32| {worst:.3e} of max {np.abs(want['noise_pred']).max():.2f}")
    assert all(np.isfinite(v).all() for v in got.values())
    assert np.array_equal(got["correction_applied"], want["correction_applied"])


def test_cuda_fusions_recorded_and_refused_on_cpu(tiny: Exported, work: Path) -> None:
    source, _, plain = tiny
    _, manifest, out = _export(source, work / "tiny_cuda", optimize=True, optimize_for="CUDAExecutionProvider")
    unet = manifest.graphs["denoiser"].optimization
    assert unet is not None and unet.level == "transformer" and unet.provider == "CUDAExecutionProvider"
    assert {"GroupNorm", "MultiHeadAttention", "BiasSplitGelu", "NhwcConv"} <= set(
        unet.fusions
    ) and unet.requires_provider
    text = manifest.graphs["text_encoder"].optimization
    assert text is not None and not text.requires_provider  # CLIP's fusions run on the CPU too
    raw = json.loads((out / MANIFEST_NAME).read_text())["graphs"]["denoiser"]["optimization"]
    assert raw["fusions"] == unet.fusions and raw["requires_provider"] is True
    _bank_unchanged(out, plain)
    with pytest.raises(ProviderMismatchError, match=r"optimised offline for CUDAExecutionProvider .*GroupNorm"):
        make_session(out / "denoiser.onnx", optimization=unet)
    assert make_session(out / "text_encoder.onnx", optimization=text) is not None  # accepted per its record
    binary = os.environ.get("SAFE_DENOISER_CPP_BINARY")
    if binary:
        proc = subprocess.run(
            [
                binary,
                "generate",
                "--bundle",
                str(out),
                "--prompt",
                "a cat",
                "--seed",
                "1",
                "--out",
                str(work / "x.png"),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        print(proc.stderr.strip())
        assert proc.returncode == 5 and "optimised offline for CUDAExecutionProvider" in proc.stderr
