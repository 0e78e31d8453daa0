"""A deterministic PNG encoder: the bytes ``safe-denoiser-cpp`` writes for the same pixels.

Filter type 0 on every row, one IDAT chunk compressed with zlib level 6, no ancillary chunks: PIL's encoder
chooses filters adaptively and may link another zlib, so its bytes are not reproducible across runtimes.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np

__all__ = ["png_bytes"]

_COLOUR_TYPE = {1: 0, 3: 2, 4: 6}  # grey, RGB, RGBA


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bytes(image: np.ndarray) -> bytes:
    """PNG bytes of an (H, W, C) uint8 image with C in {1, 3, 4} (or (H, W) grey)."""
    a = np.asarray(image)
    if a.ndim == 2:
        a = a[:, :, None]
    if a.dtype != np.uint8 or a.ndim != 3 or a.shape[2] not in _COLOUR_TYPE or 0 in a.shape:
        raise ValueError(f"png_bytes: image must be (H, W, C) uint8 with C in 1, 3, 4; got {a.dtype} {a.shape}")
    h, w, c = a.shape
    rows = np.concatenate([np.zeros((h, 1), dtype=np.uint8), a.reshape(h, w * c)], axis=1)
    header = struct.pack(">IIBBBBB", w, h, 8, _COLOUR_TYPE[c], 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", zlib.compress(rows.tobytes(), 6))
        + _chunk(b"IEND", b"")
    )
