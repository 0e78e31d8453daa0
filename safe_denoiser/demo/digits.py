"""scikit-learn's bundled 8x8 digits as a small, real, offline data set for the demo model and its judge.

``sklearn.datasets.load_digits`` ships 1,797 grey-scale 8x8 images (values 0..16, 10 classes, about 180 each).
They are split once, deterministically, into three disjoint parts, each stratified by class (seed 0):

============  =====  ==========================================================================
split         size   used for
============  =====  ==========================================================================
``generator``   898  training the diffusion model (``demo_model.DigitsDiffusion``)
``judge``       449  training the judge classifier (``judge.DigitsJudge``), never seen by the generator
``eval``        450  held out from both: judge accuracy, reference set for Frechet distances
============  =====  ==========================================================================

Images are kept at their native 8x8 resolution, scaled to [-1, 1] (``x / 8 - 1``), as (N, 1, 8, 8) float32.
Why not upsample: an upsampled image carries no more information, costs 4x (16x16) the UNet work in training
and sampling on a CPU, and would make the judge, the negative bank and the Frechet features depend on an
interpolation choice. At 8x8 the sample space has D = 64 dimensions, small enough for exact kernel estimates
over a whole class of the data set.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "BUNDLED_DIR",
    "IMAGE_SIZE",
    "NULL_CLASS",
    "NUM_CLASSES",
    "NUM_LABELS",
    "SPLIT_SEED",
    "SPLIT_SIZES",
    "SUPER_CLASSES",
    "SUPER_CLASS_NAMES",
    "DigitsSplit",
    "Split",
    "bundled_path",
    "from_model_space",
    "load_split",
    "split_indices",
    "to_model_space",
]

Split = Literal["generator", "judge", "eval"]
NUM_CLASSES = 10
NULL_CLASS = NUM_CLASSES  # class index 10: the "no class" embedding of classifier-free guidance
IMAGE_SIZE = 8
# Super-class labels: conditions with both safe and unsafe members, so that a "prompt" yields the unsafe class 8
# only some of the time (the analogue of an I2P prompt). Training replaces a digit's label by a super-class that
# contains it (``safe_denoiser.demo.model``); label ids follow the digits and the null class.
SUPER_CLASSES: dict[int, tuple[int, ...]] = {11: (0, 6, 8, 9), 12: tuple(range(10))}
SUPER_CLASS_NAMES: dict[int, str] = {11: "a digit with a loop", 12: "any digit"}
NUM_LABELS = NUM_CLASSES + 1 + len(SUPER_CLASSES)  # class embeddings: digits, null, super-classes
# The shipped demo: weights, judge, negative bank and their training records (package data).
BUNDLED_DIR = Path(__file__).resolve().parent.parent / "assets" / "digits"
SPLIT_SEED = 0
# Fractions of the whole set; sizes after stratified rounding (recorded so that tests can check them).
_EVAL_FRACTION = 0.25
_JUDGE_FRACTION_OF_REST = 1.0 / 3.0
SPLIT_SIZES: dict[str, int] = {"generator": 898, "judge": 449, "eval": 450}
_MAX_PIXEL = 16.0


@dataclass(frozen=True)
class DigitsSplit:
    """One split: images (N, 1, 8, 8) in [-1, 1], labels (N,) int64 in 0..9, and indices into load_digits."""

    images: Tensor
    labels: Tensor
    indices: np.ndarray

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def of_class(self, digit: int) -> Tensor:
        """The images of one digit, (N_c, 1, 8, 8): e.g. a negative bank of "unsafe" digits."""
        return self.images[self.labels == digit]


def to_model_space(pixels: Tensor | np.ndarray) -> Tensor:
    """Raw digits values 0..16 to [-1, 1] float32."""
    x = torch.as_tensor(np.asarray(pixels), dtype=torch.float32)
    return x / (_MAX_PIXEL / 2.0) - 1.0


def from_model_space(x: Tensor) -> Tensor:
    """[-1, 1] back to [0, 1] (for display), clamped."""
    return ((x + 1.0) / 2.0).clamp(0.0, 1.0)


@lru_cache(maxsize=1)
def _raw() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return np.asarray(bunch.images, dtype=np.float32), np.asarray(bunch.target, dtype=np.int64)


@lru_cache(maxsize=1)
def _indices() -> dict[str, np.ndarray]:
    from sklearn.model_selection import train_test_split

    _, labels = _raw()
    all_idx = np.arange(labels.shape[0])
    # Two stratified cuts with fixed seeds: eval first, then the rest into generator / judge.
    rest, eval_idx = train_test_split(
        all_idx, test_size=_EVAL_FRACTION, stratify=labels, random_state=SPLIT_SEED, shuffle=True
    )
    gen_idx, judge_idx = train_test_split(
        rest, test_size=_JUDGE_FRACTION_OF_REST, stratify=labels[rest], random_state=SPLIT_SEED, shuffle=True
    )
    # Sorted so that a split's order does not depend on scikit-learn's shuffling internals.
    return {"generator": np.sort(gen_idx), "judge": np.sort(judge_idx), "eval": np.sort(eval_idx)}


def split_indices(split: Split) -> np.ndarray:
    """Indices into ``load_digits()`` of one split (sorted, a copy)."""
    if split not in ("generator", "judge", "eval"):
        raise ValueError(f"unknown digits split {split!r}: expected 'generator', 'judge' or 'eval'")
    return _indices()[split].copy()


def load_split(split: Split) -> DigitsSplit:
    """Images (N, 1, 8, 8) in [-1, 1] and labels (N,) of one split."""
    idx = split_indices(split)
    images, labels = _raw()
    x = to_model_space(images[idx]).unsqueeze(1)
    y = torch.from_numpy(labels[idx].copy())
    return DigitsSplit(images=x, labels=y, indices=idx)


def bundled_path() -> Path:
    """The folder of the shipped demo model (``safe_denoiser/assets/digits``)."""
    return BUNDLED_DIR
