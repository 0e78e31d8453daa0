"""``manifest.json``: what an exported bundle holds, versioned and validated on load.

A bundle is a folder::

    manifest.json          this file (format "safe-denoiser.bundle", format_version 2)
    denoiser.onnx          one guided, corrected denoising step (see ``graphs.DenoiserStep``)
    denoiser.onnx.data     its weights when the graph is over 2 GB (ONNX external data, one file)
    text_encoder.onnx      prompt ids -> embeddings (text models)
    tokenizer/             the tokenizer's files (text models)
    vae_decoder.onnx       latents -> image in [-1, 1] (latent models)

``Manifest.load`` refuses a bundle of another format version, a bundle with a missing file, a bundle whose
negative bank (or, for the odds preset, reference bank) inside ``denoiser.onnx`` does not hash to the manifest's
``bank.sha256`` (``reference_bank.sha256``), and a file whose sha256
differs from the one ``files`` records (``integrity``; ``check_files=False`` skips the hashing): each with a
``ManifestError`` naming the problem and the file. The files are hashed before the bank check parses
``denoiser.onnx``, so a damaged graph or weights file is named as such, as the C++ runtime names it.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from safe_denoiser.core.guidance import SafeGuidance
from safe_denoiser.core.sld_config import SLDConfig
from safe_denoiser.files import atomic_write_json

from .graph_records import GraphPrecision
from .integrity import BundleFileError, verify_files
from .json_fields import json_int, json_ints
from .safree_text import SafreeSettings
from .tokenizer_spec import TokenizerSpec, TokenizerSpecError

__all__ = [
    "BANK_DTYPES",
    "BANK_INITIALIZER",
    "BANK_NORMS_INITIALIZER",
    "FORMAT",
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "REFERENCE_BANK_INITIALIZER",
    "REFERENCE_NORMS_INITIALIZER",
    "BankDtype",
    "BankInfo",
    "GraphOptimization",
    "GraphSpec",
    "Manifest",
    "ManifestError",
    "SchedulerInfo",
    "TensorSpec",
    "array_sha256",
    "read_initializer",
]

FORMAT = "safe-denoiser.bundle"
FORMAT_VERSION = 2  # 2: guidance recorded as {"preset": ..., fields} (one type per preset family)
MANIFEST_NAME = "manifest.json"
BANK_INITIALIZER = "negative_bank"  # the constant holding the negative bank inside denoiser.onnx
# its squared norms ||x^(n)||^2, computed once at export (the kernel would otherwise re-read the bank for them)
BANK_NORMS_INITIALIZER = "negative_bank_sq_norms"
REFERENCE_BANK_INITIALIZER = "reference_bank"  # the odds preset's reference bank (safe or unlabelled data)
REFERENCE_NORMS_INITIALIZER = "reference_bank_sq_norms"
BankDtype = Literal["float32", "float16"]
BANK_DTYPES: tuple[BankDtype, ...] = ("float32", "float16")  # how the graph stores a bank (float16: cast inside)
ROUNDED_FROM = "rounded_from_sha256"  # BankInfo.metadata key: the float32 bank file's hash of a float16-stored bank
PACKED_FROM = "packed_from_sha256"  # BankInfo.metadata key: the bank file's hash of a bank packed for Flux


class ManifestError(ValueError):
    """A bundle that cannot be used: unreadable or invalid manifest, wrong version, missing file, bank mismatch."""


def array_sha256(array: np.ndarray) -> str:
    """sha256 of the float32 little-endian bytes: the same hash as ``NegativeBank.sha256`` (a float16 array is
    widened first, so a float16-stored bank hashes as the float32 bank of its rounded values)."""
    return hashlib.sha256(np.ascontiguousarray(array, dtype="<f4").tobytes()).hexdigest()


def read_initializer(onnx_path: str | os.PathLike[str], name: str) -> np.ndarray:
    """One initializer of an ONNX file as a numpy array, without loading the other tensors' external data."""
    import onnx
    from onnx import numpy_helper
    from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data

    path = Path(onnx_path)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # a truncated or damaged file: protobuf's DecodeError names no file
        raise ManifestError(f"{str(path)!r} is not a readable ONNX graph ({type(exc).__name__}: {exc})") from exc
    for tensor in model.graph.initializer:
        if tensor.name == name:
            if uses_external_data(tensor):
                load_external_data_for_tensor(tensor, str(path.parent))
            return np.asarray(numpy_helper.to_array(tensor))
    raise ManifestError(f"{str(path)!r} has no initializer named {name!r}")


def _require(data: dict[str, Any], key: str, where: str) -> Any:
    if key not in data:
        raise ManifestError(f"manifest: {where} is missing the key {key!r}")
    return data[key]


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: name, ONNX element type name ("float32", "int64", "bool"), shape.

    A dimension is an int or a symbolic name ("batch", "height", ...) that may vary between calls.
    """

    name: str
    dtype: str
    shape: tuple[int | str, ...]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TensorSpec:
        return cls(str(data["name"]), str(data["dtype"]), tuple(data["shape"]))

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


@dataclass(frozen=True)
class GraphOptimization:
    """How a graph file was optimised offline by ONNX Runtime (``safe-denoiser export --optimize``).

    ``level`` is the SessionOptions level that produced the file ("all": ORT_ENABLE_ALL, whose output may hold
    provider- and CPU-specific nodes such as NCHWc convolutions, so it is only reused by a session of the same
    ``provider``); ``onnxruntime`` the version that wrote it; ``disabled_optimizers`` the passes left out (constant
    folding: it would fold the bank constants into unnamed initializers and break their hash check). ``fusions``:
    the fused operators (type -> count) of onnxruntime's transformer optimizer (level "transformer", export/fusion.py);
    ``requires_provider``: some of them run only on ``provider``, so both runtimes refuse a session without it.
    """

    level: str
    provider: str
    onnxruntime: str
    disabled_optimizers: tuple[str, ...] = ()
    fusions: dict[str, int] = field(default_factory=dict)
    requires_provider: bool = False

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GraphOptimization:
        where = "a graph's optimization"
        return cls(
            level=str(_require(data, "level", where)),
            provider=str(_require(data, "provider", where)),
            onnxruntime=str(_require(data, "onnxruntime", where)),
            disabled_optimizers=tuple(str(v) for v in data.get("disabled_optimizers", ())),
            fusions={str(k): int(v) for k, v in data.get("fusions", {}).items()},
            requires_provider=data.get("requires_provider", False) is True,
        )

    def to_dict(self) -> dict[str, Any]:
        data = {**asdict(self), "disabled_optimizers": list(self.disabled_optimizers)}
        return {k: v for k, v in data.items() if v or k not in ("fusions", "requires_provider")}  # absent: none


@dataclass(frozen=True)
class GraphSpec:
    """One ONNX file of the bundle: its file name, external data file (or None), I/O and named constants.

    ``constants`` maps initializer names that users may need (the bank, the reference threshold) to their role;
    ``parity_max_abs_diff`` maps each output to its largest |onnxruntime - PyTorch| difference measured at
    export time on random inputs (booleans: the number of entries that differ), ``parity_max_abs_value`` to the
    largest |PyTorch output| of that check, its scale (both empty when the export ran without verification).
    ``optimization``: how the file was optimised offline (None: as traced; the key is absent then, and readers
    that predate it ignore it, so it needs no format version).
    """

    file: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    external_data: str | None = None
    constants: dict[str, str] = field(default_factory=dict)
    parity_max_abs_diff: dict[str, float] = field(default_factory=dict)
    parity_max_abs_value: dict[str, float] = field(default_factory=dict)
    optimization: GraphOptimization | None = None
    precision: GraphPrecision | None = None  # float16 / int8 lowering (graph_records); absent: float32

    def input(self, name: str) -> TensorSpec:
        """The input called ``name`` (KeyError naming the known inputs otherwise)."""
        for spec in self.inputs:
            if spec.name == name:
                return spec
        raise KeyError(f"{self.file} has no input {name!r}; inputs: {[s.name for s in self.inputs]}")

    @property
    def input_names(self) -> list[str]:
        return [s.name for s in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [s.name for s in self.outputs]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GraphSpec:
        optimization = data.get("optimization")
        return cls(
            file=str(_require(data, "file", "a graph")),
            inputs=tuple(TensorSpec.from_dict(d) for d in _require(data, "inputs", "a graph")),
            outputs=tuple(TensorSpec.from_dict(d) for d in _require(data, "outputs", "a graph")),
            external_data=data.get("external_data"),
            constants=dict(data.get("constants", {})),
            parity_max_abs_diff={k: float(v) for k, v in data.get("parity_max_abs_diff", {}).items()},
            parity_max_abs_value={k: float(v) for k, v in data.get("parity_max_abs_value", {}).items()},
            optimization=None if optimization is None else GraphOptimization.from_dict(optimization),
            precision=GraphPrecision.from_dict(data["precision"]) if data.get("precision") else None,
        )

    def to_dict(self) -> dict[str, Any]:
        optimization = {} if self.optimization is None else {"optimization": self.optimization.to_dict()}
        precision = {} if self.precision is None else {"precision": self.precision.to_dict()}
        return {
            "file": self.file,
            "external_data": self.external_data,
            "inputs": [s.to_dict() for s in self.inputs],
            "outputs": [s.to_dict() for s in self.outputs],
            "constants": dict(self.constants),
            "parity_max_abs_diff": dict(self.parity_max_abs_diff),
            "parity_max_abs_value": dict(self.parity_max_abs_value),
            **optimization,
            **precision,
        }


@dataclass(frozen=True)
class SchedulerInfo:
    """The training noise schedule: diffusers class and config, full alphas_cumprod and sigma tables.

    ``sigmas[t] = sqrt((1 - alphas_cumprod[t]) / alphas_cumprod[t])`` (the Euler/EDM form of the same schedule).
    ``ddim`` holds the settings of a DDIM sampler over this schedule, resolved by diffusers'
    ``DDIMScheduler.from_config`` at export (timestep_spacing, steps_offset, clip_sample, clip_sample_range,
    thresholding), so a runtime needs no diffusers defaults, plus ``use_clipped_model_output``, the pipeline's
    step argument; ``final_alpha_cumprod`` is DDIM's abar after the last step (1 with ``set_alpha_to_one``).
    ``ddpm``: the same for a DDPM sampler (``DDPMScheduler.from_config``: the keys above less ``set_alpha_to_one``,
    plus ``variance_type``); empty in bundles exported before DDPM sampling existed (optional: format version 1).
    """

    type: str
    config: dict[str, Any]
    alphas_cumprod: tuple[float, ...]
    sigmas: tuple[float, ...]
    final_alpha_cumprod: float
    ddim: dict[str, Any] = field(default_factory=dict)
    ddpm: dict[str, Any] = field(default_factory=dict)

    @property
    def num_train_timesteps(self) -> int:
        return len(self.alphas_cumprod)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SchedulerInfo:
        return cls(
            type=str(_require(data, "type", "scheduler")),
            config=dict(_require(data, "config", "scheduler")),
            alphas_cumprod=tuple(float(v) for v in _require(data, "alphas_cumprod", "scheduler")),
            sigmas=tuple(float(v) for v in _require(data, "sigmas", "scheduler")),
            final_alpha_cumprod=float(_require(data, "final_alpha_cumprod", "scheduler")),
            ddim=dict(_require(data, "ddim", "scheduler")),
            ddpm=dict(data.get("ddpm") or {}),
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["alphas_cumprod"] = list(self.alphas_cumprod)
        d["sigmas"] = list(self.sigmas)
        return d


@dataclass(frozen=True)
class BankInfo:
    """A bank baked into denoiser.onnx: count, item shape, sha256 of its float32 bytes, storage dtype, metadata.

    ``dtype`` is how the graph stores it ("float16": rounded, cast to float32 inside the graph; ``sha256`` is then
    the hash of the rounded values as float32 and ``metadata[ROUNDED_FROM]`` the bank file's). ``reference_kind``
    ("safe" / "data") is set on the odds preset's reference bank only.
    """

    count: int
    sample_shape: tuple[int, ...]
    sha256: str
    initializer: str = BANK_INITIALIZER
    metadata: dict[str, str] = field(default_factory=dict)
    dtype: BankDtype = "float32"
    reference_kind: str | None = None

    def __post_init__(self) -> None:
        if self.dtype not in BANK_DTYPES:
            raise ManifestError(f"manifest: bank dtype must be one of {BANK_DTYPES}, got {self.dtype!r}")
        if self.reference_kind not in (None, "safe", "data"):
            raise ManifestError(f"manifest: reference_kind must be 'safe' or 'data', got {self.reference_kind!r}")

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "bank") -> BankInfo:
        kind = data.get("reference_kind")
        return cls(
            count=json_int(_require(data, "count", where), f"{where}.count"),
            sample_shape=json_ints(_require(data, "sample_shape", where), f"{where}.sample_shape"),
            sha256=str(_require(data, "sha256", where)),
            initializer=str(data.get("initializer", BANK_INITIALIZER)),
            metadata={str(k): str(v) for k, v in data.get("metadata", {}).items()},
            dtype=data.get("dtype", "float32"),
            reference_kind=None if kind is None else str(kind),
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["sample_shape"] = list(self.sample_shape)
        if self.reference_kind is None:  # the negative bank's entry keeps its pre-odds keys
            del d["reference_kind"]
        return d


@dataclass
class Manifest:
    """Everything a runtime needs besides the ONNX files (see the module docstring for the bundle layout).

    ``model_kind`` is "class-conditional" (the demo model: class labels, pixel space) or "text-to-image" (Stable
    Diffusion: text embeddings, latent space, a VAE). The denoiser works in the VP form x_t = sqrt(abar) x0 +
    sqrt(1 - abar) eps; its noise_pred output is always an eps prediction.
    """

    model_kind: str
    source: str
    sample_shape: tuple[int, ...]
    prediction_type: str
    scheduler: SchedulerInfo
    num_inference_steps: int
    guidance_scale: float
    graphs: dict[str, GraphSpec]
    opset: int
    precision: str
    guidance: SafeGuidance | None = None
    reference_threshold: float | None = None
    reference_threshold_steps: int | None = None
    reference_threshold_alpha_bar: float | None = None
    sld: SLDConfig | None = None
    bank: BankInfo | None = None
    reference_bank: BankInfo | None = None  # the odds preset's reference bank (``OddsGuidance`` only)
    tokenizer: str | None = None
    # Flow bundles: one entry per tokenizer folder, in text_encoder input order (empty: VP, or exported before)
    tokenizers: tuple[TokenizerSpec, ...] = ()
    null_class: int | None = None  # the "no class" label (class-conditional bundles)
    # Rows of the class embedding (labels 0..num_class_labels-1: digits, null, super-classes); None in bundles
    # exported before it was recorded, which accept 0..null_class only (``class_label_max``).
    num_class_labels: int | None = None
    vae_scaling_factor: float | None = None
    path: str = "vp"  # "vp": DDIM over alphas_cumprod; "flow": rectified flow (``flow`` holds the sampler settings)
    flow: dict[str, Any] | None = None  # export.flow_sampler's settings: family, shift / mu, sigma range, ...
    safree: SafreeSettings | None = None  # SAFREE's text side (runtime.safree_text): settings and concept basis
    model_config: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)  # relative path -> sha256 of every graph and data file
    format_version: int = FORMAT_VERSION

    # ---- (de)serialisation ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able data (what manifest.json holds)."""
        return {
            "format": FORMAT,
            "format_version": self.format_version,
            "model_kind": self.model_kind,
            "source": self.source,
            "sample_shape": list(self.sample_shape),
            "prediction_type": self.prediction_type,
            "null_class": self.null_class,
            "num_class_labels": self.num_class_labels,
            "vae_scaling_factor": self.vae_scaling_factor,
            "path": self.path,
            "flow": self.flow,
            "safree": None if self.safree is None else self.safree.to_dict(),
            "num_inference_steps": self.num_inference_steps,
            "guidance_scale": self.guidance_scale,
            "guidance": None if self.guidance is None else self.guidance.to_dict(),
            "reference_threshold": self.reference_threshold,
            "reference_threshold_steps": self.reference_threshold_steps,
            "reference_threshold_alpha_bar": self.reference_threshold_alpha_bar,
            "sld": None if self.sld is None else self.sld.to_dict(),
            "bank": None if self.bank is None else self.bank.to_dict(),
            "reference_bank": None if self.reference_bank is None else self.reference_bank.to_dict(),
            "opset": self.opset,
            "precision": self.precision,
            "tokenizer": self.tokenizer,
            "tokenizers": [s.to_dict() for s in self.tokenizers],
            "graphs": {name: g.to_dict() for name, g in self.graphs.items()},
            "scheduler": self.scheduler.to_dict(),
            "model_config": self.model_config,
            "versions": self.versions,
            "files": self.files,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        """Parse and check the format and version; ``ManifestError`` names what is wrong."""
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            got = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise ManifestError(f"manifest: format is {got!r}, expected {FORMAT!r}")
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise ManifestError(
                f"manifest: bundle format_version {version!r} is not supported by this safe-denoiser (it reads"
                f" format_version {FORMAT_VERSION}); re-export the bundle with this version"
            )
        try:
            guidance = data.get("guidance")
            sld = data.get("sld")
            bank = data.get("bank")
            reference_bank = data.get("reference_bank")
            return cls(
                model_kind=str(_require(data, "model_kind", "the manifest")),
                source=str(_require(data, "source", "the manifest")),
                sample_shape=json_ints(_require(data, "sample_shape", "the manifest"), "sample_shape"),
                prediction_type=str(_require(data, "prediction_type", "the manifest")),
                scheduler=SchedulerInfo.from_dict(_require(data, "scheduler", "the manifest")),
                num_inference_steps=json_int(
                    _require(data, "num_inference_steps", "the manifest"), "num_inference_steps"
                ),
                guidance_scale=float(_require(data, "guidance_scale", "the manifest")),
                graphs={k: GraphSpec.from_dict(v) for k, v in _require(data, "graphs", "the manifest").items()},
                opset=json_int(_require(data, "opset", "the manifest"), "opset"),
                precision=str(_require(data, "precision", "the manifest")),
                guidance=None if guidance is None else SafeGuidance.from_dict(guidance),
                reference_threshold=data.get("reference_threshold"),
                reference_threshold_steps=data.get("reference_threshold_steps"),
                reference_threshold_alpha_bar=data.get("reference_threshold_alpha_bar"),
                sld=None if sld is None else SLDConfig(**sld),
                bank=None if bank is None else BankInfo.from_dict(bank),
                reference_bank=None if reference_bank is None else BankInfo.from_dict(reference_bank, "reference_bank"),
                tokenizer=data.get("tokenizer"),
                tokenizers=tuple(TokenizerSpec.from_dict(s) for s in data.get("tokenizers") or ()),
                null_class=data.get("null_class"),
                num_class_labels=data.get("num_class_labels"),
                vae_scaling_factor=data.get("vae_scaling_factor"),
                path=str(data.get("path", "vp")),
                flow=data.get("flow"),
                safree=None if data.get("safree") is None else SafreeSettings.from_dict(data["safree"]),
                model_config=dict(data.get("model_config", {})),
                versions=dict(data.get("versions", {})),
                files={str(k): str(v) for k, v in (data.get("files") or {}).items()},
                format_version=int(version),
            )
        except ManifestError:
            raise
        except (TypeError, ValueError, KeyError) as exc:
            raise ManifestError(f"manifest: invalid content: {exc}") from exc

    def save(self, bundle_dir: str | os.PathLike[str]) -> Path:
        """Write ``bundle_dir/manifest.json`` atomically."""
        return atomic_write_json(Path(bundle_dir) / MANIFEST_NAME, self.to_dict())

    @classmethod
    def load(cls, bundle_dir: str | os.PathLike[str], check_bank: bool = True, check_files: bool = True) -> Manifest:
        """Read ``bundle_dir/manifest.json`` and ``validate`` the bundle against it."""
        root = Path(bundle_dir)
        path = root / MANIFEST_NAME
        if not root.is_dir():
            raise ManifestError(f"bundle {str(root)!r} is not a folder")
        if not path.is_file():
            raise ManifestError(f"bundle {str(root)!r} has no {MANIFEST_NAME}")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise ManifestError(f"{str(path)!r} is not readable JSON: {exc}") from exc
        manifest = cls.from_dict(data)
        manifest.validate(root, check_bank=check_bank, check_files=check_files)
        return manifest

    # ---- checks -----------------------------------------------------------------------------------
    def validate(
        self, bundle_dir: str | os.PathLike[str], check_bank: bool = True, check_files: bool = True
    ) -> Manifest:
        """Check the bundle's files against the manifest; with ``check_bank`` hash the bank inside the graph, with
        ``check_files`` every file listed in ``files``."""
        root = Path(bundle_dir)
        if self.model_kind not in ("class-conditional", "text-to-image"):
            raise ManifestError(f"manifest: unknown model_kind {self.model_kind!r}")
        if "denoiser" not in self.graphs:
            raise ManifestError("manifest: no 'denoiser' graph")
        from .contract import check_numbers, check_paths  # the contract both runtimes enforce (contract.cpp)

        check_paths(self, root)  # before any file is opened: every file name stays inside the bundle
        # Flow bundles: text_encoder / vae_decoder are optional (older ones carry the step only; runtimes refuse
        # prompts and decoding without them).
        needed = {"text-to-image": ("text_encoder", "vae_decoder")}.get(self.model_kind, ())
        needed = needed if self.path == "vp" else ()
        for name in needed:
            if name not in self.graphs:
                raise ManifestError(f"manifest: a {self.model_kind} bundle needs a {name!r} graph")
        for name, graph in self.graphs.items():
            for file in (graph.file, graph.external_data):
                if file is not None and not (root / file).is_file():
                    raise ManifestError(f"bundle {str(root)!r}: file {file!r} of graph {name!r} is missing")
        if self.tokenizer is not None and not (root / self.tokenizer).is_dir():
            raise ManifestError(f"bundle {str(root)!r}: tokenizer folder {self.tokenizer!r} is missing")
        _check_tokenizer_folders(root, self.tokenizers)
        count = self.num_class_labels
        if count is not None and (
            not isinstance(count, int) or isinstance(count, bool) or count <= (self.null_class or 0)
        ):
            raise ManifestError(
                f"manifest: num_class_labels must be an int > null_class ({self.null_class}), got {count!r}"
            )
        if len(self.scheduler.alphas_cumprod) != len(self.scheduler.sigmas) or not self.scheduler.alphas_cumprod:
            raise ManifestError("manifest: scheduler.alphas_cumprod and scheduler.sigmas must be non-empty and equal")
        if (self.guidance is None) != (self.bank is None):
            raise ManifestError("manifest: guidance and bank must both be set (correction on) or both be null")
        odds = self.guidance is not None and self.guidance.needs_reference_bank
        if odds != (self.reference_bank is not None):
            raise ManifestError(
                "manifest: reference_bank must be set exactly when guidance.preset is 'odds' (Theorem 1's beta)"
            )
        check_numbers(self)
        if check_files:  # before the bank check parses denoiser.onnx: a damaged file is named as such
            try:
                verify_files(root, self.files)
            except BundleFileError as exc:
                raise ManifestError(str(exc)) from None
        if self.bank is not None:
            for key, info in (("bank", self.bank), ("reference_bank", self.reference_bank)):
                if info is not None and info.sample_shape != self.sample_shape:
                    raise ManifestError(
                        f"manifest: {key} item shape {info.sample_shape} differs from sample_shape {self.sample_shape}"
                    )
            if check_bank:
                self.check_bank(root)
        return self

    def class_label_max(self) -> int:
        """The highest class label the denoiser embeds: num_class_labels - 1, or null_class for older bundles."""
        null = self.null_class if self.null_class is not None else 0
        return self.num_class_labels - 1 if self.num_class_labels is not None else null

    def file_entries(self) -> list[str]:
        """What ``files`` covers: each graph's file and external data, and the tokenizer folder(s)."""
        graphs = [f for g in self.graphs.values() for f in (g.file, g.external_data) if f is not None]
        return graphs + ([self.tokenizer] if self.tokenizer is not None else []) + [s.folder for s in self.tokenizers]

    def check_bank(self, bundle_dir: str | os.PathLike[str]) -> str:
        """Hash the bank constants inside denoiser.onnx (the negative bank, and the reference bank of the odds
        preset); ``ManifestError`` when one differs from its record. Returns the negative bank's hash."""
        if self.bank is None:
            raise ManifestError("manifest: this bundle has no negative bank (the correction is off)")
        path = Path(bundle_dir) / self.graphs["denoiser"].file
        digest = _check_bank_constant(path, self.bank, "bank")
        if self.reference_bank is not None:
            _check_bank_constant(path, self.reference_bank, "reference bank")
        return digest

    def check_bank_file(self, bank_path: str | os.PathLike[str]) -> None:
        """``ManifestError`` unless the bank file (.safetensors) is the one exported into this bundle."""
        from safe_denoiser.core.bank import NegativeBank

        if self.bank is None:
            raise ManifestError("manifest: this bundle has no negative bank (the correction is off)")
        digest = NegativeBank.load(bank_path).sha256()
        # the file's own hash: recorded before packing (Flux) or rounding (float16), else the graph's array's
        meta = self.bank.metadata
        if digest != meta.get(PACKED_FROM, meta.get(ROUNDED_FROM, self.bank.sha256)):
            raise ManifestError(
                f"bank hash mismatch: {str(bank_path)!r} hashes to {digest[:16]}..., the bundle's bank to"
                f" {self.bank.sha256[:16]}..."
            )


def _check_tokenizer_folders(root: Path, tokenizers: tuple[TokenizerSpec, ...]) -> None:
    """Each flow tokenizer's folder and its kind's file (``TokenizerSpec.check_folder``), as ``ManifestError``."""
    try:
        for spec in tokenizers:
            spec.check_folder(root)
    except TokenizerSpecError as exc:
        raise ManifestError(str(exc)) from None


def _check_bank_constant(path: Path, info: BankInfo, what: str) -> str:
    """Shape, storage dtype and hash of one bank initializer of ``path`` against ``info``; returns the hash."""
    array = read_initializer(path, info.initializer)
    if tuple(array.shape) != (info.count, *info.sample_shape):
        key = what.replace(" ", "_")  # the manifest field: bank / reference_bank
        raise ManifestError(
            f"{what} inside {str(path)!r} has shape {tuple(array.shape)}, the manifest's {key}.count and"
            f" {key}.sample_shape say {(info.count, *info.sample_shape)}"
        )
    if array.dtype != np.dtype(info.dtype):
        raise ManifestError(f"{what} inside {str(path)!r} is {array.dtype}, the manifest says {info.dtype}")
    digest = array_sha256(array)
    if digest != info.sha256:
        raise ManifestError(
            f"{what} hash mismatch: the {what} inside {str(path)!r} hashes to {digest[:16]}..., the manifest"
            f" records {info.sha256[:16]}... (the graph or the manifest was changed after export)"
        )
    return digest
