"""Image quality with torchmetrics, from local weight files only: FID against real images, CLIP score.

FID: ``FrechetInceptionDistance`` on the standard FID Inception (torch-fidelity's port of the 2015 TensorFlow
graph), whose weights the user gives as a safetensors file (``--inception``; converting torch-fidelity's ``.pth``
once is shown in docs/evaluation.md). torch-fidelity itself reads weights with ``torch.load``; it is only ever handed a
file we wrote from those safetensors tensors, never the user's pickle. Any other ``torch.nn.Module`` mapping uint8
images (B, 3, H, W) to features (B, F) can be passed instead. Images are centre-cropped to a square and resized to
``image_size`` (bicubic) before the extractor's own resize to 299.

CLIP score: ``CLIPScore`` with a local ``transformers`` CLIP folder (``save_pretrained`` layout, safetensors),
loaded with ``local_files_only=True``: 100 * max(cos(image, text), 0), averaged.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

__all__ = [
    "QualityUnavailableError",
    "clip_score",
    "fid",
    "folder_images",
    "images_tensor",
    "inception_from_safetensors",
    "load_clip",
    "square",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class QualityUnavailableError(FileNotFoundError):
    """Weights or a library that a quality metric needs are missing; the message says what to provide."""


def square(image: Image.Image, size: int) -> np.ndarray:
    """(size, size, 3) uint8: centre crop to a square, then bicubic resize."""
    im = image.convert("RGB")
    w, h = im.size
    m = min(w, h)
    left, top = (w - m) // 2, (h - m) // 2
    im = im.crop((left, top, left + m, top + m))
    if m != size:
        im = im.resize((size, size), resample=Image.Resampling.BICUBIC)
    return np.asarray(im)


def folder_images(folder: str | os.PathLike[str], size: int, batch_size: int = 32) -> Iterator[torch.Tensor]:
    """uint8 batches (B, 3, size, size) of the images in ``folder`` (sorted by name; not recursive)."""
    root = Path(folder)
    if not root.is_dir():
        raise QualityUnavailableError(f"image folder {str(root)!r} does not exist")
    files = sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
    if not files:
        raise QualityUnavailableError(f"image folder {str(root)!r} holds no {'/'.join(IMAGE_SUFFIXES)} images")
    for start in range(0, len(files), batch_size):
        yield images_tensor(files[start : start + batch_size], size)


def images_tensor(files: Sequence[Path], size: int) -> torch.Tensor:
    """uint8 (B, 3, size, size) of image files, each centre-cropped and resized."""
    batch = []
    for p in files:
        with Image.open(p) as im:
            batch.append(square(im, size))
    return torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2).contiguous()


def inception_from_safetensors(path: str | os.PathLike[str]) -> torch.nn.Module:
    """torchmetrics' FID Inception (2048 features) with weights from a local safetensors file."""
    p = Path(path)
    if not p.is_file():
        raise QualityUnavailableError(
            f"FID Inception weights {str(p)!r} not found: pass the FID Inception (pt_inception-2015-12-05) converted "
            "to safetensors (nothing is downloaded)"
        )
    if p.suffix != ".safetensors":
        raise ValueError(
            f"FID Inception weights {p.name!r}: expected a .safetensors file (pickled weights are never loaded)"
        )
    try:
        import torch_fidelity  # noqa: F401
        from torchmetrics.image.fid import NoTrainInceptionV3
    except (ImportError, RuntimeError) as exc:
        raise QualityUnavailableError(
            "FID's Inception network comes from torch-fidelity: pip install --no-deps torch-fidelity, plus the "
            f"torchvision build that matches your torch ({exc})"
        ) from exc
    from safetensors.torch import load_file

    state = load_file(str(p))
    with tempfile.TemporaryDirectory(prefix="fid-inception-") as tmp:
        staged = Path(tmp) / "inception.pth"
        torch.save(state, staged)  # tensors only, written here from the safetensors file
        return NoTrainInceptionV3(
            name="inception-v3-compat", features_list=["2048"], feature_extractor_weights_path=str(staged)
        )


def fid(
    generated: Iterable[torch.Tensor],
    real: Iterable[torch.Tensor],
    feature: torch.nn.Module,
    device: str | torch.device = "cpu",
) -> float:
    """FID between two streams of uint8 batches (B, 3, H, W) in ``feature``'s feature space."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    metric = FrechetInceptionDistance(feature=feature, normalize=False).to(device)
    counts = [0, 0]
    for k, stream in enumerate((real, generated)):
        for batch in stream:
            metric.update(batch.to(device), real=k == 0)
            counts[k] += batch.shape[0]
    if min(counts) < 2:
        raise ValueError(f"FID needs at least 2 real and 2 generated images, got {counts[0]} and {counts[1]}")
    return float(metric.compute())


class _ClipFeatures(torch.nn.Module):
    """The CLIP model as torchmetrics calls it: ``get_*_features`` returning the projected embeddings as tensors.

    transformers >= 5 returns a model output whose ``pooler_output`` holds them; torchmetrics 1.9 expects a tensor.
    """

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model
        self.config = model.config

    @staticmethod
    def _tensor(out: Any) -> torch.Tensor:
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self._tensor(self.model.get_image_features(pixel_values=pixel_values))

    def get_text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self._tensor(self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask))


def load_clip(folder: str | os.PathLike[str]) -> tuple[Any, Any]:
    """A local CLIP model and processor (``save_pretrained`` folder, safetensors weights, no hub access)."""
    p = Path(folder)
    if not (p / "config.json").is_file():
        raise QualityUnavailableError(
            f"CLIP folder {str(p)!r} not found or has no config.json: pass a local transformers CLIP folder "
            "(e.g. clip-vit-large-patch14 saved with save_pretrained) with --clip (nothing is downloaded)"
        )
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(str(p), local_files_only=True, use_safetensors=True)
    processor = CLIPProcessor.from_pretrained(str(p), local_files_only=True)
    return model.eval(), processor


def clip_score(
    images: Iterable[torch.Tensor],
    prompts: Iterable[Sequence[str]],
    clip: tuple[Any, Any],
    device: str | torch.device = "cpu",
) -> float:
    """torchmetrics' CLIP score over paired batches of uint8 images (B, 3, H, W) and their prompts."""
    from torchmetrics.multimodal.clip_score import CLIPScore

    model, processor = clip
    adapted: Any = (_ClipFeatures(model), processor)  # duck-typed as torchmetrics' (CLIPModel, CLIPProcessor)
    metric = CLIPScore(model_name_or_path=lambda: adapted).to(device)
    n = 0
    for batch, texts in zip(images, prompts, strict=True):
        metric.update(batch.to(device), list(texts))
        n += batch.shape[0]
    if n == 0:
        raise ValueError("CLIP score needs at least one image")
    return float(metric.compute())
