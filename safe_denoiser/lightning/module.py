"""``SafeDiffusionModule``: a LightningModule whose ``predict_step`` generates a batch of images.

``trainer.predict`` then shards a prompt set over devices and nodes (see ``data.PromptDataModule``) and
``writer.ImageWriter`` saves each image as it is made. Each item's random numbers come from a generator seeded
with the item's own seed, so image k does not depend on the world size, the batch size or its neighbours.
"""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import nn

from safe_denoiser.core.safree import SafreeConfig
from safe_denoiser.factory import ModelConfig, ModelKind
from safe_denoiser.lightning.checks import FiniteWatch, check_finite, check_window
from safe_denoiser.lightning.prompts import PromptItem, clip_text
from safe_denoiser.lightning.writer import GeneratedImage

__all__ = ["ModelKind", "SafeDiffusionModule"]


def _to_uint8(images: np.ndarray) -> list[np.ndarray]:
    """(B, H, W, C) floats in [0, 1] -> uint8 arrays, grayscale as (H, W)."""
    arr = np.clip(np.rint(images * 255.0), 0, 255).astype(np.uint8)
    return [a[..., 0] if a.shape[-1] == 1 else a for a in arr]


class SafeDiffusionModule(L.LightningModule):
    """Generate images for ``PromptItem`` batches with a diffusers pipeline plus the safe denoiser and SLD.

    Args:
        model: "demo" (the bundled digits model; prompts are class labels 0-9), "sd" (a local Stable Diffusion
            folder, ``model_dir``), "sd14-random" (random-weight SD-1.4 architecture) or "tiny-sd" (tests).
        model_dir: local diffusers folder for ``model="sd"``; nothing is ever downloaded.
        unet_weights: optional safetensors UNet state dict replacing the folder's (ESD, RECE, ...).
        scheduler: sampler name (ddim, ddpm, pndm, euler, euler_a, lms, dpmpp; demo: ddim, ddpm, dpmpp).
        num_inference_steps, guidance_scale, height, width: the usual sampling settings.
        negative_prompt: default negative prompt (demo: a class label), overridden per item.
        bank: negative bank (.safetensors); "bundled" for the demo model's shipped bank.
        reference_bank: the reference bank of the odds preset (safe or unlabelled data, .safetensors); "bundled" for
            the demo model's safe training digits.
        safe_denoiser: None (off) or ``{"preset": "odds" | "theorem" | "reference", <SafeGuidance fields>}``.
        sld: None (off), an SLD preset name (weak, medium, strong, max) or SLDConfig fields (text models only).
        sld_concept: the SLD safety concept text (default: diffusers' SLD concept).
        safree: None (off) or SafreeConfig fields (``{}``: the defaults, nudity concepts; text models only).
        seed: weight seed for the random-weight models.
        batch_invariant: run the pipeline one item at a time inside each batch, so that an image's bytes never
            depend on the batch it lands in (or so the world size). Kernels pick different blockings for different
            batch shapes, and the resulting last-bit differences can flip a pixel's rounding. Set False for
            throughput (one pipeline call per batch) where a rare one-level pixel difference is acceptable.
    """

    def __init__(
        self,
        model: ModelKind = "demo",
        model_dir: str | None = None,
        unet_weights: str | None = None,
        scheduler: str = "ddim",
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        height: int | None = None,
        width: int | None = None,
        negative_prompt: str | None = None,
        bank: str | None = None,
        reference_bank: str | None = None,
        safe_denoiser: dict[str, Any] | None = None,
        sld: str | dict[str, Any] | None = None,
        sld_concept: str | None = None,
        safree: dict[str, Any] | None = None,
        seed: int = 0,
        batch_invariant: bool = True,
    ) -> None:
        super().__init__()
        self.model_config = ModelConfig(
            model=model,
            model_dir=model_dir,
            unet_weights=unet_weights,
            scheduler=scheduler,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            height=height,
            width=width,
            negative_prompt=negative_prompt,
            bank=bank,
            reference_bank=reference_bank,
            safe_denoiser=safe_denoiser,
            sld=sld,
            sld_concept=sld_concept,
            seed=seed,
            batch_invariant=batch_invariant,
        )  # validates every field
        self.guidance = self.model_config.guidance
        self.safree = SafreeConfig.from_section(safree, "model.safree")
        if self.safree is not None and model == "demo":
            raise ValueError("model.safree needs a text model; the demo model takes class labels")
        self.save_hyperparameters()
        self.pipe: Any = None
        self.handle: Any = None

    # ---- building -------------------------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.pipe is not None:
            return
        self.pipe = self.model_config.build_pipeline()  # on the CPU: Lightning moves its modules to the device
        # The pipeline's networks become children, so Lightning moves and casts them (devices, precision).
        self.networks = nn.ModuleDict({k: v for k, v in self.pipe.components.items() if isinstance(v, nn.Module)})

    def on_predict_start(self) -> None:
        """Attach the bank and SLD after Lightning has placed the networks (so the bank takes their device/dtype)."""
        from safe_denoiser.diffusers.safe_scheduler import attach

        cfg = self.model_config
        if self.guidance is not None:  # before any image: a window the schedule never enters is a mistake
            check_window(self.guidance.window, self.pipe.scheduler, cfg.num_inference_steps)
        sld = cfg.sld_config
        if sld is not None:
            from safe_denoiser.core.config import DEFAULT_SAFETY_CONCEPT
            from safe_denoiser.diffusers.sld_unet import attach_sld

            attach_sld(self.pipe, sld, cfg.sld_concept or DEFAULT_SAFETY_CONCEPT)
        if self.safree is not None:
            from safe_denoiser.diffusers.safree_pipeline import attach_safree

            attach_safree(self.pipe, self.safree)
        if self.guidance is not None:
            shape = cfg.sample_shape(self.pipe)
            reference = cfg.load_reference_bank(shape)
            self.handle = attach(self.pipe, cfg.load_bank(shape), self.guidance, record=True, reference=reference)

    # ---- generation -----------------------------------------------------------------------------------
    def _generators(self, batch: list[PromptItem]) -> list[torch.Generator]:
        # Per-item generators on the device: image k depends on its own seed only.
        return [torch.Generator(self.device).manual_seed(it.seed) for it in batch]

    def generate(self, batch: list[PromptItem]) -> tuple[np.ndarray, list[int | None]]:
        """Images (B, H, W, C) in [0, 1] and, per item, at how many steps the correction fired."""
        if self.hparams["batch_invariant"] and len(batch) > 1:
            parts = [self.generate([item]) for item in batch]
            return np.concatenate([p[0] for p in parts]), [f for p in parts for f in p[1]]
        return self._call_pipeline(batch), self._fired_steps(len(batch))

    def _call_pipeline(self, batch: list[PromptItem]) -> np.ndarray:
        hp: Any = self.hparams
        gens = self._generators(batch)
        common = {"num_inference_steps": hp.num_inference_steps, "guidance_scale": hp.guidance_scale}
        if hp.model == "demo":
            labels = [_class_of(it) for it in batch]
            negs = [_negative_class(it.negative_prompt or hp.negative_prompt) for it in batch]
            out = self.pipe(
                class_labels=labels,
                negative_class_labels=None if all(n is None for n in negs) else negs,
                generator=gens,
                output_type="np",
                **common,
            )
            return np.asarray(out.images)
        negatives = [it.negative_prompt or hp.negative_prompt for it in batch]
        out = self.pipe(
            prompt=[it.prompt for it in batch],
            negative_prompt=None if all(n is None for n in negatives) else [n or "" for n in negatives],
            generator=gens,
            height=hp.height,
            width=hp.width,
            output_type="np",
            **common,
        )
        return np.asarray(out.images)

    def check_items(self, items: list[PromptItem]) -> None:
        """Fail before any model loads if an item cannot be generated (the demo model: class labels 0-9)."""
        if self.model_config.model == "demo":
            for it in items:
                _class_of(it)
                _negative_class(it.negative_prompt or self.model_config.negative_prompt)

    def settings(self) -> dict[str, Any]:
        """What determines an image besides its item: recorded in every PNG and metadata row."""
        hp: Any = self.hparams
        keys = ["model", "scheduler", "num_inference_steps", "guidance_scale", "height", "width", "sld"]
        keys += ["model_dir", "unet_weights", "negative_prompt", "sld_concept", "seed"]  # checked on resume too
        s = {k: hp[k] for k in keys}
        s["safe_denoiser"] = None if self.guidance is None else self.guidance.to_dict()
        s["bank"] = hp.bank
        s["safree"] = None if self.safree is None else self.safree.to_dict()
        return s

    def predict_step(
        self, batch: list[PromptItem], batch_idx: int = 0, dataloader_idx: int = 0
    ) -> list[GeneratedImage]:
        start = time.perf_counter()
        with FiniteWatch(getattr(self.pipe, "unet", None)) as watch:
            pixels, fired = self.generate(batch)
        check_finite(pixels, batch, watch, self.model_config.num_inference_steps)  # NaN is never written as black
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


def _class_of(item: PromptItem) -> int:
    raw = item.class_label if item.class_label is not None else item.prompt
    try:
        label = int(str(raw).strip())
    except ValueError:
        raise ValueError(
            f"item {clip_text(item.id)}: the demo model needs a class label 0-9 as prompt or class, "
            f"got {clip_text(raw)}"
        ) from None
    if not 0 <= label <= 9:
        raise ValueError(f"item {clip_text(item.id)}: class label must be 0-9, got {label}")
    return label


def _negative_class(value: str | None) -> int | None:
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"the demo model's negative prompt must be a class label 0-9, got {value!r}") from None
