"""``safe-denoiser export --config CONFIG.yaml --out BUNDLE_DIR``: an ONNX bundle (and TensorRT engines).

The config is the one ``safe-denoiser predict`` reads; only its ``model:`` section is used.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from safe_denoiser.runtime.manifest import Manifest

    from .onnx_graph import ExportOptions
    from .tensorrt import EngineProfile

__all__ = ["add_parser"]


def _triple(text: str) -> tuple[int, int, int]:
    parts = [int(p) for p in text.split(",")]
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"expected MIN,OPT,MAX (three integers), got {text!r}")
    return (parts[0], parts[1], parts[2])


def _sequence_length(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= 4096:
        raise argparse.ArgumentTypeError(f"expected an integer in 1..4096, got {text!r}")
    return value


def add_parser(sub: Any) -> None:
    """Register ``export`` on the ``safe-denoiser`` sub-command parser."""
    p = sub.add_parser(
        "export",
        help="export the config's pipeline, negative bank and guidance to an ONNX bundle (optionally TensorRT)",
        description=__doc__,
    )
    p.add_argument("--config", required=True, help="a safe-denoiser predict YAML (its model: section is used)")
    p.add_argument("--out", required=True, help="bundle folder to write (must not exist or be empty)")
    p.add_argument("--opset", type=int, default=17, choices=(17, 18), help="ONNX opset (legacy exporter)")
    p.add_argument("--fp16", action="store_true", help="the same as --precision fp16")
    p.add_argument(
        "--precision",
        choices=("fp32", "fp16", "int8"),
        default=None,
        help="fp16: float16 networks (GPU / TensorRT bundles); int8: int8 UNet weights (ONNX Runtime quantization);"
        " graph inputs/outputs, the correction and the bank stay float32 (default fp32)",
    )
    p.add_argument(
        "--int8-format",
        choices=("dynamic", "qdq"),
        default=None,
        help="int8: dynamic (CPU) or qdq calibrated on the bundle's own sampling steps (TensorRT; default with"
        " --tensorrt)",
    )
    p.add_argument(
        "--bank-dtype",
        choices=("float32", "float16"),
        default="float32",
        help="how the graph stores the bank(s): float16 halves their bytes (cast to float32 inside the graph)",
    )
    p.add_argument("--batch", type=int, default=2, help="batch used for tracing (the batch axis stays dynamic)")
    p.add_argument("--height", type=int, default=None, help="image height in pixels (overrides model.height)")
    p.add_argument("--width", type=int, default=None, help="image width in pixels (overrides model.width)")
    p.add_argument("--external-data", choices=("auto", "always", "never"), default="auto", help="weights file")
    p.add_argument("--no-verify", action="store_true", help="skip the onnxruntime-vs-PyTorch check of each graph")
    p.add_argument(
        "--optimize",
        nargs="?",
        const="cpu",
        default=None,
        choices=("cpu", "cuda"),
        help="cpu (the default): store ONNX Runtime's ORT_ENABLE_ALL optimisation of each graph (CPU sessions then"
        " start without re-optimising; specific to the CPU and onnxruntime version that wrote it); cuda: the"
        " transformer optimizer's UNet / CLIP / VAE fusions, some of which only the CUDA provider runs",
    )
    p.add_argument(
        "--max-sequence-length",
        type=_sequence_length,
        default=None,
        help="T5 tokens of an SD3 / Flux text encoder (default: the pipeline's, SD3 256, Flux 512)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out")
    _add_tensorrt_arguments(p)
    p.set_defaults(func=_run)


def _add_tensorrt_arguments(p: argparse.ArgumentParser) -> None:
    """The TensorRT engine flags of ``export``."""
    p.add_argument("--tensorrt", action="store_true", help="also build TensorRT engines (needs TensorRT >= 10)")
    p.add_argument("--trt-batch", type=_triple, default=(1, 2, 4), help="engine profile batch MIN,OPT,MAX")
    p.add_argument(
        "--trt-size",
        type=_triple,
        default=None,
        help="engine profile MIN,OPT,MAX square size (latent units) for graphs whose height/width are free",
    )
    p.add_argument(
        "--trt-text-length",
        type=_triple,
        default=None,
        help="engine profile MIN,OPT,MAX prompt tokens for flow (SD3/Flux) graphs (default 1,333,589: SD3's 77 CLIP"
        " + 256 T5 tokens at opt, up to 77 + 512)",
    )
    p.add_argument("--trt-fp32", action="store_true", help="build TensorRT engines without fp16 kernels")
    p.add_argument("--trt-timing-cache", default=None, help="timing cache file (default: BUNDLE/tensorrt/timing.cache)")


def _yaml_problem(exc: Exception) -> str:
    """One line for a YAML syntax error: what and where (PyYAML's own message spans several lines)."""
    mark = getattr(exc, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return (
        f"is not valid YAML ({getattr(exc, 'problem', None) or type(exc).__name__}{where}); expected a predict config"
    )


def _export(args: argparse.Namespace, options: ExportOptions) -> Manifest:
    """Check ``--out``, build the config's source, refuse a window that never fires (as predict does), export."""
    from safe_denoiser.files import check_out_dir
    from safe_denoiser.lightning.checks import check_window

    from .exporter import export_bundle, prepare_out_dir
    from .source import load_source, read_model_section

    prepare_out_dir(check_out_dir(args.out), options.overwrite)  # fail before the (slow) build
    source = load_source(read_model_section(args.config), args.height, args.width)
    if source.guidance is not None:
        check_window(source.guidance.window, source.pipe.scheduler, source.num_inference_steps)
    return export_bundle(source, args.out, options)


_OPTIMIZE_FOR = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
_PROFILE_FLAGS = {"batch": "--trt-batch", "size": "--trt-size", "text_length": "--trt-text-length"}


def _engine_profile(args: argparse.Namespace) -> EngineProfile:
    """The TensorRT optimisation profile of ``--trt-batch/--trt-size/--trt-text-length``; a bad one names its flag."""
    from safe_denoiser.errors import FieldError

    from .tensorrt import DEFAULT_TEXT_LENGTH, EngineProfile

    size = None
    if args.trt_size is not None:
        lo, opt, hi = args.trt_size
        size = ((lo, lo), (opt, opt), (hi, hi))
    text_length = args.trt_text_length if args.trt_text_length is not None else DEFAULT_TEXT_LENGTH
    try:
        return EngineProfile(batch=args.trt_batch, size=size, text_length=text_length)
    except FieldError as exc:
        raise exc.for_flag(_PROFILE_FLAGS.get(exc.field, exc.field)) from None


def _run(args: argparse.Namespace) -> int:
    import yaml

    from .exporter import ExportOptions
    from .tensorrt import TensorRTUnavailableError, build_engines, require_tensorrt

    if args.fp16 and args.precision not in (None, "fp16"):
        print(f"safe-denoiser export: error: --fp16 contradicts --precision {args.precision}", file=sys.stderr)
        return 2
    try:
        profile = _engine_profile(args)
        if args.tensorrt:
            require_tensorrt()  # before the (slow) export: say now what to install
    except (TensorRTUnavailableError, ValueError) as exc:
        print(f"safe-denoiser export: error: {exc}", file=sys.stderr)
        return 2
    options = ExportOptions(
        opset=args.opset,
        fp16=args.fp16,
        precision=args.precision or ("fp16" if args.fp16 else "fp32"),
        int8_format=args.int8_format or ("qdq" if args.tensorrt else "dynamic"),
        optimize_for=_OPTIMIZE_FOR[args.optimize or "cpu"],
        batch=args.batch,
        external_data=args.external_data,
        verify=not args.no_verify,
        overwrite=args.overwrite,
        bank_dtype=args.bank_dtype,
        optimize=args.optimize is not None,
        max_sequence_length=args.max_sequence_length,
    )
    try:
        manifest = _export(args, options)
    except FileExistsError:
        print(
            f"safe-denoiser export: error: --out {args.out!r} is not empty; pass --overwrite to replace it",
            file=sys.stderr,
        )
        return 2
    except yaml.YAMLError as exc:
        print(f"safe-denoiser export: error: --config {args.config!r} {_yaml_problem(exc)}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: {manifest.model_kind} ({manifest.source}), sample {manifest.sample_shape}")
    for graph in manifest.graphs.values():
        worst = max(graph.parity_max_abs_diff.values(), default=float("nan"))
        data = f" + {graph.external_data}" if graph.external_data else ""
        how = graph.optimization
        done = f", optimised ({how.level}, {how.provider}, onnxruntime {how.onnxruntime})" if how else ""
        lowered = f", {graph.precision.dtype} ({graph.precision.method})" if graph.precision else ""
        print(f"  {graph.file}{data}: max |onnxruntime - torch| = {worst:.3g}{done}{lowered}")
    if args.tensorrt:
        try:
            engines = build_engines(args.out, profile, fp16=not args.trt_fp32, timing_cache=args.trt_timing_cache)
        except (TensorRTUnavailableError, ValueError, RuntimeError) as exc:  # the ONNX bundle is written and valid
            print(f"safe-denoiser export: error: TensorRT engines for {args.out!r}: {exc}", file=sys.stderr)
            return 2
        for name, path in engines.items():
            print(f"  TensorRT engine {name}: {path}")
    return 0
