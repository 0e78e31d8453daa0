"""Benchmark: cost of the Theorem-1 correction (kernel estimate of E_unsafe + ``safe_eps``) on SD latents.

What is measured
----------------
One correction step on a batch of Stable-Diffusion-sized latents (D = 4x64x64 = 16384, float32, CPU):

* **ours**: the mean of ``safe_denoiser.core.kernel.path_kernel_estimate`` (log space, online logsumexp, the bank's
  squared norms precomputed once as ``NegativeBank`` holds them, no (B, N, D) tensor) followed by
  ``safe_denoiser.core.correction.safe_eps``. By default this runs the compiled one-pass kernel
  (``core.fused``: each bank row read once for the dot products and the weighted sums, rows split over the
  threads); also with the bank stored in float16 (**ours-f16**, float32 arithmetic). **ours-torch** is the same
  call with the compiled kernel switched off (``SAFE_DENOISER_FUSED_KERNEL=0``): the PyTorch loop of two matmuls
  per cache-sized chunk, as it runs where the extension is not built; ``--chunk-size`` fixes its chunk (a fixed
  chunk always takes the PyTorch loop).
* **ours-odds**: the whole correction of the conditional-odds preset (``core.step.theorem_correction`` with
  ``OddsGuidance(odds_sigma=1.0)``, window open): E_unsafe at x_t and the odds' kernel at the denoised
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
from safe_denoiser.core.kernel import path_kernel_estimate
from safe_denoiser.core.paths import vp_path
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
from correction_report import correctness_table, perf_table

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


@dataclass(frozen=True)
class Operands:
    """One call's inputs: the float32 bank, queries x_t, the model's eps, the chunk and a reference bank, if read."""

    bank: Tensor
    x_t: Tensor
    eps: Tensor
    chunk: int | None
    reference: Tensor | None

    def tiny(self) -> Operands:
        """The first 16 bank rows and the first query (chunk 8): a call that warms code pages and the thread pool."""
        return Operands(
            self.bank[:16].clone(),
            self.x_t[:1].clone(),
            self.eps[:1].clone(),
            None if self.chunk is None else 8,
            None if self.reference is None else self.reference[:16].clone(),
        )


def build_call(method: str, ops: Operands, alpha_bar: float) -> Call:
    """``method``'s correction on ``ops`` as a no-argument call (ours-f16 stores the bank in float16)."""
    if method == "baseline":
        return baseline_call(ops.bank, ops.x_t, ops.eps, alpha_bar)
    if method == "sdpa":
        return sdpa_call(ops.bank, ops.x_t, ops.eps, alpha_bar)
    if ops.reference is not None:
        return odds_call(ops.bank, ops.reference, ops.x_t, ops.eps, ops.chunk, alpha_bar)
    return ours_call(ops.bank.half() if method == "ours-f16" else ops.bank, ops.x_t, ops.eps, ops.chunk, alpha_bar)


@dataclass(frozen=True)
class Roofline:
    """The least any estimate must do, over every float32 bank the method reads: a GEMV, and a streaming read."""

    x: Tensor  # (B, D)
    banks: list[Tensor]  # (N, D) each

    def gemv(self) -> tuple[Tensor, Tensor | None]:
        """``x @ bank.T`` for every bank."""
        out = [self.x @ f.T for f in self.banks]
        return out[0], None

    def read(self) -> tuple[Tensor, Tensor | None]:
        """``bank.sum()`` for every bank."""
        out = [f.sum() for f in self.banks]
        return out[0], None


@dataclass(frozen=True)
class Measurements:
    """One row's numbers: the warm-up call's output and cost, the peak-memory probes and the timed rounds."""

    setup_rss_kib: int | None  # resident before the warm-up call: bank, inputs, code
    output: Tensor
    kernel_sum: Tensor | None
    first_s: float
    memory_method: str
    repeats: int
    peaks_mib: list[float]  # the warm-up call's first, then the probes'
    ms: list[float]
    gemv_ms: list[float]
    read_ms: list[float]


def run_worker(spec: WorkerSpec) -> dict[str, Any]:
    """Set up, warm up, then time and measure ``spec``'s call; returns a JSON-able record."""
    torch.set_num_threads(spec.threads)
    bank = make_bank(spec.n, LATENT_SHAPE, seed=spec.seed)
    x_t, eps = make_inputs(bank, spec.b, spec.alpha_bar, seed=spec.seed + 1, queries=spec.queries)
    stored = bank.half() if spec.method == "ours-f16" else bank
    # the conditional odds also read a reference bank (another draw of the same size); others read one bank
    reference = make_bank(spec.n, LATENT_SHAPE, seed=spec.seed + 2) if spec.method == "ours-odds" else None
    fn = build_call(spec.method, Operands(bank, x_t, eps, spec.chunk, reference), spec.alpha_bar)
    if spec.method == "ours-f16":
        del bank  # only the float16 copy stays resident (the roofline below reads a float32 bank of the same size)
        bank = torch.empty(stored.shape)
        bank.copy_(stored)
    banks = [bank] + ([] if reference is None else [reference])
    roofline = Roofline(x_t.reshape(spec.b, -1), [f.reshape(spec.n, -1) for f in banks])
    tiny = build_call(spec.method, Operands(bank, x_t, eps, spec.chunk, reference).tiny(), spec.alpha_bar)
    for _ in range(2):
        measured_call(tiny)
    measured = measure(fn, roofline, spec)
    record: dict[str, Any] = {
        **asdict(spec),
        **measurement_record(measured, roofline, stored.numel() * stored.element_size()),
        "fused_kernel": fused.unavailable_reason() or "on",
    }
    if measured.kernel_sum is not None:
        record["kernel_sum_underflow"] = int((measured.kernel_sum == 0).sum())
        record["kernel_sum_max"] = float(measured.kernel_sum.max())
    return record


def measure(fn: Call, roofline: Roofline, spec: WorkerSpec) -> Measurements:
    """The warm-up call, ``MEMORY_PROBES`` peak-memory calls, then the timed rounds (fewer for a slow call)."""
    setup_rss = status_kib("VmRSS")
    (out, k_sum), first_s, first_peak, mem_method = measured_call(fn)
    repeats = spec.repeats
    if first_s * repeats > spec.max_row_seconds:
        repeats = max(1, int(spec.max_row_seconds // max(first_s, 1e-9)))
    peaks: list[float] = [first_peak]
    measured_call(roofline.gemv), measured_call(roofline.read)
    for _ in range(min(repeats, MEMORY_PROBES)):  # memory apart: its probes (gc, /proc) would cool the caches
        peaks.append(measured_call(fn)[2])
    times: list[float] = []
    gemv_ms: list[float] = []
    read_ms: list[float] = []
    gc.collect()
    gc.disable()  # as timeit does: no collection lands inside a timed call
    try:
        for _ in range(repeats):  # warm, roofline and method side by side in every round: the load hits both
            gemv_ms.append(timed_call(roofline.gemv) * 1e3)
            read_ms.append(timed_call(roofline.read) * 1e3)
            times.append(timed_call(fn) * 1e3)
    finally:
        gc.enable()
    return Measurements(setup_rss, out, k_sum, first_s, mem_method, repeats, peaks, times, gemv_ms, read_ms)


def measurement_record(m: Measurements, roofline: Roofline, stored_bytes: int) -> dict[str, Any]:
    """The JSON fields of ``m``: times, peaks, the multiples of the roofline, bandwidths and the output's state."""
    times, gemv_ms, read_ms, banks_read = m.ms, m.gemv_ms, m.read_ms, len(roofline.banks)
    return {
        "repeats_run": m.repeats,
        "ms_median": statistics.median(times),
        "ms_min": min(times),
        "ms_all": times,
        "first_call_ms": m.first_s * 1e3,
        "peak_mib": max(m.peaks_mib),
        "peak_mib_first_call": m.peaks_mib[0],
        "peak_mib_all": m.peaks_mib,
        "memory_method": m.memory_method,
        "setup_rss_mib": None if m.setup_rss_kib is None else m.setup_rss_kib / 1024.0,
        "bank_mib": stored_bytes / MIB,
        "banks_read": banks_read,
        "roofline_gemv_ms_median": statistics.median(gemv_ms),
        "roofline_read_ms_median": statistics.median(read_ms),
        "roofline_gemv_gbs": banks_read * roofline.banks[0].numel() * 4 / 1e6 / min(gemv_ms),
        "x_roofline": statistics.median(t / r for t, r in zip(times, gemv_ms, strict=True)),
        "x_roofline_min": min(times) / min(gemv_ms),
        "x_read": statistics.median(t / r for t, r in zip(times, read_ms, strict=True)),
        "effective_gbs": banks_read * stored_bytes / 1e6 / min(times),
        "output_finite": bool(torch.isfinite(m.output).all()),
        "output_has_nan": bool(torch.isnan(m.output).any()),
    }


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
                ours_mean = path_kernel_estimate(x_t, bank, vp_path(ab)).mean
                ours_mean_c = path_kernel_estimate(x_t, bank, vp_path(ab), chunk_size=chunk).mean
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


# -------------------------------------------------------------------------------------------------- machine


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


@dataclass(frozen=True)
class RunPlan:
    """What the run measures: the methods, the bank and batch sizes, the worker settings and the limits."""

    methods: list[str]
    quick: bool
    repeats: int
    batches: tuple[int, ...]
    banks: tuple[int, ...]
    threads: int
    chunk_size: int | None
    alpha_bar: float
    queries: str
    mem_cap_gib: float
    max_row_seconds: float
    timeout: float

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> RunPlan:
        """The plan of the command line (``--quick``: smaller grids, 3 repeats); exits on a bad flag."""
        if not 0.0 < args.alpha_bar < 1.0:
            raise SystemExit(f"--alpha-bar must lie in (0, 1), got {args.alpha_bar}")
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        unknown = sorted(set(methods) - set(METHODS))
        if unknown or not methods:
            raise SystemExit(f"--methods: expected a comma-separated subset of {','.join(METHODS)}, got {unknown}")
        return cls(
            methods=methods,
            quick=args.quick,
            repeats=args.repeats if args.repeats is not None else (3 if args.quick else 5),
            batches=(1, 2) if args.quick else (1, 2, 8),
            banks=(515, 3000) if args.quick else (515, 3000, 10000, 30000, 100000),
            threads=args.threads,
            chunk_size=args.chunk_size,
            alpha_bar=args.alpha_bar,
            queries=args.queries,
            mem_cap_gib=args.mem_cap_gib,
            max_row_seconds=args.max_row_seconds,
            timeout=args.timeout,
        )

    def config(self) -> dict[str, Any]:
        """The JSON's ``config``."""
        return {
            "latent_shape": list(LATENT_SHAPE),
            "d": math.prod(LATENT_SHAPE),
            "dtype": "float32",
            "alpha_bar": self.alpha_bar,
            "queries": self.queries,
            "methods": self.methods,
            "beta": BETA,
            "baseline_eps": BASELINE_EPS,
            "repeats": self.repeats,
            "quick": self.quick,
            "chunk_size": self.chunk_size,
            "mem_cap_gib": self.mem_cap_gib,
            "max_row_seconds": self.max_row_seconds,
            "bank_pool_size": POOL_SIZE,
        }


def run_or_skip(plan: RunPlan, method: str, b: int, n: int, chunk: int | None) -> dict[str, Any]:
    """One row in its worker, or a ``skipped`` record when its working set would not fit; logs it to stderr."""
    d = math.prod(LATENT_SHAPE)
    need = estimate_extra_bytes(method, b, n, d, chunk)
    spec = WorkerSpec(
        method, b, n, chunk, plan.threads, plan.repeats, plan.max_row_seconds, plan.alpha_bar, plan.queries
    )
    resident = n * d * FLOAT_BYTES * {"ours-f16": 1.5, "ours-odds": 2.0}.get(method, 1.0)
    if need > plan.mem_cap_gib * GIB:
        rec: dict[str, Any] = {**asdict(spec), "skipped": f"skipped (would need {need / GIB:.1f} GiB)"}
    elif resident + need > 0.7 * available_bytes():
        rec = {**asdict(spec), "skipped": f"skipped (bank {resident / GIB:.1f} GiB > 70% of available memory)"}
    else:
        rec = launch(spec, plan.timeout)
    rec["estimated_extra_gib"] = need / GIB
    if method == "baseline":
        rec["bnd_tensor_gib"] = b * n * d * FLOAT_BYTES / GIB
    status = rec.get("skipped") or rec.get("error") or f"{rec['ms_median']:.1f} ms, {rec['peak_mib']:.1f} MiB"
    print(f"  {method:8s} B={b} N={n} chunk={chunk}: {status}", file=sys.stderr, flush=True)
    return rec


def run_rows(plan: RunPlan) -> list[dict[str, Any]]:
    """Every (N, B) row: each selected method's record (None for the others; the baseline never chunks)."""
    rows: list[dict[str, Any]] = []
    for n in plan.banks:
        for b in plan.batches:
            row: dict[str, Any] = {"b": b, "n": n, "chunk": plan.chunk_size}
            for method in METHODS:
                chunk = None if method == "baseline" else plan.chunk_size
                row[method] = run_or_skip(plan, method, b, n, chunk) if method in plan.methods else None
            rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    """Run the worker of ``--worker``, or every row and the correctness checks, then print and write the JSON."""
    args = parse_args(argv)
    if args.worker is not None:
        record = run_worker(WorkerSpec(**json.loads(args.worker)))
        print(RESULT_TAG + json.dumps(record), flush=True)
        return 0
    plan = RunPlan.from_args(args)
    wall0 = time.perf_counter()
    info = machine_info(plan.threads)
    print(
        f"torch {info['torch_version']}, threads {plan.threads} (torch.set_num_threads), "
        f"cpu_count {info['cpu_count']}, "
        f"D = {'x'.join(map(str, LATENT_SHAPE))} = {math.prod(LATENT_SHAPE)}, float32, abar {plan.alpha_bar}, "
        f"queries {plan.queries}, beta {BETA}, repeats {plan.repeats}"
    )
    correctness = correctness_checks(plan.threads)
    gc.collect()
    rows = run_rows(plan)
    wall = time.perf_counter() - wall0
    info["load_avg_end"] = list(os.getloadavg())
    print()
    print(perf_table(rows))
    print()
    print("Correctness vs a float64 reference (max abs error; N = 515, B = 2):")
    print(correctness_table(correctness))
    payload = {
        "benchmark": "correction",
        "description": "path_kernel_estimate mean + safe_eps vs a (B, N, D) plain-exp baseline, SD latent size, CPU",
        "config": plan.config(),
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
