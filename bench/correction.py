"""Benchmark: cost of the Theorem-1 correction (kernel estimate of E_unsafe + ``safe_eps``) on SD latents.

What is measured
----------------
One correction step on a batch of Stable-Diffusion-sized latents (D = 4x64x64 = 16384, float32, CPU):

* **ours**: ``safe_denoiser.core.kernel.unsafe_posterior_mean`` (log space, online logsumexp, the bank's squared
  norms precomputed once as ``NegativeBank`` holds them, no (B, N, D) tensor) followed by
  ``safe_denoiser.core.correction.safe_eps``. By default this runs the compiled one-pass kernel
  (``core.fused``: each bank row read once for the dot products and the weighted sums, rows split over the
  threads); also with the bank stored in float16 (**ours-f16**, float32 arithmetic). **ours-torch** is the same
  call with the compiled kernel switched off (``SAFE_DENOISER_FUSED_KERNEL=0``): the PyTorch loop of two matmuls
  per cache-sized chunk, as it runs where the extension is not built; ``--chunk-size`` fixes its chunk (a fixed
  chunk always takes the PyTorch loop).
* **ours-odds**: the whole correction of the conditional-odds preset (``core.step.theorem_correction`` with
  ``SafeGuidance.odds(odds_sigma=1.0)``, window open): E_unsafe at x_t and the odds' kernel at the denoised
  estimate in one stacked pass over the negative bank, then one pass over a reference bank of the same size
  (norms and the banks' data variance precomputed, as ``attach`` holds them). It must read two banks, so its
  roofline is the sum of the two banks' GEMVs (and reads).
* **roofline**: in the same worker, interleaved with the method's calls, one plain read of the same float32 bank:
  ``x @ bank.T`` (a GEMV, the least any estimate must do) and ``bank.sum()`` (a pure streaming read). Each method's
  time is reported as a multiple of the GEMV measured in the same round (median over rounds), as a multiple of the
  streaming read, and as effective GB/s (bank bytes as stored / time).
* **sdpa**: the same estimate through PyTorch's own fused attention kernel,
  ``torch.nn.functional.scaled_dot_product_attention`` (on CPU a flash-attention loop in C++ over key blocks with an
  online softmax): the query x_t scaled by sqrt(abar) / h, keys and values the bank, the bank's norms as an additive
  float mask, then ``safe_eps``. A library reference for "one fused pass": it does no row skipping.
* **baseline**: what the authors' research code does (docs/method.md section 3), written here: the query is
  ``.repeat``-ed into a (B, N, D) tensor, the scaled bank is subtracted by broadcasting (a second (B, N, D)
  tensor), the squared distance is summed from a third (the square), the kernel is a plain ``exp(-d / (2h))``
  and the mean is ``sum_n k_n x_n / (sum_n k_n + 1e-8)`` with no logsumexp. The same ``safe_eps`` follows.
  Both use the forward kernel of docs/method.md section 1 (scale sqrt(abar), h = 1 - abar), abar = 0.5, beta = 0.5.

Inputs: a bank of N latents whose 4-channel vectors are L2-normalised per spatial position (as the reference
code stores them); for N > 4096 the bank tiles a 4096-item random pool (the cost does not depend on the values).
x_t = sqrt(abar) x^(n) + sqrt(1 - abar) z for random bank items n (``--queries near``, the default: the
weights are nearly one-hot, as at SD size from moderate noise on), or x_t ~ N(0, I) (``--queries noise``, with a
small ``--alpha-bar`` such as 0.005: the first, highest-noise steps, where every bank item carries weight and the
second matmul cannot skip rows); eps ~ N(0, I).

How
---
* Every (method, B, N, chunk) row runs in a fresh Python subprocess (no allocator or page carry-over between
  rows) with ``torch.set_num_threads(--threads)`` and OMP/MKL thread variables set to the same value.
* Set-up (bank, inputs) is excluded. The worker then runs the same function twice on tiny inputs, so the code
  pages and the OpenMP pool are resident before anything is measured.
* Time: ``time.perf_counter`` around each call; one warm-up call (reported as ``first_call_ms``), then
  ``--repeats`` timed rounds (fewer when the warm-up shows they would exceed ``--max-row-seconds``), each timing the
  GEMV, the streaming read and the method back to back, with Python's garbage collector off and nothing else
  between calls (warm, in one process, as in a sampler's loop); the table shows the median.
* Peak memory, measured on the warm-up call and ``MEMORY_PROBES`` further calls apart from the timed ones (the
  probes' ``gc.collect`` and /proc reads would cool the caches of a timed call): on Linux the process's peak-RSS
  counter (VmHWM) is reset by writing ``5`` to ``/proc/self/clear_refs`` just before each call; the peak is VmHWM
  after the call minus VmRSS before it, i.e. the largest extra resident memory the call needed (temporaries,
  output) on top of the bank and inputs. The table shows the maximum over those calls. Tensors of 32 MiB and
  more are mmap-ed and returned to the OS on free by glibc, so big temporaries cannot hide in a cache. Without
  clear_refs the fallback is the ``ru_maxrss`` increase over the post-set-up value (a lower bound if set-up peaked
  higher); the JSON says which.
* Rows whose estimated extra working set exceeds ``--mem-cap-gib`` are not run; they are printed as
  ``skipped (would need X GiB)`` and recorded as such. The baseline estimate is three (B, N, D) float32 tensors
  plus one (N, D) (the scaled bank); ours needs (B, N) logits and (B, D) accumulators only.
* Each baseline row records whether its output is finite, whether it has NaNs, and for how many samples the kernel
  sum ``sum_n k_n`` underflowed to exactly 0 (then E_unsafe silently becomes 0).
* Correctness: on small cases (N = 515, B = 2) the float32 outputs of ours (unchunked and chunked) and of the
  baseline are compared with a float64 reference (direct differences, softmax in float64) for several abar.

Output: a table on stdout and JSON at ``--out`` (default bench/results/correction.json, written atomically).
Run: ``.venv/bin/python bench/correction.py [--quick] [--repeats K] [--alpha-bar A] [--queries near|noise]
[--out PATH]``.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from safe_denoiser.core import fused
from safe_denoiser.core.correction import safe_eps
from safe_denoiser.core.kernel import unsafe_posterior_mean
from safe_denoiser.files import atomic_write_json as write_json

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import measured_call, status_kib, timed_call
from correction_methods import (
    ALPHA_BAR,
    BASELINE_EPS,
    BETA,
    FLOAT_BYTES,
    LATENT_SHAPE,
    POOL_SIZE,
    Call,
    baseline_call,
    baseline_posterior_mean,
    estimate_extra_bytes,
    make_bank,
    make_inputs,
    odds_call,
    ours_call,
    sdpa_call,
)

GIB = 1024**3
MIB = 1024**2
RESULT_TAG = "@@BENCH_RESULT "
MEMORY_PROBES = 3  # calls measured for peak memory, apart from the timed ones
METHODS = ("ours", "ours-torch", "ours-f16", "ours-odds", "sdpa", "baseline")
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "correction.json"


# ------------------------------------------------------------------------------------------------- workers


@dataclass(frozen=True)
class WorkerSpec:
    """One benchmark row, run in its own subprocess."""

    method: str  # one of METHODS
    b: int
    n: int
    chunk: int | None
    threads: int
    repeats: int
    max_row_seconds: float
    alpha_bar: float = 0.5
    queries: str = "near"
    seed: int = 0


def run_worker(spec: WorkerSpec) -> dict[str, Any]:
    """Set up, warm up, then time and measure ``spec``'s call; returns a JSON-able record."""
    torch.set_num_threads(spec.threads)
    bank = make_bank(spec.n, LATENT_SHAPE, seed=spec.seed)
    x_t, eps = make_inputs(bank, spec.b, spec.alpha_bar, seed=spec.seed + 1, queries=spec.queries)
    stored = bank.half() if spec.method == "ours-f16" else bank
    # the conditional odds also read a reference bank (another draw of the same size); others read one bank
    reference = make_bank(spec.n, LATENT_SHAPE, seed=spec.seed + 2) if spec.method == "ours-odds" else None
    ab = spec.alpha_bar

    def build(bk: Tensor, xt: Tensor, ep: Tensor, chunk: int | None, ref: Tensor | None) -> Call:
        if spec.method == "baseline":
            return baseline_call(bk, xt, ep, ab)
        if spec.method == "sdpa":
            return sdpa_call(bk, xt, ep, ab)
        if ref is not None:
            return odds_call(bk, ref, xt, ep, chunk, ab)
        return ours_call(bk.half() if spec.method == "ours-f16" else bk, xt, ep, chunk, ab)

    fn = build(bank, x_t, eps, spec.chunk, reference)
    if spec.method == "ours-f16":
        del bank  # only the float16 copy stays resident (the roofline below reads a float32 bank of the same size)
        bank = torch.empty(stored.shape)
        bank.copy_(stored)
    gemv_x = x_t.reshape(spec.b, -1)
    flats = [bank.reshape(spec.n, -1)] + ([] if reference is None else [reference.reshape(spec.n, -1)])

    def roof_gemv() -> tuple[Tensor, Tensor | None]:  # one GEMV over every bank the method reads
        out = [gemv_x @ f.T for f in flats]
        return out[0], None

    def roof_read() -> tuple[Tensor, Tensor | None]:  # one streaming read of every bank the method reads
        out = [f.sum() for f in flats]
        return out[0], None

    tiny = build(
        bank[:16].clone(),
        x_t[:1].clone(),
        eps[:1].clone(),
        None if spec.chunk is None else 8,
        None if reference is None else reference[:16].clone(),
    )
    for _ in range(2):
        measured_call(tiny)
    setup_rss = status_kib("VmRSS")

    (out, k_sum), first_s, first_peak, mem_method = measured_call(fn)
    repeats = spec.repeats
    if first_s * repeats > spec.max_row_seconds:
        repeats = max(1, int(spec.max_row_seconds // max(first_s, 1e-9)))
    times: list[float] = []
    peaks: list[float] = [first_peak]
    gemv_ms: list[float] = []
    read_ms: list[float] = []
    measured_call(roof_gemv), measured_call(roof_read)
    for _ in range(min(repeats, MEMORY_PROBES)):  # memory apart: its probes (gc, /proc) would cool the caches
        peaks.append(measured_call(fn)[2])
    gc.collect()
    gc.disable()  # as timeit does: no collection lands inside a timed call
    try:
        for _ in range(repeats):  # warm, roofline and method side by side in every round: the load hits both
            gemv_ms.append(timed_call(roof_gemv) * 1e3)
            read_ms.append(timed_call(roof_read) * 1e3)
            times.append(timed_call(fn) * 1e3)
    finally:
        gc.enable()
    stored_bytes = stored.numel() * stored.element_size()
    record: dict[str, Any] = {
        **asdict(spec),
        "repeats_run": repeats,
        "ms_median": statistics.median(times),
        "ms_min": min(times),
        "ms_all": times,
        "first_call_ms": first_s * 1e3,
        "peak_mib": max(peaks),
        "peak_mib_first_call": first_peak,
        "peak_mib_all": peaks,
        "memory_method": mem_method,
        "setup_rss_mib": None if setup_rss is None else setup_rss / 1024.0,
        "bank_mib": stored_bytes / MIB,
        "banks_read": len(flats),
        "roofline_gemv_ms_median": statistics.median(gemv_ms),
        "roofline_read_ms_median": statistics.median(read_ms),
        "roofline_gemv_gbs": len(flats) * bank.numel() * 4 / 1e6 / min(gemv_ms),
        "x_roofline": statistics.median(t / r for t, r in zip(times, gemv_ms, strict=True)),
        "x_roofline_min": min(times) / min(gemv_ms),
        "x_read": statistics.median(t / r for t, r in zip(times, read_ms, strict=True)),
        "effective_gbs": len(flats) * stored_bytes / 1e6 / min(times),
        "output_finite": bool(torch.isfinite(out).all()),
        "output_has_nan": bool(torch.isnan(out).any()),
        "fused_kernel": fused.unavailable_reason() or "on",
    }
    if k_sum is not None:
        record["kernel_sum_underflow"] = int((k_sum == 0).sum())
        record["kernel_sum_max"] = float(k_sum.max())
    return record


def launch(spec: WorkerSpec, timeout_s: float) -> dict[str, Any]:
    """Run one row in a fresh interpreter; failures (OOM kill, timeout) become an ``error`` record."""
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(spec.threads)
    if spec.method == "ours-torch":
        env[fused.ENV_SWITCH] = "0"
    else:
        env.pop(fused.ENV_SWITCH, None)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(asdict(spec))]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env, check=False)
    except subprocess.TimeoutExpired:
        return {**asdict(spec), "error": f"timed out after {timeout_s:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG) :])
    return {**asdict(spec), "error": f"worker exited with {proc.returncode}: {proc.stderr.strip()[-800:]}"}


# --------------------------------------------------------------------------------------------- correctness


def reference_f64(x_t: Tensor, bank: Tensor, eps: Tensor, alpha_bar: float) -> tuple[Tensor, Tensor, float]:
    """Float64 E_unsafe and eps_safe from direct differences and a float64 softmax; also the largest log k."""
    b, n = x_t.shape[0], bank.shape[0]
    x = x_t.reshape(b, -1).double()
    y = bank.reshape(n, -1).double()
    s = math.sqrt(alpha_bar)
    logits = torch.stack([-((xi - s * y) ** 2).sum(dim=1) / (2.0 * (1.0 - alpha_bar)) for xi in x])
    mean = torch.softmax(logits, dim=1) @ y
    eps_unsafe = (x - s * mean) / math.sqrt(1.0 - alpha_bar)
    e = eps.reshape(b, -1).double()
    out = e + BETA * (e - eps_unsafe)
    return mean.reshape(x_t.shape), out.reshape(x_t.shape), float(logits.max())


def correctness_checks(threads: int) -> list[dict[str, Any]]:
    """Errors of ours and of the baseline against float64, at SD-latent size and at a toy size (D = 16)."""
    torch.set_num_threads(threads)
    rows: list[dict[str, Any]] = []
    n, b, chunk = 515, 2, 128
    for name, shape in (("sd-latent D=16384", LATENT_SHAPE), ("toy D=16", (4, 2, 2))):
        bank = make_bank(n, shape, seed=123)
        for ab in (0.05, 0.5, 0.9, 0.99):
            x_t, eps = make_inputs(bank, b, ab, seed=7)
            ref_mean, ref_out, max_log_k = reference_f64(x_t, bank, eps, ab)
            with torch.inference_mode():
                ours_mean = unsafe_posterior_mean(x_t, bank, ab)
                ours_mean_c = unsafe_posterior_mean(x_t, bank, ab, chunk_size=chunk)
                base_mean, k_sum = baseline_posterior_mean(x_t, bank, ab)
                ours_out = safe_eps(eps, x_t, ab, ours_mean, BETA)
                ours_out_c = safe_eps(eps, x_t, ab, ours_mean_c, BETA)
                base_out = safe_eps(eps, x_t, ab, base_mean, BETA)

            def err(a: Tensor, ref: Tensor) -> float:
                return float((a.double() - ref).abs().max())

            rows.append(
                {
                    "case": name,
                    "n": n,
                    "b": b,
                    "alpha_bar": ab,
                    "max_log_kernel_f64": max_log_k,
                    "ref_mean_absmax": float(ref_mean.abs().max()),
                    "ours_err_mean": err(ours_mean, ref_mean),
                    "ours_err_eps": err(ours_out, ref_out),
                    "ours_chunked_err_eps": err(ours_out_c, ref_out),
                    "ours_chunk_size": chunk,
                    "ours_finite": bool(torch.isfinite(ours_out).all() and torch.isfinite(ours_out_c).all()),
                    "baseline_err_mean": err(base_mean, ref_mean),
                    "baseline_err_eps": err(base_out, ref_out),
                    "baseline_finite": bool(torch.isfinite(base_out).all()),
                    "baseline_has_nan": bool(torch.isnan(base_out).any()),
                    "baseline_kernel_sum_underflow": int((k_sum == 0).sum()),
                }
            )
    return rows


# -------------------------------------------------------------------------------------------------- report


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _ratio(num: float | None, den: float | None) -> str:
    if num is None or den is None or den <= 0:
        return "-"
    return f"{num / den:.1f}x"


def _cell_result(rec: dict[str, Any] | None) -> tuple[str, str, float | None, float | None]:
    """(ms cell, MiB cell, ms, MiB) for a record that may be skipped or failed."""
    if rec is None:
        return "-", "-", None, None
    if "skipped" in rec:
        return rec["skipped"], "", None, None
    if "error" in rec:
        return "error", "", None, None
    return _fmt(rec["ms_median"]), _fmt(rec["peak_mib"]), rec["ms_median"], rec["peak_mib"]


def _baseline_output(rec: dict[str, Any] | None) -> str:
    if rec is None or "ms_median" not in rec:
        return "-"
    state = "NaN" if rec["output_has_nan"] else ("finite" if rec["output_finite"] else "inf")
    return f"{state}, k-sum underflow {rec['kernel_sum_underflow']}/{rec['b']}"


def _multiple(rec: dict[str, Any] | None, key: str = "x_roofline") -> str:
    return "-" if rec is None or key not in rec else f"{rec[key]:.2f}x"


def _gbs(rec: dict[str, Any] | None) -> str:
    return "-" if rec is None or "effective_gbs" not in rec else f"{rec['effective_gbs']:.1f}"


def perf_table(rows: list[dict[str, Any]]) -> str:
    header = (
        "| B | N | GEMV ms (roofline) | GEMV GB/s | ours ms | ours / GEMV | ours / read | ours GB/s "
        "| torch loop / GEMV | ours-f16 ms | f16 / GEMV(f32) | odds ms | odds / 2 GEMVs | sdpa / GEMV | ours peak MiB "
        "| baseline ms | baseline / ours | baseline output |"
    )
    lines = [header, "|" + "---|" * 18]
    for row in rows:
        ours, half, odds, base = row["ours"], row["ours-f16"], row.get("ours-odds"), row["baseline"]
        sdpa, loop = row.get("sdpa"), row.get("ours-torch")
        o_ms_s, o_mib_s, o_ms, _ = _cell_result(ours)
        h_ms_s, _, _, _ = _cell_result(half)
        d_ms_s, _, _, _ = _cell_result(odds)
        b_ms_s, _, b_ms, _ = _cell_result(base)
        roof = ours if ours is not None and "roofline_gemv_ms_median" in ours else None
        g_ms = "-" if roof is None else _fmt(roof["roofline_gemv_ms_median"], 2)
        g_bw = "-" if roof is None else _fmt(roof["roofline_gemv_gbs"])
        lines.append(
            f"| {row['b']} | {row['n']} | {g_ms} | {g_bw} | {o_ms_s} | {_multiple(ours)} | "
            f"{_multiple(ours, 'x_read')} | {_gbs(ours)} | {_multiple(loop)} | {h_ms_s} | {_multiple(half)} | "
            f"{d_ms_s} | "
            f"{_multiple(odds)} | {_multiple(sdpa)} | {o_mib_s} | {b_ms_s} | {_ratio(b_ms, o_ms)} | "
            f"{_baseline_output(base)} |"
        )
    return "\n".join(lines)


def correctness_table(rows: list[dict[str, Any]]) -> str:
    header = (
        "| case | abar | max log k (f64) | ours err E_unsafe | ours err eps | ours chunked err eps "
        "| baseline err E_unsafe | baseline err eps | baseline output |"
    )
    lines = [header, "|" + "---|" * 9]
    for r in rows:
        state = "NaN" if r["baseline_has_nan"] else ("finite" if r["baseline_finite"] else "inf")
        lines.append(
            f"| {r['case']} | {r['alpha_bar']} | {r['max_log_kernel_f64']:.1f} | {r['ours_err_mean']:.2e} | "
            f"{r['ours_err_eps']:.2e} | {r['ours_chunked_err_eps']:.2e} | {r['baseline_err_mean']:.2e} | "
            f"{r['baseline_err_eps']:.2e} | {state}, k-sum underflow {r['baseline_kernel_sum_underflow']}/{r['b']} |"
        )
    return "\n".join(lines)


def available_bytes() -> float:
    """MemAvailable now (the machine is shared: what others use is not ours to take); inf where unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            return next(int(ln.split()[1]) * 1024.0 for ln in fh if ln.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return math.inf


def machine_info(threads: int) -> dict[str, Any]:
    model = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            model = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), "")
    except OSError:
        pass
    mem_total = None
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            mem_total = int(fh.readline().split()[1]) / 1024 / 1024
    except (OSError, ValueError, IndexError):
        pass
    return {
        "torch_version": torch.__version__,
        "torch_threads": threads,
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_model": model,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "mem_total_gib": mem_total,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_avg_start": list(os.getloadavg()),
    }


# ---------------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true", help="smoke run: N in {515, 3000}, B in {1, 2}, 3 repeats")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per row after one warm-up (default 5)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON output path")
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="torch.set_num_threads value")
    p.add_argument("--chunk-size", type=int, default=None, help="fixed bank chunk for ours (default: automatic)")
    p.add_argument("--alpha-bar", type=float, default=ALPHA_BAR, help="noise level abar in (0, 1) (default 0.5)")
    p.add_argument(
        "--queries",
        choices=("near", "noise"),
        default="near",
        help="x_t near a bank item (nearly one-hot weights) or pure noise (with a small --alpha-bar: dense weights)",
    )
    p.add_argument("--methods", type=str, default=",".join(METHODS), help="comma-separated subset")
    p.add_argument("--mem-cap-gib", type=float, default=6.0, help="skip rows whose extra working set exceeds this")
    p.add_argument("--max-row-seconds", type=float, default=20.0, help="cut repeats of slow rows to fit this")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds before a row's subprocess is killed")
    p.add_argument("--worker", type=str, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker is not None:
        record = run_worker(WorkerSpec(**json.loads(args.worker)))
        print(RESULT_TAG + json.dumps(record), flush=True)
        return 0

    if not 0.0 < args.alpha_bar < 1.0:
        raise SystemExit(f"--alpha-bar must lie in (0, 1), got {args.alpha_bar}")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown or not methods:
        raise SystemExit(f"--methods: expected a comma-separated subset of {','.join(METHODS)}, got {unknown}")
    wall0 = time.perf_counter()
    repeats = args.repeats if args.repeats is not None else (3 if args.quick else 5)
    batches = (1, 2) if args.quick else (1, 2, 8)
    banks = (515, 3000) if args.quick else (515, 3000, 10000, 30000, 100000)
    d = math.prod(LATENT_SHAPE)
    cap = args.mem_cap_gib * GIB
    info = machine_info(args.threads)
    print(
        f"torch {info['torch_version']}, threads {args.threads} (torch.set_num_threads), "
        f"cpu_count {info['cpu_count']}, "
        f"D = {'x'.join(map(str, LATENT_SHAPE))} = {d}, float32, abar {args.alpha_bar}, queries {args.queries}, "
        f"beta {BETA}, repeats {repeats}"
    )

    correctness = correctness_checks(args.threads)
    gc.collect()

    def run_or_skip(method: str, b: int, n: int, chunk: int | None) -> dict[str, Any]:
        need = estimate_extra_bytes(method, b, n, d, chunk)
        spec = WorkerSpec(
            method, b, n, chunk, args.threads, repeats, args.max_row_seconds, args.alpha_bar, args.queries
        )
        resident = n * d * FLOAT_BYTES * {"ours-f16": 1.5, "ours-odds": 2.0}.get(method, 1.0)
        if need > cap:
            rec: dict[str, Any] = {**asdict(spec), "skipped": f"skipped (would need {need / GIB:.1f} GiB)"}
        elif resident + need > 0.7 * available_bytes():
            rec = {**asdict(spec), "skipped": f"skipped (bank {resident / GIB:.1f} GiB > 70% of available memory)"}
        else:
            rec = launch(spec, args.timeout)
        rec["estimated_extra_gib"] = need / GIB
        if method == "baseline":
            rec["bnd_tensor_gib"] = b * n * d * FLOAT_BYTES / GIB
        status = rec.get("skipped") or rec.get("error") or f"{rec['ms_median']:.1f} ms, {rec['peak_mib']:.1f} MiB"
        print(f"  {method:8s} B={b} N={n} chunk={chunk}: {status}", file=sys.stderr, flush=True)
        return rec

    rows: list[dict[str, Any]] = []
    for n in banks:
        for b in batches:
            row: dict[str, Any] = {"b": b, "n": n, "chunk": args.chunk_size}
            for method in METHODS:
                chunk = None if method == "baseline" else args.chunk_size
                row[method] = run_or_skip(method, b, n, chunk) if method in methods else None
            rows.append(row)

    wall = time.perf_counter() - wall0
    info["load_avg_end"] = list(os.getloadavg())
    print()
    print(perf_table(rows))
    print()
    print("Correctness vs a float64 reference (max abs error; N = 515, B = 2):")
    print(correctness_table(correctness))
    payload = {
        "benchmark": "correction",
        "description": "unsafe_posterior_mean + safe_eps vs a (B, N, D) plain-exp baseline, SD latent size, CPU",
        "config": {
            "latent_shape": list(LATENT_SHAPE),
            "d": d,
            "dtype": "float32",
            "alpha_bar": args.alpha_bar,
            "queries": args.queries,
            "methods": methods,
            "beta": BETA,
            "baseline_eps": BASELINE_EPS,
            "repeats": repeats,
            "quick": args.quick,
            "chunk_size": args.chunk_size,
            "mem_cap_gib": args.mem_cap_gib,
            "max_row_seconds": args.max_row_seconds,
            "bank_pool_size": POOL_SIZE,
        },
        "machine": info,
        "rows": rows,
        "correctness": correctness,
        "wall_seconds": wall,
    }
    write_json(args.out, payload)
    print(f"\nwall time {wall:.1f} s; JSON written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
