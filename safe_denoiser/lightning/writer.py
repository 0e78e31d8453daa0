"""``ImageWriter``: one PNG per generated item plus per-rank JSONL metadata, written atomically, resumable."""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from PIL import Image, PngImagePlugin

from safe_denoiser.files import atomic_write
from safe_denoiser.lightning.prompts import PromptItem

__all__ = ["GeneratedImage", "ImageWriter", "finished_stems", "image_path", "read_metadata"]

IMAGES = "images"
METADATA = "metadata"


@dataclass
class GeneratedImage:
    """What ``predict_step`` returns per item: the pixels (uint8, H x W x C) and what to record about them."""

    item: PromptItem
    image: np.ndarray
    info: dict[str, Any] = field(default_factory=dict)


def image_path(output_dir: str | os.PathLike[str], item: PromptItem) -> Path:
    return Path(output_dir) / IMAGES / f"{item.stem}.png"


def _is_valid_png(path: Path) -> bool:
    try:
        with Image.open(path) as im:
            im.verify()  # checks the chunks' CRCs: a truncated or corrupt file fails here
        return True
    except (OSError, SyntaxError, ValueError):
        return False


def finished_stems(output_dir: str | os.PathLike[str], items: Iterable[PromptItem]) -> set[str]:
    """Stems of the items whose PNG exists and is a valid image (so a rerun skips them)."""
    return {it.stem for it in items if (p := image_path(output_dir, it)).is_file() and _is_valid_png(p)}


def check_output_dir(output_dir: str | os.PathLike[str]) -> Path:
    """The folder, created; a clear error if the path exists and is not a folder."""
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"output_dir {str(out)!r} exists and is not a folder")
    (out / IMAGES).mkdir(parents=True, exist_ok=True)
    (out / METADATA).mkdir(parents=True, exist_ok=True)
    return out


def read_metadata(output_dir: str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
    """All ranks' metadata rows, by item id."""
    rows: dict[str, dict[str, Any]] = {}
    for f in sorted((Path(output_dir) / METADATA).glob("rank*.jsonl")):
        for line in f.read_text(encoding="utf-8").splitlines():
            if line.strip():
                row = json.loads(line)
                rows[row["id"]] = row
    return rows


class ImageWriter(BasePredictionWriter):
    """Writes ``images/<id>.png`` and ``metadata/rank<r>.jsonl`` as each batch finishes.

    The PNG holds only what determines it (id, seed, prompt, settings) so that its bytes do not depend on the
    rank, batch or time; those go to the JSONL rows. PNGs are written to a temporary file and renamed, so a killed
    run never leaves a partial image under a final name; JSONL rows are appended once per batch after the images
    (rewriting the file per batch would cost O(n^2) on large sets) and a partial last row is repaired at start-up.
    With ``output_dir=None`` the datamodule's is used.
    """

    def __init__(self, output_dir: str | None = None) -> None:
        super().__init__(write_interval="batch")
        self.output_dir = output_dir
        self._tag = "rank0"

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.output_dir is None:
            self.output_dir = getattr(getattr(trainer, "datamodule", None), "output_dir", None)
        if self.output_dir is None:
            raise ValueError("ImageWriter.output_dir is not set and the datamodule has no output_dir")
        out = check_output_dir(self.output_dir)
        self._tag = f"rank{trainer.global_rank}"
        for stale in out.glob(f"*/.*.{self._tag}.tmp"):  # left by a killed run of this rank
            stale.unlink()
        meta = self._metadata_path()
        if meta.is_file():
            text = meta.read_text(encoding="utf-8")
            if text and not text.endswith("\n"):  # a killed append: drop the partial last row
                keep = text[: text.rfind("\n") + 1]
                atomic_write(meta, lambda tmp: Path(tmp).write_text(keep, encoding="utf-8"), self._tag)

    def _metadata_path(self) -> Path:
        return Path(str(self.output_dir)) / METADATA / f"{self._tag}.jsonl"

    def write_images(self, generated: Sequence[GeneratedImage]) -> None:
        rows: list[str] = []
        for g in generated:
            path = image_path(str(self.output_dir), g.item)
            pnginfo = PngImagePlugin.PngInfo()
            pnginfo.add_text(
                "safe-denoiser", json.dumps({"id": g.item.id, "seed": g.item.seed, "prompt": g.item.prompt})
            )
            if "settings" in g.info:
                pnginfo.add_text("settings", json.dumps(g.info["settings"], sort_keys=True))
            image = Image.fromarray(np.ascontiguousarray(g.image))
            atomic_write(path, functools.partial(image.save, format="PNG", pnginfo=pnginfo), self._tag)
            rows.append(json.dumps({**g.item.to_dict(), **g.info, "file": f"{IMAGES}/{path.name}"}) + "\n")
        # One append per batch, after its PNGs are in place; a row cut short by a kill is dropped at setup.
        with self._metadata_path().open("a", encoding="utf-8") as f:
            f.write("".join(rows))
            f.flush()
            os.fsync(f.fileno())

    def write_on_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        prediction: Any,
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        self.write_images(prediction)
