"""The demo's negative bank: every real image of the unsafe digit class(es) in the generator's training split.

Rebuild the shipped file with ``python -m safe_denoiser.demo.bank`` (deterministic: the split is fixed).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from safe_denoiser.core.bank import NegativeBank
from safe_denoiser.demo.digits import bundled_path, load_split

__all__ = [
    "BANK_FILE",
    "BANK_SPLIT",
    "UNSAFE_CLASSES",
    "build_bank",
    "build_reference_bank",
    "bundled_bank_path",
    "load_bundled_bank",
    "main",
    "write_bundled_bank",
]

UNSAFE_CLASSES: tuple[int, ...] = (8,)  # the demo's "unsafe concept" (why 8: see safe_denoiser.demo.evaluate)
BANK_FILE = "bank.safetensors"
BANK_SPLIT = "generator"


def build_bank(classes: Sequence[int] = UNSAFE_CLASSES, split: str = BANK_SPLIT) -> NegativeBank:
    """All real images of ``classes`` in a digits split, in model space [-1, 1], class by class in split order."""
    classes = tuple(int(c) for c in classes)
    if not classes or len(set(classes)) != len(classes) or not all(0 <= c <= 9 for c in classes):
        raise ValueError(f"unsafe classes must be distinct digits 0..9, got {list(classes)}")
    data = load_split(split)  # type: ignore[arg-type]
    images = torch.cat([data.of_class(c) for c in classes]).contiguous()
    return NegativeBank(
        images,
        {
            "source": "sklearn.datasets.load_digits",
            "classes": ",".join(str(c) for c in classes),
            "split": split,
            "space": "model [-1, 1], (1, 8, 8)",
            "builder": "safe_denoiser.demo.bank.build_bank",
        },
    )


def build_reference_bank(unsafe: Sequence[int] = UNSAFE_CLASSES, split: str = BANK_SPLIT) -> NegativeBank:
    """The reference bank of the theorem's beta (``OddsGuidance``): every real image of the *safe* classes."""
    unsafe = tuple(int(c) for c in unsafe)
    return build_bank(tuple(c for c in range(10) if c not in unsafe), split)


def bundled_bank_path() -> Path:
    """``safe_denoiser/assets/digits/bank.safetensors``."""
    return bundled_path() / BANK_FILE


def write_bundled_bank(path: str | os.PathLike[str] | None = None) -> Path:
    """(Re)write the shipped bank: ``build_bank()`` saved atomically (``NegativeBank.save``)."""
    return build_bank().save(bundled_bank_path() if path is None else path)


def load_bundled_bank(classes: Sequence[int] = UNSAFE_CLASSES) -> NegativeBank:
    """The shipped bank when it holds ``classes``, else one built on the fly from the generator split."""
    path = bundled_bank_path()
    want = ",".join(str(int(c)) for c in classes)
    if path.is_file():
        bank = NegativeBank.load(path, sample_shape=(1, 8, 8))
        if bank.metadata.get("classes") == want and bank.metadata.get("split") == BANK_SPLIT:
            return bank
    return build_bank(classes)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m safe_denoiser.demo.bank [--out PATH]``: rebuild the shipped negative bank."""
    parser = argparse.ArgumentParser(prog="python -m safe_denoiser.demo.bank", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=None, help="output file (default: the shipped assets/digits/bank.safetensors)")
    args = parser.parse_args(argv)
    out = write_bundled_bank(args.out)
    bank = NegativeBank.load(out, sample_shape=(1, 8, 8))
    print(f"wrote {out}: {len(bank)} images of class(es) {bank.metadata['classes']}, sha256 {bank.sha256()[:16]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
