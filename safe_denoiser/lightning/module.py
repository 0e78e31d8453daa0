"""``SafeDiffusionModule``: a LightningModule whose ``predict_step`` generates a batch of images.

``trainer.predict`` then shards a prompt set over devices and nodes (see ``data.PromptDataModule``) and
``writer.ImageWriter`` saves each image as it is made. Each item's random numbers come from a generator seeded
with the item's own seed, so image k does not depend on the world size, the batch size or its neighbours.
"""

from __future__ import annotations

import time
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from torch import nn

from safe_denoiser.core.bank import NegativeBank
from safe_denoiser.core.config import SafeGuidance
from safe_denoiser.lightning.prompts import PromptItem
from safe_denoiser.lightning.writer import GeneratedImage

__all__ = ["ModelKind", "SafeDiffusionModule"]

ModelKind = Literal["demo", "sd", "sd14-random", "tiny-sd"]


def _guidance_from(settings: dict[str, Any] | None) -> SafeGuidance | None:
    """``{"preset": "reference", "eta": 0.5, ...}`` -> SafeGuidance; None or ``{"enabled": false}`` -> None."""
    if settings is None:
        return None
    values = dict(settings)
    if not values.pop("enabled", True):
        return None
    preset = values.pop("preset", "theorem")
    if "window" in values:
        values["window"] = tuple(values["window"])
    try:
        return SafeGuidance.preset(preset, **values)
    except TypeError as exc:  # an unknown key reaches the dataclass constructor
        known = sorted(SafeGuidance.__dataclass_fields__)
        raise ValueError(f"model.safe_denoiser: {exc}; expected 'preset' and some of {known}") from exc


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
        scheduler: sampler name (ddim, ddpm, pndm, euler, euler_a, lms, dpmpp; demo: ddim, ddpm, dpmsolver).
        num_inference_steps, guidance_scale, height, width: the usual sampling settings.
        negative_prompt: default negative prompt (demo: a class label), overridden per item.
        bank: negative bank (.safetensors); "bundled" for the demo model's shipped bank.
        safe_denoiser: None (off) or ``{"preset": "theorem" | "reference", <SafeGuidance fields>}``.
        sld: None (off), an SLD preset name (weak, medium, strong, max) or SLDConfig fields (text models only).
        sld_concept: the SLD safety concept text (default: diffusers' SLD concept).
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
        safe_denoiser: dict[str, Any] | None = None,
        sld: str | dict[str, Any] | None = None,
        sld_concept: str | None = None,
        seed: int = 0,
        batch_invariant: bool = True,
    ) -> None:
        super().__init__()
        if model not in ("demo", "sd", "sd14-random", "tiny-sd"):
            raise ValueError(f"model.model must be one of demo, sd, sd14-random, tiny-sd; got {model!r}")
        if model == "sd" and not model_dir:
            raise ValueError("model.model_dir is required with model: sd (a local diffusers folder)")
        if num_inference_steps <= 0:
            raise ValueError(f"model.num_inference_steps must be a positive int, got {num_inference_steps}")
        if model == "demo" and sld is not None:
            raise ValueError("model.sld needs a text model; the demo model takes class labels")
        self.guidance = _guidance_from(safe_denoiser)
        if self.guidance is not None and bank is None:
            raise ValueError("model.bank is required when model.safe_denoiser is set (a .safetensors bank file)")
        self.save_hyperparameters()
        self.pipe: Any = None
        self.handle: Any = None

    # ---- building -------------------------------------------------------------------------------------
    def build_pipeline(self) -> Any:
        """The diffusers pipeline for ``model`` on the CPU (Lightning moves its modules to the device)."""
        hp: Any = self.hparams
        if hp.model == "demo":
            from safe_denoiser.demo.pipeline import DigitsPipeline

            return DigitsPipeline.from_bundled(scheduler=hp.scheduler)
        from safe_denoiser.diffusers.pipelines import (
            load_sd_pipeline,
            make_scheduler,
            sd14_architecture_pipeline,
            tiny_sd_pipeline,
        )

        if hp.model == "sd":
            pipe = load_sd_pipeline(hp.model_dir, hp.unet_weights, scheduler=hp.scheduler, safety_checker=None)
        elif hp.model == "sd14-random":
            pipe = sd14_architecture_pipeline(seed=hp.seed)
            pipe.scheduler = make_scheduler(hp.scheduler, pipe.scheduler.config)
        else:
            pipe = tiny_sd_pipeline(seed=hp.seed, scheduler=hp.scheduler)
        pipe.set_progress_bar_config(disable=True)  # Lightning's bar shows progress per batch
        return pipe

    def configure_model(self) -> None:
        if self.pipe is not None:
            return
        self.pipe = self.build_pipeline()
        # The pipeline's networks become children, so Lightning moves and casts them (devices, precision).
        self.networks = nn.ModuleDict({k: v for k, v in self.pipe.components.items() if isinstance(v, nn.Module)})

    def on_predict_start(self) -> None:
        """Attach the bank and SLD after Lightning has placed the networks (so the bank takes their device/dtype)."""
        from safe_denoiser.diffusers.scheduler import attach

        hp: Any = self.hparams
        if hp.sld is not None:
            from safe_denoiser.core.sld import DEFAULT_SAFETY_CONCEPT, SLDConfig
            from safe_denoiser.diffusers.sld import attach_sld

            cfg = hp.sld if isinstance(hp.sld, str) else SLDConfig(**hp.sld)
            attach_sld(self.pipe, cfg, hp.sld_concept or DEFAULT_SAFETY_CONCEPT)
        if self.guidance is not None:
            shape = self._sample_shape()
            bank = self._load_bank(shape)
            self.handle = attach(self.pipe, bank, self.guidance, record=True)

    def _sample_shape(self) -> tuple[int, ...]:
        hp: Any = self.hparams
        if hp.model == "demo":
            return tuple(self.pipe.sample_shape)
        c = self.pipe.unet.config.in_channels
        factor = self.pipe.vae_scale_factor
        size = self.pipe.unet.config.sample_size * factor
        return (c, (hp.height or size) // factor, (hp.width or size) // factor)

    def _load_bank(self, shape: tuple[int, ...]) -> NegativeBank:
        path = self.hparams["bank"]
        if path == "bundled":
            from safe_denoiser.demo.pipeline import bundled_path

            path = str(bundled_path() / "bank.safetensors")
        return NegativeBank.load(path, sample_shape=shape)

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

    def settings(self) -> dict[str, Any]:
        """What determines an image besides its item: recorded in every PNG and metadata row."""
        hp: Any = self.hparams
        keys = ("model", "scheduler", "num_inference_steps", "guidance_scale", "height", "width", "sld")
        s = {k: hp[k] for k in keys}
        s["safe_denoiser"] = None if self.guidance is None else self.guidance.to_dict()
        s["bank"] = hp.bank
        return s

    def predict_step(
        self, batch: list[PromptItem], batch_idx: int = 0, dataloader_idx: int = 0
    ) -> list[GeneratedImage]:
        start = time.perf_counter()
        pixels, fired = self.generate(batch)
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
            f"item {item.id!r}: the demo model needs a class label 0-9 as prompt or class, got {raw!r}"
        ) from None
    if not 0 <= label <= 9:
        raise ValueError(f"item {item.id!r}: class label must be 0-9, got {label}")
    return label


def _negative_class(value: str | None) -> int | None:
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"the demo model's negative prompt must be a class label 0-9, got {value!r}") from None
