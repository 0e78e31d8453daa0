"""PyTorch eager vs onnxruntime (CPU) for the exported guided, corrected denoising step and a whole DDIM loop.

Models, each with the theorem preset and a 16-item negative bank:

* demo  - the bundled 8x8-digits model (class labels, pixel space), batch 4;
* sd14  - the SD-1.4 architecture with random weights at 32x32 latents (256x256 pixels), batch 1 (CFG batch 2 in
  the UNet), text embeddings given (the text encoder is not timed).

Per step: ``graphs.DenoiserStep`` (the module that is exported: UNet on the CFG batch, CFG, correction) in PyTorch
eager vs ``denoiser.onnx`` in an onnxruntime session, on the same inputs; median of ``--repeats`` calls after one
warm-up. End to end: the diffusers pipeline with ``safe_denoiser.attach`` (fixed ``latents=``, latent output) vs
``runtime.Bundle.sample`` (numpy DDIM over denoiser.onnx), same steps (demo 25, sd14 3); median of 5 runs (demo)
or one run (sd14), the step timing having warmed both up. PyTorch is timed first, then onnxruntime (so
onnxruntime's spinning worker threads never compete with PyTorch's). Both use ``--threads`` intra-op threads
(default 1: on a shared 2-core machine two threads oversubscribe the cores whenever other jobs run, and PyTorch's
OpenMP threads then slow down several-fold, which would measure the machine's load rather than the runtimes).
Speed-ups are PyTorch time / onnxruntime time, in wall time and in this process's CPU time (which does not count
time spent descheduled by other jobs on a shared machine; the 1-minute load average is recorded). Also reported:
export and session-creation times and the final-sample relative difference between the two loops.

``--optimize`` adds a row per model whose bundle was exported with ``ExportOptions(optimize=True)`` (graphs stored
as ORT_ENABLE_ALL output for the CPU provider, sessions created without re-optimising): its "session s" is the
start-up saved, its step time what offline optimisation gives over the default session-time optimisation.

``--int8`` adds rows for bundles exported with ``--precision int8``, with and without ``--optimize``, one per
``--int8-formats`` entry: dynamic (int8 weights of the UNet's MatMul / Gemm, activations quantized per call) and / or
qdq (QDQ int8 MatMul / Conv / Gemm, activation ranges calibrated on the bundle's own denoiser inputs); the correction
stays float32. Their "final rel diff" is against PyTorch's float32 loop.

Usage: python bench/ort_vs_torch.py [--quick] [--optimize] [--int8 [--int8-formats dynamic,qdq]] [--threads 1]
[--repeats K] [--out bench/results/ort_vs_torch.json] (``--quick``: the demo model only.)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, print_table, write_json

from safe_denoiser import NegativeBank, attach, detach
from safe_denoiser.export.exporter import ExportOptions, build_denoiser, denoiser_inputs, export_bundle, load_source
from safe_denoiser.runtime.bundle import Bundle


def median_seconds(fn: Callable[[], Any], repeats: int, warmup: bool = True) -> tuple[float, float, Any]:
    """(median wall s, median process CPU s, last result) over ``repeats`` calls after an optional warm-up.

    CPU time does not count time spent descheduled by other jobs on a shared machine (but does count spinning).
    """
    if warmup:
        fn()  # allocator, oneDNN/ORT kernel selection
    walls, cpus, result = [], [], None
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        result = fn()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return statistics.median(walls), statistics.median(cpus), result


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def model_settings(name: str, bank: Path, steps: int) -> dict[str, Any]:
    common = {
        "scheduler": "ddim",
        "num_inference_steps": steps,
        "bank": str(bank),
        "safe_denoiser": {"preset": "constant", "beta": 0.5, "window": [0, 800]},
    }
    if name == "demo":
        return {"model": "demo", "guidance_scale": 2.0, **common}
    return {"model": "sd14-random", "guidance_scale": 7.5, "height": 256, "width": 256, **common}


def torch_side(
    name: str, source: Any, batch: int, steps: int, repeats: int, e2e_repeats: int, shape: tuple[int, ...]
) -> dict[str, Any]:
    """PyTorch eager: the exported module's step, then the attached pipeline's whole loop."""
    step = build_denoiser(source)
    inputs = denoiser_inputs(source, step, batch, seed=0)
    inputs[step.input_names.index("timestep")] = torch.full((batch,), 500.0)  # inside the window: correction runs
    ab = source.pipe.scheduler.alphas_cumprod[500].float()
    inputs[step.input_names.index("alpha_bar")] = torch.full((batch,), float(ab))
    with torch.no_grad():
        step_s, step_cpu, out = median_seconds(lambda: step(*inputs), repeats)
    step_out = out[0].numpy()
    log(f"{name}: torch step {step_s * 1e3:.1f} ms")

    noise = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(1))
    pipe = source.pipe
    if name == "demo":
        labels = [7, 1, 4, 0][:batch]
        call: dict[str, Any] = {"class_labels": labels, "guidance_scale": 2.0}
        conditioning: Any = labels
        ort_kwargs: dict[str, Any] = {}
    else:
        emb = inputs[step.input_names.index("prompt_embeds")]
        neg = inputs[step.input_names.index("negative_prompt_embeds")]
        call = {"prompt_embeds": emb, "negative_prompt_embeds": neg, "guidance_scale": 7.5, "height": 256, "width": 256}
        conditioning = emb.numpy()
        ort_kwargs = {"negative": neg.numpy()}

    def run_torch() -> np.ndarray:
        return pipe(num_inference_steps=steps, latents=noise, output_type="latent", **call).images.numpy()

    attach(pipe, source.bank, source.guidance)
    try:
        with torch.no_grad():  # the loop is long enough to need no warm-up (the step above warmed up)
            e2e_s, e2e_cpu, final = median_seconds(run_torch, e2e_repeats, warmup=False)
    finally:
        detach(pipe)
    log(f"{name}: torch end-to-end {e2e_s:.2f} s")
    return {
        "inputs": inputs,
        "noise": noise,
        "conditioning": conditioning,
        "ort_kwargs": ort_kwargs,
        "step_s": step_s,
        "step_cpu_s": step_cpu,
        "e2e_s": e2e_s,
        "e2e_cpu_s": e2e_cpu,
        "step_out": step_out,
        "final": final,
    }


def build_and_export(
    name: str, steps: int, tmp: Path, optimize: bool, precision: str = "fp32", int8_format: str = "dynamic"
) -> tuple[Any, Path, tuple[int, ...], float, float]:
    """(source, bundle folder, sample shape, build seconds, export seconds) of one model with a random 16-item bank."""
    shape = (1, 8, 8) if name == "demo" else (4, 32, 32)
    bank = NegativeBank.from_tensor(torch.randn(16, *shape, generator=torch.Generator().manual_seed(0)))
    bank_path = bank.save(tmp / f"{name}_bank.safetensors")
    t0 = time.perf_counter()
    source = load_source(model_settings(name, bank_path, steps))
    build_s = time.perf_counter() - t0
    log(f"{name}: built in {build_s:.1f} s; exporting")
    t0 = time.perf_counter()
    folder = tmp / f"{name}-{precision}-{int8_format}{'-optimized' if optimize else ''}"
    options = ExportOptions(verify=False, optimize=optimize, precision=precision, int8_format=int8_format)  # type: ignore[arg-type]
    export_bundle(source, folder, options)
    export_s = time.perf_counter() - t0
    log(f"{name}: exported in {export_s:.1f} s")
    return source, folder, shape, build_s, export_s


def row_label(name: str, optimize: bool, precision: str, int8_format: str = "dynamic") -> str:
    """The table's model column: the model and the export flags of its bundle."""
    label = name + (" --optimize" if optimize else "") + (f" --precision {precision}" if precision != "fp32" else "")
    return label + (f" --int8-format {int8_format}" if precision == "int8" else "")


def run_model(
    name: str,
    batch: int,
    steps: int,
    repeats: int,
    e2e_repeats: int,
    threads: int,
    tmp: Path,
    optimize: bool = False,
    precision: str = "fp32",
    int8_format: str = "dynamic",
) -> dict:
    source, folder, shape, build_s, export_s = build_and_export(name, steps, tmp, optimize, precision, int8_format)

    torch_res = torch_side(name, source, batch, steps, repeats, e2e_repeats, shape)
    del source  # free the PyTorch weights before onnxruntime loads its copy
    inputs, noise, conditioning, ort_kwargs = (torch_res[k] for k in ("inputs", "noise", "conditioning", "ort_kwargs"))
    torch_step, torch_e2e = torch_res["step_s"], torch_res["e2e_s"]
    torch_step_cpu, torch_e2e_cpu = torch_res["step_cpu_s"], torch_res["e2e_cpu_s"]
    ref_out, torch_final = torch_res["step_out"], torch_res["final"]

    t0 = time.perf_counter()
    bundle = Bundle(folder, threads=threads)
    session = bundle.session("denoiser")
    session_s = time.perf_counter() - t0
    feeds = {n: v.numpy() for n, v in zip(bundle.manifest.graphs["denoiser"].input_names, inputs, strict=True)}
    ort_step, ort_step_cpu, out = median_seconds(lambda: session.run(["noise_pred"], feeds), repeats)
    step_diff = float(np.abs(out[0] - ref_out).max())

    def run_ort() -> np.ndarray:
        return bundle.sample(conditioning, noise=noise.numpy(), steps=steps, **ort_kwargs).sample

    ort_e2e, ort_e2e_cpu, ort_final = median_seconds(run_ort, e2e_repeats, warmup=False)
    rel = float(np.linalg.norm(ort_final - torch_final) / np.linalg.norm(torch_final))
    log(f"{name}: ort step {ort_step * 1e3:.1f} ms, end-to-end {ort_e2e:.2f} s")
    return {
        "model": row_label(name, optimize, precision, int8_format),
        "optimize": optimize,
        "precision": precision,
        "int8_format": int8_format if precision == "int8" else None,
        "batch": batch,
        "sample_shape": list(shape),
        "steps": steps,
        "torch_step_ms": torch_step * 1e3,
        "ort_step_ms": ort_step * 1e3,
        "step_speedup": torch_step / ort_step,
        "torch_e2e_s": torch_e2e,
        "ort_e2e_s": ort_e2e,
        "e2e_speedup": torch_e2e / ort_e2e,
        "torch_step_cpu_ms": torch_step_cpu * 1e3,
        "ort_step_cpu_ms": ort_step_cpu * 1e3,
        "step_speedup_cpu": torch_step_cpu / ort_step_cpu,
        "torch_e2e_cpu_s": torch_e2e_cpu,
        "ort_e2e_cpu_s": ort_e2e_cpu,
        "e2e_speedup_cpu": torch_e2e_cpu / ort_e2e_cpu,
        "load_average_1min": os.getloadavg()[0],
        "build_s": build_s,
        "export_s": export_s,
        "session_s": session_s,
        "step_max_abs_diff": step_diff,
        "final_rel_diff": rel,
    }


def print_rows(rows: list[dict], threads: int) -> None:
    """The results table, with the load average each row ended at."""
    header = [
        "model",
        "batch",
        "steps",
        "torch step ms",
        "ort step ms",
        "step speed-up",
        "torch e2e s",
        "ort e2e s",
        "e2e speed-up",
        "step speed-up (CPU time)",
        "e2e speed-up (CPU time)",
        "export s",
        "session s",
        "final rel diff",
    ]
    table = [
        [
            r["model"],
            r["batch"],
            r["steps"],
            f"{r['torch_step_ms']:.1f}",
            f"{r['ort_step_ms']:.1f}",
            f"{r['step_speedup']:.2f}x",
            f"{r['torch_e2e_s']:.2f}",
            f"{r['ort_e2e_s']:.2f}",
            f"{r['e2e_speedup']:.2f}x",
            f"{r['step_speedup_cpu']:.2f}x",
            f"{r['e2e_speedup_cpu']:.2f}x",
            f"{r['export_s']:.1f}",
            f"{r['session_s']:.1f}",
            f"{r['final_rel_diff']:.1e}",
        ]
        for r in rows
    ]
    load = ", ".join(f"{r['model']} {r['load_average_1min']:.1f}" for r in rows)
    print(f"threads: {threads} (PyTorch and onnxruntime), CPU, PyTorch fp32; 1-min load average at the end: {load}")
    print_table(header, table)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true", help="the demo model only")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads for PyTorch and onnxruntime (default 1)")
    p.add_argument("--repeats", type=int, default=None, help="timed step calls per model (default: demo 30, sd14 3)")
    p.add_argument("--optimize", action="store_true", help="also time bundles exported with --optimize")
    p.add_argument("--int8", action="store_true", help="also time bundles exported with --precision int8")
    p.add_argument(
        "--int8-formats", default="dynamic", help="with --int8: comma-separated --int8-format values (dynamic, qdq)"
    )
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "ort_vs_torch.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    formats = [f.strip() for f in args.int8_formats.split(",") if f.strip()]
    if not set(formats) <= {"dynamic", "qdq"}:
        p.error(f"--int8-formats takes dynamic and/or qdq, got {args.int8_formats!r}")
    variants = [("fp32", "dynamic"), *((("int8", f) for f in formats) if args.int8 else ())]
    plan = [("demo", 4, 25, args.repeats or 30, 5)]
    if not args.quick:
        plan.append(("sd14", 1, 3, args.repeats or 3, 1))
    rows = []
    with tempfile.TemporaryDirectory(prefix="ort-vs-torch-") as tmp:
        for name, batch, steps, repeats, e2e_repeats in plan:
            for precision, fmt in variants:
                for optimize in (False, True) if args.optimize else (False,):
                    row = run_model(
                        name, batch, steps, repeats, e2e_repeats, args.threads, Path(tmp), optimize, precision, fmt
                    )
                    rows.append(row)
    print_rows(rows, args.threads)
    out = write_json(args.out, {"machine": machine_info(args.threads), "rows": rows})
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
