"""``SafeDiffusionModule``: a LightningModule whose ``predict_step`` generates a batch of images.

``trainer.predict`` then shards a prompt set over devices and nodes (see ``data.PromptDataModule``) and
``writer.ImageWriter`` saves each image as it is made. Each item's random numbers come from a generator seeded
with the item's own seed, so image k does not depend on the world size, the batch size or its neighbours.
"""

from __future__ import annotations

import time
from functools import cached_property
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import nn

from safe_denoiser.core.banks import PreparedBanks
from safe_denoiser.lightning.checks import FiniteWatch, check_finite, check_window
from safe_denoiser.lightning.prompts import PromptItem, clip_text
from safe_denoiser.lightning.writer import GeneratedImage
from safe_denoiser.models.config import ModelConfig, keyword_fields
from safe_denoiser.models.registry import ClassLabels

__all__ = ["SafeDiffusionModule"]


def _to_uint8(images: np.ndarray) -> list[np.ndarray]:
    """(B, H, W, C) floats in [0, 1] -> uint8 arrays, grayscale as (H, W)."""
    arr = np.clip(np.rint(images * 255.0), 0, 255).astype(np.uint8)
    return [a[..., 0] if a.shape[-1] == 1 else a for a in arr]


class SafeDiffusionModule(L.LightningModule):
    """Generate images for ``PromptItem`` batches with a diffusers pipeline plus the safe denoiser, SLD and SAFREE.

    Its keyword arguments are ``ModelConfig``'s fields (the ``model:`` section of a predict config; the signature
    is generated from that class), held whole as ``self.config``.
    """

    @keyword_fields(ModelConfig)
    def __init__(self, **fields: Any) -> None:
        super().__init__()
        self.config = ModelConfig.from_mapping(fields)  # validates every field
        self.pipe: Any = None
        self.handle: Any = None
        self._settings: dict[str, Any] | None = None

    @classmethod
    def from_config(cls, config: ModelConfig) -> SafeDiffusionModule:
        """The module of an already validated ``ModelConfig``."""
        return cls(**config.to_mapping())

    # ---- building -------------------------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.pipe is not None:
            return
        self.pipe = self.config.build_pipeline()  # on the CPU: Lightning moves its modules to the device
        # The pipeline's networks become children, so Lightning moves and casts them (devices, precision).
        self.networks = nn.ModuleDict({k: v for k, v in self.pipe.components.items() if isinstance(v, nn.Module)})

    @cached_property
    def run_banks(self) -> PreparedBanks | None:
        """The banks this run reads, loaded once (hashed into the settings before the model loads)."""
        return self.config.load_banks()

    def on_predict_start(self) -> None:
        """Attach the bank, SLD and SAFREE after Lightning has placed the networks (so the bank takes their
        device/dtype)."""
        from safe_denoiser.diffusers.safe_scheduler import attach

        cfg = self.config
        guidance = cfg.guidance
        if guidance is not None:  # before any image: a window the schedule never enters is a mistake
            check_window(guidance.window, self.pipe.scheduler, cfg.num_inference_steps)
        sld = cfg.sld_config
        if sld is not None:
            from safe_denoiser.core.sld_config import DEFAULT_SAFETY_CONCEPT
            from safe_denoiser.diffusers.sld_unet import attach_sld

            attach_sld(self.pipe, sld, cfg.sld_concept or DEFAULT_SAFETY_CONCEPT)
        safree = cfg.safree_config
        if safree is not None:
            from safe_denoiser.diffusers.safree_pipeline import attach_safree

            attach_safree(self.pipe, safree)
        if guidance is not None:
            loaded = self.run_banks
            assert loaded is not None  # ModelConfig requires a bank with the safe denoiser
            banks = cfg.fit_banks(loaded, cfg.sample_shape(self.pipe))
            self.handle = attach(self.pipe, banks, guidance, record=True)

    # ---- generation -----------------------------------------------------------------------------------
    def _generators(self, batch: list[PromptItem]) -> list[torch.Generator]:
        # Per-item generators on the device: image k depends on its own seed only.
        return [torch.Generator(self.device).manual_seed(it.seed) for it in batch]

    def generate(self, batch: list[PromptItem]) -> tuple[np.ndarray, list[int | None]]:
        """Images (B, H, W, C) in [0, 1] and, per item, at how many steps the correction fired."""
        if self.config.batch_invariant and len(batch) > 1:
            parts = [self.generate([item]) for item in batch]
            return np.concatenate([p[0] for p in parts]), [f for p in parts for f in p[1]]
        return self._call_pipeline(batch), self._fired_steps(len(batch))

    def _call_pipeline(self, batch: list[PromptItem]) -> np.ndarray:
        cfg = self.config
        common = {
            "num_inference_steps": cfg.num_inference_steps,
            "guidance_scale": cfg.guidance_scale,
            "generator": self._generators(batch),
            "output_type": "np",
        }
        labels = cfg.kind.labels
        if labels is not None:  # a class-conditional model: prompts and negative prompts are class labels
            negs = [_negative_class(labels, it.negative_prompt or cfg.negative_prompt) for it in batch]
            out = self.pipe(
                class_labels=[_class_of(labels, it) for it in batch],
                negative_class_labels=None if all(n is None for n in negs) else negs,
                **common,
            )
            return np.asarray(out.images)
        negatives = [it.negative_prompt or cfg.negative_prompt for it in batch]
        out = self.pipe(
            prompt=[it.prompt for it in batch],
            negative_prompt=None if all(n is None for n in negatives) else [n or "" for n in negatives],
            height=cfg.height,
            width=cfg.width,
            **common,
        )
        return np.asarray(out.images)

    def check_items(self, items: list[PromptItem]) -> None:
        """Fail before any model loads if an item cannot be generated (class-conditional models: its labels)."""
        labels = self.config.kind.labels
        if labels is not None:
            for it in items:
                _class_of(labels, it)
                _negative_class(labels, it.negative_prompt or self.config.negative_prompt)

    def settings(self) -> dict[str, Any]:
        """What shapes an image besides its item (``ModelConfig.image_settings``: every field, banks by content,
        and the trainer's precision): recorded in every PNG and metadata row, compared on resume."""
        if self._settings is None:
            precision = str(self.trainer.precision) if self._trainer is not None else None
            self._settings = self.config.image_settings(self.run_banks, precision)
        return self._settings

    def predict_step(
        self, batch: list[PromptItem], batch_idx: int = 0, dataloader_idx: int = 0
    ) -> list[GeneratedImage]:
        start = time.perf_counter()
        with FiniteWatch(getattr(self.pipe, "unet", None)) as watch:
            pixels, fired = self.generate(batch)
        check_finite(pixels, batch, watch, self.config.num_inference_steps)  # NaN is never written as black
        images = _to_uint8(pixels)
        seconds = (time.perf_counter() - start) / len(batch)
        settings = self.settings()
        return [
            GeneratedImage(
                it,
                img,
                {
                    "settings": settings,
                    "correction_steps": fired[i],
                    "seconds": round(seconds, 4),
                    "rank": self.global_rank,
                },
            )
            for i, (it, img) in enumerate(zip(batch, images, strict=True))
        ]

    def _fired_steps(self, b: int) -> list[int | None]:
        """Per item, at how many steps the correction fired (None when the safe denoiser is off)."""
        if self.handle is None or not self.handle.records:
            return [None] * b
        # One host transfer per batch, after sampling: the loop itself never syncs.
        applied = torch.stack([tr.record.applied for tr in self.handle.records]).sum(0).cpu()
        return [int(v) for v in applied]


def _class_of(labels: ClassLabels, item: PromptItem) -> int:
    raw = item.class_label if item.class_label is not None else item.prompt
    return labels.parse(clip_text(raw) if len(str(raw)) > 200 else raw, f"item {clip_text(item.id)}: class label")


def _negative_class(labels: ClassLabels, value: str | None) -> int | None:
    if value is None or value == "":
        return None
    return labels.parse(value, "the negative prompt")
