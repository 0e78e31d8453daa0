"""Per-step cost of the safe denoiser and of SLD on the SD-1.4-architecture UNet (random weights, CPU, fp32).

One denoising step as StableDiffusionPipeline runs it: UNet on the CFG batch [uncond, cond] (batch 2, 64x64
latents, 77x768 text states), CFG combination, scheduler.step. Variants, measured side by side (interleaved
rounds) in one run:

* plain         - the bare DDIM step;
* safe N=515    - the same step through ``SafeScheduler`` (constant preset, beta 0.5, bank of 515 latents);
* safe N=3000   - bank of 3,000 latents;
* sld           - ``SLDUNet`` (MEDIUM preset): one UNet call of batch 3 instead of 2.

Ratios use each variant's fastest round (other processes only ever add time), in wall time and in this
process's CPU time (which does not count time spent descheduled by other jobs on a shared machine).

The correction alone (``SafeScheduler.correct``, no UNet) is also timed over many repeats for every preset the
library ships (constant, mass, the conditional odds with a reference bank of the same size, reference, sgf,
shielded), because on a shared CPU its milliseconds are below the UNet's run-to-run noise.

Usage: python bench/pipeline_overhead.py [--rounds 3] [--threads N] [--out bench/results/pipeline_overhead.json]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from safe_denoiser import (
    ConstantGuidance,
    MassGuidance,
    OddsGuidance,
    PreparedBanks,
    ReferenceGuidance,
    SafeGuidance,
    SafeScheduler,
    SLDConfig,
    SLDUNet,
)
from safe_denoiser.core.bank import l2_normalize_positions
from safe_denoiser.core.energy_guidance import suggest_radius
from safe_denoiser.core.guidance import SGFGuidance, ShieldedGuidance
from safe_denoiser.diffusers.pipelines import make_scheduler, sd14_unet
from safe_denoiser.files import atomic_write_json as write_json

GUIDANCE_SCALE = 7.5
LATENT = (4, 64, 64)
VARIANTS = ("plain", "safe N=515", "safe N=3000", "sld")  # timed side by side


def timed(fn: Callable[[], Any]) -> float:
    """Wall seconds of one call of ``fn``."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def timed_both(fn: Callable[[], Any]) -> tuple[float, float]:
    """(wall seconds, this process's CPU seconds): CPU time does not count time spent descheduled."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def safe_ddim(bank: Tensor | None, guidance: SafeGuidance | None = None, reference: Tensor | None = None) -> Any:
    """A 50-step DDIM scheduler, wrapped in ``SafeScheduler`` with ``bank`` (constant preset, beta 0.5, by default)."""
    s = make_scheduler("ddim")
    if bank is not None:
        g = guidance or ConstantGuidance(beta=0.5)
        s = SafeScheduler(s, PreparedBanks.prepare(bank, g, reference), g)
    s.set_timesteps(50)
    return s


@dataclass(frozen=True)
class StepBench:
    """One denoising step's fixed parts: the UNet and its SLD wrapper, the prompt states, the latent, t, and one
    scheduler per variant."""

    unet: Any
    sld_unet: SLDUNet
    text: Tensor  # (2, 77, 768): [uncond, cond]
    x: Tensor
    t: Tensor
    schedulers: dict[str, Any]

    def step(self, name: str) -> Callable[[], Any]:
        """Variant ``name``'s step as StableDiffusionPipeline runs it: UNet on the CFG batch, CFG, scheduler.step."""
        model = self.sld_unet if name == "sld" else self.unet
        scheduler, x, t = self.schedulers[name], self.x, self.t

        def run() -> Any:
            with torch.inference_mode():
                u, c = model(torch.cat([x, x]), t, encoder_hidden_states=self.text).sample.chunk(2)
                return scheduler.step(u + GUIDANCE_SCALE * (c - u), t, x).prev_sample

        return run


def build_bench(unet: Any) -> tuple[StepBench, dict[int, Tensor]]:
    """The step's inputs (random: only shapes matter for timing) and the banks of 515, 3,000 and 10,000 latents."""
    text = torch.randn(2, 77, 768)  # [uncond, cond] prompt states
    sld_unet = SLDUNet(unet, torch.randn(1, 77, 768), SLDConfig.medium().with_(warmup_steps=0))
    x = torch.randn(1, *LATENT)
    banks = {n: l2_normalize_positions(torch.randn(n, *LATENT)) for n in (515, 3000, 10_000)}  # 10k: correction only
    scheds = {"plain": safe_ddim(None), "sld": safe_ddim(None)}
    scheds.update({f"safe N={n}": safe_ddim(b) for n, b in banks.items()})
    t = scheds["plain"].timesteps[5]  # t = 881: inside the reference window too
    return StepBench(unet, sld_unet, text, x, t, scheds), banks


def time_steps(bench: StepBench, rounds: int) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall and CPU seconds of each variant's step over ``rounds`` interleaved rounds, after a warm-up."""
    for v in ("plain", "sld"):  # warm-up: first calls at batch 2 and 3 allocate
        print(f"  warm-up: {v:12s} {timed(bench.step(v)):7.2f}s", flush=True)
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    cpu_times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for r in range(1, rounds + 1):
        for v in VARIANTS if r % 2 else VARIANTS[::-1]:  # alternate the order against drift
            wall, cpu = timed_both(bench.step(v))
            times[v].append(wall)
            cpu_times[v].append(cpu)
            print(f"  round {r}: {v:12s} {wall:7.2f}s wall {cpu:7.2f}s CPU", flush=True)
    return times, cpu_times


def correction_presets(bank: Tensor) -> list[tuple[str, SafeGuidance]]:
    """One setting of every preset the library ships, each firing at the timed step (t = 881, inside every window).

    Shielded's radius is the bank's own scale (``suggest_radius``): its cost does not depend on how many items fall
    inside (both bank reads are dense GEMVs), only its output does.
    """
    presets: list[tuple[str, SafeGuidance]] = [
        ("constant", ConstantGuidance(beta=0.5)),
        ("mass", MassGuidance()),
        ("odds (odds_sigma 1)", OddsGuidance(odds_scale=3.0, odds_sigma=1.0)),
        ("reference", ReferenceGuidance(threshold=0.0)),
        ("sgf", SGFGuidance()),
        ("shielded", ShieldedGuidance(radius=suggest_radius(bank))),
    ]
    shipped = {g.preset for _, g in presets}
    if shipped != set(SafeGuidance.preset_names()):  # a new preset must get a row here
        raise RuntimeError(f"bench presets {sorted(shipped)} != the library's {SafeGuidance.preset_names()}")
    return presets


def time_corrections(bench: StepBench, banks: dict[int, Tensor]) -> dict[str, float]:
    """The correction alone (``SafeScheduler.correct``, no UNet), median ms of 10, per preset and bank size."""
    eps = torch.randn(1, *LATENT)
    x, t = bench.x, bench.t
    correction_ms: dict[str, float] = {}
    for n, b in banks.items():
        reference = l2_normalize_positions(torch.randn(n, *LATENT))
        for preset, g in correction_presets(b):
            s = safe_ddim(b, g, reference if g.needs_reference_bank else None)
            with torch.inference_mode():
                s.correct(eps, t, x)
                reps = [timed(partial(s.correct, eps, t, x)) for _ in range(10)]
            correction_ms[f"{preset} N={n}"] = 1e3 * statistics.median(reps)
    return correction_ms


def step_rows(times: dict[str, list[float]], cpu_times: dict[str, list[float]]) -> list[dict[str, Any]]:
    """Each variant's fastest, median and CPU times and its ratios to the plain step."""
    # Other processes on a shared CPU only ever add time: the minimum is the least disturbed estimate. CPU time
    # (this process only) is steadier still when other jobs compete for the cores.
    best = {v: min(ts) for v, ts in times.items()}
    best_cpu = {v: min(ts) for v, ts in cpu_times.items()}
    base, base_cpu = best["plain"], best_cpu["plain"]
    return [
        {
            "variant": v,
            "unet_batch": 3 if v == "sld" else 2,
            "wall_min_s": best[v],
            "wall_median_s": statistics.median(times[v]),
            "cpu_min_s": best_cpu[v],
            "ratio_wall": best[v] / base,
            "ratio_cpu": best_cpu[v] / base_cpu,
            "wall_runs_s": times[v],
            "cpu_runs_s": cpu_times[v],
        }
        for v in VARIANTS
    ]


def print_tables(rows: list[dict[str, Any]], correction_ms: dict[str, float]) -> None:
    """The step table and the correction-alone table (its share of the plain step's fastest wall time)."""
    base = next(row["wall_min_s"] for row in rows if row["variant"] == "plain")
    print()
    print(f"torch threads: {torch.get_num_threads()}")
    print("| step variant (UNet batch) | wall min s | wall median s | CPU min s | ratio (wall min) | ratio (CPU min) |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['variant']} ({row['unet_batch']}) | {row['wall_min_s']:.2f} | {row['wall_median_s']:.2f}"
            f" | {row['cpu_min_s']:.2f} | {row['ratio_wall']:.3f} | {row['ratio_cpu']:.3f} |"
        )
    print()
    print("| correction alone (median of 10) | ms/step | (plain step + correction) / plain step | share of the step |")
    print("|---|---|---|---|")
    for name, ms in correction_ms.items():
        print(f"| {name} | {ms:.1f} | {1 + ms / 1e3 / base:.4f} | {100 * ms / 1e3 / base:.3f}% |")


def main() -> None:
    """Time the step variants and the correction alone, print the tables and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per variant (after a warm-up call)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "pipeline_overhead.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    t0 = time.perf_counter()
    unet = sd14_unet(seed=0)
    n_params = sum(p.numel() for p in unet.parameters())
    print(f"SD-1.4 UNet: {n_params / 1e6:.1f}M parameters, built in {time.perf_counter() - t0:.1f}s", flush=True)
    bench, banks = build_bench(unet)
    times, cpu_times = time_steps(bench, args.rounds)
    correction_ms = time_corrections(bench, banks)  # what the pipeline adds per step on top of the UNet
    rows = step_rows(times, cpu_times)
    print_tables(rows, correction_ms)
    result = {
        "benchmark": "pipeline_overhead",
        "unet": "SD-1.4 architecture, random weights, fp32",
        "unet_parameters": n_params,
        "latent_shape": list(LATENT),
        "cfg_batch": 2,
        "scheduler": f"DDIM, 50 steps, t={int(bench.t)}",
        "device": "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "rounds": args.rounds,
        "steps": rows,
        "correction_only_ms": correction_ms,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    write_json(args.out, result)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
