"""Tracing a module into ONNX and post-processing the graph: constants to initializers, external data, checks.

``export_graph`` traces with the legacy TorchScript exporter (``torch.onnx.export(..., dynamo=False)``, opset 17 or
18), turns the constant inputs into named initializers (the bank is ``negative_bank``, bit-identical to the bank
file), gathers weights over 2 GB into one page-aligned external-data file, and checks the graph with onnxruntime
against PyTorch (``verify``). With ``optimize`` the finished graph is rewritten by ONNX Runtime's own graph
optimisations (ORT_ENABLE_ALL for the CPU provider, constant folding left out so the named constants survive) before
it is verified, and the manifest records how (``GraphOptimization``).
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from safe_denoiser.runtime.graph_records import PRECISIONS, GraphPrecision
from safe_denoiser.runtime.manifest import BANK_DTYPES, BankDtype, GraphOptimization, GraphSpec, TensorSpec

__all__ = ["OPTIMIZE_PROVIDER", "SUPPORTED_OPSETS", "ExportOptions", "export_graph", "optimize_graph"]

SUPPORTED_OPSETS = (17, 18)
_TWO_GB = 2**31
EXTERNAL_DATA_THRESHOLD = _TWO_GB - 2**26  # "auto": inline bytes above this go external (protobuf's 2 GB)
_EXTERNAL_MIN_BYTES = 1024  # tensors below this stay inside the .onnx file when external data is used
_ALIGN = 4096  # page-aligned offsets in the external-data file (onnxruntime can memory-map it)
OPTIMIZE_PROVIDER = "CPUExecutionProvider"  # the provider ``optimize`` optimises for
# Constant folding would fold Reshape(negative_bank) and the like into new, unnamed initializers: the bank constants
# (hashed by both runtimes) must keep their names. The torch exporter already folded the networks' constants.
_KEEP_CONSTANTS = ("ConstantFolding",)
OPTIMIZE_TARGETS = (OPTIMIZE_PROVIDER, "CUDAExecutionProvider")  # CUDA: the transformer optimizer (export.fusion)
Lowering = Callable[[Path, "str | None"], GraphPrecision]  # rewrites a finished graph in place (export.precision)


@dataclass(frozen=True)
class ExportOptions:
    """How to export: opset, fp16 weights, the trace batch, external data, verification, overwrite.

    ``fp16`` casts the networks' weights to float16; graph inputs and outputs stay float32 and the correction
    runs in float32. ``external_data``: "auto" (only when the graph is over 2 GB), "always" or "never".
    ``verify`` runs every graph once with onnxruntime on random inputs of batch ``batch + 1`` (so a graph that
    silently fixed the traced batch fails) and records the max abs differences in the manifest.
    ``bank_dtype``: "float32" or "float16" storage of the banks inside the graph (cast to float32 there).
    ``optimize``: store each graph as ONNX Runtime's ORT_ENABLE_ALL optimisation of it for the CPU provider
    (``optimize_graph``), so CPU sessions start without re-optimising.
    ``external_data_threshold``: with "auto", a graph whose inline bytes exceed it gets external data (tests lower
    it to exercise that path on tiny graphs). ``max_sequence_length``: the T5 token length of a flow bundle's
    text encoder (None: the pipeline's default, SD3 256, Flux 512).
    ``precision``: "fp32", "fp16" or "int8" (export.precision; ``fp16=True`` is the same as "fp16", and the two
    always agree after construction); ``int8_format``: "dynamic" (CPU) or "qdq" (calibrated, for TensorRT).
    ``optimize_for``: the provider ``optimize`` targets, CPU (ORT_ENABLE_ALL) or CUDA (transformer fusions).
    """

    opset: int = 17
    fp16: bool = False
    batch: int = 2
    external_data: Literal["auto", "always", "never"] = "auto"
    verify: bool = True
    overwrite: bool = False
    bank_dtype: BankDtype = "float32"
    optimize: bool = False
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD
    max_sequence_length: int | None = None
    precision: str = "fp32"
    int8_format: Literal["dynamic", "qdq"] = "dynamic"
    optimize_for: str = OPTIMIZE_PROVIDER

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS or (self.fp16 and self.precision not in ("fp32", "fp16")):
            raise ValueError(f"precision must be one of {PRECISIONS} (fp16=True: fp16), got {self.precision!r}")
        object.__setattr__(self, "precision", "fp16" if self.fp16 else self.precision)
        object.__setattr__(self, "fp16", self.precision == "fp16")
        if self.int8_format not in ("dynamic", "qdq"):
            raise ValueError(f"int8_format must be dynamic or qdq, got {self.int8_format!r}")
        if self.optimize_for not in OPTIMIZE_TARGETS:
            raise ValueError(f"optimize_for must be one of {OPTIMIZE_TARGETS}, got {self.optimize_for!r}")
        if self.opset not in SUPPORTED_OPSETS:
            raise ValueError(f"opset must be one of {SUPPORTED_OPSETS} (legacy exporter), got {self.opset}")
        if self.batch < 1:
            raise ValueError(f"batch must be >= 1, got {self.batch}")
        if self.external_data not in ("auto", "always", "never"):
            raise ValueError(f"external_data must be auto, always or never, got {self.external_data!r}")
        if self.bank_dtype not in BANK_DTYPES:
            raise ValueError(f"bank_dtype must be one of {BANK_DTYPES}, got {self.bank_dtype!r}")
        if not 0 <= self.external_data_threshold <= EXTERNAL_DATA_THRESHOLD:
            raise ValueError(f"external_data_threshold must lie in 0..{EXTERNAL_DATA_THRESHOLD}")
        if self.max_sequence_length is not None and not 1 <= self.max_sequence_length <= 4096:
            raise ValueError(f"max_sequence_length must lie in 1..4096, got {self.max_sequence_length}")


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
    traced: Path,
    dest: Path,
    constants: Mapping[str, np.ndarray],
    external: Literal["auto", "always", "never"],
    threshold: int = EXTERNAL_DATA_THRESHOLD,
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
    to_external = already or external == "always" or (external == "auto" and inline_bytes > threshold)
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


def optimize_graph(path: Path, data_name: str | None, provider: str = OPTIMIZE_PROVIDER) -> GraphOptimization:
    """Replace ``path`` (and its external data ``data_name``) by ONNX Runtime's ORT_ENABLE_ALL optimisation of it
    for ``provider``; returns the record for the manifest. Written to a temporary sibling folder, then renamed."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # the "hardware specific" warning of ENABLE_ALL output: recorded in the manifest
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    with tempfile.TemporaryDirectory(prefix=f".optimize-{path.stem}-", dir=path.parent) as tmp:
        optimized = Path(tmp) / path.name
        options.optimized_model_filepath = str(optimized)
        if data_name is not None:  # weights stay in one external-data file of the same name
            options.add_session_config_entry("session.optimized_model_external_initializers_file_name", data_name)
            options.add_session_config_entry(
                "session.optimized_model_external_initializers_min_size_in_bytes", str(_EXTERNAL_MIN_BYTES)
            )
        ort.InferenceSession(str(path), options, providers=[provider], disabled_optimizers=list(_KEEP_CONSTANTS))
        if data_name is not None:
            os.replace(Path(tmp) / data_name, path.parent / data_name)
        os.replace(optimized, path)
    return GraphOptimization(
        level="all", provider=provider, onnxruntime=ort.__version__, disabled_optimizers=_KEEP_CONSTANTS
    )


def _check_constants_kept(path: Path, constants: Mapping[str, str]) -> None:
    """RuntimeError unless every named constant of the manifest is still an initializer of ``path``."""
    import onnx

    names = {t.name for t in onnx.load(str(path), load_external_data=False).graph.initializer}
    lost = sorted(set(constants) - names)
    if lost:
        raise RuntimeError(f"{path.name}: graph optimisation removed the named constants {lost}")


def _verify(
    path: Path,
    module: nn.Module,
    inputs: Sequence[Tensor],
    input_names: list[str],
    output_names: list[str],
    optimization: GraphOptimization | None = None,
) -> tuple[dict[str, float], dict[str, float]]:
    """(max |onnxruntime - PyTorch|, max |PyTorch|) per output (booleans: the number of disagreeing entries), the
    graph loaded as the runtime loads it."""
    from safe_denoiser.runtime.bundle import make_session

    session = make_session(path, optimization=optimization)
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


def export_graph(
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
    lowering: Lowering | None = None,
) -> GraphSpec:
    """Trace ``module`` into ``dest`` (constants appended as inputs, then made initializers), lower its precision
    (``lowering``), optimise, verify, as ``options`` asks."""
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
        data_name = _finalize(traced, dest, arrays, options.external_data, options.external_data_threshold)
    spec = _graph_spec(dest, data_name, roles or {})
    if lowering is not None:
        spec = dataclasses.replace(spec, precision=lowering(dest, data_name))
    if options.optimize and options.optimize_for == OPTIMIZE_PROVIDER:
        spec = dataclasses.replace(spec, optimization=optimize_graph(dest, data_name))
    elif options.optimize:
        from .fusion import fuse_graph

        spec = dataclasses.replace(spec, optimization=fuse_graph(dest, data_name, dest.stem))
    if lowering is not None or options.optimize:
        _check_constants_kept(dest, spec.constants)
    if check is not None and not (spec.optimization and spec.optimization.requires_provider):  # no GPU: unverified
        diffs, scales = _verify(dest, module, check, input_names, output_names, spec.optimization)
        spec = dataclasses.replace(spec, parity_max_abs_diff=diffs, parity_max_abs_value=scales)
    return spec
