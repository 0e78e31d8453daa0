"""The miniature Stable Diffusion as a model kind (``model: mini-sd``), registered through the
``safe_denoiser.model_kinds`` entry point (pyproject.toml), so that no generic module imports it.

A text-to-image kind: the shipped ``StableDiffusionPipeline`` folder (``safe_denoiser/assets/mini_sd``), one fixed
32 x 32 size (4 x 8 x 8 latents), the shipped negative bank (VAE latents of the training 8s) and reference bank
(the other digits').
"""

from __future__ import annotations

from typing import Any

from safe_denoiser.core.bank import NegativeBank
from safe_denoiser.models.diffusers_kinds import latent_sample_shape
from safe_denoiser.models.registry import ModelKind

__all__ = ["MINI_SD", "load_pipeline"]


def load_pipeline(scheduler: str | None = None) -> Any:
    """The shipped miniature as a ``StableDiffusionPipeline`` on the CPU (``scheduler``: a short name, e.g. ddim)."""
    from safe_denoiser.diffusers.pipelines import load_sd_pipeline
    from safe_denoiser.mini_sd.data import ASSETS_DIR

    pipe = load_sd_pipeline(ASSETS_DIR, scheduler=scheduler, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _build(*, scheduler: str, model_dir: str | None, unet_weights: str | None, seed: int) -> Any:
    return load_pipeline(scheduler)


def _bank(name: str) -> NegativeBank:
    from safe_denoiser.mini_sd.data import ASSETS_DIR

    return NegativeBank.load(ASSETS_DIR / name, sample_shape=(4, 8, 8))


def _bundled_bank() -> NegativeBank:
    from safe_denoiser.mini_sd.bank import BANK_FILE

    return _bank(BANK_FILE)


def _bundled_reference_bank() -> NegativeBank:
    from safe_denoiser.mini_sd.bank import REFERENCE_BANK_FILE

    return _bank(REFERENCE_BANK_FILE)


MINI_SD = ModelKind(
    "mini-sd",
    _build,
    latent_sample_shape,
    inputs="text-to-image",
    description="the bundled miniature Stable Diffusion (text prompts about digits, 32 x 32)",
    fixed_size=True,
    bundled_bank=_bundled_bank,
    bundled_reference_bank=_bundled_reference_bank,
)
