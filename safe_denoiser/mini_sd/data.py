"""The miniature's images: the demo's digits splits rendered as 32 x 32 RGB, and the one setting of the concept.

An 8 x 8 digit (values 0..16) becomes uint8 (``round(v * 255 / 16)``), is upsampled to 32 x 32 by PIL's bilinear
filter and repeated into 3 channels. The uint8 form is the data: PNGs written from it and read back by
``safe-denoiser bank build --size 32`` give the same tensors the VAE was trained on (PIL's resize to the same size is
a copy), so the negative bank built through the user's path is the training data's own latents.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from safe_denoiser.demo.digits import Split, load_split

__all__ = [
    "ASSETS_DIR",
    "IMAGE_SIZE",
    "MAX_TOKENS",
    "UNSAFE_DIGIT",
    "Concept",
    "RenderedSplit",
    "downsample_to_judge",
    "render_split",
    "to_model_space",
]

IMAGE_SIZE = 32
MAX_TOKENS = 77  # SD-1.x's CLIP context: prompts, SAFREE's token projections and attacks keep SD's shapes
UNSAFE_DIGIT = 8
ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets" / "mini_sd"
_DIGIT_MAX = 16.0


@dataclass(frozen=True)
class Concept:
    """The unsafe concept: one digit (default 8). The negative bank holds its training images, the reference bank
    the other digits'."""

    digit: int = UNSAFE_DIGIT

    def __post_init__(self) -> None:
        if isinstance(self.digit, bool) or not isinstance(self.digit, int) or not 0 <= self.digit <= 9:
            raise ValueError(f"concept digit must be an int 0..9, got {self.digit!r}")

    @property
    def safe_digits(self) -> tuple[int, ...]:
        return tuple(d for d in range(10) if d != self.digit)


@dataclass(frozen=True)
class RenderedSplit:
    """One digits split at 32 x 32: ``pixels`` (N, 32, 32, 3) uint8, ``labels`` (N,), ``raw`` (N, 8, 8) 0..16."""

    pixels: np.ndarray
    labels: np.ndarray
    raw: np.ndarray

    def images(self) -> Tensor:
        """(N, 3, 32, 32) float32 in [-1, 1], as ``safe_denoiser.core.bank.load_image_folder`` reads a PNG."""
        return to_model_space(self.pixels)


def to_model_space(pixels: np.ndarray) -> Tensor:
    """uint8 (N, H, W, 3) to (N, 3, H, W) float32 in [-1, 1] (``x / 127.5 - 1``)."""
    return torch.from_numpy(np.ascontiguousarray(pixels)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def _render(raw: np.ndarray) -> np.ndarray:
    from PIL import Image

    out = np.empty((raw.shape[0], IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    small = np.rint(raw * (255.0 / _DIGIT_MAX)).astype(np.uint8)
    for i, img in enumerate(small):
        big = Image.fromarray(img, mode="L").resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR)
        out[i] = np.asarray(big)[:, :, None]
    return out


@lru_cache(maxsize=3)
def render_split(split: Split) -> RenderedSplit:
    """The demo's split (``safe_denoiser.demo.digits``: generator 898, judge 449, eval 450) at 32 x 32 RGB."""
    data = load_split(split)
    raw = ((data.images[:, 0].numpy() + 1.0) * (_DIGIT_MAX / 2.0)).round()
    return RenderedSplit(pixels=_render(raw), labels=data.labels.numpy().copy(), raw=raw.astype(np.float32))


def downsample_to_judge(images: Tensor) -> Tensor:
    """(B, 3, 32, 32) in [-1, 1] to the demo judge's input (B, 1, 8, 8) in [-1, 1]: channel mean, 4 x 4 mean pool."""
    grey = images.float().clamp(-1.0, 1.0).mean(dim=1, keepdim=True)
    return torch.nn.functional.avg_pool2d(grey, kernel_size=IMAGE_SIZE // 8)
