"""``PromptDataModule``: serves a prompt set to ``trainer.predict``, minus the items already finished."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import lightning as L
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch.utils.data import DataLoader

from safe_denoiser.lightning.outputs import OutputFolder
from safe_denoiser.lightning.prompts import PromptItem, load_prompts

__all__ = ["PromptDataModule"]


def _collate(items: list[PromptItem]) -> list[PromptItem]:
    return items


class PromptDataModule(L.LightningDataModule):
    """Prompt items from a .txt/.csv/.jsonl file, batched as lists of ``PromptItem``.

    On start (``setup``), before any model is loaded, rank 0 reads and checks the prompt set (and, through the
    model's ``check_items``, that the model can take every item), checks that ``output_dir`` is writable, locks
    it, and compares the images already there with this run's settings and items (``overwrite``: regenerate those
    that differ instead of refusing); then it decides which items are finished and broadcasts the list, so that
    every rank shards the same remaining items (Lightning's predict sampler neither pads nor repeats).
    ``skip_existing=False`` regenerates every item.
    """

    def __init__(
        self,
        prompts: str,
        output_dir: str = "outputs/predict",
        batch_size: int = 1,
        default_seed: int = 42,
        skip_existing: bool = True,
        overwrite: bool = False,
        limit: int | None = None,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        for name, value, least in (("batch_size", batch_size, 1), ("num_workers", num_workers, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"data.{name} must be an int >= {least}, got {value!r}")
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0):
            raise ValueError(f"data.limit must be a positive int or null, got {limit!r}")
        if isinstance(default_seed, bool) or not isinstance(default_seed, int) or not 0 <= default_seed < 2**63:
            raise ValueError(f"data.default_seed must be an int in [0, 2**63), got {default_seed!r}")
        self.prompts = prompts
        self.output_dir = output_dir
        self.batch_size = batch_size
        self.default_seed = default_seed
        self.skip_existing = skip_existing
        self.overwrite = overwrite
        self.limit = limit
        self.num_workers = num_workers
        self.items: list[PromptItem] = []
        self.skipped = 0
        self.folder: OutputFolder | None = None  # rank 0's, locked from setup to teardown

    def remaining_items(
        self,
        settings: Mapping[str, Any] | None = None,
        check_items: Callable[[list[PromptItem]], None] | None = None,
    ) -> tuple[list[PromptItem], int]:
        """The prompt set (first ``limit`` items) without the finished ones; and how many were finished.

        Locks ``output_dir`` for rank 0 (held in ``self.folder`` until ``teardown``).
        """
        items = load_prompts(self.prompts, self.default_seed)[: self.limit]
        if check_items is not None:
            check_items(items)
        folder = OutputFolder(self.output_dir, rank=0)
        try:
            resume = folder.prepare(items, settings, skip_existing=self.skip_existing, overwrite=self.overwrite)
        except BaseException:
            folder.close()
            raise
        done = resume.finished
        if resume.rebuilt_rows or resume.dropped_rows or resume.removed_temp_files:
            rank_zero_info(
                f"{self.output_dir}: resumed; {resume.rebuilt_rows} metadata row(s) rebuilt from their images, "
                f"{resume.dropped_rows} dropped (partial, duplicate or without a valid image), "
                f"{resume.removed_temp_files} temporary file(s) of killed runs removed"
            )
        if self.folder is not None:
            self.folder.close()
        self.folder = folder
        remaining = [it for it in items if it.stem not in done]
        return remaining, len(items) - len(remaining)

    def _model_hooks(self) -> tuple[Mapping[str, Any] | None, Callable[[list[PromptItem]], None] | None]:
        """The model's settings (stored with each image, compared on resume) and item check, when it has them."""
        module = self.trainer.lightning_module if self.trainer is not None else None
        settings = getattr(module, "settings", None)
        return (settings() if callable(settings) else None), getattr(module, "check_items", None)

    def setup(self, stage: str) -> None:
        trainer = self.trainer
        if trainer is None or trainer.world_size == 1:
            self.items, self.skipped = self.remaining_items(*self._model_hooks())
            return
        decided: tuple[list[PromptItem], int] | Exception | None = None
        if trainer.global_rank == 0:
            try:
                decided = self.remaining_items(*self._model_hooks())
            except Exception as exc:  # every rank raises it, rather than waiting for rank 0 at the broadcast
                decided = exc
        decided = trainer.strategy.broadcast(decided, src=0)
        if isinstance(decided, Exception):
            raise decided
        assert decided is not None
        self.items, self.skipped = decided

    def teardown(self, stage: str) -> None:
        if self.folder is not None:
            self.folder.close()

    def transfer_batch_to_device(self, batch: Any, device: Any, dataloader_idx: int) -> Any:
        """Prompt items are host data; the pipeline puts its own tensors on the device."""
        return batch

    def predict_dataloader(self) -> DataLoader[Any]:
        return DataLoader(
            self.items,  # type: ignore[arg-type]
            batch_size=self.batch_size,
            shuffle=False,
            collate_fn=_collate,
            num_workers=self.num_workers,
        )
