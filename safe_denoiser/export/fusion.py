"""``export --optimize cuda``: onnxruntime's transformer optimizer (UNet / CLIP / VAE fusions) run offline.

The optimizer rewrites attention into MultiHeadAttention (packed QKV / KV), GroupNorm (+ Add) into GroupNorm /
SkipGroupNorm, the GEGLU half-split into BiasSplitGelu, convolutions into NhwcConv and LayerNorm + Add into
SkipLayerNormalization. Several of these com.microsoft operators exist only in the CUDA provider, so whether the
CPU provider can still run the result is asked of onnxruntime itself (a CPU session with no optimisation) and
recorded as ``GraphOptimization.requires_provider``; both runtimes then refuse such a graph on the CPU. Only the
Python fusion passes run (``opt_level=0``): they need no GPU. TensorRT is not a target: its ONNX parser knows no
com.microsoft operators and it fuses at engine build (the plain or ``--precision`` graphs are what it takes).
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from safe_denoiser.runtime.manifest import GraphOptimization

__all__ = ["FUSION_MODEL_TYPES", "FUSION_PROVIDER", "fuse_graph"]

FUSION_PROVIDER = "CUDAExecutionProvider"
# The optimizer's model type of each bundle graph (other graphs, e.g. flow transformers, are stored as traced).
FUSION_MODEL_TYPES = {"denoiser": "unet", "text_encoder": "clip", "vae_decoder": "vae"}


@contextmanager
def _numpy2_head_count() -> Iterator[None]:
    """onnxruntime 1.2x's ``FusionAttentionUnet.get_num_heads`` calls ``int()`` on a shape-(1,) array, a TypeError
    under numpy >= 2.3; read that one value as a scalar first, for the duration of the call. The module is imported
    under two names (the optimizer puts its own folder on sys.path), so both classes are patched."""
    import sys

    import onnxruntime.transformers.optimizer  # noqa: F401  (imports the bare-named modules)

    classes = [m.FusionAttentionUnet for k, m in list(sys.modules.items()) if k.endswith("fusion_attention_unet")]
    originals = [c.get_num_heads for c in classes]

    def patched(original: Any) -> Any:
        def get_num_heads(self: Any, reshape_q: Any, is_torch2: bool = False) -> int:
            parent = self.model.get_parent(reshape_q, 1) if is_torch2 else None
            if parent is not None and parent.op_type == "Concat" and len(parent.input) == 4:
                value = self.model.get_constant_value(parent.input[2])
                if isinstance(value, np.ndarray) and value.size == 1:
                    return int(value.reshape(()))
            return int(original(self, reshape_q, is_torch2))

        return get_num_heads

    for cls, original in zip(classes, originals, strict=True):
        cls.get_num_heads = patched(original)
    try:
        yield
    finally:
        for cls, original in zip(classes, originals, strict=True):
            cls.get_num_heads = original


def _runs_on_cpu(path: Path) -> bool:
    """Whether onnxruntime's CPU provider has a kernel for every node of ``path`` (session creation, no passes)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 4
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own NotImplemented / Fail types
        if "NOT_IMPLEMENTED" in str(exc) or "implementation" in str(exc):
            return False
        raise
    return True


def _op_counts(model: Any) -> Counter[str]:
    return Counter(n.op_type for n in model.graph.node)


def fuse_graph(path: Path, data_name: str | None, graph: str) -> GraphOptimization | None:
    """Replace ``path`` by the transformer optimizer's fusions for ``FUSION_PROVIDER`` (model type from the graph's
    name ``graph``); None (file untouched) for a graph the optimizer has no model type for."""
    import onnx
    import onnxruntime as ort
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    model_type = FUSION_MODEL_TYPES.get(graph)
    if model_type is None:
        return None
    before = _op_counts(onnx.load(str(path), load_external_data=False))
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)  # the optimizer logs each pattern it looked for and did not find
    try:
        with _numpy2_head_count():
            optimizer = optimize_model(
                str(path),
                model_type=model_type,
                num_heads=0,
                hidden_size=0,
                opt_level=0,
                use_gpu=True,
                optimization_options=FusionOptions(model_type),
            )
    finally:
        logging.disable(previous)
    after = _op_counts(optimizer.model)
    fusions = {op: n for op, n in sorted(after.items()) if op not in before}
    with tempfile.TemporaryDirectory(prefix=f".fuse-{path.stem}-", dir=path.parent) as tmp:
        fused = Path(tmp) / path.name
        optimizer.save_model_to_file(str(fused), use_external_data_format=data_name is not None)
        if data_name is not None:  # one external-data file under the bundle's name for it
            model = onnx.load(str(fused))
            onnx.save(model, str(fused), save_as_external_data=True, location=data_name, size_threshold=1024)
            os.replace(Path(tmp) / data_name, path.parent / data_name)
        onnx.checker.check_model(str(fused))
        cpu = _runs_on_cpu(fused)
        os.replace(fused, path)
    return GraphOptimization(
        level="transformer",
        provider=FUSION_PROVIDER,
        onnxruntime=ort.__version__,
        fusions=fusions,
        requires_provider=not cpu,
    )
