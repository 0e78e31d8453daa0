"""Safe Latent Diffusion as a UNet wrapper: ``SLDUNet`` adds the safety-concept branch to a pipeline's CFG batch.

One wrapper for text pipelines (the safety concept is a text embedding, passed as ``encoder_hidden_states``) and
for class-conditional ones such as the demo's ``DigitsPipeline`` (the safety concept is a class label, passed as
``class_labels``). On a CFG call [uncond; cond] it runs one UNet call of batch 3B on [uncond; cond; safety]
(``core.sld.append_safety_branch``), computes SLD's safety term gamma (``core.sld.sld_guidance``) and returns
[eps_u, eps_c - gamma]; the pipeline's own combination eps_u + s_g ((eps_c - gamma) - eps_u) is then SLD's
eps_u + s_g [(eps_c - eps_u) - gamma] (Eq. 3). The equations are documented in ``safe_denoiser.core.sld``.

A call is a CFG call when the pipeline says so (``pipe.do_classifier_free_guidance``, an explicit flag of
diffusers' pipelines and of ``DigitsPipeline``; True without a pipeline) and the batch is even; every other call
(guidance scale 1, a single branch) passes through untouched. Momentum and the step counter are per sampling call:
they reset when the pipeline's scheduler has a new ``timesteps`` tensor (``set_timesteps`` makes one per call; a
``SafeScheduler`` from ``attach`` forwards the attribute, so SLD and the safe denoiser compose), when the batch
size changes, and on ``reset()`` (call it in hand-written loops).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any, Literal, TypeVar

import torch
from torch import Tensor, nn

from ..core.sld import append_safety_branch, sld_guidance
from ..core.sld_config import DEFAULT_SAFETY_CONCEPT, SLDConfig

__all__ = ["Conditioning", "SLDUNet", "attach_sld", "detach_sld", "encode_concept", "install_sld_unet"]

Conditioning = Literal["text", "class_labels"]
_ARGUMENT: dict[str, str] = {"text": "encoder_hidden_states", "class_labels": "class_labels"}


def encode_concept(pipe: Any, concept: str) -> Tensor:
    """(1, L, D) text-encoder hidden states of ``concept``, tokenised as diffusers' SLD pipeline does it."""
    tokenizer, text_encoder = getattr(pipe, "tokenizer", None), getattr(pipe, "text_encoder", None)
    if tokenizer is None or text_encoder is None:
        raise ValueError(f"{type(pipe).__name__} needs a tokenizer and a text_encoder to encode the safety concept")
    if not isinstance(concept, str) or not concept.strip():
        raise ValueError(f"the safety concept must be a non-empty string, got {concept!r}")
    ids = tokenizer(
        [concept], padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        return text_encoder(ids.to(text_encoder.device))[0]


def _extend_batch(value: Any, b: int) -> Any:
    """Batch-aligned [uncond (b); cond (b)] inputs (tensors, also inside lists and dicts) -> [uncond; cond; cond]."""
    if isinstance(value, Tensor):
        return append_safety_branch(value) if value.dim() > 0 and value.shape[0] == 2 * b else value
    if isinstance(value, (list, tuple)):
        return type(value)(_extend_batch(v, b) for v in value)
    if isinstance(value, dict):
        return {k: _extend_batch(v, b) for k, v in value.items()}
    return value


class SLDUNet(nn.Module):
    """A UNet wrapper that adds SLD's safety branch to the pipeline's CFG batch (see the module docstring).

    Args:
        unet: the pipeline's UNet (``UNet2DConditionModel`` for text, ``UNet2DModel`` with class labels).
        safety: the safety concept's conditioning: a (1, L, D) text embedding, or (K,) class labels with K = 1
            (one class for every image) or K = batch size (one per image).
        config: SLD's settings.
        pipe: the pipeline, for its CFG flag and its scheduler's schedule (held weakly).
        conditioning: "text" or "class_labels": which UNet argument carries the conditioning.

    Attribute reads it does not define fall through to the wrapped UNet (``config``, ``dtype``, ``device``, ...).
    """

    safety: Tensor

    def __init__(
        self,
        unet: nn.Module,
        safety: Tensor,
        config: SLDConfig,
        pipe: Any | None = None,
        conditioning: Conditioning = "text",
    ) -> None:
        super().__init__()
        if conditioning not in _ARGUMENT:
            raise ValueError(f"conditioning must be 'text' or 'class_labels', got {conditioning!r}")
        self.unet = unet
        self.sld = config
        self.conditioning = conditioning
        self.register_buffer("safety", safety.detach().clone(), persistent=False)
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

    @property
    def safety_embedding(self) -> Tensor:
        """The safety concept's text embedding (text conditioning)."""
        return self.safety

    @property
    def safety_labels(self) -> Tensor:
        """The safety classes (class-label conditioning)."""
        return self.safety

    def reset(self) -> None:
        """Start a new trajectory: step 0, zero momentum."""
        self.step_index = 0
        self.momentum = None

    def _pipeline(self) -> Any | None:
        return self._pipe() if self._pipe is not None else None

    def _cfg_active(self) -> bool:
        pipe = self._pipeline()
        return bool(getattr(pipe, "do_classifier_free_guidance", True)) if pipe is not None else True

    def _track_trajectory(self) -> None:
        """Reset when the scheduler's schedule object changed (a new sampling call): an identity test, no sync."""
        pipe = self._pipeline()
        marker = getattr(getattr(pipe, "scheduler", None), "timesteps", None)
        if marker is not None and marker is not self._marker:
            self._marker = marker
            self.reset()

    def forward(
        self, sample: Tensor, timestep: Tensor | float | int, *args: Any, return_dict: bool = True, **kwargs: Any
    ) -> Any:
        """The UNet's call; on a CFG batch the cond half comes back as eps_c - gamma (SLD active)."""
        name = _ARGUMENT[self.conditioning]
        positional = name not in kwargs and len(args) > 0
        cond = args[0] if positional else kwargs.get(name)
        if not (self.sld.enabled and cond is not None and sample.shape[0] % 2 == 0 and self._cfg_active()):
            return self.unet(sample, timestep, *args, return_dict=return_dict, **kwargs)
        self._track_trajectory()
        b = sample.shape[0] // 2
        cond3 = append_safety_branch(cond, self.safety)
        rest, extra = (args[1:], kwargs) if positional else (args, {k: v for k, v in kwargs.items() if k != name})
        new_args, new_kwargs = _extend_batch(rest, b), _extend_batch(extra, b)
        if positional:
            new_args = (cond3, *new_args)
        else:
            new_kwargs[name] = cond3
        out = self.unet(
            append_safety_branch(sample), _extend_batch(timestep, b), *new_args, return_dict=False, **new_kwargs
        )[0]
        eps_u, eps_c, eps_s = out.chunk(3)
        if self.momentum is not None and self.momentum.shape != eps_c.shape:
            self.reset()
        term, self.momentum = sld_guidance(eps_u, eps_c, eps_s, self.momentum, self.step_index, self.sld)
        self.step_index += 1
        result = torch.cat([eps_u, eps_c - term])
        return _output(self.conditioning, result) if return_dict else (result,)


Wrapper = TypeVar("Wrapper", bound=SLDUNet)


def _output(conditioning: Conditioning, sample: Tensor) -> Any:
    """The wrapped UNet class's own output type around ``sample``."""
    if conditioning == "text":
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        return UNet2DConditionOutput(sample=sample)
    from diffusers.models.unets.unet_2d import UNet2DOutput

    return UNet2DOutput(sample=sample)


def install_sld_unet(pipe: Any, make: Callable[[nn.Module], Wrapper], detach_with: str = "detach_sld") -> Wrapper:
    """Put ``make(pipe.unet)`` at ``pipe.unet`` and return it; ValueError without a UNet or when SLD is attached."""
    unet = getattr(pipe, "unet", None)
    if unet is None:
        raise ValueError(f"{type(pipe).__name__} has no unet to attach SLD to")
    if isinstance(unet, SLDUNet):
        raise ValueError(f"SLD is already attached to this pipeline: {detach_with}(pipe) first")
    wrapper = make(unet)
    object.__setattr__(pipe, "unet", wrapper)  # bypass config registration: pipe.config keeps the real class
    return wrapper


def attach_sld(pipe: Any, config: SLDConfig | str | None = None, concept: str = DEFAULT_SAFETY_CONCEPT) -> SLDUNet:
    """Make a text pipeline sample with SLD (default: the MEDIUM preset); returns the ``SLDUNet`` at ``pipe.unet``."""
    cfg = SLDConfig.from_value(config)

    def make(unet: nn.Module) -> SLDUNet:
        embedding = encode_concept(pipe, concept).to(device=getattr(unet, "device", None))
        return SLDUNet(unet, embedding, cfg, pipe, "text")

    return install_sld_unet(pipe, make)


def detach_sld(pipe: Any) -> nn.Module:
    """Put the original UNet back; returns it. Raises ValueError when SLD is not attached."""
    wrapper = getattr(pipe, "unet", None)
    if not isinstance(wrapper, SLDUNet):
        raise ValueError("SLD is not attached to this pipeline (pipe.unet is not an SLDUNet)")
    object.__setattr__(pipe, "unet", wrapper.unet)
    return wrapper.unet
