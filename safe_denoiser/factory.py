"""The one pipeline factory that ``safe-denoiser predict`` and ``safe-denoiser export`` share.

``ModelConfig`` is a config's ``model:`` section, validated: which model (the bundled demo, a local Stable
Diffusion folder, the random-weight SD-1.4 architecture, the tiny test pipeline), which sampler, the safe
denoiser's settings and bank, SLD. ``build_pipeline`` makes the diffusers pipeline; ``ModelConfig.sample_shape``
and ``ModelConfig.load_bank`` give the sample shape and the negative bank that goes with it. Neither imports
Lightning, so an export needs none.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, get_args

from safe_denoiser.core.bank import NegativeBank
from safe_denoiser.core.config import SafeGuidance, SLDConfig

__all__ = ["MODEL_KINDS", "ModelConfig", "ModelKind", "build_pipeline", "guidance_from"]

ModelKind = Literal["demo", "sd", "sdxl", "sd3", "flux", "sd14-random", "tiny-sd", "tiny-sdxl", "tiny-sd3", "tiny-flux"]
LOCAL_FAMILIES = ("sd", "sdxl", "sd3", "flux")  # model kinds loaded from a local diffusers folder
MODEL_KINDS: tuple[str, ...] = get_args(ModelKind)
BUNDLED_BANK = "bundled"  # ``bank: bundled``: the demo model's shipped negative bank


def build_pipeline(
    model: ModelKind = "demo",
    *,
    scheduler: str = "ddim",
    model_dir: str | os.PathLike[str] | None = None,
    unet_weights: str | os.PathLike[str] | None = None,
    seed: int = 0,
) -> Any:
    """The diffusers pipeline of a model kind on the CPU, without a progress bar (callers show their own).

    ``model``: "demo" (``DigitsPipeline``, the bundled digits model), "sd" (a local folder ``model_dir``,
    optionally with ``unet_weights``), "sd14-random" or "tiny-sd" (random weights from ``seed``). ``scheduler``:
    a short name of ``safe_denoiser.diffusers.scheduler_registry.SCHEDULERS`` (the demo: ``DEMO_SCHEDULERS``).
    """
    if model == "demo":
        from safe_denoiser.demo.pipeline import DigitsPipeline

        return DigitsPipeline.from_bundled(scheduler=scheduler)
    from safe_denoiser.diffusers.pipelines import (
        load_sd_pipeline,
        make_scheduler,
        sd14_architecture_pipeline,
        tiny_sd_pipeline,
    )

    if model == "sd":
        if not model_dir:
            raise ValueError("model_dir is required with model 'sd' (a local diffusers folder)")
        pipe = load_sd_pipeline(model_dir, unet_weights, scheduler=scheduler, safety_checker=None)
    elif model in ("sdxl", "sd3", "flux"):
        from safe_denoiser.diffusers.families import load_family

        if not model_dir:
            raise ValueError(f"model_dir is required with model {model!r} (a local diffusers folder)")
        pipe = load_family(model, model_dir, scheduler=scheduler, unet_weights=unet_weights)
    elif model in ("tiny-sdxl", "tiny-sd3", "tiny-flux"):
        from safe_denoiser.diffusers.families import tiny_pipeline

        pipe = tiny_pipeline(model.removeprefix("tiny-"), seed=seed, scheduler=scheduler)
    elif model == "sd14-random":
        pipe = sd14_architecture_pipeline(seed=seed)
        pipe.scheduler = make_scheduler(scheduler, pipe.scheduler.config)
    elif model == "tiny-sd":
        pipe = tiny_sd_pipeline(seed=seed, scheduler=scheduler)
    else:
        raise ValueError(f"model must be one of {', '.join(MODEL_KINDS)}; got {model!r}")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def guidance_from(settings: Mapping[str, Any] | None) -> SafeGuidance | None:
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


@dataclass(frozen=True)
class ModelConfig:
    """A config's ``model:`` section (``SafeDiffusionModule``'s arguments), validated on construction.

    Field meanings: see ``SafeDiffusionModule``. ``guidance`` and ``sld_config`` are the parsed
    ``safe_denoiser`` and ``sld`` settings (None when off).
    """

    model: ModelKind = "demo"
    model_dir: str | None = None
    unet_weights: str | None = None
    scheduler: str = "ddim"
    num_inference_steps: int = 50
    guidance_scale: float = 7.5
    height: int | None = None
    width: int | None = None
    negative_prompt: str | None = None
    bank: str | None = None
    reference_bank: str | None = None
    safe_denoiser: dict[str, Any] | None = None
    sld: str | dict[str, Any] | None = None
    sld_concept: str | None = None
    seed: int = 0
    batch_invariant: bool = True

    def __post_init__(self) -> None:
        if self.model not in MODEL_KINDS:
            raise ValueError(f"model.model must be one of {', '.join(MODEL_KINDS)}; got {self.model!r}")
        if self.model in LOCAL_FAMILIES and not self.model_dir:
            raise ValueError(f"model.model_dir is required with model: {self.model} (a local diffusers folder)")
        steps = self.num_inference_steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps <= 0:
            raise ValueError(f"model.num_inference_steps must be a positive int, got {steps!r}")
        scale = self.guidance_scale
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
            raise ValueError(f"model.guidance_scale must be a finite number, got {scale!r}")
        for name in ("height", "width", "seed"):
            value, least = getattr(self, name), (0 if name == "seed" else 1)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < least):
                raise ValueError(
                    f"model.{name} must be an int >= {least}{' or null' if name != 'seed' else ''}, got {value!r}"
                )
        for name in ("scheduler", "model_dir", "unet_weights", "bank", "reference_bank", "sld_concept"):
            value = getattr(self, name)
            if not (isinstance(value, str) or (value is None and name != "scheduler")):
                raise ValueError(
                    f"model.{name} must be a string{'' if name == 'scheduler' else ' or null'}, got {value!r}"
                )
        if not isinstance(self.batch_invariant, bool):
            raise ValueError(f"model.batch_invariant must be true or false, got {self.batch_invariant!r}")
        if self.safe_denoiser is not None and not isinstance(self.safe_denoiser, Mapping):
            raise ValueError(f"model.safe_denoiser must be a mapping or null, got {self.safe_denoiser!r}")
        if self.model == "demo" and self.sld is not None:
            raise ValueError("model.sld needs a text model; the demo model takes class labels")
        if self.guidance is not None and self.bank is None:
            raise ValueError("model.bank is required when model.safe_denoiser is set (a .safetensors bank file)")
        if self.guidance is not None and self.guidance.beta_mode == "odds" and self.reference_bank is None:
            raise ValueError(
                "model.reference_bank is required with the odds preset (a .safetensors bank of safe or unlabelled"
                " data, or 'bundled' for the demo)"
            )
        if self.sld is not None:
            try:
                SLDConfig.from_value(self.sld)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"model.sld: {exc}") from exc

    @classmethod
    def from_mapping(cls, section: Mapping[str, Any]) -> ModelConfig:
        """From a YAML ``model:`` mapping; unknown keys raise a ValueError naming the known ones."""
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(section) - set(known))
        if unknown:
            raise ValueError(f"unknown model field(s) {unknown}; expected some of {known}")
        return cls(**dict(section))

    @property
    def guidance(self) -> SafeGuidance | None:
        """The safe denoiser's settings (None: off)."""
        return guidance_from(self.safe_denoiser)

    @property
    def sld_config(self) -> SLDConfig | None:
        """SLD's settings (None: off)."""
        return None if self.sld is None else SLDConfig.from_value(self.sld)

    def build_pipeline(self) -> Any:
        """``build_pipeline`` with this section's model, sampler, folder, UNet weights and seed."""
        return build_pipeline(
            self.model,
            scheduler=self.scheduler,
            model_dir=self.model_dir,
            unet_weights=self.unet_weights,
            seed=self.seed,
        )

    def sample_shape(self, pipe: Any) -> tuple[int, ...]:
        """(C, H, W) of one sample of ``pipe``: the demo's pixels, or the latents of ``height`` x ``width``."""
        if self.model == "demo":
            return tuple(int(v) for v in pipe.sample_shape)
        factor = int(pipe.vae_scale_factor)
        unet = getattr(pipe, "unet", None)
        net = unet if unet is not None else pipe.transformer  # SD3 and Flux
        default = getattr(pipe, "default_sample_size", None)
        size = int(default if default is not None else net.config.sample_size) * factor
        channels = int(net.config.in_channels)
        if hasattr(type(pipe), "_pack_latents"):  # Flux: the bank holds unpacked latents (attach packs them)
            channels //= 4
        return (channels, (self.height or size) // factor, (self.width or size) // factor)

    def load_bank(self, sample_shape: tuple[int, ...]) -> NegativeBank:
        """The negative bank (``bank: bundled``: the demo's shipped one), checked against ``sample_shape``."""
        if self.bank is None:
            raise ValueError("model.bank is not set (a .safetensors bank file, or 'bundled' for the demo)")
        path = self.bank
        if path == BUNDLED_BANK:
            from safe_denoiser.demo.bank import bundled_bank_path

            path = str(bundled_bank_path())
        return NegativeBank.load(path, sample_shape=sample_shape)

    def load_reference_bank(self, sample_shape: tuple[int, ...]) -> NegativeBank | None:
        """The reference bank of the odds preset (``bundled``: the demo's safe training digits); None when unset."""
        if self.reference_bank is None:
            return None
        if self.reference_bank == BUNDLED_BANK:
            from safe_denoiser.demo.bank import build_reference_bank

            return build_reference_bank()
        return NegativeBank.load(self.reference_bank, sample_shape=sample_shape)
