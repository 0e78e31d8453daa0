"""TensorRT engines from a bundle's ONNX graphs, and polygraphy checks of those graphs.

``build_engines`` parses each ONNX file with TensorRT's ONNX parser (external data included), adds one
optimisation profile (min/opt/max batch; where a graph's spatial size is free, resolution; where its text length is
free, as in the flow (SD3/Flux) denoiser's prompt embeddings, text length; the flow text encoder's T5 ids, fixed at
the manifest's T5 ``max_length``, which runtimes always feed), optionally enables
fp16, reuses and updates a timing cache, and writes ``<bundle>/tensorrt/<graph>.plan`` plus ``engines.json``
(TensorRT version, profiles, precision). It needs TensorRT >= 10 (int64 inputs: class labels, timesteps' step
index, token ids) and its Python package; where that is not importable ``TensorRTUnavailableError`` says what to
install. Engines are specific to the GPU and TensorRT version they were built with: build them on the target.

``polygraphy_compare`` runs a graph through polygraphy's onnxruntime runner (and its TensorRT runner when
``tensorrt=True``) with polygraphy's ``Comparator`` against reference outputs (e.g. PyTorch's), so the check that
runs on CPU here is the same one a user runs with TensorRT on a GPU.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from safe_denoiser.errors import FieldError
from safe_denoiser.files import atomic_write, atomic_write_json
from safe_denoiser.runtime.manifest import GraphSpec, Manifest

__all__ = [
    "DEFAULT_TEXT_LENGTH",
    "INSTALL_HINT",
    "EngineProfile",
    "TensorRTUnavailableError",
    "build_engine",
    "build_engines",
    "manifest_axes",
    "polygraphy_compare",
    "profile_shapes",
    "require_tensorrt",
]

INSTALL_HINT = (
    "TensorRT's Python package is not importable. Install TensorRT >= 10 on a machine with an NVIDIA GPU and"
    " driver, e.g. `pip install tensorrt` (NVIDIA's wheels; they download the TensorRT libraries for your CUDA"
    " version) or the Python wheel shipped in the TensorRT tarball. The ONNX bundle itself runs without TensorRT"
    " (onnxruntime, CPU or CUDA)."
)
_SPATIAL = {"height": 0, "width": 1, "latent_height": 0, "latent_width": 1}
TEXT_LENGTH_AXIS = "text_length"  # the flow exporter's name for the prompt embeddings' token axis
# (min, opt, max) tokens of a flow graph's prompt embeddings: opt 333 is SD3's default (77 CLIP + 256 T5 tokens);
# max 589 = 77 + 512 covers SD3 with max_sequence_length=512 and Flux's largest T5 length (512); min 1 admits
# any shorter max_sequence_length.
DEFAULT_TEXT_LENGTH = (1, 333, 589)
T5_LENGTH_AXIS = "t5_length"  # the flow text encoder's T5 ids axis (docs/bundle_format.md, "text_encoder.onnx (flow)")


class TensorRTUnavailableError(RuntimeError):
    """TensorRT (the ``tensorrt`` Python package) is not installed or cannot be imported."""


def require_tensorrt() -> Any:
    """The ``tensorrt`` module, or ``TensorRTUnavailableError`` with what to install."""
    try:
        import tensorrt
    except ImportError as exc:  # includes missing shared libraries behind the Python package
        raise TensorRTUnavailableError(f"{INSTALL_HINT} (import error: {exc})") from exc
    major = int(str(tensorrt.__version__).split(".")[0])
    if major < 10:
        raise TensorRTUnavailableError(f"TensorRT {tensorrt.__version__} is too old: {INSTALL_HINT}")
    return tensorrt


@dataclass(frozen=True)
class EngineProfile:
    """One optimisation profile: (min, opt, max) batch, for free spatial dims (min, opt, max) (h, w), and for a
    free text length (the flow graphs' ``text_length`` axis) (min, opt, max) tokens.

    ``size=None`` fixes free spatial dims at the bundle's sample size (latent units for latent models);
    ``text_length`` defaults to ``DEFAULT_TEXT_LENGTH`` (SD3's and Flux's prompt lengths).
    """

    batch: tuple[int, int, int] = (1, 2, 4)
    size: tuple[tuple[int, int], tuple[int, int], tuple[int, int]] | None = None
    text_length: tuple[int, int, int] = DEFAULT_TEXT_LENGTH

    def __post_init__(self) -> None:
        for name in ("batch", "text_length"):
            value = getattr(self, name)
            if len(value) != 3 or not 1 <= value[0] <= value[1] <= value[2]:
                raise FieldError(name, "three integers with 1 <= min <= opt <= max", value, owner="profile")


def manifest_axes(manifest: Manifest) -> dict[str, int]:
    """Symbolic dims whose length the manifest fixes: "t5_length" = the T5 tokenizer's ``max_length`` (a flow
    bundle's text encoder; runtimes pad every prompt to it), so its profile is that length at min, opt and max."""
    t5 = [spec.max_length for spec in manifest.tokenizers if spec.kind == "t5"]
    return {T5_LENGTH_AXIS: t5[0]} if t5 else {}


def profile_shapes(
    spec: GraphSpec,
    sample_hw: tuple[int, int],
    profile: EngineProfile,
    fixed_axes: Mapping[str, int] | None = None,
) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """(min, opt, max) shape of every input of ``spec``: symbolic dims resolved from ``profile``.

    Spatial dims ("height", "width", "latent_height", "latent_width") are in the sample's units (latents for
    latent models), ``sample_hw`` being the bundle's sample size; "text_length" is in tokens; a dim named in
    ``fixed_axes`` (``manifest_axes``: "t5_length") is that length at every level.
    """
    fixed = dict(fixed_axes or {})
    sizes = profile.size or (sample_hw, sample_hw, sample_hw)
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]] = {}
    for tensor in spec.inputs:
        per_level: list[tuple[int, ...]] = []
        for level in range(3):
            dims: list[int] = []
            for d in tensor.shape:
                if isinstance(d, int):
                    dims.append(d)
                elif d == "batch":
                    dims.append(profile.batch[level])
                elif d in _SPATIAL:
                    dims.append(sizes[level][_SPATIAL[d]])
                elif d == TEXT_LENGTH_AXIS:
                    dims.append(profile.text_length[level])
                elif d in fixed:
                    dims.append(fixed[d])
                else:
                    raise ValueError(f"input {tensor.name!r} of {spec.file} has an unknown symbolic dim {d!r}")
            per_level.append(tuple(dims))
        shapes[tensor.name] = (per_level[0], per_level[1], per_level[2])
    return shapes


def build_engine(
    onnx_path: str | os.PathLike[str],
    engine_path: str | os.PathLike[str],
    shapes: Mapping[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]],
    fp16: bool = True,
    timing_cache: str | os.PathLike[str] | None = None,
    workspace_gb: float = 8.0,
) -> Path:
    """Build and serialise one TensorRT engine (TensorRT Python API) with one optimisation profile."""
    trt = require_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT >= 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # resolves external data next to the file
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT cannot parse {str(onnx_path)!r}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * 2**30))
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    cache_path = Path(timing_cache) if timing_cache is not None else None
    cache_bytes = cache_path.read_bytes() if cache_path is not None and cache_path.is_file() else b""
    config.set_timing_cache(config.create_timing_cache(cache_bytes), ignore_mismatch=False)
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in shapes.items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {str(onnx_path)!r} (see the log above)")
    out = Path(engine_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda p: p.write_bytes(memoryview(serialized)))
    if cache_path is not None:  # later builds (other graphs, other profiles) skip the kernel timing
        cache = memoryview(config.get_timing_cache().serialize())
        atomic_write(cache_path, lambda p: p.write_bytes(cache))
    return out


def build_engines(
    bundle_dir: str | os.PathLike[str],
    profile: EngineProfile | None = None,
    fp16: bool = True,
    timing_cache: str | os.PathLike[str] | None = None,
    graphs: Sequence[str] | None = None,
    out_subdir: str = "tensorrt",
) -> dict[str, Path]:
    """Engines for a bundle's graphs in ``<bundle>/<out_subdir>/`` (timing cache: ``timing.cache`` there)."""
    trt = require_tensorrt()  # before reading anything: fail fast with the install hint
    root = Path(bundle_dir)
    manifest = Manifest.load(root)
    profile = profile or EngineProfile()
    out_dir = root / out_subdir
    out_dir.mkdir(parents=True, exist_ok=True)
    cache = Path(timing_cache) if timing_cache is not None else out_dir / "timing.cache"
    shape = manifest.sample_shape  # (C, H, W); Flux's packed (tokens, 64) graphs have no free spatial dims
    hw = (shape[1], shape[2]) if len(shape) == 3 else (0, 0)
    fixed = manifest_axes(manifest)
    engines: dict[str, Path] = {}
    record: dict[str, Any] = {"tensorrt": str(trt.__version__), "fp16": fp16, "profile": asdict(profile), "engines": {}}
    for name in graphs or list(manifest.graphs):
        spec = manifest.graphs[name]
        shapes = profile_shapes(spec, hw, profile, fixed)
        engines[name] = build_engine(root / spec.file, out_dir / f"{name}.plan", shapes, fp16, cache)
        record["engines"][name] = {"file": f"{name}.plan", "shapes": {k: list(v) for k, v in shapes.items()}}
    atomic_write_json(out_dir / "engines.json", record)
    return engines


def polygraphy_compare(
    onnx_path: str | os.PathLike[str],
    feeds: Sequence[Mapping[str, np.ndarray]],
    reference: Sequence[Mapping[str, np.ndarray]],
    atol: float | Mapping[str, float] = 1e-4,
    rtol: float | Mapping[str, float] = 1e-4,
    tensorrt: bool = False,
    fp16: bool = False,
    providers: Sequence[str] = ("cpu",),
) -> tuple[bool, dict[str, dict[str, float]]]:
    """Polygraphy ``Comparator`` of the graph (onnxruntime, and TensorRT if asked) against ``reference``.

    ``atol``/``rtol``: one value or one per output name (polygraphy's rule: an element passes when its absolute
    or its relative difference is within tolerance). Returns (all outputs pass, {runner: {output: max abs diff
    over iterations vs reference}}).
    """
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
    from polygraphy.comparator import Comparator, CompareFunc
    from polygraphy.logger import G_LOGGER

    path = str(onnx_path)
    runners: list[Any] = [OnnxrtRunner(SessionFromOnnx(path, providers=list(providers)), name="onnxruntime")]
    if tensorrt:
        require_tensorrt()
        from polygraphy.backend.trt import CreateConfig, EngineFromNetwork, NetworkFromOnnxPath, TrtRunner
        from polygraphy.backend.trt import Profile as TrtProfile

        trt_profile = TrtProfile()
        for name, arr in feeds[0].items():
            trt_profile.add(name, min=arr.shape, opt=arr.shape, max=arr.shape)
        config = CreateConfig(fp16=fp16, profiles=[trt_profile])
        runners.append(TrtRunner(EngineFromNetwork(NetworkFromOnnxPath(path), config=config), name="tensorrt"))
    # errstate: polygraphy's relative error divides by reference zeros (e.g. an all-zero output): not a failure.
    with G_LOGGER.verbosity(G_LOGGER.ERROR), np.errstate(divide="ignore", invalid="ignore"):
        results = Comparator.run(runners, data_loader=[dict(f) for f in feeds])
        results.add([dict(r) for r in reference], runner_name="pytorch")
        compare = CompareFunc.simple(
            atol=dict(atol) if isinstance(atol, Mapping) else atol,
            rtol=dict(rtol) if isinstance(rtol, Mapping) else rtol,
        )
        ok = bool(Comparator.compare_accuracy(results, compare_func=compare))
    diffs: dict[str, dict[str, float]] = {}
    for runner_name, iterations in results.items():
        if runner_name == "pytorch":
            continue
        per_output: dict[str, float] = {}
        for it, ref in zip(iterations, reference, strict=True):
            for name, expected in ref.items():
                got = np.asarray(it[name])
                diff = float(np.max(np.abs(got.astype(np.float64) - np.asarray(expected, dtype=np.float64))))
                per_output[name] = max(per_output.get(name, 0.0), diff)
        diffs[runner_name] = per_output
    return ok, diffs
