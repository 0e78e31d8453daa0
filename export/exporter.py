"""Export a configured pipeline (+ negative bank + guidance) to a self-describing ONNX bundle.

One YAML describes both ``safe-denoiser predict`` and ``safe-denoiser export``: the ``model:`` section's keys are
``SafeDiffusionModule``'s arguments, and the module's own ``build_pipeline``, ``_sample_shape`` and ``_load_bank``
build what gets exported (``load_source``). ``export_bundle`` then traces each graph with the legacy TorchScript
exporter (``torch.onnx.export(..., dynamo=False)``, opset 17 or 18: METHOD.md section 6), turns the constants into
named initializers (the bank is ``negative_bank``, bit-identical to the bank file), gathers weights over 2 GB into
one external-data file, checks every graph with onnxruntime against PyTorch (``verify``), and writes the bundle
atomically: everything goes to a temporary sibling folder that is renamed into place at the end.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from safe_denoiser.core.bank import NegativeBank
from safe_denoiser.core.config import SafeGuidance
from safe_denoiser.core.sld import DEFAULT_SAFETY_CONCEPT, SLDConfig
from safe_denoiser.core.step import reference_threshold
from safe_denoiser.diffusers.sld import encode_concept

from .graphs import DenoiserStep, TextEncoderGraph, VaeDecoderGraph
from .manifest import (
    BANK_INITIALIZER,
    BankInfo,
    GraphSpec,
    Manifest,
    SchedulerInfo,
    TensorSpec,
    process_umask,
)

__all__ = [
    "ExportOptions",
    "ExportSource",
    "build_denoiser",
    "export_bundle",
    "export_from_config",
    "load_source",
    "prepare_out_dir",
    "read_model_section",
]

SUPPORTED_OPSETS = (17, 18)
_TWO_GB = 2**31
_EXTERNAL_MIN_BYTES = 1024  # tensors below this stay inside the .onnx file when external data is used
_ALIGN = 4096  # page-aligned offsets in the external-data file (onnxruntime can memory-map it)
_THRESHOLD_SEED = 0  # the reference threshold's noise: SafeScheduler seeds it with 0 as well


@dataclass(frozen=True)
class ExportOptions:
    """How to export: opset, fp16 weights, the trace batch, external data, verification, overwrite.

    ``fp16`` casts the networks' weights to float16; graph inputs and outputs stay float32 and the correction
    runs in float32. ``external_data``: "auto" (only when the graph is over 2 GB), "always" or "never".
    ``verify`` runs every graph once with onnxruntime on random inputs of batch ``batch + 1`` (so a graph that
    silently fixed the traced batch fails) and records the max abs differences in the manifest.
    """

    opset: int = 17
    fp16: bool = False
    batch: int = 2
    external_data: Literal["auto", "always", "never"] = "auto"
    verify: bool = True
    overwrite: bool = False

    def __post_init__(self) -> None:
        if self.opset not in SUPPORTED_OPSETS:
            raise ValueError(f"opset must be one of {SUPPORTED_OPSETS} (legacy exporter), got {self.opset}")
        if self.batch < 1:
            raise ValueError(f"batch must be >= 1, got {self.batch}")
        if self.external_data not in ("auto", "always", "never"):
            raise ValueError(f"external_data must be auto, always or never, got {self.external_data!r}")


@dataclass
class ExportSource:
    """What one config's ``model:`` section builds: pipeline, guidance, bank, SLD, sample shape, defaults."""

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
    """Build the pipeline, bank and guidance through ``SafeDiffusionModule`` (the same code ``predict`` runs).

    ``height``/``width`` (pixels) override the section's; the bank must match the resulting sample shape.
    """
    from safe_denoiser.lightning.module import SafeDiffusionModule

    args = dict(model_args)
    if height is not None:
        args["height"] = height
    if width is not None:
        args["width"] = width
    module = SafeDiffusionModule(**args)
    module.pipe = module.build_pipeline()  # configure_model() would also register the networks as children
    pipe = module.pipe
    shape = tuple(int(v) for v in module._sample_shape())
    guidance = module.guidance
    bank = module._load_bank(shape) if guidance is not None else None
    hp: Any = module.hparams
    sld: SLDConfig | None = None
    if hp.sld is not None:
        sld = SLDConfig.preset(hp.sld) if isinstance(hp.sld, str) else SLDConfig(**hp.sld)
        if not sld.enabled:  # SLDUNet skips SLD when s_S <= 1: export the same (CFG only)
            sld = None
    kind: Literal["class-conditional", "text-to-image"] = "class-conditional" if hp.model == "demo" else "text-to-image"
    return ExportSource(
        model_args=args,
        pipe=pipe,
        kind=kind,
        sample_shape=shape,
        num_inference_steps=int(hp.num_inference_steps),
        guidance_scale=float(hp.guidance_scale),
        guidance=guidance,
        bank=bank,
        sld=sld,
        sld_concept=hp.sld_concept or DEFAULT_SAFETY_CONCEPT,
    )


def _prediction_type(pipe: Any) -> str:
    return str(pipe.scheduler.config.get("prediction_type", "epsilon"))


def resolved_threshold(source: ExportSource) -> tuple[float | None, float | None]:
    """(threshold, abar at the last timestep) of the reference gate: ``guidance.threshold`` or, as SafeScheduler
    does it, the bank's minimum kernel sum at the configured schedule's last timestep (noise seeded with 0)."""
    g = source.guidance
    if g is None or g.mode != "reference":
        return None, None
    sched = source.pipe.scheduler
    probe = type(sched).from_config(sched.config)
    probe.set_timesteps(source.num_inference_steps)
    ab_last = float(sched.alphas_cumprod.double()[round(float(probe.timesteps[-1]))])
    if g.threshold is not None:
        return float(g.threshold), ab_last
    assert source.bank is not None and g.kernel_sigma is not None
    gen = torch.Generator().manual_seed(_THRESHOLD_SEED)
    return reference_threshold(source.bank.data.float(), g.kernel_sigma, ab_last, gen), ab_last


def build_denoiser(source: ExportSource, fp16: bool = False) -> DenoiserStep:
    """The ``DenoiserStep`` for ``source`` (a float16 copy of the UNet with ``fp16``)."""
    if _prediction_type(source.pipe) != "epsilon":
        raise ValueError(
            f"export supports epsilon-prediction models; this scheduler has prediction_type"
            f" {_prediction_type(source.pipe)!r}"
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
    ).eval()


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


def denoiser_inputs(source: ExportSource, module: DenoiserStep, b: int, seed: int = 0) -> list[Tensor]:
    """Random but meaningful example inputs for ``module`` at batch ``b`` (in ``module.input_names`` order)."""
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
        values["class_labels"] = torch.randint(0, 10, (b,), generator=gen)
        values["negative_class_labels"] = torch.full((b,), 10, dtype=torch.long)
    else:
        tok = source.pipe.tokenizer
        ids = tok(["a photo of a cat"] * b, padding="max_length", max_length=tok.model_max_length, return_tensors="pt")
        neg = tok([""] * b, padding="max_length", max_length=tok.model_max_length, return_tensors="pt")
        with torch.no_grad():
            values["prompt_embeds"] = source.pipe.text_encoder(ids.input_ids)[0].float()
            values["negative_prompt_embeds"] = source.pipe.text_encoder(neg.input_ids)[0].float()
    return [values[name] for name in module.input_names]


# ---- tracing and ONNX post-processing ---------------------------------------------------------------------------
@contextmanager
def _quiet_tracing() -> Iterator[None]:
    # TracerWarnings come from diffusers' shape asserts (static shapes at trace time): expected, not actionable.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.onnx.*")
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        yield


def _trace(
    module: nn.Module,
    args: Sequence[Tensor],
    path: Path,
    input_names: list[str],
    output_names: list[str],
    dynamic_axes: dict[str, dict[int, str]],
    opset: int,
) -> None:
    with torch.no_grad(), _quiet_tracing():
        torch.onnx.export(
            module,
            tuple(args),
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=input_names,
            output_names=output_names,
            dynamic_axes=dynamic_axes,
            do_constant_folding=True,
        )


def _all_tensors(model: Any) -> Iterator[Any]:
    from onnx.external_data_helper import _get_all_tensors

    yield from _get_all_tensors(model)


def _point_to(tensor: Any, location: str, offset: int, length: int) -> None:
    """Make ``tensor`` refer to ``length`` bytes at ``offset`` of ``location`` (whatever it held before)."""
    import onnx

    tensor.ClearField("raw_data")
    del tensor.external_data[:]
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    tensor.data_location = onnx.TensorProto.EXTERNAL


def _finalize(
    traced: Path, dest: Path, constants: Mapping[str, np.ndarray], external: Literal["auto", "always", "never"]
) -> str | None:
    """Move constant inputs into initializers and gather external data into ``<dest>.data``.

    Returns the external-data file name, or None when everything fits inside ``dest``. The torch exporter writes
    one file per tensor for graphs over 2 GB; they are concatenated (page-aligned) into one file, streaming.
    """
    import onnx
    from onnx import numpy_helper
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    model = onnx.load(str(traced), load_external_data=False)
    graph = model.graph
    kept = [vi for vi in graph.input if vi.name not in constants]
    missing = sorted(set(constants) - {vi.name for vi in graph.input})
    if missing:
        raise RuntimeError(f"traced graph lost its constant inputs {missing}")
    del graph.input[:]
    graph.input.extend(kept)
    for name, value in constants.items():
        graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(value), name))

    tensors = list(_all_tensors(model))
    already = any(uses_external_data(t) for t in tensors)
    inline_bytes = sum(len(t.raw_data) for t in tensors)
    to_external = already or external == "always" or (external == "auto" and inline_bytes > _TWO_GB - 2**26)
    if external == "never" and to_external:
        raise ValueError(f"{dest.name} is over 2 GB: it needs external data (external_data='never' was given)")
    data_name: str | None = None
    if to_external:
        data_name = dest.name + ".data"
        with open(dest.parent / data_name, "wb") as out:
            for t in tensors:
                if uses_external_data(t):
                    info = ExternalDataInfo(t)
                    with open(traced.parent / info.location, "rb") as src:
                        src.seek(info.offset or 0)
                        payload = src.read(info.length) if info.length else src.read()
                elif len(t.raw_data) >= _EXTERNAL_MIN_BYTES or (
                    not t.raw_data and numpy_helper.to_array(t).nbytes >= _EXTERNAL_MIN_BYTES
                ):
                    if not t.raw_data:  # typed-field storage: normalise to raw bytes first
                        t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t), t.name))
                    payload = t.raw_data
                else:
                    continue
                pad = -out.tell() % _ALIGN
                out.write(b"\0" * pad)
                offset = out.tell()
                out.write(payload)
                _point_to(t, data_name, offset, len(payload))
    onnx.save(model, str(dest))
    onnx.checker.check_model(str(dest))
    return data_name


def _tensor_specs(values: Sequence[Any]) -> tuple[TensorSpec, ...]:
    from onnx.helper import tensor_dtype_to_np_dtype

    specs = []
    for vi in values:
        tt = vi.type.tensor_type
        dims: list[int | str] = [d.dim_param if d.dim_param else int(d.dim_value) for d in tt.shape.dim]
        specs.append(TensorSpec(vi.name, np.dtype(tensor_dtype_to_np_dtype(tt.elem_type)).name, tuple(dims)))
    return tuple(specs)


def _graph_spec(path: Path, data_name: str | None, constants: Mapping[str, str]) -> GraphSpec:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return GraphSpec(
        file=path.name,
        inputs=_tensor_specs(model.graph.input),
        outputs=_tensor_specs(model.graph.output),
        external_data=data_name,
        constants=dict(constants),
    )


def _verify(
    path: Path, module: nn.Module, inputs: Sequence[Tensor], input_names: list[str], output_names: list[str]
) -> tuple[dict[str, float], dict[str, float]]:
    """(max |onnxruntime - PyTorch|, max |PyTorch|) per output (booleans: the number of disagreeing entries)."""
    from .runtime import make_session

    session = make_session(path)
    feeds = {n: v.numpy() for n, v in zip(input_names, inputs, strict=True)}
    got = session.run(output_names, feeds)
    with torch.no_grad():
        ref = module(*inputs)
    refs = [ref] if isinstance(ref, Tensor) else list(ref)
    diffs: dict[str, float] = {}
    scales: dict[str, float] = {}
    for name, g, r in zip(output_names, got, refs, strict=True):
        r_np = r.numpy()
        if r_np.dtype == np.bool_:
            diffs[name] = float(np.count_nonzero(np.asarray(g) != r_np))
            scales[name] = 1.0
        else:
            diffs[name] = float(np.max(np.abs(np.asarray(g, dtype=np.float64) - r_np.astype(np.float64))))
            scales[name] = float(np.max(np.abs(r_np)))
    return diffs, scales


def _export_graph(
    module: nn.Module,
    example: Sequence[Tensor],
    check: Sequence[Tensor] | None,
    dest: Path,
    input_names: list[str],
    output_names: list[str],
    dynamic_axes: dict[str, dict[int, str]],
    options: ExportOptions,
    constants: Mapping[str, Tensor] | None = None,
    roles: Mapping[str, str] | None = None,
) -> GraphSpec:
    """Trace ``module`` into ``dest`` (constants appended as inputs, then made initializers); verify if asked."""
    consts = dict(constants or {})
    with tempfile.TemporaryDirectory(prefix=f".trace-{dest.stem}-", dir=dest.parent) as tmp:
        traced = Path(tmp) / dest.name
        _trace(
            module,
            [*example, *consts.values()],
            traced,
            [*input_names, *consts],
            output_names,
            dynamic_axes,
            options.opset,
        )
        arrays = {k: v.detach().cpu().numpy() for k, v in consts.items()}
        data_name = _finalize(traced, dest, arrays, options.external_data)
    spec = _graph_spec(dest, data_name, roles or {})
    if check is not None:
        diffs, scales = _verify(dest, module, check, input_names, output_names)
        spec = dataclasses.replace(spec, parity_max_abs_diff=diffs, parity_max_abs_value=scales)
    return spec


# ---- the bundle -------------------------------------------------------------------------------------------------
def prepare_out_dir(out: Path, overwrite: bool) -> None:
    """Refuse a non-empty existing ``out`` unless ``overwrite`` (checked before any work is done)."""
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {str(out)!r} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"--out {str(out)!r} exists and is not empty; pass --overwrite to replace it")


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
    from diffusers import DDIMScheduler

    sched = pipe.scheduler
    ac = sched.alphas_cumprod.double()
    ddim: Any = DDIMScheduler.from_config(sched.config)
    if not torch.equal(ddim.alphas_cumprod.double(), ac):
        raise ValueError(f"a DDIM sampler over {type(sched).__name__}'s config has a different noise schedule")
    keys = ("timestep_spacing", "steps_offset", "clip_sample", "clip_sample_range", "thresholding", "set_alpha_to_one")
    settings = {k: _jsonable(ddim.config[k]) for k in keys}
    settings["use_clipped_model_output"] = _ddim_clips_model_output(pipe)
    return SchedulerInfo(
        type=type(sched).__name__,
        config=_jsonable(dict(sched.config)),
        alphas_cumprod=tuple(float(v) for v in ac),
        sigmas=tuple(float(v) for v in ((1 - ac) / ac).sqrt()),
        final_alpha_cumprod=float(ddim.final_alpha_cumprod),
        ddim=settings,
    )


def _ddim_clips_model_output(pipe: Any) -> bool:
    """Whether the pipeline's own loop passes ``use_clipped_model_output=True`` to a DDIM step.

    DigitsPipeline decides it in ``_step_kwargs`` (it does, for DDIM); diffusers' Stable Diffusion pipelines never
    pass it. Asked with a DDIM scheduler swapped in, so the answer is the one a DDIM sampler gets.
    """
    from diffusers import DDIMScheduler

    step_kwargs = getattr(pipe, "_step_kwargs", None)
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
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        os.chmod(staging, 0o777 & ~process_umask())  # mkdtemp creates 0700; the bundle is meant to be shared
        manifest = _write_bundle(source, staging, options)
        _install(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def _write_bundle(source: ExportSource, root: Path, options: ExportOptions) -> Manifest:
    pipe = source.pipe
    b = options.batch
    check_b = b + 1
    graphs: dict[str, GraphSpec] = {}

    # denoiser.onnx
    step = build_denoiser(source, options.fp16)
    batch_axes = {n: {0: "batch"} for n in [*step.input_names, *step.output_names]}
    if source.guidance is None and source.kind == "text-to-image":
        # Without a bank the spatial size is free too (with one it is the bank's item shape).
        for n in ("sample", "noise", "sld_momentum", "noise_pred", "sample_corrected", "x0_hat", "sld_momentum_out"):
            batch_axes[n] = {0: "batch", 2: "height", 3: "width"}
    roles = {BANK_INITIALIZER: "negative bank (N, C, H, W) float32"} if source.guidance is not None else {}
    if step.reference:
        roles["reference_threshold"] = "reference gate threshold (scalar float32)"
    if source.sld is not None:
        roles["sld_safety_embedding"] = "SLD safety-concept embedding (1, L, D) float32"
    graphs["denoiser"] = _export_graph(
        step,
        denoiser_inputs(source, step, b, seed=0),
        denoiser_inputs(source, step, check_b, seed=1) if options.verify else None,
        root / "denoiser.onnx",
        step.input_names,
        step.output_names,
        {k: v for k, v in batch_axes.items() if k in step.input_names or k in step.output_names},
        options,
        dict(zip(step.constant_names, step.constants(), strict=True)),
        roles,
    )

    tokenizer_dir: str | None = None
    if source.kind == "text-to-image":
        text_encoder = copy.deepcopy(pipe.text_encoder).half() if options.fp16 else pipe.text_encoder
        te = TextEncoderGraph(text_encoder.eval()).eval()
        tok = pipe.tokenizer

        def ids(n: int) -> Tensor:
            prompts = ["a photo of a cat", "", "a red car"] * n
            return tok(
                prompts[:n], padding="max_length", max_length=tok.model_max_length, return_tensors="pt"
            ).input_ids

        graphs["text_encoder"] = _export_graph(
            te,
            [ids(b)],
            [ids(check_b)] if options.verify else None,
            root / "text_encoder.onnx",
            te.input_names,
            te.output_names,
            {"input_ids": {0: "batch"}, "last_hidden_state": {0: "batch"}},
            options,
        )
        tokenizer_dir = "tokenizer"
        tok.save_pretrained(str(root / tokenizer_dir))

        vae = copy.deepcopy(pipe.vae).half() if options.fp16 else pipe.vae
        vd = VaeDecoderGraph(vae.eval()).eval()
        gen = torch.Generator().manual_seed(2)
        c, h, w = source.sample_shape
        graphs["vae_decoder"] = _export_graph(
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
        )

    threshold, ab_last = resolved_threshold(source)
    bank = source.bank
    manifest = Manifest(
        model_kind=source.kind,
        source=str(source.model_args.get("model", "demo")),
        sample_shape=source.sample_shape,
        prediction_type=_prediction_type(pipe),
        scheduler=_scheduler_info(pipe),
        num_inference_steps=source.num_inference_steps,
        guidance_scale=source.guidance_scale,
        graphs=graphs,
        opset=options.opset,
        precision="fp16" if options.fp16 else "fp32",
        guidance=source.guidance,
        reference_threshold=threshold,
        reference_threshold_steps=source.num_inference_steps if threshold is not None else None,
        reference_threshold_alpha_bar=ab_last,
        sld=source.sld,
        bank=None
        if bank is None
        else BankInfo(
            count=len(bank),
            sample_shape=bank.sample_shape,
            sha256=bank.sha256(),
            metadata=dict(bank.metadata),
        ),
        tokenizer=tokenizer_dir,
        null_class=10 if source.kind == "class-conditional" else None,
        vae_scaling_factor=float(pipe.vae.config.scaling_factor) if source.kind == "text-to-image" else None,
        model_config=_jsonable(source.model_args),
        versions=_versions(),
    )
    manifest.save(root)  # last: a folder with a manifest is a complete bundle
    manifest.validate(root)
    return manifest


def export_from_config(
    config: str | os.PathLike[str],
    out: str | os.PathLike[str],
    options: ExportOptions | None = None,
    height: int | None = None,
    width: int | None = None,
) -> Manifest:
    """``safe-denoiser export``'s work: read the YAML's model section, build, export."""
    options = options or ExportOptions()
    prepare_out_dir(Path(out), options.overwrite)  # fail before the (slow) build
    source = load_source(read_model_section(config), height, width)
    return export_bundle(source, out, options)
