"""Per-graph records written by ``safe-denoiser export --precision`` / ``--optimize cuda`` and what a runtime checks.

``GraphPrecision`` says how a graph's arithmetic was lowered (float16 or int8) and what stayed float32;
``check_session_provider`` refuses, before onnxruntime is asked, a graph whose offline optimisation holds fused
operators that only its recorded provider runs (``GraphOptimization.requires_provider``), with a message that says
what to do instead of onnxruntime's "Could not find an implementation for NhwcConv".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .manifest import GraphOptimization

__all__ = ["PRECISIONS", "GraphPrecision", "ProviderMismatchError", "check_session_provider"]

PRECISIONS = ("fp32", "fp16", "int8")  # the manifest's top-level ``precision`` and ``export --precision``


class ProviderMismatchError(ValueError):
    """A graph optimised for one execution provider, with operators only that provider runs, opened on another."""


@dataclass(frozen=True)
class GraphPrecision:
    """How a graph's weights and arithmetic were lowered from float32 at export (absent: all float32).

    ``dtype``: "float16" or "int8" (the network's weights). ``method``: "torch-half" (the network traced in float16,
    its float32 inputs cast at its boundary), "float16-converter" (onnxruntime.transformers' float16 conversion of
    the whole traced graph, inputs and outputs kept float32), "dynamic" (onnxruntime's ``quantize_dynamic``: int8
    weights, activations quantized per call; CPU) or "qdq" (``quantize_static`` in QDQ format, activation scales
    from ``calibration_feeds`` real denoiser inputs; TensorRT). ``float32_scope``: what stays float32 (the graph's
    nodes outside the network: CFG, SLD, the safe-denoiser correction and its bank constants). ``nodes``: how many
    nodes were lowered (int8: the network's nodes of the types ``export.precision.QUANTIZED_OPS`` handed to the
    quantizer, which skips those without a constant weight). ``onnxruntime``: the version that wrote it (None for
    torch-half).
    """

    dtype: str
    method: str
    float32_scope: str
    nodes: int = 0
    calibration_feeds: int = 0
    onnxruntime: str | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GraphPrecision:
        from .manifest import ManifestError

        for key in ("dtype", "method", "float32_scope"):
            if not isinstance(data.get(key), str):
                raise ManifestError(f"manifest: a graph's precision.{key} must be a string, got {data.get(key)!r}")
        version = data.get("onnxruntime")
        return cls(
            dtype=data["dtype"],
            method=data["method"],
            float32_scope=data["float32_scope"],
            nodes=int(data.get("nodes", 0)),
            calibration_feeds=int(data.get("calibration_feeds", 0)),
            onnxruntime=None if version is None else str(version),
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_session_provider(file: str, optimization: GraphOptimization | None, providers: Sequence[str]) -> None:
    """ProviderMismatchError when ``file`` was optimised with operators only ``optimization.provider`` runs and that
    provider is not among the session's ``providers``."""
    if optimization is None or not optimization.requires_provider or optimization.provider in providers:
        return
    fused = ", ".join(sorted(optimization.fusions)) or "fused operators"
    raise ProviderMismatchError(
        f"graph {file!r} was optimised offline for {optimization.provider} ({fused}), operators that the requested"
        f" providers {list(providers)} cannot run: open the bundle with {optimization.provider}, or export it again"
        " with --optimize cpu (or without --optimize) for the CPU"
    )
