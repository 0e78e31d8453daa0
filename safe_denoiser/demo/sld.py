"""Class-conditional SLD for ``DigitsPipeline``: the safety concept is a digit class instead of a text prompt.

``DigitsPipeline`` makes one batched UNet call per step on [uncond; cond] (class labels [null or negative; class])
and combines the halves by classifier-free guidance. ``ClassSLDUNet`` wraps the pipeline's UNet the way
``sld.SLDUNet`` does for text pipelines: for a CFG batch it appends a third branch conditioned on the unsafe
("safety concept") class, runs one UNet call of batch 3B, computes SLD's safety term gamma with
``sld.sld_guidance`` and returns [eps_u, eps_c - gamma]. The pipeline's own combination
eps_u + s_g ((eps_c - gamma) - eps_u) is then SLD's eps_u + s_g [(eps_c - eps_u) - gamma] (Eq. 3) for any s_g.

CFG batches are recognised by their content: the pipeline passes the same sample twice (``cat([x, x])``), so a
call whose two halves are equal is a CFG call; any other call (guidance_scale 0 or 1, a single branch) passes
through untouched. The check is one comparison of the (tiny) sample, on the host for this CPU demo.

Momentum and the step counter are per sampling call: they reset whenever the pipeline's scheduler has a new
``timesteps`` tensor (``set_timesteps`` makes one per call; a ``SafeScheduler`` from ``attach`` forwards the
attribute, so SLD and the safe denoiser compose), when the batch size changes, and on ``reset()``.

Usage::

    wrapper = attach_class_sld(pipe, safety_class=8, config=SLDConfig.medium())
    images = pipe([3, 5], guidance_scale=2.0, output_type="latent").images
    detach_class_sld(pipe)
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from safe_denoiser.core.sld import SLDConfig, sld_guidance

__all__ = ["ClassSLDUNet", "attach_class_sld", "detach_class_sld"]


def _safety_labels(safety_class: int | Sequence[int] | Tensor) -> Tensor:
    """(K,) int64 with K = 1 (one class for every image) or K = batch size; checked against 0..9."""
    t = torch.as_tensor(safety_class if isinstance(safety_class, Tensor) else list(_as_seq(safety_class)))
    t = t.detach().reshape(-1).to(torch.long).cpu()
    if t.numel() == 0 or int(t.min()) < 0 or int(t.max()) > 9:
        raise ValueError(f"safety_class must be digit classes in 0..9, got {t.tolist()}")
    return t


def _as_seq(value: int | Sequence[int]) -> Sequence[int]:
    if isinstance(value, bool):
        raise ValueError(f"safety_class must be an int or a sequence of ints, got {value!r}")
    return [int(value)] if isinstance(value, int) else [int(v) for v in value]


class ClassSLDUNet(nn.Module):
    """A ``UNet2DModel`` wrapper adding SLD's safety-class branch to the CFG batch (see the module docstring).

    Attributes it does not define fall through to the wrapped UNet (``config``, ``dtype``, ``device``, ...), so
    the pipeline keeps working unchanged. ``safety_labels`` is (1,) (one class for all images) or (B,) per image.
    """

    def __init__(
        self,
        unet: nn.Module,
        safety_class: int | Sequence[int] | Tensor,
        config: SLDConfig | None = None,
        pipe: Any | None = None,
    ) -> None:
        super().__init__()
        self.unet = unet
        self.sld = SLDConfig.medium() if config is None else config
        self.safety_labels = _safety_labels(safety_class)
        self._pipe = weakref.ref(pipe) if pipe is not None else None
        self._marker: object | None = None
        self.step_index = 0
        self.momentum: Tensor | None = None

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            modules = self.__dict__.get("_modules", {})
            if "unet" not in modules:
                raise
            return getattr(modules["unet"], name)

    def reset(self) -> None:
        """Start a new trajectory: step 0, zero momentum (call it in hand-written loops)."""
        self.step_index = 0
        self.momentum = None

    def _track_trajectory(self, batch: int) -> None:
        """Reset on a new schedule object (a new sampling call) or a new batch size: identity tests only."""
        pipe = self._pipe() if self._pipe is not None else None
        marker = getattr(getattr(pipe, "scheduler", None), "timesteps", None)
        if marker is not None and marker is not self._marker:
            self._marker = marker
            self.reset()
        if self.momentum is not None and self.momentum.shape[0] != batch:
            self.reset()

    def _safety_for(self, b: int, device: torch.device) -> Tensor:
        labels = self.safety_labels
        if labels.numel() not in (1, b):
            raise ValueError(f"ClassSLDUNet has {labels.numel()} safety labels for a batch of {b} images")
        return labels.expand(b).to(device) if labels.numel() == 1 else labels.to(device)

    def forward(
        self,
        sample: Tensor,
        timestep: Tensor | float | int,
        class_labels: Tensor | None = None,
        return_dict: bool = True,
        **kwargs: Any,
    ) -> Any:
        """UNet(sample, t, class_labels); for a CFG batch [x; x] the cond half comes back as eps_c - gamma."""
        n = sample.shape[0]
        b = n // 2
        is_cfg = self.sld.enabled and class_labels is not None and n % 2 == 0 and torch.equal(sample[:b], sample[b:])
        if not is_cfg:
            return self.unet(sample, timestep, class_labels=class_labels, return_dict=return_dict, **kwargs)
        assert class_labels is not None
        self._track_trajectory(b)
        labels = torch.cat([class_labels.reshape(-1), self._safety_for(b, class_labels.device)])
        t = timestep
        if isinstance(t, Tensor) and t.dim() > 0 and t.shape[0] == n:  # per-sample timesteps: extend as well
            t = torch.cat([t, t[b:]])
        out = self.unet(torch.cat([sample, sample[b:]]), t, class_labels=labels, return_dict=False, **kwargs)[0]
        eps_u, eps_c, eps_s = out.chunk(3)
        term, self.momentum = sld_guidance(eps_u, eps_c, eps_s, self.momentum, self.step_index, self.sld)
        self.step_index += 1
        result = torch.cat([eps_u, eps_c - term])
        if not return_dict:
            return (result,)
        from diffusers.models.unets.unet_2d import UNet2DOutput

        return UNet2DOutput(sample=result)


def attach_class_sld(
    pipe: Any, safety_class: int | Sequence[int] | Tensor, config: SLDConfig | str | None = None
) -> ClassSLDUNet:
    """Make a ``DigitsPipeline`` sample with class-conditional SLD (default MEDIUM); returns the wrapper."""
    cfg = SLDConfig.medium() if config is None else SLDConfig.preset(config) if isinstance(config, str) else config
    if not isinstance(cfg, SLDConfig):
        raise TypeError(f"config must be an SLDConfig or a preset name, got {type(config).__name__}")
    unet = getattr(pipe, "unet", None)
    if unet is None:
        raise ValueError(f"{type(pipe).__name__} has no unet to attach SLD to")
    if isinstance(unet, ClassSLDUNet):
        raise ValueError("class SLD is already attached to this pipeline: detach_class_sld(pipe) first")
    wrapper = ClassSLDUNet(unet, safety_class, cfg, pipe)
    object.__setattr__(pipe, "unet", wrapper)  # bypass config registration: pipe.config keeps the real class
    return wrapper


def detach_class_sld(pipe: Any) -> nn.Module:
    """Put the original UNet back; returns it. Raises ValueError when class SLD is not attached."""
    wrapper = getattr(pipe, "unet", None)
    if not isinstance(wrapper, ClassSLDUNet):
        raise ValueError("class SLD is not attached to this pipeline (pipe.unet is not a ClassSLDUNet)")
    object.__setattr__(pipe, "unet", wrapper.unet)
    return wrapper.unet
