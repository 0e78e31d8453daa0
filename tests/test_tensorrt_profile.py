"""The TensorRT optimisation profile of flow (SD3/Flux) graphs and the export command's profile flags.

TensorRT is not installed where these run: they cover the profile construction and the refusals that happen before
any export; building an engine (``build_engine``) is not exercised here.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from safe_denoiser.cli import main
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
