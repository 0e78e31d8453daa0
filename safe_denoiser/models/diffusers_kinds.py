"""The built-in model kinds: Stable Diffusion families from a local folder, and SD-1.4's architecture with random
weights (for shape, speed and export work). Builders import diffusers only when called."""

from __future__ import annotations

from typing import Any

from safe_denoiser.errors import FieldError
from safe_denoiser.models.registry import ModelKind

__all__ = ["DIFFUSERS_KINDS", "latent_sample_shape"]


def latent_sample_shape(pipe: Any, height: int | None, width: int | None) -> tuple[int, ...]:
    """(C, H, W) of the latents of a ``height`` x ``width`` image (None: the pipeline's default size)."""
    factor = int(pipe.vae_scale_factor)
    unet = getattr(pipe, "unet", None)
    net = unet if unet is not None else pipe.transformer  # SD3 and Flux
    default = getattr(pipe, "default_sample_size", None)
    size = int(default if default is not None else net.config.sample_size) * factor
    channels = int(net.config.in_channels)
    if hasattr(type(pipe), "_pack_latents"):  # Flux: the bank holds unpacked latents (attach packs them)
        channels //= 4
    return (channels, (height or size) // factor, (width or size) // factor)


def _folder(model_dir: str | None, family: str) -> str:
    if not model_dir:
        raise FieldError("model_dir", f"a local diffusers folder with model: {family}", model_dir, owner="model")
    return model_dir


def _local_sd(*, scheduler: str, model_dir: str | None, unet_weights: str | None, seed: int) -> Any:
    from safe_denoiser.diffusers.pipelines import load_sd_pipeline

    return load_sd_pipeline(_folder(model_dir, "sd"), unet_weights, scheduler=scheduler, safety_checker=None)


def _local_family(family: str) -> Any:
    def build(*, scheduler: str, model_dir: str | None, unet_weights: str | None, seed: int) -> Any:
        from safe_denoiser.diffusers.families import load_family

        return load_family(family, _folder(model_dir, family), scheduler=scheduler, unet_weights=unet_weights)

    return build


def _sd14_random(*, scheduler: str, model_dir: str | None, unet_weights: str | None, seed: int) -> Any:
    from safe_denoiser.diffusers.pipelines import make_scheduler, sd14_architecture_pipeline

    pipe = sd14_architecture_pipeline(seed=seed)
    pipe.scheduler = make_scheduler(scheduler, pipe.scheduler.config)
    return pipe


DIFFUSERS_KINDS: tuple[ModelKind, ...] = (
    ModelKind("sd", _local_sd, latent_sample_shape, description="Stable Diffusion 1.x/2.x", needs_model_dir=True),
    *(
        ModelKind(family, _local_family(family), latent_sample_shape, description=family, needs_model_dir=True)
        for family in ("sdxl", "sd3", "flux")
    ),
    ModelKind("sd14-random", _sd14_random, latent_sample_shape, description="SD-1.4's architecture, random weights"),
)
