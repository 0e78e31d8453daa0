"""Class-conditional SLD for ``DigitsPipeline``: the safety concept is a digit class instead of a text prompt.

The wrapper is ``safe_denoiser.diffusers.sld_unet.SLDUNet`` with ``conditioning="class_labels"`` (see its docstring):
for a CFG call it appends a third branch conditioned on the unsafe ("safety concept") class, runs one UNet call of
batch 3B and returns [eps_u, eps_c - gamma]. ``DigitsPipeline.do_classifier_free_guidance`` says which calls are
CFG calls (guidance scale 0 or 1 runs one branch, which passes through untouched). The safety classes are fixed
when attaching: one class for every image, or one per image of the batch to be sampled.

Usage::

    wrapper = attach_class_sld(pipe, safety_class=8, config=SLDConfig.medium())
    images = pipe([3, 5], guidance_scale=2.0, output_type="latent").images
    detach_class_sld(pipe)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from safe_denoiser.core.sld_config import SLDConfig
from safe_denoiser.demo.digits import NUM_CLASSES
from safe_denoiser.diffusers.sld_unet import SLDUNet, install_sld_unet

__all__ = ["ClassSLDUNet", "attach_class_sld", "detach_class_sld"]

SafetyClass = int | Sequence[int] | Tensor


def _safety_labels(safety_class: SafetyClass) -> Tensor:
    """(K,) int64 digit classes (K = 1: one class for every image; K = batch size: one per image)."""
    if isinstance(safety_class, bool):
        raise ValueError(f"safety_class must be an int, a sequence of ints or a tensor, got {safety_class!r}")
    if isinstance(safety_class, Tensor):
        t = safety_class.detach().reshape(-1).to(torch.long).cpu()
    else:
        t = torch.tensor([int(safety_class)] if isinstance(safety_class, int) else [int(v) for v in safety_class])
    if t.numel() == 0 or int(t.min()) < 0 or int(t.max()) >= NUM_CLASSES:
        raise ValueError(f"safety_class must be digit classes in 0..{NUM_CLASSES - 1}, got {t.tolist()}")
    return t.to(torch.long)


class ClassSLDUNet(SLDUNet):
    """``SLDUNet`` with class-label conditioning and validated digit safety classes (``safety_labels``)."""

    def __init__(
        self, unet: nn.Module, safety_class: SafetyClass, config: SLDConfig | None = None, pipe: Any | None = None
    ) -> None:
        labels = _safety_labels(safety_class).to(device=getattr(unet, "device", None))  # no host copy per step
        super().__init__(unet, labels, SLDConfig.from_value(config), pipe, "class_labels")


def attach_class_sld(pipe: Any, safety_class: SafetyClass, config: SLDConfig | str | None = None) -> ClassSLDUNet:
    """Make a ``DigitsPipeline`` sample with class-conditional SLD (default MEDIUM); returns the wrapper.

    ``safety_class``: one digit for every image, or one per image of the batches to be sampled.
    """
    cfg = SLDConfig.from_value(config)
    labels = _safety_labels(safety_class)
    return install_sld_unet(pipe, lambda unet: ClassSLDUNet(unet, labels, cfg, pipe), "detach_class_sld")


def detach_class_sld(pipe: Any) -> nn.Module:
    """Put the original UNet back; returns it. Raises ValueError when class SLD is not attached."""
    wrapper = getattr(pipe, "unet", None)
    if not isinstance(wrapper, ClassSLDUNet):
        raise ValueError("class SLD is not attached to this pipeline (pipe.unet is not a ClassSLDUNet)")
    object.__setattr__(pipe, "unet", wrapper.unet)
    return wrapper.unet
