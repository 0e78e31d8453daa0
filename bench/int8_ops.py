"""Which node types pay to quantize on CPU: one denoiser step of a float32 bundle, int8 per node-type set.

Takes a float32 bundle's ``denoiser.onnx`` (e.g. ``bench/startup.py``'s ``sd14-plain``: the SD-1.4 architecture)
and writes into ``--work`` copies quantized by the export's own ``export.precision.quantize_graph`` over the
network's nodes (``/unet/``) of one type set each: dynamic int8 (MatMulInteger / ConvInteger, activations quantized
per call) of MatMul + Gemm, of Conv, of all three; and QDQ int8 (which ONNX Runtime's CPU provider fuses into
QLinearMatMul / QLinearConv) of all three, calibrated on ``--calibration`` random input sets (enough to
time it; the export's own calibration uses real denoiser inputs, ``export.precision.calibration_feeds``). The
correction and its bank stay float32 in every copy.

Timed in one process: the median of ``--repeats`` calls of each session on the same inputs (timestep 500, inside
the correction's window), the float32 session again after each variant (so every ratio is against a neighbouring
float32 time); also each variant's relative difference from the float32 output (random calibration: a timing
figure, not an accuracy one) and its quantization seconds.

Usage: python bench/int8_ops.py BUNDLE [--variants dynamic-matmul,dynamic-conv,dynamic-all,qdq-all] [--threads 1]
[--repeats 3] [--work bench/results/int8_ops] [--out bench/results/int8_ops.json]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, print_table, write_json

from safe_denoiser.export.precision import Int8Format, network_nodes, quantize_graph
from safe_denoiser.runtime.manifest import Manifest

ROOT = Path(__file__).resolve().parents[1]
VARIANTS: dict[str, tuple[Int8Format, tuple[str, ...]]] = {
    "dynamic-matmul": ("dynamic", ("MatMul", "Gemm")),
    "dynamic-conv": ("dynamic", ("Conv",)),
    "dynamic-all": ("dynamic", ("MatMul", "Conv", "Gemm")),
    "qdq-all": ("qdq", ("MatMul", "Conv", "Gemm")),
}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def random_feeds(session: Any, sample_shape: tuple[int, ...], seed: int) -> dict[str, np.ndarray]:
    """Inputs of the session's shapes (batch 1; a sample-shaped input (B, C, H, W) the bundle's ``sample_shape``),
    timestep 500 and alpha_bar 0.3: inside every window."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in session.get_inputs():
        if len(spec.shape) == 1 + len(sample_shape) and spec.name in ("sample", "noise"):
            shape = [1, *sample_shape]
        else:
            shape = [d if isinstance(d, int) else 1 for d in spec.shape]
        if "int64" in spec.type:
            feeds[spec.name] = np.zeros(shape, np.int64)
        elif spec.name in ("timestep", "alpha_bar"):
            feeds[spec.name] = np.full(shape, 500.0 if spec.name == "timestep" else 0.3, np.float32)
        else:
            feeds[spec.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def main() -> None:
    import onnxruntime as ort

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("bundle", type=Path)
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated: " + ", ".join(VARIANTS))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--calibration", type=int, default=2, help="random input sets for the QDQ ranges")
    p.add_argument("--work", type=Path, default=ROOT / "bench" / "results" / "int8_ops")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "int8_ops.json")
    args = p.parse_args()
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    if not set(names) <= set(VARIANTS):
        p.error(f"unknown --variants {sorted(set(names) - set(VARIANTS))} (choose from {', '.join(VARIANTS)})")
    source = args.bundle / "denoiser.onnx"
    if not source.is_file():
        p.error(f"{source} does not exist (a float32 bundle folder is expected)")
    args.work.mkdir(parents=True, exist_ok=True)

    def session(path: Path) -> Any:
        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def step_seconds(s: Any, feeds: dict[str, np.ndarray]) -> tuple[float, np.ndarray]:
        s.run(None, feeds)  # warm-up
        times, out = [], None
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            out = s.run(None, feeds)[0]
            times.append(time.perf_counter() - t0)
        assert out is not None
        return statistics.median(times), out

    float_session = session(source)
    sample_shape = Manifest.load(args.bundle, check_bank=False, check_files=False).sample_shape
    feeds = random_feeds(float_session, sample_shape, 0)
    _, reference = step_seconds(float_session, feeds)
    rows = []
    for name in names:
        method, ops = VARIANTS[name]
        out = args.work / f"{name}.onnx"
        nodes = network_nodes(source, "/unet/", ops)
        t0 = time.perf_counter()
        count = args.calibration if method == "qdq" else 0
        calibration = [random_feeds(float_session, sample_shape, k) for k in range(count)]
        quantize_graph(source, out, nodes, ops, method, calibration, external=True)  # the export's own call
        quantize_s = time.perf_counter() - t0
        int8_s, got = step_seconds(session(out), feeds)
        float_s, _ = step_seconds(float_session, feeds)
        rel = float(np.linalg.norm(got - reference) / np.linalg.norm(reference))
        rows.append(
            {
                "variant": name,
                "nodes": len(nodes),
                "int8_step_ms": 1e3 * int8_s,
                "float32_step_ms": 1e3 * float_s,
                "speedup": float_s / int8_s,
                "quantize_s": quantize_s,
                "rel_diff": rel,
            }
        )
        log(f"{name}: {1e3 * int8_s:.0f} ms vs float32 {1e3 * float_s:.0f} ms")
    print(f"\n{source}, {args.threads} thread(s), median of {args.repeats}")
    print_table(
        ["int8 variant", "nodes", "int8 step ms", "float32 step ms (next)", "speed-up", "quantize s", "rel diff"],
        [
            [
                r["variant"],
                r["nodes"],
                f"{r['int8_step_ms']:.0f}",
                f"{r['float32_step_ms']:.0f}",
                f"{r['speedup']:.2f}x",
                f"{r['quantize_s']:.0f}",
                f"{r['rel_diff']:.1e}",
            ]
            for r in rows
        ],
    )
    write_json(
        args.out, {"benchmark": "int8_ops", "bundle": str(args.bundle), "rows": rows, **machine_info(args.threads)}
    )
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
