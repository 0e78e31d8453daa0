"""int8 vs float32 bundles of the miniature SD: the safety table's figures, image-by-image agreement and speed.

For each config (``configs/mini_sd.yaml``: SD, no safe denoiser; ``configs/mini_sd_safe.yaml``: SD + ours, the odds
preset) the bundle is exported twice, ``--precision fp32`` and ``--precision int8`` with ``--int8-format`` (dynamic:
int8 weights of the denoiser's MatMul / Gemm nodes; qdq: MatMul / Conv / Gemm with calibrated activations; the
correction float32 in both). Every bundle then runs the miniature
table's prompt sets (``safe-denoiser evaluate --model mini-sd``'s files, all prompts, 3 seed sets unless
``--quick``) through the Python runtime (``mini_sd.table.bundle_pipeline``) and is scored by the table's own code:
ASR / TR / broken per attack set, benign Frechet distance and CLIP analogue, with bootstrap intervals.

The two bundles of one config start every image from the same noise (the runtime's Philox noise of its seed), so
they also compare image by image: the share of images whose outcome (unsafe, safe and real-looking, broken)
differs. Verdict per figure: the int8 mean lies inside the float32 row's 95% interval (none for a Frechet
distance over one seed set, which has no interval).

Speed, same process, interleaved rounds: one 8-prompt, 25-step DDIM sample (text encoder, denoiser, VAE decoder)
per bundle, median of ``--repeats``; ``--threads`` intra-op threads (default 1).

Each bundle's table goes to ``<work>/<config>-<precision>-<manifest digest>/`` (``mini_sd.table.run``'s files; a
rerun reuses finished rows, a re-exported bundle gets a new folder). ``<work>``: ``bench/results/int8_safety``.

Usage: python bench/int8_safety.py [--quick] [--threads 1] [--repeats 5] [--int8-format dynamic]
[--out bench/results/int8_safety.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, print_table, write_json

from safe_denoiser.export.exporter import ExportOptions, export_bundle
from safe_denoiser.export.source import load_source, read_model_section
from safe_denoiser.mini_sd.table.bundle_pipeline import BundlePipeline
from safe_denoiser.mini_sd.table.harness import TableContext
from safe_denoiser.mini_sd.table.rows import Row
from safe_denoiser.mini_sd.table.run import run_table
from safe_denoiser.mini_sd.table.settings import ATTACK_SETS, BENIGN_SET, TableSettings
from safe_denoiser.runtime.bundle import Bundle

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"SD": ROOT / "configs" / "mini_sd.yaml", "SD + ours (odds)": ROOT / "configs" / "mini_sd_safe.yaml"}
PRECISIONS = ("fp32", "int8")
TIMED_PROMPTS = ["a handwritten eight", "a thin slanted seven", "the number 8 in bold strokes", "any digit"] * 2


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def export(config: Path, precision: str, folder: Path, int8_format: str) -> Path:
    """The config's bundle at ``precision`` in ``folder`` (kept when already there: a rerun resumes)."""
    if not (folder / "manifest.json").is_file():
        t0 = time.perf_counter()
        options = ExportOptions(verify=False, precision=precision, int8_format=int8_format)  # type: ignore[arg-type]
        export_bundle(load_source(read_model_section(config)), folder, options)
        log(f"exported {folder.name} in {time.perf_counter() - t0:.1f} s")
    return folder


def digest(folder: Path) -> str:
    """The manifest's digest (it lists every file's sha256): a re-exported bundle gets a new table folder."""
    return hashlib.sha256((folder / "manifest.json").read_bytes()).hexdigest()[:12]


def outcome_flips(a: dict[str, Any], b: dict[str, Any]) -> dict[str, float]:
    """Per set: the share of images whose outcome (unsafe / safe-real / broken) differs between two tables' scores."""
    out = {}
    for key, sa in a.items():
        sb = b[key]
        pairs = zip(sa["unsafe"], sa["broken"], sb["unsafe"], sb["broken"], strict=True)
        flips = [(u1, k1) != (u2, k2) for u1, k1, u2, k2 in pairs]
        out[key] = sum(flips) / len(flips)
    return out


def bundle_loader(bundle: Bundle) -> Callable[[str], BundlePipeline]:
    """The table context's ``load``: every row model name gets this bundle's pipeline."""
    return lambda _model: BundlePipeline(bundle)


def timed_sample(bundle: Bundle) -> float:
    t0 = time.perf_counter()
    bundle.sample(TIMED_PROMPTS, seed=list(range(len(TIMED_PROMPTS))))
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="8 prompts per set, one seed set (a smoke test)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--int8-format", default="dynamic", choices=("dynamic", "qdq"))
    p.add_argument("--work", type=Path, default=ROOT / "bench" / "results" / "int8_safety")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "int8_safety.json")
    args = p.parse_args()

    settings = TableSettings(threads=args.threads)
    if args.quick:
        settings = dataclasses.replace(settings, prompts_per_set=8, seed_sets=1)
    base_ctx = TableContext.create()
    bundles: dict[tuple[str, str], Bundle] = {}
    tables: dict[tuple[str, str], dict[str, Any]] = {}
    scores: dict[tuple[str, str], dict[str, Any]] = {}
    for label, config in CONFIGS.items():
        for precision in PRECISIONS:
            name = f"{config.stem}-{precision}" + (f"-{args.int8_format}" if precision == "int8" else "")
            folder = export(config, precision, args.work / "bundles" / name, args.int8_format)
            bundle = Bundle(folder, threads=args.threads)
            bundles[label, precision] = bundle
            row = Row(f"{label} [{precision} bundle]")
            ctx = dataclasses.replace(base_ctx, load=bundle_loader(bundle), pipes={})
            out = args.work / f"{name}-{digest(folder)}"
            t0 = time.perf_counter()
            result = run_table(out, dataclasses.replace(settings, rows=(row,)), ctx, progress=True)
            log(f"{row.name}: table in {time.perf_counter() - t0:.1f} s ({out})")
            tables[label, precision] = result["rows"][row.name]
            record = Path(out) / result["rows"][row.name]["cache"]
            scores[label, precision] = json.loads(record.read_text(encoding="utf-8"))["scores"]

    # Speed: interleaved rounds over the four bundles, after a warm-up each.
    for b in bundles.values():
        timed_sample(b)
    times: dict[tuple[str, str], list[float]] = {k: [] for k in bundles}
    for r in range(args.repeats):
        for k in bundles if r % 2 == 0 else list(bundles)[::-1]:
            times[k].append(timed_sample(bundles[k]))
    median = {k: statistics.median(v) for k, v in times.items()}

    metrics = [(s.key, m) for s in ATTACK_SETS for m in ("asr", "broken")] + [
        (BENIGN_SET.key, "fd"),
        (BENIGN_SET.key, "clip"),
        (BENIGN_SET.key, "broken"),
    ]
    flips_by_row = {label: outcome_flips(scores[label, "fp32"], scores[label, "int8"]) for label in CONFIGS}
    rows_out, table_rows = [], []
    for label in CONFIGS:
        f32, i8 = tables[label, "fp32"]["summary"], tables[label, "int8"]["summary"]
        flips = flips_by_row[label]
        for key, m in metrics:
            if key not in f32:
                continue
            a, b = f32[key][m], i8[key][m]
            # One seed set gives a Frechet distance no interval (low = high): no verdict. Elsewhere a point
            # interval (every image alike) is a verdict: equal or not.
            inside = None if m == "fd" and a["low"] == a["high"] else a["low"] <= b["mean"] <= a["high"]
            rows_out.append({"row": label, "set": key, "metric": m, "fp32": a, "int8": b, "int8_inside_fp32": inside})
            verdict = "n/a" if inside is None else ("yes" if inside else "**no**")
            table_rows.append(
                [label, key, m, f"{a['mean']:.3f} [{a['low']:.3f}, {a['high']:.3f}]", f"{b['mean']:.3f}", verdict]
            )
        for key, share in flips.items():
            table_rows.append([label, key, "outcome flips fp32 vs int8", "", f"{share:.3f}", ""])
    print()
    print_table(["row", "set", "figure", "fp32 bundle [95% interval]", "int8 bundle", "int8 inside"], table_rows)
    print()
    speed_rows = []
    for label in CONFIGS:
        t32, t8 = median[label, "fp32"], median[label, "int8"]
        speed_rows.append([label, f"{t32:.3f}", f"{t8:.3f}", f"{t32 / t8:.2f}x"])
    print_table(["row", "fp32 s / 8 images", "int8 s / 8 images", "int8 speed-up"], speed_rows)

    result = {
        "benchmark": "int8_safety",
        "settings": settings.to_dict(),
        "int8_format": args.int8_format,
        "figures": rows_out,
        "outcome_flips": flips_by_row,
        "sample_s": {f"{label} [{p}]": v for (label, p), v in times.items()},
        "sample_median_s": {f"{label} [{p}]": v for (label, p), v in median.items()},
        "machine": machine_info(args.threads),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    write_json(args.out, result)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
