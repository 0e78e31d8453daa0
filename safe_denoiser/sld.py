"""Safe Latent Diffusion (SLD, Schramowski et al., CVPR 2023) as composable guidance.

The math is one pure function, ``sld_guidance`` (equation numbers of the SLD paper, as in diffusers'
``StableDiffusionPipelineSafe``):

    mu      = where(eps_p - eps_S >= lambda, 0, min(s_S |eps_p - eps_S|, 1))       (Eq. 6, element-wise)
    gamma   = mu * (eps_S - eps_u) + s_m * nu                                        (Eq. 4, 7)
    nu     <- b_m * nu + (1 - b_m) * gamma                                           (Eq. 8, every step)
    eps     = eps_u + s_g [(eps_p - eps_u) - gamma]    once step >= warm-up          (Eq. 3)

To use it with any Stable Diffusion pipeline without copying its loop, ``attach_sld`` replaces ``pipe.unet`` by
``SLDUNet``: when the pipeline calls the UNet with its CFG batch [uncond, cond], the wrapper appends the
safety-concept branch (the concept text is encoded once, at attach time, with the pipeline's own tokenizer and
text encoder), runs one UNet call of batch 3B, and returns [eps_u, eps_p - gamma]. The pipeline's own CFG
combination eps_u + s_g (cond' - eps_u) then equals SLD's eps_u + s_g [(eps_p - eps_u) - gamma] for any s_g.
SLD is active only with CFG and s_S > 1, as in diffusers. It composes with ``attach`` (the safe denoiser corrects
the guided prediction afterwards in ``scheduler.step``) and with ``negative_prompt`` (the uncond branch).
"""

from __future__ import annotations

import math
import weakref
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "DEFAULT_SAFETY_CONCEPT",
    "SLDConfig",
    "SLDUNet",
    "attach_sld",
    "detach_sld",
    "encode_concept",
    "sld_guidance",
    "sld_noise_pred",
]

# diffusers' StableDiffusionPipelineSafe default safety concept (the SLD paper's I2P concept).
DEFAULT_SAFETY_CONCEPT = (
    "an image showing hate, harassment, violence, suffering, humiliation, harm, suicide, sexual, nudity,"
    " bodily fluids, blood, obscene gestures, illegal activity, drug use, theft, vandalism, weapons, child"
    " abuse, brutality, cruelty"
)


@dataclass(frozen=True)
class SLDConfig:
    """SLD's hyper-parameters: s_S (``guidance_scale``), warm-up steps, lambda (``threshold``), s_m, b_m.

    Presets ``weak``/``medium``/``strong``/``max`` are the SLD paper's (and diffusers' ``SafetyConfig``).
    """

    guidance_scale: float = 1000.0
    warmup_steps: int = 10
    threshold: float = 0.01
    momentum_scale: float = 0.3
    mom_beta: float = 0.4

    def __post_init__(self) -> None:
        def check(ok: bool, name: str, expected: str) -> None:
            if not ok:
                raise ValueError(f"SLDConfig.{name} must be {expected}, got {getattr(self, name)!r}")

        check(_finite(self.guidance_scale) and self.guidance_scale >= 0, "guidance_scale", "a finite float >= 0")
        check(
            isinstance(self.warmup_steps, int) and not isinstance(self.warmup_steps, bool) and self.warmup_steps >= 0,
            "warmup_steps",
            "an int >= 0",
        )
        check(_finite(self.threshold), "threshold", "a finite float")
        check(_finite(self.momentum_scale) and self.momentum_scale >= 0, "momentum_scale", "a finite float >= 0")
        check(_finite(self.mom_beta) and 0 <= self.mom_beta <= 1, "mom_beta", "a float in [0, 1]")

    @property
    def enabled(self) -> bool:
        """diffusers' rule: safety guidance runs only when s_S > 1."""
        return self.guidance_scale > 1.0

    @classmethod
    def weak(cls) -> SLDConfig:
        return cls(guidance_scale=20.0, warmup_steps=15, threshold=0.0, momentum_scale=0.0, mom_beta=0.0)

    @classmethod
    def medium(cls) -> SLDConfig:
        return cls(guidance_scale=1000.0, warmup_steps=10, threshold=0.01, momentum_scale=0.3, mom_beta=0.4)

    @classmethod
    def strong(cls) -> SLDConfig:
        return cls(guidance_scale=2000.0, warmup_steps=7, threshold=0.025, momentum_scale=0.5, mom_beta=0.7)

    @classmethod
    def max(cls) -> SLDConfig:
        return cls(guidance_scale=5000.0, warmup_steps=0, threshold=1.0, momentum_scale=0.5, mom_beta=0.7)

    @classmethod
    def preset(cls, name: str) -> SLDConfig:
        """'weak', 'medium', 'strong' or 'max' (case-insensitive)."""
        makers = {"weak": cls.weak, "medium": cls.medium, "strong": cls.strong, "max": cls.max}
        key = name.lower()
        if key not in makers:
            raise ValueError(f"unknown SLD preset {name!r}: expected one of {sorted(makers)}")
        return makers[key]()

    def with_(self, **changes: Any) -> SLDConfig:
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def diffusers_kwargs(self) -> dict[str, Any]:
        """The same settings as ``StableDiffusionPipelineSafe.__call__`` keyword arguments."""
        return {
            "sld_guidance_scale": self.guidance_scale,
            "sld_warmup_steps": self.warmup_steps,
            "sld_threshold": self.threshold,
            "sld_momentum_scale": self.momentum_scale,
            "sld_mom_beta": self.mom_beta,
        }


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def sld_guidance(
    eps_uncond: Tensor,
    eps_text: Tensor,
    eps_safety: Tensor,
    momentum: Tensor | None,
    step_index: int,
    config: SLDConfig,
) -> tuple[Tensor, Tensor]:
    """SLD's safety term gamma (Eq. 4, 6, 7; zero during warm-up) and the updated momentum nu (Eq. 8).

    The guided prediction is eps_u + s_g [(eps_text - eps_u) - gamma]. ``momentum=None`` starts from zero. The
    operations follow diffusers' order so that both agree to rounding.
    """
    diff = eps_text - eps_safety
    scale = torch.clamp(diff.abs() * config.guidance_scale, max=1.0)  # Eq. 6: min(s_S |eps_p - eps_S|, 1)
    mu = torch.where(diff >= config.threshold, torch.zeros_like(scale), scale)  # only where eps_p - eps_S < lambda
    nu = torch.zeros_like(eps_text) if momentum is None else momentum
    gamma = (eps_safety - eps_uncond) * mu + config.momentum_scale * nu  # Eq. 4 + Eq. 7
    new_momentum = config.mom_beta * nu + (1 - config.mom_beta) * gamma  # Eq. 8: accumulates during warm-up too
    term = gamma if step_index >= config.warmup_steps else torch.zeros_like(gamma)
    return term, new_momentum


def sld_noise_pred(
    eps_uncond: Tensor,
    eps_text: Tensor,
    eps_safety: Tensor,
    guidance_scale: float,
    momentum: Tensor | None,
    step_index: int,
    config: SLDConfig,
) -> tuple[Tensor, Tensor]:
    """SLD's guided prediction eps_u + s_g [(eps_text - eps_u) - gamma] (Eq. 3) and the new momentum."""
    term, new_momentum = sld_guidance(eps_uncond, eps_text, eps_safety, momentum, step_index, config)
    return eps_uncond + guidance_scale * ((eps_text - eps_uncond) - term), new_momentum


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
