"""Start-up of the C++ and Python runtimes on SD-1.4-architecture bundles: plain, ``--optimize``, int8, both.

The bundle: the SD-1.4 architecture with random weights (``model: sd14-random``: the real UNet, text encoder and VAE
decoder shapes, 3.4 GB of float32 graphs), 256x256 pixels, the constant preset with a 16-item bank, exported four
ways with ``ExportOptions``: plain float32; ``optimize=True`` (graphs stored as ONNX Runtime's ORT_ENABLE_ALL output
for the CPU provider, sessions opened without re-optimising); ``precision="int8"`` (dynamic int8 weights of the
denoiser's MatMul / Conv nodes); both.

Start-up, each a fresh process, wall time from launch to exit:

* C++: ``safe-denoiser-cpp info --bundle DIR`` (manifest, file hashes, every session, the tokenizer);
* Python: ``runtime.Bundle(DIR)`` and every session and the tokenizer (``bench/cpp_vs_python.py``'s runner with
  no requests);

each with the files hashed (the verified-files cache off), with the files found in a warm verified-files cache
(``runtime.integrity``: a restart of an unchanged bundle; the cache is written by one untimed run), and, for C++,
with ``--no-verify-files`` (no check at all). The cache lives in a temporary folder, never the user's.

Each is run ``--repeats`` times after one untimed run (so the bundle's files are in the page cache: a cold start
adds the disk's read time for the bundle's bytes, listed per bundle); the median and the minimum are reported.
The bundles stay in ``--work`` (default ``bench/results/startup_bundles``, ~9 GB) so that a rerun does not export again.

Usage: python bench/startup.py [--threads 1] [--repeats 3] [--variants plain,optimize,int8,optimize-int8]
[--out bench/results/startup.json]. Needs ``make cpp`` first.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, print_table, write_json
from cpp_vs_python import BINARY, PY_RUNNER, run_measured

from safe_denoiser.runtime.integrity import VERIFY_CACHE_ENV

ROOT = Path(__file__).resolve().parents[1]
# The start-ups timed per bundle: result key -> table column.
STARTS = {
    "cpp": "C++ hashing",
    "cpp_cached": "C++ cached",
    "cpp_no_verify_files": "C++ --no-verify-files",
    "python": "Python hashing",
    "python_cached": "Python cached",
}
VARIANTS: dict[str, dict[str, Any]] = {
    "plain": {},
    "optimize": {"optimize": True},
    "int8": {"precision": "int8"},
    "optimize-int8": {"optimize": True, "precision": "int8"},
}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def export(variant: str, work: Path) -> tuple[Path, float | None]:
    """The variant's bundle under ``work`` (kept when already there) and its export seconds (None: reused)."""
    import torch

    from safe_denoiser.core.bank import NegativeBank
    from safe_denoiser.export.exporter import ExportOptions, export_bundle, load_source

    folder = work / f"sd14-{variant}"
    if (folder / "manifest.json").is_file():
        return folder, None
    bank = work / "sd14_bank.safetensors"
    if not bank.is_file():
        NegativeBank.from_tensor(torch.randn(16, 4, 32, 32, generator=torch.Generator().manual_seed(0))).save(bank)
    settings = {
        "model": "sd14-random",
        "scheduler": "ddim",
        "num_inference_steps": 3,
        "guidance_scale": 7.5,
        "height": 256,
        "width": 256,
        "bank": str(bank),
        "safe_denoiser": {"preset": "constant", "beta": 0.5},
    }
    t0 = time.perf_counter()
    export_bundle(load_source(settings), folder, ExportOptions(verify=False, **VARIANTS[variant]))
    seconds = time.perf_counter() - t0
    log(f"{variant}: exported in {seconds:.1f} s")
    return folder, seconds


def timed(cmd: list[str], repeats: int, cache: str) -> dict[str, Any]:
    """One untimed run (page cache, and the verified-files cache when on), then ``repeats`` runs: wall seconds
    (median, min, all) and peak RSS (MiB). ``cache``: the verified-files cache file, or "off"."""
    os.environ[VERIFY_CACHE_ENV] = cache
    run_measured(cmd)
    runs = [run_measured(cmd) for _ in range(repeats)]
    walls = [w for w, _, _ in runs]
    return {"median_s": statistics.median(walls), "min_s": min(walls), "runs_s": walls, "peak_rss_mib": runs[-1][1]}


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated: " + ", ".join(VARIANTS))
    p.add_argument("--work", type=Path, default=ROOT / "bench" / "results" / "startup_bundles")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "startup.json")
    args = p.parse_args()
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        p.error(f"unknown --variants {', '.join(unknown)} (choose from {', '.join(VARIANTS)})")
    if not BINARY.is_file():
        raise SystemExit(f"{BINARY} is missing: run `make cpp` first")
    args.work.mkdir(parents=True, exist_ok=True)

    rows = []
    cache_dir = Path(tempfile.mkdtemp(prefix="startup-verify-cache-"))
    for variant in variants:
        folder, export_s = export(variant, args.work)
        threads = ["--threads", str(args.threads)]
        cpp_cmd = [str(BINARY), "info", "--bundle", str(folder), *threads]
        py_cmd = [sys.executable, "-c", PY_RUNNER, str(folder), "[]", "1", "3", str(args.threads)]
        cache = str(cache_dir / f"{variant}.json")
        row = {
            "variant": variant,
            "bundle_bytes": folder_bytes(folder),
            "export_s": export_s,
            "cpp": timed(cpp_cmd, args.repeats, "off"),
            "cpp_cached": timed(cpp_cmd, args.repeats, cache),
            "cpp_no_verify_files": timed([*cpp_cmd, "--no-verify-files"], args.repeats, "off"),
            "python": timed(py_cmd, args.repeats, "off"),
            "python_cached": timed(py_cmd, args.repeats, cache),
        }
        rows.append(row)
        log(f"{variant}: " + ", ".join(f"{k} {row[k]['median_s']:.2f} s" for k in STARTS))

    print(f"\nSD-1.4 architecture start-up, {args.threads} thread(s), median (min) of {args.repeats}, warm page cache")
    print_table(
        ["bundle", "GB", *(f"{label} s" for label in STARTS.values()), "peak RSS C++ / Py (MiB)"],
        [
            [
                r["variant"],
                f"{r['bundle_bytes'] / 1e9:.2f}",
                *(f"{r[k]['median_s']:.2f} ({r[k]['min_s']:.2f})" for k in STARTS),
                f"{r['cpp']['peak_rss_mib']} / {r['python']['peak_rss_mib']}",
            ]
            for r in rows
        ],
    )
    write_json(
        args.out,
        {
            "benchmark": "startup",
            "machine": machine_info(args.threads),
            "rows": rows,
            "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
        },
    )
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
