"""What gets exported: a config's ``model:`` section built into pipeline, bank and guidance, and the step module.

One YAML describes both ``safe-denoiser predict`` and ``safe-denoiser export``: the ``model:`` section
(``safe_denoiser.models.ModelConfig``, ``SafeDiffusionModule``'s arguments) builds what gets exported through the
same model config that ``predict`` uses (``load_source``; no Lightning needed).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from safe_denoiser.core.bank import NegativeBank
from safe_denoiser.core.guidance import ReferenceGuidance, SafeGuidance
from safe_denoiser.core.safree import SafreeConfig
from safe_denoiser.core.sld_config import DEFAULT_SAFETY_CONCEPT, SLDConfig
from safe_denoiser.core.step import THRESHOLD_SEED, reference_threshold
from safe_denoiser.diffusers.sld_unet import encode_concept
from safe_denoiser.models import ModelConfig
from safe_denoiser.models.registry import ClassLabels
from safe_denoiser.runtime.manifest import BANK_DTYPES, BankDtype

from .flow_graphs import FlowDenoiserStep, FlowFamily, flow_family
from .graphs import DenoiserStep

FLUX_TEXT_LENGTH = 16  # T5 tokens of the example inputs (the graph's text length is dynamic)

__all__ = [
    "ExportSource",
    "build_denoiser",
    "build_flow_denoiser",
    "class_label_count",
    "denoiser_inputs",
    "flow_inputs",
    "load_source",
    "prediction_type",
    "read_model_section",
    "resolved_threshold",
    "step_sample_shape",
]


@dataclass
class ExportSource:
    """What one config's ``model:`` section builds: pipeline, guidance, banks, SLD, sample shape, defaults.

    ``reference_bank``: the odds preset's reference bank (``model.reference_bank``), None for other presets.
    """

    model_args: dict[str, Any]
    pipe: Any
    kind: Literal["class-conditional", "text-to-image"]
    sample_shape: tuple[int, ...]
    num_inference_steps: int
    guidance_scale: float
    guidance: SafeGuidance | None = None
    bank: NegativeBank | None = None
    sld: SLDConfig | None = None
    sld_concept: str = DEFAULT_SAFETY_CONCEPT
    safree: SafreeConfig | None = None
    reference_bank: NegativeBank | None = None
    labels: ClassLabels | None = None  # a class-conditional model's labels (its null class included)

    @property
    def family(self) -> FlowFamily | None:
        """ "sd3" / "flux" for a rectified-flow pipeline (exported with ``FlowDenoiserStep``), else None."""
        return flow_family(self.pipe)


# ---- building from a config ---------------------------------------------------------------------------------
def read_model_section(config: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``model:`` mapping of a ``safe-denoiser predict`` YAML (``init_args`` of a class_path form too)."""
    import yaml

    path = Path(config)
    if not path.is_file():
        raise FileNotFoundError(f"config {str(path)!r} does not exist")
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise ValueError(f"config {str(path)!r} has no 'model:' section (the SafeDiffusionModule arguments)")
    section = data["model"]
    if "init_args" in section:
        section = section["init_args"] or {}
    return dict(section)


def load_source(model_args: Mapping[str, Any], height: int | None = None, width: int | None = None) -> ExportSource:
    """Build the pipeline, bank and guidance of a ``model:`` section with ``predict``'s model config.

    ``height``/``width`` (pixels) override the section's; the bank must match the resulting sample shape.
    """
    args = dict(model_args)
    if height is not None:
        args["height"] = height
    if width is not None:
        args["width"] = width
    config = ModelConfig.from_mapping(args)
    pipe = config.build_pipeline()
    shape = config.sample_shape(pipe)
    guidance = config.guidance
    sld = config.sld_config
    if sld is not None and not sld.enabled:  # SLDUNet skips SLD when s_S <= 1: export the same (CFG only)
        sld = None
    return ExportSource(
        model_args=args,
        pipe=pipe,
        kind=config.kind.inputs,
        sample_shape=shape,
        num_inference_steps=config.num_inference_steps,
        guidance_scale=float(config.guidance_scale),
        guidance=guidance,
        bank=config.load_bank(shape) if guidance is not None else None,
        reference_bank=_reference_bank(config, shape),
        sld=sld,
        sld_concept=config.sld_concept or DEFAULT_SAFETY_CONCEPT,
        safree=config.safree_config,
        labels=config.kind.labels,
    )


def _reference_bank(config: ModelConfig, shape: tuple[int, ...]) -> NegativeBank | None:
    """The odds preset's reference bank (``model.reference_bank``, checked against ``shape``); None otherwise."""
    if config.guidance is None or not config.guidance.needs_reference_bank:
        return None
    bank = config.load_reference_bank(shape)
    if bank is None:  # ModelConfig refuses this already; kept for a clear message if that changes
        raise ValueError("model.reference_bank is required with the odds preset")
    return bank.validate(shape)


def class_label_count(pipe: Any) -> int:
    """Rows of the UNet's class embedding (config ``num_class_embeds``): digits, the null class, super-classes."""
    count = pipe.unet.config.get("num_class_embeds")
    if not isinstance(count, int) or count < 1:
        raise ValueError(f"the class-conditional UNet's config has no num_class_embeds (got {count!r})")
    return count


def prediction_type(pipe: Any) -> str:
    """The scheduler config's prediction type (diffusers' default: "epsilon")."""
    return str(pipe.scheduler.config.get("prediction_type", "epsilon"))


def resolved_threshold(source: ExportSource) -> tuple[float | None, float | None]:
    """(threshold, abar at the last timestep) of the reference gate: ``guidance.threshold`` or, as SafeScheduler
    does it, the bank's minimum kernel sum at the configured schedule's last timestep (noise seeded with 0)."""
    g = source.guidance
    if not isinstance(g, ReferenceGuidance):
        return None, None
    sched = source.pipe.scheduler
    probe = type(sched).from_config(sched.config)
    probe.set_timesteps(source.num_inference_steps)
    ab_last = float(sched.alphas_cumprod.double()[round(float(probe.timesteps[-1]))])
    if g.threshold is not None:
        return float(g.threshold), ab_last
    assert source.bank is not None
    gen = torch.Generator().manual_seed(THRESHOLD_SEED)
    return reference_threshold(source.bank.data.float(), g.kernel_sigma, ab_last, gen), ab_last


def build_denoiser(
    source: ExportSource, fp16: bool = False, bank_dtype: BankDtype = "float32"
) -> DenoiserStep | FlowDenoiserStep:
    """The step module for ``source`` (a float16 copy of the network with ``fp16``; banks stored as ``bank_dtype``)."""
    if bank_dtype not in BANK_DTYPES:
        raise ValueError(f"bank_dtype must be one of {BANK_DTYPES}, got {bank_dtype!r}")
    if source.family is not None:
        return build_flow_denoiser(source, fp16, bank_dtype)
    if prediction_type(source.pipe) != "epsilon":
        raise ValueError(
            f"export supports epsilon-prediction models; this scheduler has prediction_type"
            f" {prediction_type(source.pipe)!r}"
        )
    unet = source.pipe.unet
    if fp16:
        unet = copy.deepcopy(unet).half()
    safety = None
    if source.sld is not None:
        safety = encode_concept(source.pipe, source.sld_concept)
    threshold, _ = resolved_threshold(source)
    return DenoiserStep(
        unet.eval(),
        "class_labels" if source.kind == "class-conditional" else "text",
        source.guidance,
        None if source.bank is None else source.bank.data,
        threshold,
        source.sld,
        safety,
        None if source.reference_bank is None else source.reference_bank.data,
        bank_dtype,
    ).eval()


def build_flow_denoiser(
    source: ExportSource, fp16: bool = False, bank_dtype: BankDtype = "float32"
) -> FlowDenoiserStep:
    """The ``FlowDenoiserStep`` of an SD3 / Flux ``source`` (the banks packed as Flux's scheduler steps them, then
    stored as ``bank_dtype``)."""
    from safe_denoiser.diffusers.bank_layout import sample_space_bank

    family = source.family
    assert family is not None
    if source.sld is not None:
        raise ValueError(f"model.sld: SLD is not supported on {family} pipelines (flow matching)")
    if source.guidance is not None and source.guidance.renoises:
        raise ValueError(
            "model.safe_denoiser: flow matching supports the constant, mass, odds, sgf and shielded presets, not"
            " 'reference' (it re-noises x_t with the DDPM forward process, which a flow path does not have)"
        )
    if source.safree is not None:
        raise ValueError(f"model.safree: SAFREE's export covers SD-1.x text encoders, not {family}")
    transformer = source.pipe.transformer
    if fp16:
        transformer = copy.deepcopy(transformer).half()
    bank = None if source.bank is None else sample_space_bank(source.pipe, source.bank.data)
    ref = source.reference_bank
    reference = None if ref is None else sample_space_bank(source.pipe, ref.data, "reference bank")  # as attach packs
    image_ids = None
    if family == "flux":
        _, h, w = source.sample_shape  # unpacked latent shape; the pipeline's ids index 2x2 patches
        image_ids = source.pipe._prepare_latent_image_ids(1, h // 2, w // 2, torch.device("cpu"), torch.float32)
    step = FlowDenoiserStep(transformer.eval(), family, source.guidance, bank, image_ids, reference, bank_dtype)
    return step.eval()


def step_sample_shape(source: ExportSource) -> tuple[int, ...]:
    """The shape of one sample as the scheduler steps it (Flux: packed (h w / 4, 4 C); else ``sample_shape``)."""
    if source.family == "flux":
        c, h, w = source.sample_shape
        return ((h // 2) * (w // 2), 4 * c)
    return source.sample_shape


# ---- example inputs ----------------------------------------------------------------------------------------
def _window_timesteps(source: ExportSource, b: int, gen: torch.Generator) -> Tensor:
    """Timesteps that alternate inside and outside the correction window (so both branches are exercised)."""
    t_train = int(source.pipe.scheduler.config.num_train_timesteps)
    ts = torch.randint(0, t_train, (b,), generator=gen)
    g = source.guidance
    if g is not None:
        lo, hi = max(0.0, g.window[0]), min(float(t_train - 1), g.window[1])
        inside = [round((lo + hi) / 2)] if lo <= hi else []
        outside = [t for t in (round(lo) - 1, round(hi) + 1) if 0 <= t < t_train]
        for i in range(b):
            pool = inside if i % 2 == 0 else outside
            if pool:
                ts[i] = pool[0]
    return ts


def flow_inputs(source: ExportSource, module: FlowDenoiserStep, b: int, seed: int = 0) -> list[Tensor]:
    """Example inputs of a ``FlowDenoiserStep``: sigmas inside and outside the window, the pipeline's embeddings."""
    gen = torch.Generator().manual_seed(seed)
    t = _window_timesteps(source, b, gen).float().clamp_min(1.0)
    prompts = (["a photo of a cat", "a red car", "a dog"] * b)[:b]
    values: dict[str, Tensor] = {
        "sample": torch.randn((b, *step_sample_shape(source)), generator=gen),
        "timestep": t,
        "sigma": t / 1000.0,
        "guidance_scale": torch.full((b,), source.guidance_scale),
    }
    pipe = source.pipe
    with torch.no_grad():
        if module.family == "flux":
            pe, pooled, _ = pipe.encode_prompt(prompts[:b], prompts[:b], max_sequence_length=FLUX_TEXT_LENGTH)
            values.update(prompt_embeds=pe, pooled_prompt_embeds=pooled)
        else:
            pe, npe, pooled, npooled = pipe.encode_prompt(prompts[:b], None, None, do_classifier_free_guidance=True)
            values.update(
                prompt_embeds=pe,
                pooled_prompt_embeds=pooled,
                negative_prompt_embeds=npe,
                negative_pooled_prompt_embeds=npooled,
            )
    return [values[name].float() for name in module.input_names]


def denoiser_inputs(
    source: ExportSource, module: DenoiserStep | FlowDenoiserStep, b: int, seed: int = 0
) -> list[Tensor]:
    """Random but meaningful example inputs for ``module`` at batch ``b`` (in ``module.input_names`` order)."""
    if isinstance(module, FlowDenoiserStep):
        return flow_inputs(source, module, b, seed)
    gen = torch.Generator().manual_seed(seed)
    shape = (b, *source.sample_shape)
    t = _window_timesteps(source, b, gen)
    ac = source.pipe.scheduler.alphas_cumprod.float()
    values: dict[str, Tensor] = {
        "sample": torch.randn(shape, generator=gen),
        "timestep": t.float(),
        "alpha_bar": ac[t],
        "guidance_scale": torch.full((b,), source.guidance_scale),
        "noise": torch.randn(shape, generator=gen),
        "sld_momentum": 0.1 * torch.randn(shape, generator=gen),
    }
    if source.sld is not None:
        values["sld_step"] = torch.arange(b) % 2 * source.sld.warmup_steps  # before and after warm-up
    if source.kind == "class-conditional":
        assert source.labels is not None
        null = source.labels.null  # example labels: the plain classes below the null class, as the baseline drew
        values["class_labels"] = torch.randint(0, null, (b,), generator=gen)
        values["negative_class_labels"] = torch.full((b,), null, dtype=torch.long)
    else:
        tok = source.pipe.tokenizer
        ids = tok(["a photo of a cat"] * b, padding="max_length", max_length=tok.model_max_length, return_tensors="pt")
        neg = tok([""] * b, padding="max_length", max_length=tok.model_max_length, return_tensors="pt")
        with torch.no_grad():
            values["prompt_embeds"] = source.pipe.text_encoder(ids.input_ids)[0].float()
            values["negative_prompt_embeds"] = source.pipe.text_encoder(neg.input_ids)[0].float()
    return [values[name] for name in module.input_names]
