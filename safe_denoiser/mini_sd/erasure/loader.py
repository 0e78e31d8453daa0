"""``load_erased_pipeline(method)``: the miniature with its concept erased by ESD-x or UCE, and the two model kinds
(``model: mini-sd-esd`` / ``mini-sd-uce``) that build it from a config.

ESD's trained cross-attention parameters are shipped (``assets/mini_sd/erasure/esd_x.safetensors``) and replace the
base UNet's; UCE's edit is computed at load time from the shipped model (``uce.apply_uce``, well under a second).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from safe_denoiser.errors import FieldError
from safe_denoiser.mini_sd.erasure.esd import ESD_FILE
from safe_denoiser.mini_sd.erasure.uce import UceSettings, apply_uce
from safe_denoiser.mini_sd.model_kind import MINI_SD, load_pipeline
from safe_denoiser.models.registry import ModelKind

__all__ = ["ERASED_KINDS", "METHODS", "apply_esd", "load_erased_pipeline"]

METHODS: tuple[str, ...] = ("esd", "uce")


def apply_esd(pipe: Any, path: Path = ESD_FILE) -> list[str]:
    """Replace ``pipe.unet``'s parameters by the ESD file's (all must be existing cross-attention parameters of the
    same shapes); returns their names."""
    from safetensors.torch import load_file

    if not path.is_file():
        raise FileNotFoundError(f"ESD weights {str(path)!r} do not exist (python -m safe_denoiser.mini_sd.erasure.esd)")
    tensors = load_file(str(path))
    params = dict(pipe.unet.named_parameters())
    for name, value in tensors.items():
        if ".attn2." not in f".{name}" or name not in params or params[name].shape != value.shape:
            raise ValueError(
                f"{str(path)!r}: {name!r} {tuple(value.shape)} is not a cross-attention parameter of the UNet"
            )
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(value)
    return sorted(tensors)


def load_erased_pipeline(method: str, scheduler: str | None = None) -> Any:
    """The shipped miniature (``model_kind.load_pipeline``) with its concept erased: ``method`` "esd" (ESD-x, the
    shipped fine-tuned cross-attention) or "uce" (UCE's closed-form edit with ``UceSettings()``)."""
    if method not in METHODS:
        raise FieldError("method", f"one of {', '.join(METHODS)}", method)
    pipe = load_pipeline(scheduler)
    if method == "esd":
        apply_esd(pipe)
    else:
        apply_uce(pipe, UceSettings())
    return pipe


def _kind(method: str, description: str) -> ModelKind:
    def build(*, scheduler: str, model_dir: str | None, unet_weights: str | None, seed: int) -> Any:
        return load_erased_pipeline(method, scheduler)

    return dataclasses.replace(MINI_SD, name=f"mini-sd-{method}", build=build, description=description)


# The miniature's own kind (banks, fixed size, text prompts) with the erased UNet: entry point in pyproject.toml.
ERASED_KINDS: tuple[ModelKind, ...] = (
    _kind("esd", "the bundled miniature SD with the digit 8 erased by ESD-x (fine-tuned cross-attention)"),
    _kind("uce", "the bundled miniature SD with the digit 8 erased by UCE (closed-form cross-attention edit)"),
)
