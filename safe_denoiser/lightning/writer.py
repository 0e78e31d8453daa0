"""``ImageWriter``: one PNG per generated item, carrying its own record, plus per-rank JSONL metadata.

The write path of one batch: for each image, a temporary file (named with the rank and pid) is written and renamed
into place; then the batch's rows are appended to ``metadata/rank<r>.jsonl`` in one write. A kill at any point
leaves either no image (its temporary file is removed on the next start, by the lock's next holder) or a whole
image whose row ``OutputFolder.prepare`` finds or rebuilds from the image itself (see ``outputs``).
"""

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
from safe_denoiser.lightning.outputs import (
    IMAGES,
    METADATA,
    RECORD_KEY,
    SETTINGS_KEY,
    VOLATILE_KEYS,
    OutputFolder,
    check_output_dir,
    image_path,
    metadata_path,
    metadata_rows,
    read_image_record,
    read_metadata,
)
from safe_denoiser.lightning.prompts import PromptItem, clip_text

__all__ = [
    "IMAGES",
    "METADATA",
    "GeneratedImage",
    "ImageWriter",
    "check_output_dir",
    "finished_stems",
    "image_path",
    "metadata_rows",
    "read_metadata",
]


@dataclass
class GeneratedImage:
    """What ``predict_step`` returns per item: the pixels (uint8, H x W x C) and what to record about them.

    ``info["settings"]`` goes into the PNG's ``settings`` chunk, the other fields into its record, except the
    run-dependent ``seconds`` and ``rank``, which only the JSONL row holds.
    """

    item: PromptItem
    image: np.ndarray
    info: dict[str, Any] = field(default_factory=dict)


def finished_stems(output_dir: str | os.PathLike[str], items: Iterable[PromptItem]) -> set[str]:
    """Stems of the items whose PNG exists and is a whole image with its record (so a rerun skips them)."""
    return {it.stem for it in items if (p := image_path(output_dir, it)).is_file() and read_image_record(p)}


def _append(path: Path, text: str) -> None:
    """Append ``text`` with one ``write`` (O_APPEND) and fsync it: a kill leaves at most one partial last row."""
    data = text.encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def _dumps(value: Any, item: PromptItem, what: str, sort_keys: bool = False) -> str:
    """Strict JSON (NaN and Inf refused: they are not JSON), with an error naming the item."""
    try:
        return json.dumps(value, allow_nan=False, sort_keys=sort_keys)
    except ValueError as exc:
        raise ValueError(f"item {clip_text(item.id)}: its {what} holds a NaN or infinite number: {exc}") from None


class ImageWriter(BasePredictionWriter):
    """Writes ``images/<id>.png`` and ``metadata/rank<r>.jsonl`` as each batch finishes (``output_dir=None``: the
    datamodule's). It holds the folder's lock for its rank from ``setup`` to ``teardown``."""

    def __init__(self, output_dir: str | None = None) -> None:
        super().__init__(write_interval="batch")
        self.output_dir = output_dir
        self.folder: OutputFolder | None = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        datamodule = getattr(trainer, "datamodule", None)
        if self.output_dir is None:
            self.output_dir = getattr(datamodule, "output_dir", None)
        if self.output_dir is None:
            raise ValueError("ImageWriter.output_dir is not set and the datamodule has no output_dir")
        rank = int(trainer.global_rank)
        prepared = getattr(datamodule, "folder", None)
        if isinstance(prepared, OutputFolder) and prepared.root == Path(self.output_dir) and prepared.rank == rank:
            self.folder = prepared  # rank 0 of a PromptDataModule run: locked and reconciled already
        elif hasattr(datamodule, "folder"):
            self.folder = OutputFolder(self.output_dir, rank).lock()  # other ranks: rank 0 reconciled for all
        else:
            self.folder = OutputFolder(self.output_dir, rank)  # used on its own: lock and reconcile here
            self.folder.prepare([])

    def _folder(self) -> OutputFolder:
        if self.folder is None:
            raise RuntimeError("ImageWriter.setup has not run")
        return self.folder

    def write_images(self, generated: Sequence[GeneratedImage]) -> None:
        """Each image renamed into place whole with its record, then the batch's rows in one append."""
        folder = self._folder()
        rows: list[str] = []
        for g in generated:
            path = image_path(folder.root, g.item)
            if g.image.dtype != np.uint8:
                raise TypeError(f"item {clip_text(g.item.id)}: images must be uint8, got {g.image.dtype}")
            record = {**g.item.to_dict(), **{k: v for k, v in g.info.items() if k not in VOLATILE_KEYS}}
            record["file"] = f"{IMAGES}/{path.name}"
            volatile = {k: g.info[k] for k in VOLATILE_KEYS if k in g.info}
            rows.append(_dumps({**record, **volatile}, g.item, "metadata row") + "\n")
            pnginfo = PngImagePlugin.PngInfo()
            settings = record.pop(SETTINGS_KEY, None)
            pnginfo.add_text(RECORD_KEY, _dumps(record, g.item, "record"))
            if SETTINGS_KEY in g.info:
                pnginfo.add_text(SETTINGS_KEY, _dumps(settings, g.item, "settings", sort_keys=True))
            image = Image.fromarray(np.ascontiguousarray(g.image))
            atomic_write(path, functools.partial(image.save, format="PNG", pnginfo=pnginfo), folder.temp_tag)
            folder.wrote_any = True
        _append(metadata_path(folder.root, folder.rank), "".join(rows))

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

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.folder is not None:
            self.folder.close()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        if self.folder is not None:
            self.folder.close()
