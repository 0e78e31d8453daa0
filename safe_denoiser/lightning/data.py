"""``PromptDataModule``: serves a prompt set to ``trainer.predict``, minus the items already finished."""

from __future__ import annotations

from typing import Any

import lightning as L
from torch.utils.data import DataLoader

from safe_denoiser.lightning.prompts import PromptItem, load_prompts
from safe_denoiser.lightning.writer import check_output_dir, finished_stems

__all__ = ["PromptDataModule"]


def _collate(items: list[PromptItem]) -> list[PromptItem]:
    return items


class PromptDataModule(L.LightningDataModule):
    """Prompt items from a .txt/.csv/.jsonl file, batched as lists of ``PromptItem``.

    With ``skip_existing`` (resume), rank 0 decides which items are finished and broadcasts the list, so that
    every rank shards the same remaining items (Lightning's predict sampler neither pads nor repeats).
    """

    def __init__(
        self,
        prompts: str,
        output_dir: str = "outputs/predict",
        batch_size: int = 1,
        default_seed: int = 42,
        skip_existing: bool = True,
        limit: int | None = None,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if batch_size <= 0:
            raise ValueError(f"data.batch_size must be a positive int, got {batch_size}")
        if limit is not None and limit <= 0:
            raise ValueError(f"data.limit must be a positive int or null, got {limit}")
        self.prompts = prompts
        self.output_dir = output_dir
        self.batch_size = batch_size
        self.default_seed = default_seed
        self.skip_existing = skip_existing
        self.limit = limit
        self.num_workers = num_workers
        self.items: list[PromptItem] = []
        self.skipped = 0

    def remaining_items(self) -> tuple[list[PromptItem], int]:
        """The prompt set (first ``limit`` items) without those whose image exists and is valid; and the skip count."""
        check_output_dir(self.output_dir)
        items = load_prompts(self.prompts, self.default_seed)[: self.limit]
        done = finished_stems(self.output_dir, items) if self.skip_existing else set()
        return [it for it in items if it.stem not in done], len(done)

    def setup(self, stage: str) -> None:
        trainer = self.trainer
        if trainer is not None and trainer.world_size > 1:
            decided = self.remaining_items() if trainer.global_rank == 0 else None
            decided = trainer.strategy.broadcast(decided, src=0)
        else:
            decided = self.remaining_items()
        assert decided is not None
        self.items, self.skipped = decided

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
