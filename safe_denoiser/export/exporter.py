"""Export a configured pipeline (+ negative bank + guidance) to a self-describing ONNX bundle.

Three modules, one concern each: ``source`` builds what gets exported from the ``model:`` section of a
``safe-denoiser predict`` config (pipeline, bank, guidance, SLD, SAFREE, and the step module); ``onnx_graph`` traces
a module with the legacy TorchScript exporter (opset 17 or 18), turns constants into named initializers (the bank
is ``negative_bank``, bit-identical to a float32 bank file), gathers weights over 2 GB into one external-data file and
checks the graph with onnxruntime against PyTorch; this module writes the bundle: the graphs, the tokenizer, the
scheduler tables, SAFREE's concept basis and the manifest, atomically (everything goes to a temporary sibling
folder that is renamed into place at the end). The public names of all three are importable from here.

Rectified-flow pipelines (SD3, Flux) export their step (``flow_graphs.FlowDenoiserStep``) with the sampler settings
in ``manifest.flow``, and their text encoders (CLIP + T5, as ``encode_prompt``), tokenizers and VAE decoder
(``flow_text``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from safe_denoiser.core.bank import NegativeBank
from safe_denoiser.core.guidance import OddsGuidance
from safe_denoiser.files import staging_dir
from safe_denoiser.runtime.integrity import bundle_files, hash_files
from safe_denoiser.runtime.manifest import (
    BANK_INITIALIZER,
    BANK_NORMS_INITIALIZER,
    PACKED_FROM,
    REFERENCE_BANK_INITIALIZER,
    REFERENCE_NORMS_INITIALIZER,
    ROUNDED_FROM,
    BankDtype,
    BankInfo,
    GraphSpec,
    Manifest,
    SchedulerInfo,
    array_sha256,
)
from safe_denoiser.runtime.safree_text import SafreeSettings, orthonormal_basis
from safe_denoiser.runtime.tokenizer_spec import TokenizerSpec

from .flow_graphs import FlowDenoiserStep, register_rms_norm, traceable_rotary
from .flow_text import export_flow_text_and_vae
from .graphs import DenoiserStep, TextEncoderGraph, VaeDecoderGraph
from .onnx_graph import SUPPORTED_OPSETS, ExportOptions, export_graph
from .precision import denoiser_lowering, whole_graph_lowering
from .source import (
    ExportSource,
    build_denoiser,
    class_label_count,
    denoiser_inputs,
    load_source,
    prediction_type,
    read_model_section,
    resolved_threshold,
    step_sample_shape,
)

__all__ = [
    "SUPPORTED_OPSETS",
    "ExportOptions",
    "ExportSource",
    "build_denoiser",
    "denoiser_inputs",
    "export_bundle",
    "load_source",
    "prepare_out_dir",
    "read_model_section",
]


# ---- the bundle -------------------------------------------------------------------------------------------------
def prepare_out_dir(out: Path, overwrite: bool) -> None:
    """Refuse a non-empty existing ``out`` unless ``overwrite`` (checked before any work is done)."""
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"bundle folder {str(out)!r} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(
            f"bundle folder {str(out)!r} exists and is not empty; choose another folder or set overwrite=True"
        )


def _install(staging: Path, out: Path) -> None:
    """Rename the finished staging folder to ``out`` (the old bundle, if any, is moved away first)."""
    old: Path | None = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / out.name)
    os.replace(staging, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _scheduler_info(pipe: Any) -> SchedulerInfo:
    from diffusers import DDIMScheduler, DDPMScheduler

    sched = pipe.scheduler
    ac = sched.alphas_cumprod.double()
    ddim: Any = DDIMScheduler.from_config(sched.config)
    ddpm: Any = DDPMScheduler.from_config(sched.config)
    for name, other in (("DDIM", ddim), ("DDPM", ddpm)):
        if not torch.equal(other.alphas_cumprod.double(), ac):
            raise ValueError(f"a {name} sampler over {type(sched).__name__}'s config has a different noise schedule")
    keys = ("timestep_spacing", "steps_offset", "clip_sample", "clip_sample_range", "thresholding")
    settings = {k: _jsonable(ddim.config[k]) for k in (*keys, "set_alpha_to_one")}
    settings["use_clipped_model_output"] = _ddim_clips_model_output(pipe)
    ddpm_settings = {k: _jsonable(ddpm.config[k]) for k in (*keys, "variance_type")}
    return SchedulerInfo(
        type=type(sched).__name__,
        config=_jsonable(dict(sched.config)),
        alphas_cumprod=tuple(float(v) for v in ac),
        sigmas=tuple(float(v) for v in ((1 - ac) / ac).sqrt()),
        final_alpha_cumprod=float(ddim.final_alpha_cumprod),
        ddim=settings,
        ddpm=ddpm_settings,
    )


def _ddim_clips_model_output(pipe: Any) -> bool:
    """Whether the pipeline's own loop passes ``use_clipped_model_output=True`` to a DDIM step.

    DigitsPipeline decides it in ``step_kwargs`` (it does, for DDIM); diffusers' Stable Diffusion pipelines never
    pass it. Asked with a DDIM scheduler swapped in, so the answer is the one a DDIM sampler gets.
    """
    from diffusers import DDIMScheduler

    step_kwargs = getattr(pipe, "step_kwargs", None)
    if not callable(step_kwargs):
        return False
    original = pipe.scheduler
    try:  # bypass DiffusionPipeline.__setattr__ (config registration), as safe_denoiser.attach does
        object.__setattr__(pipe, "scheduler", DDIMScheduler.from_config(original.config))
        return bool(step_kwargs(None, 0.0).get("use_clipped_model_output", False))
    finally:
        object.__setattr__(pipe, "scheduler", original)


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=lambda v: v.tolist() if hasattr(v, "tolist") else str(v)))


def _versions() -> dict[str, str]:
    import diffusers
    import onnx

    import safe_denoiser

    return {
        "safe_denoiser": safe_denoiser.__version__,
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "diffusers": diffusers.__version__,
    }


def export_bundle(source: ExportSource, out: str | os.PathLike[str], options: ExportOptions | None = None) -> Manifest:
    """Write the bundle for ``source`` to ``out`` (see ``manifest`` for the layout); returns its manifest."""
    options = options or ExportOptions()
    out = Path(out)
    prepare_out_dir(out, options.overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_dir(out.parent, prefix=f".{out.name}.")
    try:
        manifest = _write_bundle(source, staging, options)
        _install(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def _write_bundle(source: ExportSource, root: Path, options: ExportOptions) -> Manifest:
    pipe = source.pipe
    flow = source.family is not None
    denoiser, step = _export_denoiser(source, root, options)
    graphs = {"denoiser": denoiser}
    bank, reference_bank = _bank_infos(source, step, options.bank_dtype)
    tokenizer_dir: str | None = None
    if source.kind == "text-to-image" and not flow:
        graphs.update(_export_text_and_vae(source, root, options))
        tokenizer_dir = "tokenizer"
        pipe.tokenizer.save_pretrained(str(root / tokenizer_dir))
    tokenizers: tuple[TokenizerSpec, ...] = ()
    if source.family is not None:  # SD3 / Flux: text encoders, tokenizers and VAE decoder (export.flow_text)
        flow_graphs, tokenizers = export_flow_text_and_vae(pipe, source.family, source.sample_shape, root, options)
        graphs.update(flow_graphs)

    threshold, ab_last = resolved_threshold(source)
    manifest = Manifest(
        model_kind=source.kind,
        source=str(source.model_args.get("model", "demo")),
        sample_shape=step_sample_shape(source),
        prediction_type="flow" if flow else prediction_type(pipe),
        scheduler=_flow_scheduler_info(pipe) if flow else _scheduler_info(pipe),
        num_inference_steps=source.num_inference_steps,
        guidance_scale=source.guidance_scale,
        graphs=graphs,
        opset=options.opset,
        precision=options.precision,
        guidance=source.guidance,
        reference_threshold=threshold,
        reference_threshold_steps=source.num_inference_steps if threshold is not None else None,
        reference_threshold_alpha_bar=ab_last,
        sld=source.sld,
        bank=bank,
        reference_bank=reference_bank,
        tokenizer=tokenizer_dir,
        tokenizers=tokenizers,
        null_class=None if source.labels is None else source.labels.null,
        num_class_labels=class_label_count(pipe) if source.kind == "class-conditional" else None,
        vae_scaling_factor=float(pipe.vae.config.scaling_factor) if source.kind == "text-to-image" else None,
        path="flow" if flow else "vp",
        flow=_flow_settings(source) if flow else None,
        safree=_safree_section(source),
        model_config=_jsonable(source.model_args),
        versions=_versions(),
    )
    manifest.files = hash_files(root, bundle_files(root, manifest.file_entries()))  # checked on every load
    manifest.save(root)  # last: a folder with a manifest is a complete bundle
    manifest.validate(root)
    return manifest


def _export_denoiser(
    source: ExportSource, root: Path, options: ExportOptions
) -> tuple[GraphSpec, DenoiserStep | FlowDenoiserStep]:
    """denoiser.onnx: the guided, corrected step (VP/sigma ``DenoiserStep`` or flow ``FlowDenoiserStep``)."""
    step = build_denoiser(source, options.fp16, options.bank_dtype)
    flow = isinstance(step, FlowDenoiserStep)
    batch_axes = {n: {0: "batch"} for n in [*step.input_names, *step.output_names]}
    if flow:
        register_rms_norm(options.opset)  # Flux's q/k norms; a no-op for graphs without aten::rms_norm
        for n in ("prompt_embeds", "negative_prompt_embeds"):
            batch_axes[n] = {0: "batch", 1: "text_length"}
    elif source.guidance is None and source.kind == "text-to-image":
        # Without a bank the spatial size is free too (with one it is the bank's item shape).
        for n in ("sample", "noise", "sld_momentum", "noise_pred", "sample_corrected", "x0_hat", "sld_momentum_out"):
            batch_axes[n] = {0: "batch", 2: "height", 3: "width"}
    layout = "packed (N, h w / 4, 4 C)" if source.family == "flux" else "(N, C, H, W)"
    stored = options.bank_dtype if options.bank_dtype == "float32" else f"{options.bank_dtype} (cast to float32)"
    roles = (
        {BANK_INITIALIZER: f"negative bank {layout} {stored}", BANK_NORMS_INITIALIZER: "its squared norms (N,) float32"}
        if source.guidance is not None
        else {}
    )
    if source.reference_bank is not None:
        roles[REFERENCE_BANK_INITIALIZER] = f"reference bank of the odds beta {layout} {stored}"
        roles[REFERENCE_NORMS_INITIALIZER] = "its squared norms (M,) float32"
    if not flow and step.reference:
        roles["reference_threshold"] = "reference gate threshold (scalar float32)"
    if source.sld is not None:
        roles["sld_safety_embedding"] = "SLD safety-concept embedding (1, L, D) float32"
    with traceable_rotary() if source.family == "flux" else nullcontext():
        spec = export_graph(
            step,
            denoiser_inputs(source, step, options.batch, seed=0),
            denoiser_inputs(source, step, options.batch + 1, seed=1) if options.verify else None,
            root / "denoiser.onnx",
            step.input_names,
            step.output_names,
            batch_axes,
            options,
            dict(zip(step.constant_names, step.constants(), strict=True)),
            roles,
            denoiser_lowering(source, step, options),
        )
    return spec, step


def _export_text_and_vae(source: ExportSource, root: Path, options: ExportOptions) -> dict[str, GraphSpec]:
    """text_encoder.onnx and vae_decoder.onnx of an SD-1.x-style text-to-image pipeline."""
    pipe = source.pipe
    b, check_b = options.batch, options.batch + 1
    te = TextEncoderGraph(pipe.text_encoder.eval()).eval()  # fp16: converted as a graph (export.precision)
    lowering = whole_graph_lowering(options)
    tok = pipe.tokenizer

    def ids(n: int) -> Tensor:
        prompts = ["a photo of a cat", "", "a red car"] * n
        return tok(prompts[:n], padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids

    graphs = {
        "text_encoder": export_graph(
            te,
            [ids(b)],
            [ids(check_b)] if options.verify else None,
            root / "text_encoder.onnx",
            te.input_names,
            te.output_names,
            {"input_ids": {0: "batch"}, "last_hidden_state": {0: "batch"}},
            options,
            lowering=lowering,
        )
    }
    vd = VaeDecoderGraph(pipe.vae.eval()).eval()
    gen = torch.Generator().manual_seed(2)
    c, h, w = source.sample_shape
    graphs["vae_decoder"] = export_graph(
        vd,
        [torch.randn(b, c, h, w, generator=gen)],
        [torch.randn(check_b, c, h, w, generator=gen)] if options.verify else None,
        root / "vae_decoder.onnx",
        vd.input_names,
        vd.output_names,
        {
            "latents": {0: "batch", 2: "latent_height", 3: "latent_width"},
            "image": {0: "batch", 2: "image_height", 3: "image_width"},
        },
        options,
        lowering=lowering,
    )
    return graphs


def _bank_infos(
    source: ExportSource, step: DenoiserStep | FlowDenoiserStep, bank_dtype: BankDtype
) -> tuple[BankInfo | None, BankInfo | None]:
    """(negative, reference) banks as the graph holds them, hashed from the step's own buffers: Flux's packed array,
    a float16 bank's rounded values, the file's hash in metadata (``PACKED_FROM`` / ``ROUNDED_FROM``)."""
    neg = (
        None if source.bank is None else _graph_bank_info(source, source.bank, step.bank, bank_dtype, BANK_INITIALIZER)
    )
    g, ref = source.guidance, source.reference_bank
    if ref is None or not isinstance(g, OddsGuidance):
        return neg, None
    info = _graph_bank_info(source, ref, step.reference_bank, bank_dtype, REFERENCE_BANK_INITIALIZER)
    return neg, dataclasses.replace(info, reference_kind=g.reference_kind)


def _graph_bank_info(
    source: ExportSource, bank: NegativeBank, stored: Tensor, bank_dtype: BankDtype, initializer: str
) -> BankInfo:
    """``bank`` as initializer ``initializer`` holds it (``stored``, the step's buffer)."""
    metadata = dict(bank.metadata)
    if source.family == "flux":
        metadata.update({PACKED_FROM: bank.sha256(), "layout": "flux packed 2x2 patches"})
    elif bank_dtype != "float32":
        metadata[ROUNDED_FROM] = bank.sha256()
    return BankInfo(
        count=len(bank),
        sample_shape=tuple(stored.shape[1:]),
        sha256=array_sha256(stored.numpy()),
        initializer=initializer,
        metadata=metadata,
        dtype=bank_dtype,
    )


# ---- flow matching and SAFREE settings ---------------------------------------------------------------------------
_FLOW_REFUSED = (
    "use_karras_sigmas",
    "use_exponential_sigmas",
    "use_beta_sigmas",
    "invert_sigmas",
    "stochastic_sampling",
)


def _flow_scheduler_info(pipe: Any) -> SchedulerInfo:
    """A flow scheduler's training schedule, t = 0 first: ``sigmas`` its own (x = (1 - s) x0 + s eps; the VP form's
    sigma is infinite at s = 1), ``alphas_cumprod`` the equivalent VP abar = (1 - s)^2 / ((1 - s)^2 + s^2)."""
    sched = type(pipe.scheduler).from_config(pipe.scheduler.config)  # the training table, not a past run's sigmas
    s = np.asarray(sched.sigmas.double().cpu().numpy()[: int(sched.config.num_train_timesteps)])[::-1]  # t = 0 first
    ab = (1 - s) ** 2 / ((1 - s) ** 2 + s**2)
    return SchedulerInfo(
        type=type(sched).__name__,
        config=_jsonable(dict(sched.config)),
        alphas_cumprod=tuple(float(v) for v in ab),
        sigmas=tuple(float(v) for v in s),
        final_alpha_cumprod=1.0,
    )


def _flow_settings(source: ExportSource) -> dict[str, Any]:
    """What ``flow_sampler.flow_schedule`` needs, resolved from the scheduler and pipeline at export."""
    from safe_denoiser.runtime.flow_sampler import calculate_shift

    cfg = source.pipe.scheduler.config
    refused = [k for k in _FLOW_REFUSED if cfg.get(k)] + (["shift_terminal"] if cfg.get("shift_terminal") else [])
    if refused:
        raise ValueError(f"flow export: the scheduler settings {refused} are not supported by the numpy runtime")
    fresh = type(source.pipe.scheduler).from_config(cfg)  # sigma range of the training schedule (not a run's)
    settings: dict[str, Any] = {
        "family": source.family,
        "num_train_timesteps": int(cfg.num_train_timesteps),
        "shift": float(cfg.get("shift", 1.0)),
        "use_dynamic_shifting": bool(cfg.get("use_dynamic_shifting", False)),
        "time_shift_type": str(cfg.get("time_shift_type", "exponential")),
        "base_shift": float(cfg.get("base_shift", 0.5)),
        "max_shift": float(cfg.get("max_shift", 1.15)),
        "base_image_seq_len": int(cfg.get("base_image_seq_len", 256)),
        "max_image_seq_len": int(cfg.get("max_image_seq_len", 4096)),
        "sigma_min": float(fresh.sigma_min),
        "sigma_max": float(fresh.sigma_max),
        "pipeline_sigmas": "linspace" if source.family == "flux" else None,
    }
    if settings["use_dynamic_shifting"]:
        if source.family == "flux":
            tokens = step_sample_shape(source)[0]
        else:  # SD3: (height / patch) x (width / patch) in latent pixels
            patch = int(source.pipe.transformer.config.patch_size)
            tokens = (source.sample_shape[1] // patch) * (source.sample_shape[2] // patch)
        settings["image_seq_len"] = tokens
        settings["mu"] = calculate_shift(tokens, settings)
    return settings


def _safree_section(source: ExportSource) -> SafreeSettings | None:
    """SAFREE's settings and the concept subspace's orthonormal basis (D, r), for ``safree_text`` at run time."""
    cfg = source.safree
    if cfg is None:
        return None
    if source.kind != "text-to-image" or source.family is not None:
        raise ValueError("model.safree: SAFREE needs an SD-1.x-style text model (one CLIP text encoder)")
    if cfg.re_attention and any(s != 1.0 for s in cfg.re_attention_scales):
        raise ValueError(
            "model.safree.re_attention: the latent re-attention is not exported (it needs the UNet's skip features"
            " inside the graph); set re_attention: false to export SAFREE's text side"
        )
    from safe_denoiser.diffusers.safree_pipeline import encode_pooled

    tok, te = source.pipe.tokenizer, source.pipe.text_encoder
    ids = tok(list(cfg.concepts), padding="max_length", max_length=tok.model_max_length, truncation=True).input_ids
    pooled = encode_pooled(te, torch.tensor(ids)).float().cpu().numpy()
    eos = int(te.config.eos_token_id)
    return SafreeSettings.from_dict(
        {
            **_jsonable(cfg.to_dict()),
            "pooling": "argmax" if eos == 2 else "eos",  # how CLIPTextModel picks the pooled row
            "eos_token_id": eos,
            "vocab_size": int(te.config.vocab_size),  # the runtimes check mask_token_id / eos_token_id against it
            "concept_basis": orthonormal_basis(pooled).tolist(),
        }
    )
