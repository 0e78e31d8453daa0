"""One manifest contract for both runtimes: the shared list of bad manifests that the Python runtime and the C++
runtime must both refuse, each naming the field.

Every case is one small change to a real exported bundle (the demo model with its bank, the tiny SD with SLD and
the reference preset, tiny SD3 and Flux flow bundles with a bank): the Python runtime (``Bundle`` and its sessions)
raises ``ManifestError`` naming the field, and ``safe-denoiser-cpp info`` exits with the bundle error (3) and a
message naming the same field. The unchanged bundles are accepted by both, so each case tests its change only.
The C++ binary is located as in tests/test_cpp_runtime.py (``SAFE_DENOISER_CPP_BINARY`` or ``make cpp``'s).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import safe_denoiser.testing  # noqa: F401  (registers the tiny test model kinds)
from safe_denoiser import NegativeBank
from safe_denoiser.export.exporter import export_bundle, load_source
from safe_denoiser.runtime.bundle import Bundle
from safe_denoiser.runtime.contract import bundle_path
from safe_denoiser.runtime.manifest import ManifestError

ROOT = Path(__file__).resolve().parents[1]
BINARY = Path(
    os.environ.get("SAFE_DENOISER_CPP_BINARY", ROOT / "cpp_runtime" / "build" / "release" / "safe-denoiser-cpp")
)
BUNDLE_EXIT = 3
Manifest = dict[str, Any]


@pytest.fixture(scope="module")
def cpp() -> Path:
    if not BINARY.is_file() and "SAFE_DENOISER_CPP_BINARY" not in os.environ:
        subprocess.run(["make", "-C", str(ROOT), "cpp"], check=True, stdout=subprocess.DEVNULL)
    return BINARY


def _bank(path: Path, shape: tuple[int, ...]) -> str:
    NegativeBank.from_tensor(torch.randn(shape, generator=torch.Generator().manual_seed(0))).save(path)
    return str(path)


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """demo (constant preset, bundled bank), tiny SD (reference preset + SLD), tiny SD3 and Flux (constant, with
    their text encoders, tokenizers and VAE decoders), tiny SD with SAFREE's text side."""
    out = tmp_path_factory.mktemp("contract")
    constant = {"preset": "constant", "beta": 0.5, "window": [0, 1000]}
    flow = {"scheduler": "flow_euler", "num_inference_steps": 4, "guidance_scale": 3.5, "height": 16, "width": 16}
    sld = {"guidance_scale": 1000.0, "warmup_steps": 1, "threshold": 0.01, "momentum_scale": 0.3, "mom_beta": 0.4}
    configs = {
        "demo": {"model": "demo", "scheduler": "ddim", "num_inference_steps": 10, "bank": "bundled"},
        "tiny": {
            "model": "tiny-sd",
            "scheduler": "ddim",
            "num_inference_steps": 4,
            "height": 16,
            "width": 16,
            "bank": _bank(out / "tiny_bank.safetensors", (3, 4, 8, 8)),
            "safe_denoiser": {"preset": "reference", "window": [400, 1000]},
            "sld": sld,
        },
        "sd3": {**flow, "model": "tiny-sd3", "bank": _bank(out / "sd3_bank.safetensors", (3, 16, 8, 8))},
        "flux": {**flow, "model": "tiny-flux", "bank": _bank(out / "flux_bank.safetensors", (3, 16, 8, 8))},
        "safree": {
            "model": "tiny-sd",
            "scheduler": "ddim",
            "num_inference_steps": 4,
            "height": 16,
            "width": 16,
            "bank": str(out / "tiny_bank.safetensors"),
            "safree": {"concepts": ["nudity", "naked body"], "re_attention": False},
        },
    }
    for name, config in configs.items():
        export_bundle(load_source({"safe_denoiser": constant, **config}), out / name)
    return out


def _open_python(bundle: Path) -> None:
    """Everything the Python runtime checks before sampling: the manifest, the files, each graph's session."""
    b = Bundle(bundle)
    for graph in b.manifest.graphs:
        b.session(graph)


def _cpp_info(cpp: Path, bundle: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(cpp), "info", "--bundle", str(bundle)], capture_output=True, text=True, timeout=300)


# ---- the cases ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    """One bad bundle: ``mutate`` changes the manifest (and, for symlink cases, the folder); ``field`` is what both
    runtimes' messages must name."""

    name: str
    bundle: str
    field: str
    mutate: Callable[[Manifest, Path], None]


def _set(path: str, value: Any) -> Callable[[Manifest, Path], None]:
    """Set the manifest entry at a dotted path ("graphs.denoiser.file"; list indices as numbers)."""

    def mutate(m: Manifest, _: Path) -> None:
        *parents, last = path.split(".")
        node: Any = m
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        node[int(last) if isinstance(node, list) else last] = value

    return mutate


def _edit(fn: Callable[[Manifest], None]) -> Callable[[Manifest, Path], None]:
    return lambda m, _: fn(m)


def _outside_copy(m: Manifest, bundle: Path) -> None:
    """denoiser.onnx named by its absolute path in a copy outside the bundle."""
    outside = bundle.parent / "outside.onnx"
    shutil.copyfile(bundle / "denoiser.onnx", outside)
    m["graphs"]["denoiser"]["file"] = str(outside)


def _dotdot(m: Manifest, bundle: Path) -> None:
    shutil.copyfile(bundle / "denoiser.onnx", bundle.parent / "outside.onnx")
    m["graphs"]["denoiser"]["file"] = "../outside.onnx"


def _symlink(name: str) -> Callable[[Manifest, Path], None]:
    """Replace the bundle's ``name`` (a file or folder) by a symlink to the same bytes outside the bundle."""

    def mutate(_: Manifest, bundle: Path) -> None:
        outside = bundle.parent / f"outside-{name}"
        shutil.move(bundle / name, outside)
        (bundle / name).symlink_to(outside, target_is_directory=outside.is_dir())

    return mutate


def _tokenizer_outside(m: Manifest, bundle: Path) -> None:
    shutil.copytree(bundle / "tokenizer", bundle.parent / "tok")
    m["tokenizer"] = "../tok"


def _cut_schedule(m: Manifest) -> None:
    s = m["scheduler"]
    s["alphas_cumprod"], s["sigmas"] = s["alphas_cumprod"][:900], s["sigmas"][:900]


def _scale_entry(key: str, t: int, factor: float) -> Callable[[Manifest, Path], None]:
    def mutate(m: Manifest, _: Path) -> None:
        m["scheduler"][key][t] *= factor

    return mutate


def _linear_table(m: Manifest) -> None:
    """A whole other schedule (linear betas), its sigmas consistent with it: only the config contradicts it."""
    ac = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))
    m["scheduler"]["alphas_cumprod"] = ac.tolist()
    m["scheduler"]["sigmas"] = np.sqrt((1 - ac) / ac).tolist()


def _rename_input(old: str, new: str) -> Callable[[Manifest, Path], None]:
    def mutate(m: Manifest, _: Path) -> None:
        for t in m["graphs"]["denoiser"]["inputs"]:
            if t["name"] == old:
                t["name"] = new

    return mutate


def _io_dtype(graph: str, kind: str, name: str, dtype: str) -> Callable[[Manifest, Path], None]:
    def mutate(m: Manifest, _: Path) -> None:
        next(t for t in m["graphs"][graph][kind] if t["name"] == name)["dtype"] = dtype

    return mutate


def _io_shape(graph: str, kind: str, name: str, shape: list[Any]) -> Callable[[Manifest, Path], None]:
    def mutate(m: Manifest, _: Path) -> None:
        next(t for t in m["graphs"][graph][kind] if t["name"] == name)["shape"] = shape

    return mutate


def _drop_input(name: str) -> Callable[[Manifest, Path], None]:
    def mutate(m: Manifest, _: Path) -> None:
        g = m["graphs"]["denoiser"]
        g["inputs"] = [t for t in g["inputs"] if t["name"] != name]

    return mutate


def _bank_count(m: Manifest) -> None:
    m["bank"]["count"] -= 1


def _io_rename(graph: str, kind: str, old: str, new: str) -> Callable[[Manifest, Path], None]:
    def mutate(m: Manifest, _: Path) -> None:
        next(t for t in m["graphs"][graph][kind] if t["name"] == old)["name"] = new

    return mutate


def _drop_graph(name: str) -> Callable[[Manifest, Path], None]:
    def mutate(m: Manifest, _: Path) -> None:
        del m["graphs"][name]

    return mutate


def _safree(**changes: Any) -> Callable[[Manifest, Path], None]:
    """The bundle's ``safree`` section with ``changes`` (a value None: the key removed)."""

    def mutate(m: Manifest, _: Path) -> None:
        m["safree"] = {k: v for k, v in {**m["safree"], **changes}.items() if v is not None}

    return mutate


def _safree_vocab_end(key: str) -> Callable[[Manifest, Path], None]:
    def mutate(m: Manifest, _: Path) -> None:
        m["safree"][key] = m["safree"]["vocab_size"]  # one past the last id

    return mutate


def _not_orthonormal(m: Manifest) -> None:
    m["safree"]["concept_basis"] = (2 * np.asarray(m["safree"]["concept_basis"])).clip(-1, 1).tolist()


# A valid section for a bundle that cannot take one (D = 32 as the tiny CLIP; the runtimes refuse it by the bundle).
SAFREE_SECTION = {
    "alpha": 0.01,
    "self_validation": True,
    "svf_max_step": 2,
    "svf_sharpness": 50.0,
    "svf_midpoint": 0.0,
    "mask_token_id": 0,
    "pooling": "argmax",
    "concept_basis": np.eye(32, 1).tolist(),
}


def _files_key(name: str) -> Callable[[Manifest, Path], None]:
    def mutate(m: Manifest, _: Path) -> None:
        m["files"][name] = "0" * 64

    return mutate


CASES = [
    # file names (the one path rule, contract.bundle_path / contract.cpp's is_bundle_relative + check_inside_bundle)
    Case("absolute graph path", "demo", "graphs.denoiser.file", _outside_copy),
    Case("../ graph path", "demo", "graphs.denoiser.file", _dotdot),
    Case("./ graph path", "demo", "graphs.denoiser.file", _set("graphs.denoiser.file", "./denoiser.onnx")),
    Case("symlinked graph escaping", "demo", "graphs.denoiser.file", _symlink("denoiser.onnx")),
    Case("../ external data", "demo", "graphs.denoiser.external_data", _set("graphs.denoiser.external_data", "../x")),
    Case("tokenizer folder outside", "tiny", "tokenizer", _tokenizer_outside),
    Case("symlinked tokenizer escaping", "tiny", "tokenizer", _symlink("tokenizer")),
    Case("absolute files entry", "tiny", "files['/etc/hostname']", _files_key("/etc/hostname")),
    Case("backslash files entry", "demo", "files['a\\b']", _files_key("a\\b")),
    # the graphs' I/O against the manifest (names, dtypes, static dims) and against sample_shape
    Case("graph input renamed", "demo", "graphs.denoiser.inputs", _rename_input("timestep", "t")),
    Case("graph input dropped", "sd3", "graphs.denoiser.inputs", _drop_input("negative_pooled_prompt_embeds")),
    Case("sld section removed", "tiny", "graphs.denoiser.inputs", _set("sld", None)),
    Case(
        "input dtype changed",
        "demo",
        "graphs.denoiser.inputs 'timestep'",
        _io_dtype("denoiser", "inputs", "timestep", "int64"),
    ),
    Case(
        "output dtype changed",
        "tiny",
        "graphs.denoiser.outputs 'correction_applied'",
        _io_dtype("denoiser", "outputs", "correction_applied", "float32"),
    ),
    Case(
        "text encoder width",
        "tiny",
        "graphs.text_encoder.outputs",
        _io_shape("text_encoder", "outputs", "last_hidden_state", ["batch", 77, 999]),
    ),
    Case(
        "vae latent channels",
        "tiny",
        "graphs.vae_decoder.inputs",
        _io_shape("vae_decoder", "inputs", "latents", ["batch", 8, "h", "w"]),
    ),
    Case("sample_shape changed", "demo", "sample_shape", _set("sample_shape", [1, 16, 16])),
    Case("flux sample_shape changed", "flux", "sample_shape", _set("sample_shape", [17, 64])),
    # the scheduler tables against the scheduler config
    Case("alphas_cumprod cut", "demo", "scheduler.alphas_cumprod", _edit(_cut_schedule)),
    Case("alphas_cumprod edited", "demo", "scheduler.alphas_cumprod[500]", _scale_entry("alphas_cumprod", 500, 1.001)),
    Case("alphas_cumprod another schedule", "tiny", "scheduler.alphas_cumprod[", _edit(_linear_table)),
    Case("sigmas edited", "tiny", "scheduler.sigmas[10]", _scale_entry("sigmas", 10, 1.0001)),
    Case(
        "num_train_timesteps mismatch", "demo", "num_train_timesteps", _set("scheduler.config.num_train_timesteps", 999)
    ),
    Case(
        "beta_schedule changed", "demo", "scheduler.alphas_cumprod[", _set("scheduler.config.beta_schedule", "linear")
    ),
    Case(
        "beta_schedule unknown",
        "demo",
        "scheduler.config.beta_schedule",
        _set("scheduler.config.beta_schedule", "sigmoid"),
    ),
    Case("final_alpha_cumprod", "demo", "scheduler.final_alpha_cumprod", _set("scheduler.final_alpha_cumprod", 0.5)),
    # defaults, banks, labels
    Case("negative steps", "demo", "num_inference_steps", _set("num_inference_steps", -3)),
    Case("steps past the table", "tiny", "num_inference_steps", _set("num_inference_steps", 1001)),
    Case("huge guidance scale", "demo", "guidance_scale", _set("guidance_scale", 1e6)),
    Case("bank count mismatch", "demo", "bank.count", _edit(_bank_count)),
    Case("bank count zero", "tiny", "bank.count", _set("bank.count", 0)),
    Case("bank sha256 not a hash", "demo", "bank.sha256", _set("bank.sha256", "XYZ")),
    Case("bank initializer unknown", "demo", "bank.initializer", _set("bank.initializer", "other_bank")),
    Case("num_class_labels below null", "demo", "num_class_labels", _set("num_class_labels", 5)),
    Case("null_class missing", "demo", "null_class", _set("null_class", None)),
    Case("class labels on a text model", "tiny", "null_class", _set("null_class", 10)),
    Case("tokenizer missing", "tiny", "tokenizer", _set("tokenizer", None)),
    # the flow section
    Case("flow shift negative", "sd3", "flow.shift", _set("flow.shift", -1.0)),
    Case("flow shift changed", "sd3", "scheduler.sigmas[", _set("flow.shift", 2.0)),
    Case("flow num_train_timesteps", "sd3", "flow.num_train_timesteps", _set("flow.num_train_timesteps", 0)),
    Case("flow sigma_min zero", "sd3", "flow.sigma_min", _set("flow.sigma_min", 0.0)),
    Case("flow sigma_max edited", "sd3", "flow.sigma_max", _set("flow.sigma_max", 0.9)),
    Case("flow family unknown", "flux", "flow.family", _set("flow.family", "sdxl")),
    Case("flow image_seq_len", "flux", "flow.image_seq_len", _set("flow.image_seq_len", 17)),
    Case("flow mu", "flux", "flow.mu", _set("flow.mu", 1.0)),
    Case("flow seq len range", "flux", "flow.max_image_seq_len", _set("flow.base_image_seq_len", 5000)),
    Case("flow section missing", "demo", "flow must be an object", _set("path", "flow")),
    Case("flow section on vp", "tiny", "flow must be null", _set("flow", {"family": "sd3"})),
    Case(
        "alphas_cumprod out of range",
        "demo",
        "scheduler.alphas_cumprod[3] must be in (0, 1]",
        _set("scheduler.alphas_cumprod.3", 1.5),
    ),
    # integers are JSON integers (2.5 is not read as 2, nor 4.0 as 4)
    Case("float steps", "demo", "num_inference_steps", _set("num_inference_steps", 2.5)),
    Case("integral float steps", "tiny", "num_inference_steps", _set("num_inference_steps", 4.0)),
    Case("float sample_shape", "demo", "sample_shape", _set("sample_shape", [1, 8.0, 8])),
    Case("float bank count", "demo", "bank.count", _set("bank.count", 2.5)),
    Case("float null_class", "demo", "null_class", _set("null_class", 10.5)),
    Case("float flow timesteps", "sd3", "flow.num_train_timesteps", _set("flow.num_train_timesteps", 1000.0)),
    # flow bundles' text encoder, tokenizers and VAE decoder against each other and the denoiser
    Case(
        "text encoder input renamed",
        "sd3",
        "graphs.text_encoder.inputs",
        _io_rename("text_encoder", "inputs", "input_ids_2", "ids"),
    ),
    Case("tokenizer feeds no input", "flux", "graphs.text_encoder.inputs", _set("tokenizers.1.input", "input_ids_3")),
    Case(
        "text encoder input dtype",
        "flux",
        "graphs.text_encoder.inputs 'input_ids' dtype",
        _io_dtype("text_encoder", "inputs", "input_ids", "int32"),
    ),
    Case("clip max_length", "sd3", "graphs.text_encoder.inputs 'input_ids' shape", _set("tokenizers.0.max_length", 64)),
    Case(
        "t5 length",
        "flux",
        "graphs.text_encoder.inputs 'input_ids_2' shape",
        _io_shape("text_encoder", "inputs", "input_ids_2", ["batch", 256]),
    ),
    Case(
        "flow text encoder width",
        "flux",
        "graphs.text_encoder.outputs 'prompt_embeds'",
        _io_shape("text_encoder", "outputs", "prompt_embeds", ["batch", "text_length", 31]),
    ),
    Case(
        "pooled width",
        "sd3",
        "graphs.text_encoder.outputs 'pooled_prompt_embeds'",
        _io_shape("text_encoder", "outputs", "pooled_prompt_embeds", ["batch", 65]),
    ),
    Case(
        "text encoder output renamed",
        "flux",
        "graphs.text_encoder.outputs",
        _io_rename("text_encoder", "outputs", "pooled_prompt_embeds", "pooled"),
    ),
    Case(
        "flow vae latents",
        "flux",
        "graphs.vae_decoder.inputs",
        _io_shape("vae_decoder", "inputs", "latents", ["batch", 16, 32]),
    ),
    Case("tokenizers without text encoder", "sd3", "tokenizers", _drop_graph("text_encoder")),
    Case("text encoder without tokenizers", "flux", "tokenizers", _set("tokenizers", [])),
    # SAFREE's section (cpp_runtime/src/safree.cpp's SafreeSettings::parse, runtime/safree_text.SafreeSettings)
    Case("safree alpha", "safree", "safree.alpha", _safree(alpha="0.01")),
    Case("safree alpha <= -1", "safree", "safree.alpha", _safree(alpha=-1.0)),
    Case("safree mask_token_id missing", "safree", "safree.mask_token_id", _safree(mask_token_id=None)),
    Case("safree pooling", "safree", "safree.pooling", _safree(pooling="mean")),
    Case("safree svf_max_step float", "safree", "safree.svf_max_step", _safree(svf_max_step=2.5)),
    Case("safree self_validation", "safree", "safree.self_validation", _safree(self_validation=1)),
    Case("safree re_attention on", "safree", "safree.re_attention", _safree(re_attention=True)),
    Case("safree unknown key", "safree", "safree has the unknown key 'filter_mode'", _safree(filter_mode="fourier")),
    Case("safree basis not orthonormal", "safree", "safree.concept_basis", _edit(_not_orthonormal)),
    Case(  # the contract's words: it refuses before Runtime::open reads prompt_embeds' width
        "safree basis width",
        "safree",
        "safree.concept_basis must be (D, r) with D = 32 (prompt_embeds' width)",
        _safree(concept_basis=np.eye(16, 2).tolist()),
    ),
    Case("safree mask id past the vocabulary", "safree", "safree.mask_token_id", _safree_vocab_end("mask_token_id")),
    Case("safree eos id past the vocabulary", "safree", "safree.eos_token_id", _safree_vocab_end("eos_token_id")),
    Case("safree on a class model", "demo", "safree must be null", _set("safree", SAFREE_SECTION)),
    Case(
        "safree on a flow bundle",
        "sd3",
        "safree must be null",
        _set("safree", {**SAFREE_SECTION, "concept_basis": np.eye(64, 1).tolist()}),
    ),
]


def _make_case(bundles: Path, tmp_path: Path, case: Case) -> Path:
    """A copy of the case's bundle (graph files hard-linked: real files inside it) with the change applied."""
    out = tmp_path / "bundle"
    shutil.copytree(bundles / case.bundle, out, copy_function=os.link)
    path = out / "manifest.json"
    manifest = json.loads(path.read_text(encoding="utf-8"))
    case.mutate(manifest, out)
    path.unlink()  # hard-linked: never write through to the fixture's manifest
    path.write_text(json.dumps(manifest), encoding="utf-8")
    return out


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_both_runtimes_refuse_naming_the_field(cpp: Path, bundles: Path, tmp_path: Path, case: Case) -> None:
    bundle = _make_case(bundles, tmp_path, case)
    with pytest.raises(ManifestError, match=re.escape(case.field)):
        _open_python(bundle)
    proc = _cpp_info(cpp, bundle)
    assert proc.returncode == BUNDLE_EXIT, (proc.returncode, proc.stdout, proc.stderr)
    assert case.field in proc.stderr, proc.stderr


@pytest.mark.parametrize("name", ["demo", "tiny", "sd3", "flux", "safree"])
def test_exported_bundles_are_accepted(cpp: Path, bundles: Path, name: str) -> None:
    """The unchanged bundles pass both (so every case above fails for its change). A C++ runtime without flow
    sampling refuses flow bundles by their path, after the contract passed."""
    _open_python(bundles / name)
    proc = _cpp_info(cpp, bundles / name)
    flow = json.loads((bundles / name / "manifest.json").read_text(encoding="utf-8"))["path"] == "flow"
    if proc.returncode != 0:
        assert flow and 'manifest: path "flow"' in proc.stderr, proc.stderr
    assert "must be" not in proc.stderr, proc.stderr


@pytest.mark.parametrize("name", ["denoiser.onnx", "tokenizer/vocab.json", "a..b", "x/y/z.data"])
def test_path_rule_accepts_names_inside(tmp_path: Path, name: str) -> None:
    assert bundle_path(tmp_path, name, "f") == tmp_path / name


@pytest.mark.parametrize("name", ["", "/abs", "../x", "a/../b", "./a", "a//b", "a/", "a\\b", "a\0b", 3, None])
def test_path_rule_refuses(tmp_path: Path, name: Any) -> None:
    with pytest.raises(ManifestError, match=r"manifest: f must be a relative path inside the bundle folder"):
        bundle_path(tmp_path, name, "f")


def test_path_rule_follows_symlinks(tmp_path: Path) -> None:
    """A symlink resolving inside passes; one resolving outside (existing or dangling) is refused."""
    root = tmp_path / "bundle"
    root.mkdir()
    (root / "real.onnx").write_bytes(b"x")
    (root / "inside.onnx").symlink_to(root / "real.onnx")
    (root / "out.onnx").symlink_to(tmp_path / "elsewhere.onnx")  # dangling
    assert bundle_path(root, "inside.onnx", "f") == root / "inside.onnx"
    with pytest.raises(ManifestError, match=r"manifest: f 'out.onnx' resolves to .*, outside the bundle folder"):
        bundle_path(root, "out.onnx", "f")
