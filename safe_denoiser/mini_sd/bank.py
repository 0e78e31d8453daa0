"""The miniature's banks, built through the user's own path: PNGs of real training digits, then
``safe-denoiser bank build --images DIR --vae <the pipeline folder> --size 32``.

``bank.safetensors``: the generator split's images of the concept digit (default 8); ``reference_bank.safetensors``:
its images of the other digits (the odds preset's reference). Both are the VAE's posterior means times its scaling
factor, (N, 4, 8, 8). Rebuild by hand::

    python -m safe_denoiser.mini_sd.bank images --digits 8 --out /tmp/eights
    safe-denoiser bank build --images /tmp/eights --vae safe_denoiser/assets/mini_sd --size 32 \\
        --out safe_denoiser/assets/mini_sd/bank.safetensors --overwrite
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from safe_denoiser.mini_sd.data import IMAGE_SIZE, Concept, render_split

__all__ = ["BANK_FILE", "REFERENCE_BANK_FILE", "bank_build_argv", "build_banks", "write_digit_images"]

BANK_FILE = "bank.safetensors"
REFERENCE_BANK_FILE = "reference_bank.safetensors"


def write_digit_images(digits: Sequence[int], out: str | Path) -> list[Path]:
    """The generator split's images of ``digits`` as 32 x 32 RGB PNGs, named ``<split index>_<digit>.png`` (sorted
    names follow the split's order)."""
    from PIL import Image

    data = render_split("generator")
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for i, (pixels, label) in enumerate(zip(data.pixels, data.labels, strict=True)):
        if int(label) in digits:
            path = folder / f"{i:04d}_{int(label)}.png"
            Image.fromarray(pixels, mode="RGB").save(path, format="PNG")
            written.append(path)
    return written


def bank_build_argv(images: str | Path, vae: str | Path, out: str | Path) -> list[str]:
    """``safe-denoiser bank build`` arguments for the miniature (32-pixel images, posterior means)."""
    args = ["--images", str(images), "--vae", str(vae), "--size", str(IMAGE_SIZE), "--out", str(out)]
    return ["bank", "build", *args, "--overwrite"]


def build_banks(folder: str | Path, concept: Concept | None = None) -> dict[str, Any]:
    """Write ``bank.safetensors`` and ``reference_bank.safetensors`` into the pipeline ``folder``; returns a record."""
    from safe_denoiser.cli import main as cli
    from safe_denoiser.core.bank import NegativeBank

    concept = Concept() if concept is None else concept
    folder = Path(folder)
    record: dict[str, Any] = {"concept_digit": concept.digit}
    for name, digits in ((BANK_FILE, (concept.digit,)), (REFERENCE_BANK_FILE, concept.safe_digits)):
        with tempfile.TemporaryDirectory(prefix="mini-sd-bank-") as tmp:
            images = Path(tmp) / ("unsafe" if name == BANK_FILE else "reference")
            write_digit_images(digits, images)
            if cli(bank_build_argv(images, folder, folder / name)) != 0:
                raise RuntimeError(f"safe-denoiser bank build failed for {name}")
        bank = NegativeBank.load(folder / name)
        record[name] = {
            "digits": list(digits),
            "items": len(bank),
            "shape": list(bank.sample_shape),
            "sha256": bank.sha256(),
        }
    return record


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m safe_denoiser.mini_sd.bank images --digits 8 --out DIR``: the PNGs a bank is built from."""
    parser = argparse.ArgumentParser(prog="python -m safe_denoiser.mini_sd.bank", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    images = sub.add_parser("images", help="write the generator split's images of some digits as PNGs")
    images.add_argument("--digits", type=int, nargs="+", required=True)
    images.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    if not args.digits or not all(0 <= d <= 9 for d in args.digits):
        parser.error(f"--digits must be digits 0..9, got {args.digits}")
    paths = write_digit_images(args.digits, args.out)
    print(f"wrote {len(paths)} images to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
