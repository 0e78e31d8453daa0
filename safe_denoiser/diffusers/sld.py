"""Safe Latent Diffusion as a UNet wrapper: ``SLDUNet`` adds the safety-concept branch to a pipeline's CFG batch.

The equations live in ``safe_denoiser.core.sld``; see its docstring.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import Tensor, nn

from ..core.sld import DEFAULT_SAFETY_CONCEPT, SLDConfig, sld_guidance

__all__ = ["SLDUNet", "attach_sld", "detach_sld", "encode_concept"]


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
    """[uncond (b), cond (b)] batch-aligned inputs -> [uncond, cond, cond] for the safety branch."""
    if isinstance(value, Tensor):
        return torch.cat([value, value[b:]]) if value.dim() > 0 and value.shape[0] == 2 * b else value
    if isinstance(value, (list, tuple)):
        return type(value)(_extend_batch(v, b) for v in value)
    if isinstance(value, dict):
        return {k: _extend_batch(v, b) for k, v in value.items()}
    return value


class SLDUNet(nn.Module):
    """A UNet wrapper that adds SLD's safety-concept branch to the pipeline's CFG batch (see module docstring).

    Attribute reads it does not define fall through to the wrapped UNet (``config``, ``dtype``, ``device``, ...).
    Per-trajectory state (step counter, momentum) resets when the pipeline's scheduler gets a new schedule
    (``set_timesteps`` creates a new ``timesteps`` tensor); call ``reset()`` in hand-written loops.
    """

    safety_embedding: Tensor

    def __init__(self, unet: nn.Module, safety_embedding: Tensor, config: SLDConfig, pipe: Any | None = None) -> None:
        super().__init__()
        self.unet = unet
        self.sld = config
        self.register_buffer("safety_embedding", safety_embedding.detach().clone(), persistent=False)
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
        self,
        sample: Tensor,
        timestep: Tensor | float | int,
        encoder_hidden_states: Tensor,
        *args: Any,
        return_dict: bool = True,
        **kwargs: Any,
    ) -> Any:
        """UNet(sample, t, ehs) with [uncond, cond'] where cond' = eps_cond - gamma, when SLD is active."""
        if not (self.sld.enabled and self._cfg_active() and sample.shape[0] % 2 == 0):
            return self.unet(sample, timestep, encoder_hidden_states, *args, return_dict=return_dict, **kwargs)
        self._track_trajectory()
        b = sample.shape[0] // 2
        safety = self.safety_embedding.to(encoder_hidden_states)
        if safety.shape[1:] != encoder_hidden_states.shape[1:]:
            raise ValueError(
                f"safety-concept embedding {tuple(safety.shape[1:])} does not match the prompt embeddings"
                f" {tuple(encoder_hidden_states.shape[1:])}"
            )
        out = self.unet(
            torch.cat([sample, sample[b:]]),
            _extend_batch(timestep, b),
            torch.cat([encoder_hidden_states, safety.expand(b, -1, -1)]),
            *_extend_batch(args, b),
            return_dict=False,
            **_extend_batch(kwargs, b),
        )[0]
        eps_u, eps_c, eps_s = out.chunk(3)
        if self.momentum is not None and self.momentum.shape != eps_c.shape:
            self.reset()
        term, self.momentum = sld_guidance(eps_u, eps_c, eps_s, self.momentum, self.step_index, self.sld)
        self.step_index += 1
        result = torch.cat([eps_u, eps_c - term])
        if not return_dict:
            return (result,)
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        return UNet2DConditionOutput(sample=result)


def attach_sld(pipe: Any, config: SLDConfig | str | None = None, concept: str = DEFAULT_SAFETY_CONCEPT) -> SLDUNet:
    """Make ``pipe`` sample with SLD (default: the MEDIUM preset); returns the ``SLDUNet`` now at ``pipe.unet``."""
    cfg = SLDConfig.medium() if config is None else SLDConfig.preset(config) if isinstance(config, str) else config
    if not isinstance(cfg, SLDConfig):
        raise TypeError(f"config must be an SLDConfig or a preset name, got {type(config).__name__}")
    unet = getattr(pipe, "unet", None)
    if unet is None:
        raise ValueError(f"{type(pipe).__name__} has no unet to attach SLD to")
    if isinstance(unet, SLDUNet):
        raise ValueError("SLD is already attached to this pipeline: detach_sld(pipe) first")
    embedding = encode_concept(pipe, concept)
    wrapper = SLDUNet(unet, embedding.to(device=unet.device), cfg, pipe)
    object.__setattr__(pipe, "unet", wrapper)  # bypass config registration: pipe.config keeps the real class
    return wrapper


def detach_sld(pipe: Any) -> nn.Module:
    """Put the original UNet back; returns it. Raises ValueError when SLD is not attached."""
    wrapper = getattr(pipe, "unet", None)
    if not isinstance(wrapper, SLDUNet):
        raise ValueError("SLD is not attached to this pipeline (pipe.unet is not an SLDUNet)")
    object.__setattr__(pipe, "unet", wrapper.unet)
    return wrapper.unet
