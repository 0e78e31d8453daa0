"""Bundles: every file hashed in the manifest and checked on load (errors name the file); the runtime's arguments
checked before onnxruntime sees them."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from safe_denoiser.runtime.arguments import check_array, check_int, check_labels, check_scales, check_seeds
from safe_denoiser.runtime.integrity import BundleFileError, bundle_files, file_sha256, hash_files, verify_files


# ---- file hashes ---------------------------------------------------------------------------------------------------
def test_file_hashes_match_hashlib_and_name_the_bad_file(tmp_path: Path) -> None:
    (tmp_path / "tokenizer").mkdir()
    (tmp_path / "tokenizer" / "vocab.json").write_text("{}", encoding="utf-8")
    payload = np.random.default_rng(0).bytes(3 * (1 << 20) + 17)  # more than one read chunk
    (tmp_path / "denoiser.onnx").write_bytes(payload)
    names = bundle_files(tmp_path, ["denoiser.onnx", None, "tokenizer"])
    assert names == ["denoiser.onnx", "tokenizer/vocab.json"]
    digests = hash_files(tmp_path, names)
    assert digests["denoiser.onnx"] == hashlib.sha256(payload).hexdigest() == file_sha256(tmp_path / "denoiser.onnx")
    verify_files(tmp_path, digests)
    flipped = bytearray(payload)
    flipped[2_000_000] ^= 0x01  # one bit, deep inside the weights
    (tmp_path / "denoiser.onnx").write_bytes(bytes(flipped))
    with pytest.raises(BundleFileError, match=r"file 'denoiser.onnx' does not match the manifest"):
        verify_files(tmp_path, digests)
    (tmp_path / "denoiser.onnx").write_bytes(payload[:1000])  # truncated
    with pytest.raises(BundleFileError, match=r"file 'denoiser.onnx' does not match"):
        verify_files(tmp_path, digests)
    (tmp_path / "tokenizer" / "vocab.json").unlink()
    (tmp_path / "denoiser.onnx").write_bytes(payload)
    with pytest.raises(BundleFileError, match=r"file 'tokenizer/vocab.json' listed in the manifest is missing"):
        verify_files(tmp_path, digests)


# ---- runtime arguments ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("labels", "message"),
    [
        (["3"], r"class labels\[0\] must be an int in 0\.\.10 \(10 = no class\) or None, got '3'"),
        ([2.7], r"class labels\[0\] must be an int in 0\.\.10 .* got 2\.7"),
        ([1, 11], r"class labels\[1\] must be an int in 0\.\.10 .* got 11"),
        ([True], r"class labels\[0\] .* got True"),
        ([], r"class labels is empty: give one class label per image"),
        ("3", r"class labels must be a list of ints"),
    ],
)
def test_bad_labels(labels: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_labels(labels, 10, "class labels")


def test_good_labels() -> None:
    out = check_labels([3, None, np.int64(10)], 10, "class labels")
    assert out.dtype == np.int64 and out.tolist() == [3, 10, 10]


def test_scales_steps_arrays_and_seeds() -> None:
    assert check_scales(2.0, 3).tolist() == [2.0, 2.0, 2.0]
    assert check_scales([1.0, 2.0], 2).tolist() == [1.0, 2.0]
    with pytest.raises(ValueError, match=r"guidance_scale must be one number or a list of 3 \(one per image\)"):
        check_scales([1.0, 2.0], 3)
    with pytest.raises(ValueError, match="guidance_scale must be finite, got nan"):
        check_scales(float("nan"), 1)
    with pytest.raises(ValueError, match="guidance_scale must be a number or one number per image"):
        check_scales("high", 1)
    with pytest.raises(ValueError, match=r"steps must be an int in 1\.\.1000, got 2\.5"):
        check_int(2.5, "steps", 1, 1000)
    with pytest.raises(ValueError, match=r"steps must be an int in 1\.\.1000, got 0"):
        check_int(0, "steps", 1, 1000)
    noise = np.zeros((2, 1, 8, 8))
    assert check_array(noise, "noise", (2, 1, 8, 8)).dtype == np.float32
    noise[1, 0, 3, 3] = np.nan
    with pytest.raises(ValueError, match=r"noise holds NaN or Inf \(1 values\)"):
        check_array(noise, "noise", (2, 1, 8, 8))
    with pytest.raises(
        ValueError, match=r"noise must have shape \(3, 1, 8, 8\) \(None: any size\), got \(2, 1, 8, 8\)"
    ):
        check_array(np.zeros((2, 1, 8, 8)), "noise", (3, 1, 8, 8))
    assert check_array(np.zeros((2, 4, 6, 7)), "noise", (2, 4, None, None)).shape == (2, 4, 6, 7)
    with pytest.raises(ValueError, match="noise must have shape"):
        check_array(np.zeros((2, 4, 6)), "noise", (2, 4, None, None))
    assert check_seeds(5, 2) == [(5, 0), (5, 1)]
    assert check_seeds([5, 6], 2) == [(5, 0), (6, 0)]
    with pytest.raises(ValueError, match=r"seed must be an int in 0\.\.\d+, got 1\.9"):
        check_seeds(1.9, 1)
    with pytest.raises(ValueError, match="seed: 1 seeds for 2 images"):
        check_seeds([1], 2)


# ---- on a real bundle (the demo model, the bundled bank) -----------------------------------------------------------
@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from safe_denoiser.export.exporter import ExportOptions, export_bundle, load_source

    args = {
        "model": "demo",
        "num_inference_steps": 3,
        "bank": "bundled",
        "safe_denoiser": {"preset": "constant", "beta": 0.5},
    }
    out = tmp_path_factory.mktemp("bundle") / "demo"
    export_bundle(load_source(args), out, ExportOptions(verify=False))
    return out


def _copy(bundle: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(bundle, tmp_path / "copy"))


def test_every_file_is_hashed_in_the_manifest(bundle: Path) -> None:
    from safe_denoiser.runtime.manifest import Manifest

    manifest = Manifest.load(bundle)
    assert manifest.files == {"denoiser.onnx": file_sha256(bundle / "denoiser.onnx")}


def test_flipped_weight_bytes_are_refused_naming_the_file(bundle: Path, tmp_path: Path) -> None:
    from safe_denoiser.runtime.bundle import Bundle
    from safe_denoiser.runtime.manifest import ManifestError

    root = _copy(bundle, tmp_path)
    data = bytearray((root / "denoiser.onnx").read_bytes())
    start = len(data) // 2  # inside the UNet's weights, away from the bank (which its own hash covers)
    data[start : start + 64] = bytes(b ^ 0xFF for b in data[start : start + 64])
    (root / "denoiser.onnx").write_bytes(bytes(data))
    with pytest.raises(ManifestError, match=r"file 'denoiser.onnx' does not match the manifest"):
        Bundle(root)
    Bundle(root, check_files=False)  # the switch for speed: the bank's own hash still holds


def test_a_truncated_graph_names_the_file(bundle: Path, tmp_path: Path) -> None:
    from safe_denoiser.runtime.bundle import Bundle
    from safe_denoiser.runtime.manifest import ManifestError

    root = _copy(bundle, tmp_path)
    path = root / "denoiser.onnx"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])
    with pytest.raises(ManifestError, match=r"file 'denoiser.onnx' does not match the manifest"):
        Bundle(root)  # the files are checked before the bank check parses the graph (as the C++ runtime does)
    with pytest.raises(ManifestError, match=r"denoiser.onnx' is not a readable ONNX graph \(DecodeError"):
        Bundle(root, check_files=False)
    loaded = Bundle(root, check_files=False, check_bank=False)
    with pytest.raises(ManifestError, match=r"denoiser.onnx': onnxruntime cannot load this graph"):
        loaded.sample([1], steps=2)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"conditioning": ["3"]}, r"class labels\[0\] must be an int in 0\.\.12 \(10 = no class\)"),
        ({"conditioning": []}, "class labels is empty"),
        ({"conditioning": [2.7]}, r"class labels\[0\] must be an int .* got 2\.7"),
        ({"conditioning": [1, 2], "negative": [3]}, "negative class labels: 1 labels for 2 images"),
        (
            {"conditioning": [1, 2], "guidance_scale": [1.0, 2.0, 3.0]},
            r"guidance_scale must be one number or a list of 2",
        ),
        ({"conditioning": [1], "guidance_scale": float("nan")}, "guidance_scale must be finite"),
        ({"conditioning": [1], "steps": 2.5}, r"steps must be an int in 1\.\.1000, got 2\.5"),
        ({"conditioning": [1], "noise": np.full((1, 1, 8, 8), np.nan, np.float32)}, r"noise holds NaN or Inf \(64"),
        ({"conditioning": [1], "noise": np.zeros((2, 1, 8, 8), np.float32)}, r"noise must have shape \(1, 1, 8, 8\)"),
        ({"conditioning": [1], "seed": 1.9}, r"seed must be an int in 0\.\.\d+, got 1\.9"),
    ],
)
def test_runtime_arguments_are_checked_before_onnxruntime(bundle: Path, kwargs: dict[str, Any], message: str) -> None:
    from safe_denoiser.runtime.bundle import Bundle

    with pytest.raises(ValueError, match=message):
        Bundle(bundle, check_files=False).sample(**kwargs)


def test_runtime_stops_on_non_finite_samples(bundle: Path) -> None:
    from safe_denoiser.runtime.bundle import Bundle

    b = Bundle(bundle, check_files=False)
    assert np.isfinite(b.sample([1, 7], steps=2).sample).all()
    with pytest.raises(FloatingPointError, match=r"step 1 of 2 \(timestep \d+\) made non-finite samples for image"):
        b.sample([1], steps=2, noise=np.full((1, 1, 8, 8), 3e38, np.float32))  # finite, but float32 overflows


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ("  guidance_scle: 3\n", r"unknown model field\(s\) \['guidance_scle'\]"),
        ("  num_inference_steps: '3'\n", r"model\.num_inference_steps must be a positive int, got '3'"),
        ("  guidance_scale: .nan\n", r"model\.guidance_scale must be a finite number, got nan"),
        ("  bank: 5\n  safe_denoiser: {preset: constant, beta: 1}\n", r"model\.bank must be a string or null, got 5"),
        (
            "  bank: bundled\n  safe_denoiser: {preset: theorem, eta: 1}\n",
            r"model\.safe_denoiser: safe_denoiser\.preset must be one of constant, mass, odds, reference, sgf, "
            r"shielded, got 'theorem'"
            r" \('theorem' with beta_mode constant/mass/odds is now the preset constant/mass/odds\)",
        ),
        (
            "  bank: bundled\n  safe_denoiser: {preset: constant, eta: 1}\n",
            r"model\.safe_denoiser: unknown field\(s\) \['eta'\] for safe_denoiser preset 'constant'.*'eta' is now beta"
            r" \(constant\)",
        ),
    ],
)
def test_export_rejects_a_bad_config_like_predict(
    tmp_path: Path, section: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    import re

    from safe_denoiser.cli import main

    config = tmp_path / "bad.yaml"
    config.write_text("model:\n  model: demo\n" + section, encoding="utf-8")
    assert main(["export", "--config", str(config), "--out", str(tmp_path / "b")]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "b").exists()  # nothing made
    # predict checks the same section with the same factory first: the same message, before any model loads
    assert main(["predict", "--config", str(config), "--data.output_dir", str(tmp_path / "p")]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "p").exists()


def test_export_cli_odds_preset_and_float16_banks(tmp_path: Path) -> None:
    """The odds preset exports from a predict config (reference bank inside the graph; tests/test_export_odds.py
    checks its numbers); ``--bank-dtype float16`` is recorded in the manifest."""
    import yaml

    from safe_denoiser import OddsGuidance, cli
    from safe_denoiser.runtime.manifest import Manifest

    cfg = tmp_path / "odds.yaml"
    section = {"model": "demo", "bank": "bundled", "reference_bank": "bundled", "safe_denoiser": {"preset": "odds"}}
    cfg.write_text(yaml.safe_dump({"model": section}))
    out = tmp_path / "bundle"
    assert cli.main(["export", "--config", str(cfg), "--out", str(out), "--bank-dtype", "float16", "--no-verify"]) == 0
    manifest = Manifest.load(out)
    assert isinstance(manifest.guidance, OddsGuidance) and manifest.guidance == OddsGuidance()
    assert manifest.reference_bank is not None and manifest.reference_bank.reference_kind == "safe"
    assert manifest.bank is not None and manifest.bank.dtype == manifest.reference_bank.dtype == "float16"
