"""Portable counter-based Gaussian noise: Philox 4x32-10 + Box-Muller keyed by (seed, item, stream).

The C++ runtime (``cpp_runtime/src/noise.cpp``) draws the same bits, so a seed gives the same image from Python
onnxruntime and from ``safe-denoiser-cpp``, whatever the batch the image runs in:

- block ``j`` of an image is ``philox4x32_10(counter=(j, item, stream, 0), key=(seed & 0xffffffff, seed >> 32))``;
- its words ``(r0, r1, r2, r3)`` give two Box-Muller pairs in float64, ``u = (r + 0.5) / 2**32`` in (0, 1):
  ``sqrt(-2 log u0) * (cos, sin)(2 pi u1)``, then rounded to float32; values ``4j .. 4j + 3`` of the image;
- ``stream`` 0 is the initial noise, ``stream`` ``s + 1`` the reference preset's re-noise at step index ``s``,
  ``stream`` ``2**31 + s`` the DDPM sampler's noise at step index ``s`` (steps never reach 2**31 - 1: no overlap).

log, cos and sin go through Python's ``math`` (the C library's functions, as the C++ side calls them), so the
float64 values are bit-identical on a given machine; numpy's vectorised versions may differ in the last bit.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["DDPM_STREAM_BASE", "INITIAL_STREAM", "ddpm_stream", "gaussian_noise", "philox4x32_10", "renoise_stream"]

INITIAL_STREAM = 0
DDPM_STREAM_BASE = 2**31  # above every re-noise stream (1 + step index < 2**31)
_M0, _M1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)  # Philox 4x32 multipliers
_W0, _W1 = 0x9E3779B9, 0xBB67AE85  # Weyl key increments
_MASK = np.uint64(0xFFFFFFFF)


def renoise_stream(step_index: int) -> int:
    """The noise stream of the reference preset's re-noise at a step index (0-based)."""
    return step_index + 1


def ddpm_stream(step_index: int) -> int:
    """The noise stream of the DDPM sampler's variance noise at a step index (0-based)."""
    return DDPM_STREAM_BASE + step_index


def philox4x32_10(counters: np.ndarray, key: tuple[int, int]) -> np.ndarray:
    """Philox 4x32 with 10 rounds over (N, 4) uint32 counters: (N, 4) uint32 outputs (Salmon et al., SC'11)."""
    c = np.asarray(counters, dtype=np.uint64).copy()
    k0, k1 = key[0] & 0xFFFFFFFF, key[1] & 0xFFFFFFFF
    for _ in range(10):
        p0, p1 = _M0 * c[:, 0], _M1 * c[:, 2]  # exact: both factors < 2**32
        hi0, lo0, hi1, lo1 = p0 >> np.uint64(32), p0 & _MASK, p1 >> np.uint64(32), p1 & _MASK
        c = np.stack([hi1 ^ c[:, 1] ^ np.uint64(k0), lo1, hi0 ^ c[:, 3] ^ np.uint64(k1), lo0], axis=1)
        k0, k1 = (k0 + _W0) & 0xFFFFFFFF, (k1 + _W1) & 0xFFFFFFFF
    return c.astype(np.uint32)


def _apply(fn: object, values: np.ndarray) -> np.ndarray:
    """``fn`` (a ``math`` function) on every float64 value, in C's libm rather than numpy's SIMD kernels."""
    return np.fromiter(map(fn, values.tolist()), dtype=np.float64, count=values.size)  # type: ignore[call-overload]


def gaussian_noise(seed: int, item: int, stream: int, count: int) -> np.ndarray:
    """``count`` standard normal float32 values for (seed, item, stream): the C++ runtime's bits."""
    if not 0 <= seed < 2**64:
        raise ValueError(f"seed must lie in 0..2**64-1, got {seed}")
    if not 0 <= item < 2**32 or not 0 <= stream < 2**32:
        raise ValueError(f"item and stream must lie in 0..2**32-1, got {item}, {stream}")
    blocks = (count + 3) // 4
    counters = np.zeros((blocks, 4), dtype=np.uint64)
    counters[:, 0] = np.arange(blocks, dtype=np.uint64)
    counters[:, 1] = item
    counters[:, 2] = stream
    r = philox4x32_10(counters, (seed & 0xFFFFFFFF, seed >> 32)).astype(np.float64)
    u = (r + 0.5) * 2.0**-32  # exact in float64
    radius = np.sqrt(-2.0 * _apply(math.log, u[:, 0::2].reshape(-1)))  # sqrt is correctly rounded everywhere
    theta = 2.0 * math.pi * u[:, 1::2].reshape(-1)
    z = np.empty((blocks, 2, 2), dtype=np.float64)
    z[:, :, 0] = (radius * _apply(math.cos, theta)).reshape(blocks, 2)
    z[:, :, 1] = (radius * _apply(math.sin, theta)).reshape(blocks, 2)
    return z.reshape(-1)[:count].astype(np.float32)
