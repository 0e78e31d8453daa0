"""The TensorRT optimisation profile of flow (SD3/Flux) graphs and the export command's profile flags.

TensorRT is not installed where these run: they cover the profile construction and the refusals that happen before
any export, and ``build_engines``' profiles of every graph of a tiny Flux bundle with ``build_engine`` replaced by a
recorder; building an engine is not exercised here.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from safe_denoiser.cli import main
from safe_denoiser.export import tensorrt
from safe_denoiser.export.tensorrt import DEFAULT_TEXT_LENGTH, EngineProfile, profile_shapes
from safe_denoiser.runtime.manifest import GraphSpec, TensorSpec


def _flow_denoiser() -> GraphSpec:
    """The SD3 denoiser's inputs as the flow exporter declares them: batch and text length are free."""
    inputs = (
        TensorSpec("sample", "float32", ("batch", 16, 8, 8)),
        TensorSpec("timestep", "float32", ("batch",)),
        TensorSpec("prompt_embeds", "float32", ("batch", "text_length", 32)),
        TensorSpec("pooled_prompt_embeds", "float32", ("batch", 64)),
        TensorSpec("negative_prompt_embeds", "float32", ("batch", "text_length", 32)),
    )
    return GraphSpec("denoiser.onnx", inputs, (TensorSpec("noise_pred", "float32", ("batch", 16, 8, 8)),))


def test_flow_graph_text_length_is_in_the_profile() -> None:
    spec = _flow_denoiser()
    shapes = profile_shapes(spec, (8, 8), EngineProfile(batch=(1, 2, 4), text_length=(10, 77, 333)))
    assert shapes["prompt_embeds"] == ((1, 10, 32), (2, 77, 32), (4, 333, 32))
    assert shapes["negative_prompt_embeds"] == shapes["prompt_embeds"]
    assert shapes["sample"] == ((1, 16, 8, 8), (2, 16, 8, 8), (4, 16, 8, 8))
    default = profile_shapes(spec, (8, 8), EngineProfile())["prompt_embeds"]
    assert DEFAULT_TEXT_LENGTH == (1, 333, 589)  # SD3's 77 + 256 tokens at opt, up to 77 + 512
    assert [s[1] for s in default] == list(DEFAULT_TEXT_LENGTH)


def test_an_unknown_symbolic_dim_is_still_refused() -> None:
    spec = GraphSpec("g.onnx", (TensorSpec("x", "float32", ("batch", "frames")),), ())
    with pytest.raises(ValueError, match="unknown symbolic dim 'frames'"):
        profile_shapes(spec, (8, 8), EngineProfile())


@pytest.mark.parametrize("bad", [(0, 1, 2), (5, 3, 4), (1, 4, 3)])
def test_profile_text_length_must_be_ordered(bad: tuple[int, int, int]) -> None:
    with pytest.raises(ValueError, match=r"profile\.text_length must be three integers with 1 <= min <= opt <= max"):
        EngineProfile(text_length=bad)


@pytest.mark.parametrize(("flag", "value"), [("--trt-text-length", "5,3,4"), ("--trt-batch", "2,1,4")])
def test_export_refuses_a_bad_profile_flag_before_exporting(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flag: str, value: str
) -> None:
    out = tmp_path / "bundle"
    argv = ["export", "--config", str(tmp_path / "never-read.yaml"), "--out", str(out), "--tensorrt", flag, value]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"safe-denoiser export: error: {flag} must be three integers with 1 <= min <= opt <= max")
    assert "Traceback" not in err and not out.exists()


def test_t5_length_is_fixed_at_the_given_length() -> None:
    """The flow text encoder's T5 ids axis ("t5_length") is the manifest's max_length at min, opt and max (runtimes
    always pad to it); without that length it stays an unknown dim."""
    ids = (TensorSpec("input_ids", "int64", ("batch", 77)), TensorSpec("input_ids_2", "int64", ("batch", "t5_length")))
    outputs = (TensorSpec("prompt_embeds", "float32", ("batch", "text_length", 32)),)
    spec = GraphSpec("text_encoder.onnx", ids, outputs)
    shapes = profile_shapes(spec, (8, 8), EngineProfile(batch=(1, 3, 8)), {"t5_length": 256})
    assert shapes == {"input_ids": ((1, 77), (3, 77), (8, 77)), "input_ids_2": ((1, 256), (3, 256), (8, 256))}
    with pytest.raises(ValueError, match="unknown symbolic dim 't5_length'"):
        profile_shapes(spec, (8, 8), EngineProfile())


def test_build_engines_profiles_every_flow_graph(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``build_engines`` on a tiny Flux bundle (packed 2-D samples, CLIP + T5 text encoder), TensorRT replaced by a
    recorder: every graph gets a profile, T5's ids at the manifest's max_length, the denoiser's text length from
    ``--trt-text-length``, and engines.json records them."""
    import safe_denoiser.testing  # noqa: F401  (registers the tiny model kinds)
    from safe_denoiser.export.exporter import ExportOptions, export_bundle, load_source

    args = {"model": "tiny-flux", "scheduler": "flow_euler", "num_inference_steps": 2, "height": 16, "width": 16}
    manifest = export_bundle(load_source(args), tmp_path / "flux", ExportOptions(verify=False, max_sequence_length=64))
    built: dict[str, Any] = {}

    def record(onnx: Path, engine: Path, shapes: dict[str, Any], *_: Any) -> Path:
        built[Path(engine).stem] = shapes
        return Path(engine)

    monkeypatch.setattr(tensorrt, "require_tensorrt", lambda: SimpleNamespace(__version__="10.0.0"))
    monkeypatch.setattr(tensorrt, "build_engine", record)
    profile = EngineProfile(batch=(1, 2, 4), text_length=(64, 64, 64))
    tensorrt.build_engines(tmp_path / "flux", profile)
    assert set(built) == set(manifest.graphs) == {"denoiser", "text_encoder", "vae_decoder"}
    assert [s.max_length for s in manifest.tokenizers] == [77, 64]
    assert built["text_encoder"] == {
        "input_ids": ((1, 77), (2, 77), (4, 77)),
        "input_ids_2": ((1, 64), (2, 64), (4, 64)),
    }
    assert built["denoiser"]["prompt_embeds"] == ((1, 64, 32), (2, 64, 32), (4, 64, 32))
    assert built["denoiser"]["sample"] == ((1, 16, 64), (2, 16, 64), (4, 16, 64))  # packed: no spatial dims
    record_file = json.loads((tmp_path / "flux" / "tensorrt" / "engines.json").read_text())
    assert record_file["engines"]["text_encoder"]["shapes"]["input_ids_2"] == [[1, 64], [2, 64], [4, 64]]
