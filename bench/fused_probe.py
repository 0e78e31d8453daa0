"""Probe: would a fused kernel reach the memory roofline where the library kernel cannot?

Not part of the package. It answers one question for the project's design decision (docs/performance.md): the
library kernel (``core.kernel``, two BLAS matmuls per cache-sized chunk) stays near 2x one GEMV over the bank when
every bank item carries weight (the highest-noise steps), because the second matmul re-reads each chunk from the
last-level cache. A fused loop uses each bank row for the B dot products and, while the row is still in L1/L2, for
the B weighted sums (online softmax, the flash-attention recurrence per row), so the bank is read from memory once.

What is measured (SD latents D = 4x64x64, float32, 1 thread, in one process, interleaved rounds):

* **gemv**: ``x @ bank.T`` over the same bank (the roofline the issue names);
* **ours**: ``core.kernel.unsafe_posterior_mean`` with precomputed norms (the shipped kernel);
* **fused**: the loop below, compiled here with the system C compiler (``cc -O3 -march=native -fopenmp-simd``) and
  called through ctypes on the tensors' memory; its error against a float64 softmax is printed beside ours.

Regimes as in bench/correction.py: queries near bank items at abar 0.5 (nearly one-hot weights) and pure noise at
abar 0.005 (every item weighted). The C source is the probe's own; needs a C compiler (a clear error otherwise).

Run: ``.venv/bin/python bench/fused_probe.py [--repeats 25] [--out bench/results/fused_probe.json]``.
"""

from __future__ import annotations

import argparse
import ctypes
import math
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, print_table, write_json
from correction_methods import LATENT_SHAPE, make_bank, make_inputs

from safe_denoiser.core.kernel import bank_sq_norms, unsafe_posterior_mean

C_SOURCE = r"""
#include <math.h>
#include <string.h>

/* E = sum_n softmax_n(logit) y_n per query b, logit_bn = coef_b <x_b, y_n> + bias_bn, in one pass over the rows:
   each row is loaded from memory by the dot products and reused from L1/L2 by the weighted sums. */
void fused_kernel_mean(const float *restrict x, int B, const float *restrict Y, long N, long D,
                       const float *restrict bias, const float *restrict coef, float *restrict acc,
                       float *restrict run_max, float *restrict run_sum) {
    for (int b = 0; b < B; ++b) { run_max[b] = -INFINITY; run_sum[b] = 0.0f; }
    memset(acc, 0, sizeof(float) * (size_t)B * (size_t)D);
    for (long n = 0; n < N; ++n) {
        const float *restrict y = Y + n * D;
        for (int b = 0; b < B; ++b) {
            const float *restrict xb = x + (long)b * D;
            float *restrict ab = acc + (long)b * D;
            float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
            for (long d = 0; d < D; ++d) dot += xb[d] * y[d];
            const float logit = coef[b] * dot + bias[(long)b * N + n];
            if (logit > run_max[b]) { /* the running maximum moves: rescale what was accumulated */
                const float r = expf(run_max[b] - logit);
                if (run_sum[b] > 0.0f) {
#pragma omp simd
                    for (long d = 0; d < D; ++d) ab[d] *= r;
                }
                run_sum[b] *= r;
                run_max[b] = logit;
            }
            const float w = expf(logit - run_max[b]);
            if (w == 0.0f) continue; /* underflowed: adds exact zeros */
            run_sum[b] += w;
#pragma omp simd
            for (long d = 0; d < D; ++d) ab[d] += w * y[d];
        }
    }
    for (int b = 0; b < B; ++b) {
        const float inv = 1.0f / run_sum[b];
        float *restrict ab = acc + (long)b * D;
        for (long d = 0; d < D; ++d) ab[d] *= inv;
    }
}
"""


def compile_kernel(workdir: Path) -> ctypes.CDLL:
    """Build the C source into a shared library in ``workdir`` and load it."""
    compiler = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if compiler is None:
        raise SystemExit("fused_probe: no C compiler (cc, gcc or clang) on PATH; the probe compiles its kernel")
    src, lib = workdir / "fused.c", workdir / "fused.so"
    src.write_text(C_SOURCE, encoding="utf-8")
    flags = ["-O3", "-march=native", "-fopenmp-simd", "-fPIC", "-shared", "-std=c11"]
    subprocess.run([compiler, *flags, str(src), "-o", str(lib), "-lm"], check=True)
    dll = ctypes.CDLL(str(lib))
    fp = ctypes.POINTER(ctypes.c_float)
    dll.fused_kernel_mean.argtypes = [fp, ctypes.c_int, fp, ctypes.c_long, ctypes.c_long, fp, fp, fp, fp, fp]
    dll.fused_kernel_mean.restype = None
    return dll


def _ptr(t: Tensor) -> Any:
    return ctypes.cast(t.data_ptr(), ctypes.POINTER(ctypes.c_float))


def reference_mean(x: Tensor, bank: Tensor, alpha_bar: float) -> Tensor:
    """Float64 softmax-weighted bank mean with the forward kernel (scale sqrt(abar), variance 1 - abar)."""
    xd, yd = x.reshape(x.shape[0], -1).double(), bank.reshape(bank.shape[0], -1).double()
    logits = -torch.cdist(xd, math.sqrt(alpha_bar) * yd).square() / (2.0 * (1.0 - alpha_bar))
    return torch.softmax(logits, dim=1) @ yd


def run_case(dll: ctypes.CDLL, queries: str, alpha_bar: float, b: int, n: int, repeats: int) -> dict[str, Any]:
    bank = make_bank(n, LATENT_SHAPE, seed=0)
    x_t, _ = make_inputs(bank, b, alpha_bar, seed=1, queries=queries)
    flat, xf = bank.reshape(n, -1), x_t.reshape(b, -1).contiguous()
    d = flat.shape[1]
    norms = bank_sq_norms(bank)
    s, h = math.sqrt(alpha_bar), 1.0 - alpha_bar
    coef = torch.full((b,), s / h)
    bias = (-0.5 * (s / h) * s * norms).expand(b, n).contiguous()
    acc, run_max, run_sum = torch.empty(b, d), torch.empty(b), torch.empty(b)

    def fused() -> Tensor:
        dll.fused_kernel_mean(
            _ptr(xf), b, _ptr(flat), n, d, _ptr(bias), _ptr(coef), _ptr(acc), _ptr(run_max), _ptr(run_sum)
        )
        return acc

    calls = {
        "gemv": lambda: xf @ flat.T,
        "ours": lambda: unsafe_posterior_mean(x_t, bank, alpha_bar, bank_sq_norms=norms),
        "fused": fused,
    }
    ref = reference_mean(x_t, bank, alpha_bar)
    err = {
        "ours": float((calls["ours"]().reshape(b, -1).double() - ref).abs().max()),
        "fused": float((fused().double() - ref).abs().max()),
    }
    scale = float(ref.abs().max())
    if err["fused"] > 1e-3 * scale:
        raise SystemExit(f"fused_probe: the fused kernel is wrong ({err['fused']:.3g} vs float64, scale {scale:.3g})")
    times: dict[str, list[float]] = {k: [] for k in calls}
    with torch.inference_mode():
        for fn in calls.values():
            fn()
        for _ in range(repeats):
            for name, fn in calls.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    ratio = {k: statistics.median(t / g for t, g in zip(v, times["gemv"], strict=True)) for k, v in times.items()}
    return {
        "queries": queries,
        "alpha_bar": alpha_bar,
        "b": b,
        "n": n,
        "gemv_ms": 1e3 * statistics.median(times["gemv"]),
        "ours_ms": 1e3 * statistics.median(times["ours"]),
        "fused_ms": 1e3 * statistics.median(times["fused"]),
        "ours_x_gemv": ratio["ours"],
        "fused_x_gemv": ratio["fused"],
        "ours_err_f64": err["ours"],
        "fused_err_f64": err["fused"],
        "mean_absmax": scale,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--repeats", type=int, default=25, help="interleaved timed rounds per case")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "fused_probe.json")
    args = p.parse_args(argv)
    if args.repeats < 1:
        raise SystemExit(f"--repeats must be a positive int, got {args.repeats}")
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        dll = compile_kernel(Path(tmp))
        for queries, alpha_bar in (("near", 0.5), ("noise", 0.005)):
            for n in (515, 3000):
                for b in (1, 2):
                    rows.append(run_case(dll, queries, alpha_bar, b, n, args.repeats))
                    print(f"  {queries} B={b} N={n} done", file=sys.stderr, flush=True)
    print_table(
        ["queries", "abar", "B", "N", "GEMV ms", "ours / GEMV", "fused / GEMV", "ours err (f64)", "fused err (f64)"],
        [
            [
                r["queries"],
                r["alpha_bar"],
                r["b"],
                r["n"],
                f"{r['gemv_ms']:.2f}",
                f"{r['ours_x_gemv']:.2f}x",
                f"{r['fused_x_gemv']:.2f}x",
                f"{r['ours_err_f64']:.1e}",
                f"{r['fused_err_f64']:.1e}",
            ]
            for r in rows
        ],
    )
    result = {"benchmark": "fused_probe", "machine": machine_info(1), "repeats": args.repeats, "rows": rows}
    write_json(args.out, result)
    print(f"\nJSON written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
