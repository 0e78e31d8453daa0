"""Benchmark: a bank larger than comfortable memory, memory-mapped (``NegativeBank.load(..., mmap=True)``).

Writes a bank of ``--n`` random items of ``--dim`` values (float32 or float16) to a safetensors file, in slices so
that writing needs no bank-sized buffer beyond the one tensor ``save`` takes (run with ``--write`` once), then in a
fresh process maps it, validates it (the pass that also computes the squared norms) and runs the kernel estimate
``--calls`` times. Reported: file size, wall time of each phase, effective GB/s, and this process's anonymous
resident memory (RssAnon: what the process itself holds) separately from its file-backed resident pages (RssFile:
the page cache's copy of the mapped file, which the kernel may drop at any time and re-read on the next pass).

Usage: python bench/mmap_bank.py --write --n 1000000 --dim 1024 [--dtype float16] [--path /tmp/bank.safetensors]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import torch

from safe_denoiser.core.bank import FORMAT, TENSOR_KEY, NegativeBank
from safe_denoiser.core.kernel import path_kernel_estimate
from safe_denoiser.core.paths import vp_path
from safe_denoiser.files import atomic_write, atomic_write_json

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
ST_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


def status_mib(field: str) -> float:
    """A /proc/self/status memory field in MiB."""
    with open("/proc/self/status", encoding="ascii") as fh:
        return next(int(line.split()[1]) / 1024 for line in fh if line.startswith(field + ":"))


def write_bank(path: Path, n: int, dim: int, dtype: torch.dtype, rows: int = 65536) -> None:
    """A safetensors bank written slice by slice (the format is a JSON header then raw little-endian bytes)."""
    meta = {"format": FORMAT, "count": str(n), "sample_shape": json.dumps([dim]), "dtype": str(dtype)[6:]}
    size = n * dim * torch.empty((), dtype=dtype).element_size()
    header = {
        "__metadata__": meta,
        TENSOR_KEY: {"dtype": ST_NAMES[dtype], "shape": [n, dim], "data_offsets": [0, size]},
    }
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data 8-byte aligned, as safetensors writes it

    def write(tmp: Path) -> None:
        gen = torch.Generator().manual_seed(0)
        with tmp.open("wb") as fh:
            fh.write(len(raw).to_bytes(8, "little") + raw)
            for start in range(0, n, rows):
                fh.write(torch.randn(min(rows, n - start), dim, generator=gen).to(dtype).numpy().tobytes())

    atomic_write(path, write)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--path", type=Path, default=Path("/tmp/safe_denoiser_mmap_bank.safetensors"))
    p.add_argument("--write", action="store_true", help="(re)write the bank file first")
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--calls", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "mmap_bank.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.write:
        t0 = time.perf_counter()
        write_bank(args.path, args.n, args.dim, DTYPES[args.dtype])
        print(f"wrote {args.path} in {time.perf_counter() - t0:.1f} s")
    file_gb = args.path.stat().st_size / 1e9
    x = torch.randn(args.batch, args.dim)
    path_kernel_estimate(x, torch.randn(64, args.dim), vp_path(0.5))  # warm code paths and the allocator
    anon0, file0 = status_mib("RssAnon"), status_mib("RssFile")
    t0 = time.perf_counter()
    bank = NegativeBank.load(args.path, mmap=True)  # maps, checks finiteness and computes the norms: one pass
    load_s = time.perf_counter() - t0
    anon1, file1 = status_mib("RssAnon"), status_mib("RssFile")
    calls = []
    for _ in range(args.calls):
        t0 = time.perf_counter()
        est = path_kernel_estimate(x, bank.data, vp_path(0.5), bank_sq_norms=bank.sq_norms)
        calls.append(time.perf_counter() - t0)
        assert bool(torch.isfinite(est.mean).all())
    result = {
        "n": len(bank),
        "dim": args.dim,
        "dtype": args.dtype,
        "batch": args.batch,
        "threads": args.threads,
        "file_gb": file_gb,
        "load_and_validate_s": load_s,
        "load_gbs": file_gb / load_s,
        "estimate_s": calls,
        "estimate_gbs_best": file_gb / min(calls),
        "rss_anon_growth_mib_after_load": anon1 - anon0,
        "rss_anon_growth_mib_after_calls": status_mib("RssAnon") - anon0,
        "rss_file_mib_after_load": file1 - file0,
        "rss_file_mib_after_calls": status_mib("RssFile") - file0,
        "norms_mib": bank.sq_norms.numel() * 4 / 2**20,
        "mem_total_gib": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30,
        "load_avg": list(os.getloadavg()),
    }
    print(json.dumps(result, indent=1))
    atomic_write_json(args.out, result)
    assert math.isfinite(result["load_gbs"])


if __name__ == "__main__":
    main()
