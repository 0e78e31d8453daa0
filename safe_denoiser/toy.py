"""``safe-denoiser toy``: the poster's picture on a 2-D Gaussian mixture (placeholder, being written)."""

from __future__ import annotations

from typing import Any


def add_parser(sub: Any) -> None:
    p = sub.add_parser("toy", help="2-D Gaussian-mixture demo of the safe denoiser")
    p.add_argument("--out", default="outputs/toy")
    p.set_defaults(func=lambda args: (_ for _ in ()).throw(NotImplementedError("toy demo not written yet")))
