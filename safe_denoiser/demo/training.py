"""One Lightning training scaffold for the demo's two networks (the diffusion model and the judge).

Deterministic by construction: the global seed is set before the network is built (its initialisation draws from
it), then the data loader is built, and the CPU ``Trainer`` runs with ``deterministic=True``; the caller's thread
count is restored afterwards.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import lightning as L
from torch.utils.data import DataLoader

from safe_denoiser.threads import torch_threads

__all__ = ["fit"]

M = TypeVar("M", bound=L.LightningModule)


def fit(
    build: Callable[[], M],
    loader: Callable[[], DataLoader[Any]],
    *,
    seed: int,
    threads: int | None = None,
    callbacks: Sequence[L.Callback] = (),
    **trainer_kwargs: Any,
) -> tuple[M, L.Trainer, float]:
    """Seed, build the module, build the loader, fit on one CPU; returns (module, trainer, wall seconds)."""
    with torch_threads(threads):
        L.seed_everything(seed, workers=True)
        module = build()
        data = loader()
        trainer = L.Trainer(
            accelerator="cpu",
            devices=1,
            deterministic=True,
            logger=False,
            enable_checkpointing=False,
            enable_model_summary=False,
            callbacks=list(callbacks),
            **trainer_kwargs,
        )
        start = time.perf_counter()
        trainer.fit(module, data)
        return module, trainer, time.perf_counter() - start
