"""``export --precision fp16 | int8``: lowering the networks' arithmetic while the correction stays float32.

The line between the two is the trace's own scope: the network's nodes are named ``/unet/...`` (SD-1.x, the demo)
or ``/transformer/...`` (SD3, Flux); every other node of ``denoiser.onnx`` is CFG, SLD or the safe-denoiser
correction, whose kernel over the bank constant picks the nearest bank item by a softmax of squared distances
(float16 rounding of those distances, ~1e-3 relative, can flip which item is nearest), so it is never lowered and
the bank initializers keep their bytes and hashes.

* fp16, the denoiser: the network is traced in float16 (``source.build_denoiser(fp16=True)``, "torch-half"), its
  float32 inputs cast at its boundary inside the step, so the graph's I/O and the correction stay float32. The text
  encoder and the VAE decoder: onnxruntime.transformers' float16 converter over the whole traced graph with its I/O
  kept float32 (the torch-half trace of CLIP mixes float32 and float16 LayerNorm inputs, which onnxruntime refuses).
* int8 "dynamic" (CPU): ``quantize_dynamic``, int8 weights of the network's MatMul / Gemm nodes, activations
  quantized per call (MatMulInteger); its convolutions stay float32 (``QUANTIZED_OPS`` says why).
* int8 "qdq" (TensorRT): ``quantize_static`` in QDQ format over the same nodes, activation ranges calibrated on
  real denoiser inputs: a few DDIM steps of the float32 step module from noise, with the bundle's own conditioning
  (``calibration_feeds``).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from safe_denoiser.runtime.graph_records import GraphPrecision

__all__ = [
    "INT8_FORMATS",
    "QUANTIZED_OPS",
    "Int8Format",
    "calibration_feeds",
    "float16_graph",
    "network_scope",
    "quantize_graph",
    "quantize_int8",
    "torch_half_record",
]

Int8Format = Literal["dynamic", "qdq"]
INT8_FORMATS: tuple[Int8Format, ...] = ("dynamic", "qdq")
# The node types given int8 weights, per format. Dynamic (CPU) leaves Conv in float32: with ONNX Runtime's
# ConvInteger the SD-1.4 denoiser's step ran at 0.33x float32 (Conv only) and MatMulInteger at 1.36x (MatMul / Gemm
# only) on a 2-core AVX-512 / AVX-VNNI CPU (bench/int8_ops.py; docs/performance.md, "int8 at SD-1.4 size"). QDQ
# quantizes both: ONNX Runtime fuses it into QLinearConv on CPU (1.83x there), and TensorRT has int8 convolutions.
QUANTIZED_OPS: dict[str, tuple[str, ...]] = {"dynamic": ("MatMul", "Gemm"), "qdq": ("MatMul", "Conv", "Gemm")}
OUTSIDE = "nodes outside {scope} (CFG, SLD, the safe-denoiser correction and its bank constants)"


def network_scope(step: Any) -> str:
    """The trace scope of the step module's network: "/unet/" or "/transformer/"."""
    return "/transformer/" if hasattr(step, "transformer") else "/unet/"


def _walk(graph: Any) -> Iterator[Any]:
    """Every node of ``graph``, those of If / Loop subgraphs included."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.g.node:
                yield from _walk(attr.g)


def network_nodes(path: Path, scope: str, op_types: Sequence[str] | None = None) -> list[str]:
    """Names of the nodes of ``path`` inside the network's trace scope (of ``op_types`` only, when given)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return [n.name for n in _walk(graph) if n.name.startswith(scope) and (op_types is None or n.op_type in op_types)]


def torch_half_record(scope: str) -> GraphPrecision:
    """The record of a denoiser whose network was traced in float16."""
    return GraphPrecision("float16", "torch-half", OUTSIDE.format(scope=scope))


def _replace(path: Path, data_name: str | None, write: Callable[[Path], None]) -> None:
    """Run ``write(tmp_path)`` and move its result (and external data) over ``path``, atomically per file."""
    with tempfile.TemporaryDirectory(prefix=f".precision-{path.stem}-", dir=path.parent) as tmp:
        out = Path(tmp) / path.name
        write(out)
        if data_name is not None:
            import onnx

            model = onnx.load(str(out))  # with its external data, read into memory
            # onnx appends external data to an existing file: the writer's own data file (often this very name)
            # would stay in front of the new bytes, a second copy of the weights that nothing reads.
            for leftover in Path(tmp).iterdir():
                if leftover != out and leftover.is_file():
                    leftover.unlink()
            onnx.save(model, str(out), save_as_external_data=True, location=data_name, size_threshold=1024)
            os.chmod(Path(tmp) / data_name, path.stat().st_mode & 0o777)  # the writer may create it 0600
            os.replace(Path(tmp) / data_name, path.parent / data_name)
        os.chmod(out, path.stat().st_mode & 0o777)  # the bundle's other files' mode, not a temporary file's
        os.replace(out, path)


def float16_graph(path: Path, data_name: str | None) -> GraphPrecision:
    """Convert a whole graph (text encoder, VAE decoder) to float16 with its inputs and outputs kept float32."""
    import onnx
    import onnxruntime as ort
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    # Resize: its scales input must stay float32 (the converter would turn their Constant into float16).
    blocked = [*DEFAULT_OP_BLOCK_LIST, "Resize"]

    def write(out: Path) -> None:
        model = convert_float_to_float16(onnx.load(str(path)), keep_io_types=True, op_block_list=blocked)
        onnx.save(model, str(out), save_as_external_data=data_name is not None)

    nodes = sum(1 for _ in _walk(onnx.load(str(path), load_external_data=False).graph))
    _replace(path, data_name, write)
    return GraphPrecision("float16", "float16-converter", "graph inputs and outputs", nodes, 0, ort.__version__)


class _Feeds:
    """onnxruntime's CalibrationDataReader over recorded input dicts (duck-typed: ``get_next`` / ``rewind``)."""

    def __init__(self, feeds: Sequence[dict[str, np.ndarray]]) -> None:
        self.feeds = list(feeds)
        self.position = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.position >= len(self.feeds):
            return None
        self.position += 1
        return self.feeds[self.position - 1]

    def rewind(self) -> None:
        self.position = 0


def quantize_graph(
    path: Path,
    out: Path,
    nodes: Sequence[str],
    op_types: Sequence[str],
    method: Int8Format,
    feeds: Sequence[dict[str, np.ndarray]] = (),
    external: bool = False,
) -> None:
    """Write ``path`` with int8 weights for ``nodes`` of ``op_types`` to ``out``: dynamic (activations quantized per
    call) or QDQ (symmetric int8, activation ranges from the calibration ``feeds``)."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

    if method == "qdq" and not feeds:
        raise ValueError("int8 qdq quantization needs calibration feeds (real denoiser inputs)")
    common: dict[str, Any] = {
        "nodes_to_quantize": list(nodes),
        "op_types_to_quantize": list(op_types),
        "use_external_data_format": external,
    }
    if method == "dynamic":
        quantize_dynamic(str(path), str(out), weight_type=QuantType.QInt8, **common)
    else:
        quantize_static(
            str(path),
            str(out),
            _Feeds(feeds),  # duck-typed CalibrationDataReader
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            extra_options={"ActivationSymmetric": True, "WeightSymmetric": True},
            **common,
        )


def quantize_int8(
    path: Path,
    data_name: str | None,
    scope: str,
    method: Int8Format,
    feeds: Sequence[dict[str, np.ndarray]] = (),
) -> GraphPrecision:
    """int8 weights for the network's ``QUANTIZED_OPS[method]`` nodes of ``path`` (``scope``); the rest float32."""
    import onnxruntime as ort

    ops = QUANTIZED_OPS[method]
    nodes = network_nodes(path, scope, ops)
    _replace(path, data_name, lambda out: quantize_graph(path, out, nodes, ops, method, feeds, data_name is not None))
    return GraphPrecision("int8", method, OUTSIDE.format(scope=scope), len(nodes), len(feeds), ort.__version__)


def calibration_feeds(
    step: Any, inputs: Callable[[int], list[torch.Tensor]], scheduler: Any, steps: int = 4, samples: int = 2
) -> list[dict[str, np.ndarray]]:
    """Real denoiser inputs for QDQ calibration: ``samples`` DDIM trajectories of ``steps`` steps of the float32
    step module from noise. ``inputs(seed)`` gives one batch of example inputs (the bundle's conditioning); their
    sample, timestep and alpha_bar are replaced by each step's (SLD's momentum and step index follow the loop)."""
    from diffusers import DDIMScheduler

    names = list(step.input_names)
    outs = list(step.output_names)
    feeds: list[dict[str, np.ndarray]] = []
    for seed in range(samples):
        values = dict(zip(names, inputs(seed), strict=True))
        sched: Any = DDIMScheduler.from_config(scheduler.config)
        sched.set_timesteps(steps)
        ab = sched.alphas_cumprod.float()
        x = values["sample"]
        for i, t in enumerate(sched.timesteps):
            b = x.shape[0]
            values.update(sample=x, timestep=torch.full((b,), float(t)), alpha_bar=torch.full((b,), float(ab[t])))
            if "sld_step" in values:
                values["sld_step"] = torch.full((b,), i, dtype=torch.long)
            feeds.append({k: v.detach().numpy().copy() for k, v in values.items()})
            with torch.no_grad():
                result = dict(zip(outs, step(*[values[n] for n in names]), strict=True))
            if "sld_momentum" in values:
                values["sld_momentum"] = result["sld_momentum_out"]
            x = sched.step(result["noise_pred"], t, result["sample_corrected"]).prev_sample
    return feeds


def denoiser_lowering(source: Any, step: Any, options: Any) -> Callable[[Path, str | None], GraphPrecision] | None:
    """What ``options.precision`` does to ``denoiser.onnx`` of ``step`` (an ``ExportSource``'s step module)."""
    scope = network_scope(step)
    if options.precision == "fp16":  # the network was traced in float16 (build_denoiser): only the record
        record = torch_half_record(scope)
        return lambda path, data_name: record
    if options.precision != "int8":
        return None
    feeds: list[dict[str, np.ndarray]] = []
    if options.int8_format == "qdq":
        if source.family is not None:
            raise ValueError(f"int8 qdq calibration covers SD-1.x-style and demo bundles, not {source.family}")
        from .source import denoiser_inputs

        feeds = calibration_feeds(
            step, lambda seed: denoiser_inputs(source, step, options.batch, seed=seed), source.pipe.scheduler
        )
    return lambda path, data_name: quantize_int8(path, data_name, scope, options.int8_format, feeds)


def whole_graph_lowering(options: Any) -> Callable[[Path, str | None], GraphPrecision] | None:
    """What ``options.precision`` does to the text encoder and the VAE decoder (int8: nothing, they run once)."""
    return float16_graph if options.precision == "fp16" else None
