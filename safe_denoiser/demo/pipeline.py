"""``DigitsPipeline``: class-conditional sampling from the bundled 8x8-digits diffusion model.

A regular ``diffusers.DiffusionPipeline`` with two registered modules, ``unet`` (UNet2DModel with 11 class
embeddings) and ``scheduler`` (any diffusers scheduler for an epsilon-prediction VP model). Each step makes one
batched UNet call on [uncond; cond], combines them by classifier-free guidance, and hands the guided eps to
``self.scheduler.step`` -- the single place where ``safe_denoiser.attach`` hooks its correction in.

Sample space: (B, 1, 8, 8) in [-1, 1], the same as ``safe_denoiser.demo.digits`` and the judge's input; get it with
``output_type="latent"``. ``"pt"`` and ``"np"`` are rescaled to [0, 1] as diffusers does.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

# Imported from their modules, not the package root: diffusers' lazy root module types them as dummies.
from diffusers.models.unets.unet_2d import UNet2DModel
from diffusers.pipelines.pipeline_utils import DiffusionPipeline, ImagePipelineOutput
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor

from safe_denoiser.core.correction import cfg_combine
from safe_denoiser.demo.digits import NULL_CLASS, bundled_path
from safe_denoiser.diffusers.scheduler_registry import DEMO_SCHEDULERS, scheduler_class

__all__ = ["NULL_CLASS", "ClassLabels", "DigitsPipeline", "bundled_path"]

Labels = Sequence[int | None] | Tensor
_OUTPUT_TYPES = ("pt", "np", "pil", "latent")


def _runs_both_branches(guidance_scale: float) -> bool:
    """Whether CFG needs eps_u and eps_c (one batched UNet call): 0 and 1 use one branch alone."""
    return guidance_scale not in (0.0, 1.0)


@dataclass(frozen=True)
class ClassLabels:
    """One call's labels, int64 (B,) each: ``cond`` the requested classes, ``uncond`` the null or negative class."""

    cond: Tensor
    uncond: Tensor

    @property
    def batch_size(self) -> int:
        """How many images the call makes."""
        return int(self.cond.shape[0])

    def unet_input(self, guidance_scale: float) -> Tensor:
        """The UNet's class labels: [uncond; cond] when CFG runs both branches, else the one branch it uses."""
        if _runs_both_branches(guidance_scale):
            return torch.cat([self.uncond, self.cond])
        return self.cond if guidance_scale == 1.0 else self.uncond


def _labels_tensor(labels: Labels, name: str, num_labels: int = NULL_CLASS + 1) -> Tensor:
    """int64 (B,) with None -> NULL_CLASS; raises on values outside 0..num_labels - 1 (the UNet's class embeddings)."""
    if isinstance(labels, Tensor):
        t = labels.detach().reshape(-1).to(torch.long).cpu()
    else:
        t = torch.tensor([NULL_CLASS if c is None else int(c) for c in labels], dtype=torch.long)
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= num_labels):
        raise ValueError(
            f"{name} must lie in 0..{num_labels - 1} ({NULL_CLASS} or None = no class), got "
            f"{t[(t < 0) | (t >= num_labels)][:5].tolist()} (first bad values of {t.numel()})"
        )
    return t


class DigitsPipeline(DiffusionPipeline):
    """Sample 8x8 digits of requested classes with classifier-free guidance and an optional negative class.

    Load the shipped model with ``DigitsPipeline.from_bundled()`` (DDIM) or ``from_bundled("ddpm")``.
    """

    unet: UNet2DModel
    scheduler: Any  # any diffusers scheduler (SchedulerMixin declares none of the methods used here)

    @property
    def num_labels(self) -> int:
        """How many class labels the UNet embeds: digits, the null class and any super-classes."""
        embedding = getattr(self.unet, "class_embedding", None)
        return int(embedding.num_embeddings) if isinstance(embedding, torch.nn.Embedding) else NULL_CLASS + 1

    def __init__(self, unet: UNet2DModel, scheduler: SchedulerMixin) -> None:
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)
        self._do_classifier_free_guidance = False

    # ---- loading ----------------------------------------------------------------------------------
    @classmethod
    def from_pretrained_dir(cls, path: str | Path, scheduler: str = "ddim", **kwargs: Any) -> DigitsPipeline:
        """Load a folder written by ``demo_model.train`` (offline, safetensors only), with a named sampler.

        ``scheduler`` is one of ``DEMO_SCHEDULERS`` ("ddim", "ddpm", "dpmpp"); each is built from the saved
        training schedule, so betas and clipping stay the ones the model was trained with.
        """
        scheduler_cls = scheduler_class(scheduler, DEMO_SCHEDULERS)
        path = Path(path)
        if not (path / "model_index.json").is_file():
            raise FileNotFoundError(f"{str(path)!r} is not a DigitsPipeline folder (no model_index.json)")
        # low_cpu_mem_usage=False: the default path wants ``accelerate`` and warns without it (1 MB model).
        kwargs.setdefault("low_cpu_mem_usage", False)
        pipe = cls.from_pretrained(str(path), local_files_only=True, use_safetensors=True, **kwargs)
        pipe.register_modules(scheduler=scheduler_cls.from_config(pipe.scheduler.config))
        pipe.set_progress_bar_config(disable=True)
        return pipe

    @classmethod
    def from_bundled(cls, scheduler: str = "ddim", **kwargs: Any) -> DigitsPipeline:
        """The model shipped in ``safe_denoiser/assets/digits`` (see its ``train_config.json``)."""
        return cls.from_pretrained_dir(bundled_path(), scheduler=scheduler, **kwargs)

    # ---- properties -------------------------------------------------------------------------------
    @property
    def null_class(self) -> int:
        """The class index of the unconditional branch (10)."""
        return NULL_CLASS

    @property
    def do_classifier_free_guidance(self) -> bool:
        """Whether the current (or last) call runs the batched [uncond; cond] UNet call (guidance not 0 or 1)."""
        return self._do_classifier_free_guidance

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of one sample: (1, 8, 8)."""
        cfg = self.unet.config
        size = cfg["sample_size"]
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return (int(cfg["in_channels"]), int(h), int(w))

    # ---- sampling ---------------------------------------------------------------------------------
    def step_kwargs(self, generator: Any, eta: float) -> dict[str, Any]:
        """Pass ``generator`` (and ``eta`` when non-zero) only to samplers whose ``step`` accepts them.

        DDIM also gets ``use_clipped_model_output=True``: it recomputes eps from the clipped x0 so that x0 and eps
        stay consistent. Without it, every step where guidance pushes x0 outside [-1, 1] drops the clipped-off
        signal while keeping the noise, and with guidance_scale 2 and 50 steps only 72% of the samples were judged
        the requested digit (100% with it; 100% at 3 too). The class's own ``step`` is inspected for that, since a
        wrapper (``safe_denoiser.attach``) takes ``**kwargs`` and forwards them.
        """
        params = inspect.signature(self.scheduler.step).parameters
        var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        kwargs: dict[str, Any] = {}
        if "generator" in params or var_kw:
            kwargs["generator"] = generator
        # __class__, not type(): a wrapper reports the wrapped scheduler's class there.
        if "use_clipped_model_output" in inspect.signature(self.scheduler.__class__.step).parameters:
            kwargs["use_clipped_model_output"] = True
        if eta != 0.0:
            if "eta" not in params and not var_kw:
                raise ValueError(f"{type(self.scheduler).__name__}.step takes no eta; eta={eta} needs DDIM")
            kwargs["eta"] = eta
        return kwargs

    @torch.no_grad()
    def __call__(
        self,
        class_labels: Labels | None = None,
        guidance_scale: float = 2.0,
        negative_class_labels: Labels | None = None,
        num_inference_steps: int = 50,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pt",
        latents: Tensor | None = None,
        batch_size: int | None = None,
        eta: float = 0.0,
        return_dict: bool = True,
    ) -> ImagePipelineOutput | tuple[Any]:
        """Generate one image per entry of ``class_labels``.

        Args:
            class_labels: digits 0..9, one per image; ``None`` (as the argument or an entry) or 10 means no class
                (unconditional). With ``class_labels=None`` give ``batch_size``.
            guidance_scale: w in eps = eps_u + w (eps_c - eps_u). 1 uses the conditional branch alone (one UNet
                pass per step), 0 the unconditional branch alone; anything else runs both in one batched call.
            negative_class_labels: the "negative prompt": per image, the class whose eps replaces the null
                class as eps_u, so guidance pushes away from it. ``None`` entries keep the null class.
            num_inference_steps: sampler steps.
            generator: one generator, or a list with one per image; with a list, image i's initial noise (and
                any sampler noise) comes from generator i alone, so a batch equals its images made one by one.
            output_type: "pt" (B, 1, 8, 8) in [0, 1], "np" (B, 8, 8, 1) in [0, 1], "pil" (list of L-mode
                images) or "latent" (B, 1, 8, 8) in the model's space [-1, 1] (the judge's input).
            latents: initial noise (B, 1, 8, 8) to use instead of drawing it.
            batch_size: number of images when ``class_labels`` is None.
            eta: DDIM's stochasticity (0 = deterministic DDIM); rejected for samplers without it.
            return_dict: return an ``ImagePipelineOutput`` (else a 1-tuple).
        """
        self.check_inputs(output_type)
        if batch_size is None:  # only read without class_labels
            batch_size = latents.shape[0] if latents is not None else 1
        labels = self.encode_class_labels(class_labels, negative_class_labels, batch_size)
        x = self.prepare_latents(labels.batch_size, generator, latents)

        self.scheduler.set_timesteps(num_inference_steps, device=self._execution_device)
        step_kwargs = self.step_kwargs(generator, eta)
        self._do_classifier_free_guidance = _runs_both_branches(guidance_scale)  # read by UNet wrappers (SLD)
        unet_labels = labels.unet_input(guidance_scale).to(self._execution_device)
        for t in self.progress_bar(self.scheduler.timesteps):
            eps = self.predict_noise(x, t, unet_labels, guidance_scale)
            x = self.scheduler.step(eps, t, x, **step_kwargs).prev_sample

        images = self.postprocess(x, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)

    def check_inputs(self, output_type: str) -> None:
        """Reject an unknown ``output_type`` before any work (labels and latents are checked where they are made)."""
        if output_type not in _OUTPUT_TYPES:
            raise ValueError(f"output_type must be 'pt', 'np', 'pil' or 'latent', got {output_type!r}")

    def encode_class_labels(
        self, class_labels: Labels | None, negative_class_labels: Labels | None, batch_size: int
    ) -> ClassLabels:
        """The per-image conditional and unconditional (null or negative) labels, checked against the UNet."""
        if class_labels is None:
            cond = torch.full((batch_size,), NULL_CLASS, dtype=torch.long)
        else:
            cond = _labels_tensor(class_labels, "class_labels", self.num_labels)
        b = cond.shape[0]
        if b == 0:
            raise ValueError("class_labels is empty: nothing to generate")
        if negative_class_labels is None:
            uncond = torch.full_like(cond, NULL_CLASS)
        else:
            uncond = _labels_tensor(negative_class_labels, "negative_class_labels", self.num_labels)
            if uncond.shape[0] != b:
                raise ValueError(f"negative_class_labels has {uncond.shape[0]} entries for {b} images")
        return ClassLabels(cond=cond, uncond=uncond)

    def prepare_latents(
        self, batch_size: int, generator: torch.Generator | list[torch.Generator] | None, latents: Tensor | None
    ) -> Tensor:
        """The initial noise (drawn, or ``latents`` checked) on the UNet's device and dtype, scaled for the sampler."""
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(
                f"got {len(generator)} generators for {batch_size} images: pass one per image or a single one"
            )
        device, dtype = self._execution_device, self.unet.dtype
        shape = (batch_size, *self.sample_shape)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
        return latents.to(device=device, dtype=dtype) * self.scheduler.init_noise_sigma

    def predict_noise(self, x: Tensor, t: Tensor, unet_labels: Tensor, guidance_scale: float) -> Tensor:
        """The guided eps at step ``t``: one UNet call, on [uncond; cond] combined by CFG when both branches run."""
        x_in = self.scheduler.scale_model_input(x, t)
        if not self.do_classifier_free_guidance:
            return self.unet(x_in, t, class_labels=unet_labels).sample
        eps_u, eps_c = self.unet(torch.cat([x_in, x_in]), t, class_labels=unet_labels).sample.chunk(2)
        return cfg_combine(eps_u, eps_c, guidance_scale)

    def postprocess(self, x: Tensor, output_type: str) -> Any:
        """Samples in model space [-1, 1] as ``output_type``: the tensor itself, or rescaled to [0, 1] (pt/np/pil)."""
        if output_type == "latent":
            return x
        images: Any = (x / 2 + 0.5).clamp(0, 1)
        if output_type in ("np", "pil"):
            images = images.cpu().permute(0, 2, 3, 1).float().numpy()
            if output_type == "pil":
                images = self.numpy_to_pil(images)
        return images
