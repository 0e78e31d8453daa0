"""SDXL, SD3 and Flux: local loading (safetensors only), the families' scheduler configs, img2img variants.

Random-weight tiny pipelines of each family for tests live in ``safe_denoiser.testing``.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from safe_denoiser.diffusers.pipelines import load_sd_pipeline

__all__ = [
    "FAMILIES",
    "FLUX_SCHEDULER_CONFIG",
    "SDXL_SCHEDULER_CONFIG",
    "family_schedulers",
    "img2img_pipeline",
    "load_family",
]

# family -> (text-to-image class, image-to-image class), diffusers names.
FAMILIES: dict[str, tuple[str, str]] = {
    "sd": ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline"),
    "sdxl": ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline"),
    "sd3": ("StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline"),
    "flux": ("FluxPipeline", "FluxImg2ImgPipeline"),
}

# stabilityai/stable-diffusion-xl-base-1.0 scheduler/scheduler_config.json (EulerDiscreteScheduler).
SDXL_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "interpolation_type": "linear",
    "use_karras_sigmas": False,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "clip_sample": False,
    "sample_max_value": 1.0,
}

# black-forest-labs/FLUX.1-dev scheduler/scheduler_config.json (dynamic shifting).
FLUX_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}


def family_schedulers(family: str) -> tuple[str, ...]:
    """The scheduler short names a family samples with: flow matching for SD3/Flux, the VP/sigma ones otherwise."""
    from safe_denoiser.diffusers.scheduler_registry import SCHEDULERS

    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}: expected one of {sorted(FAMILIES)}")
    flow = family in ("sd3", "flux")
    return tuple(n for n, spec in SCHEDULERS.items() if (spec.kind == "flow") == flow)


def img2img_pipeline(pipe: Any) -> Any:
    """The image-to-image pipeline of ``pipe``'s family over the same components (shared, not copied)."""
    import diffusers

    name = type(pipe).__name__
    for txt2img, img2img in FAMILIES.values():
        if name == txt2img:
            out: Any = getattr(diffusers, img2img)(**pipe.components)
            out.set_progress_bar_config(disable=True)
            return out
    raise ValueError(f"no image-to-image variant known for {name}; expected one of {[v[0] for v in FAMILIES.values()]}")


def load_family(
    family: str,
    model_dir: str | os.PathLike[str],
    *,
    scheduler: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    **kwargs: Any,
) -> Any:
    """A family's pipeline from a local diffusers folder (safetensors only, never remote code; ``load_sd_pipeline``).

    ``scheduler``: a short name from ``family_schedulers(family)``, built from the folder's scheduler config.
    """
    import diffusers

    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}: expected one of {sorted(FAMILIES)}")
    if scheduler is not None and scheduler not in family_schedulers(family):
        raise ValueError(
            f"scheduler {scheduler!r} does not sample {family}: expected one of {family_schedulers(family)}"
        )
    cls = getattr(diffusers, FAMILIES[family][0])
    return load_sd_pipeline(model_dir, scheduler=scheduler, device=device, dtype=dtype, pipeline_class=cls, **kwargs)
