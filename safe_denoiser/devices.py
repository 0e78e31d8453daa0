"""``torch_device``: a device named on a command line, checked to exist on this machine before any work is done."""

from __future__ import annotations

import torch

__all__ = ["torch_device"]

EXPECTED = "a torch device such as cpu, cuda, cuda:1 or mps"


def torch_device(name: str, flag: str = "device") -> torch.device:
    """``torch.device(name)``, refused with a ``ValueError`` naming ``flag`` when malformed or absent here."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"{flag} must be {EXPECTED}, got {name!r}") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"{flag} {name!r}: this machine has no CUDA device (or torch was built without CUDA)")
        if device.index is not None and device.index >= count:
            raise ValueError(f"{flag} {name!r}: this machine has {count} CUDA device(s), cuda:0..cuda:{count - 1}")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{flag} {name!r}: MPS (Apple GPU) is not available on this machine")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"{flag} must be {EXPECTED}, got {name!r}")
    return device
