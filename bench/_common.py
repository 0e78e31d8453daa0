"""Helpers shared by the bench scripts: machine info, a markdown table, an atomic JSON write, timing one call and
its peak extra memory."""

from __future__ import annotations

import gc
import os
import platform
import resource
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch

from safe_denoiser.files import atomic_write_json


def machine_info(threads: int | None = None) -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": threads if threads is not None else torch.get_num_threads(),
        "platform": platform.platform(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def print_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for row in rows:
        print("| " + " | ".join(str(c) for c in row) + " |")


def write_json(path: str | os.PathLike[str], data: dict[str, Any]) -> Path:
    """Write atomically: a temporary file in the same folder, then rename."""
    return atomic_write_json(path, data)


# ----------------------------------------------------------------------------- one call: time and peak memory
T = TypeVar("T")


def status_kib(field: str) -> int | None:
    """A ``/proc/self/status`` field in KiB (VmRSS, VmHWM), or None where there is no /proc."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
    except OSError:
        return False
    return True


def _maxrss_kib() -> int:
    value = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return value // 1024 if sys.platform == "darwin" else value


def measured_call(fn: Callable[[], T]) -> tuple[T, float, float, str]:
    """Run ``fn`` once: (its result, seconds, peak extra MiB, how the peak was measured)."""
    gc.collect()
    rss_before = status_kib("VmRSS")
    use_hwm = rss_before is not None and _reset_peak_rss() and status_kib("VmHWM") is not None
    maxrss_before = _maxrss_kib()
    t0 = time.perf_counter()
    with torch.inference_mode():
        result = fn()
    seconds = time.perf_counter() - t0
    if use_hwm and rss_before is not None:
        peak_kib = (status_kib("VmHWM") or 0) - rss_before
        method = "VmHWM (reset via /proc/self/clear_refs) minus VmRSS before the call"
    else:
        peak_kib = _maxrss_kib() - maxrss_before
        method = "ru_maxrss increase over post-setup value (lower bound)"
    return result, seconds, max(peak_kib, 0) / 1024.0, method


def timed_call(fn: Callable[[], Any]) -> float:
    """Seconds of one call of ``fn``, nothing else around it (the warm state of a sampler's loop)."""
    with torch.inference_mode():
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0
