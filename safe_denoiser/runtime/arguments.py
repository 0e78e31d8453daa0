"""Checks of ``Bundle.sample``'s arguments, before onnxruntime sees them: each error names the argument.

Without them a string label, an empty label list, a guidance list of the wrong length or NaN noise reach numpy or
onnxruntime, which fail with messages about tensors (or, for NaN, do not fail and return NaN images).
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["check_array", "check_int", "check_labels", "check_scales", "check_seeds"]


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_int(value: Any, name: str, low: int, high: int | None = None) -> int:
    """An int in [low, high] (2.5 and "3" are refused, not truncated or parsed)."""
    if not _is_int(value) or value < low or (high is not None and value > high):
        span = f">= {low}" if high is None else f"in {low}..{high}"
        raise ValueError(f"{name} must be an int {span}, got {value!r}")
    return int(value)


def check_labels(labels: Any, null: int, name: str, high: int | None = None) -> np.ndarray:
    """Class labels as int64: ints in 0..high (default ``null``; ``null`` and None: no class); at least one."""
    high = null if high is None else high
    if isinstance(labels, (str, bytes)) or not isinstance(labels, (Sequence, np.ndarray)):
        raise ValueError(f"{name} must be a list of ints 0..{high} ({null} or None: no class), got {labels!r}")
    values = list(np.asarray(labels, dtype=object).reshape(-1))
    if not values:
        raise ValueError(f"{name} is empty: give one class label per image")
    out = []
    for i, v in enumerate(values):
        if v is None:
            out.append(null)
        elif _is_int(v) and 0 <= v <= high:
            out.append(int(v))
        else:
            raise ValueError(f"{name}[{i}] must be an int in 0..{high} ({null} = no class) or None, got {v!r}")
    return np.asarray(out, dtype=np.int64)


def check_scales(value: Any, b: int, name: str = "guidance_scale") -> np.ndarray:
    """One finite number, or one per image: float32 (b,)."""
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number or one number per image, got {value!r}") from None
    if arr.ndim > 1 or (arr.ndim == 1 and arr.shape[0] != b):
        raise ValueError(f"{name} must be one number or a list of {b} (one per image), got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} must be finite, got {value!r}")
    return np.broadcast_to(arr.astype(np.float32), (b,)).copy()


def check_array(value: Any, name: str, shape: tuple[int | None, ...]) -> np.ndarray:
    """A finite float32 array of ``shape`` (None: any size on that axis), C-contiguous."""
    try:
        arr = np.ascontiguousarray(value, dtype=np.float32)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a float array of shape {shape}, got {type(value).__name__}") from None
    if arr.ndim != len(shape) or any(w is not None and g != w for g, w in zip(arr.shape, shape, strict=True)):
        raise ValueError(f"{name} must have shape {shape} (None: any size), got {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} holds NaN or Inf ({int((~np.isfinite(arr)).sum())} values)")
    return arr


def check_seeds(seed: Any, b: int) -> list[tuple[int, int]]:
    """(seed, item) keys per image: one int seed for all (image i: item i), or one per image (item 0)."""
    if isinstance(seed, (Sequence, np.ndarray)) and not isinstance(seed, (str, bytes)):
        seeds = list(seed)
        if len(seeds) != b:
            raise ValueError(f"seed: {len(seeds)} seeds for {b} images")
        return [(check_int(s, f"seed[{i}]", 0, 2**64 - 1), 0) for i, s in enumerate(seeds)]
    return [(check_int(seed, "seed", 0, 2**64 - 1), i) for i in range(b)]
