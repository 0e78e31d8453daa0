"""``safe_denoiser.runtime.bundle`` runs without torch: a subprocess that blocks torch samples an exported bundle."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from safe_denoiser.export.exporter import ExportOptions, export_bundle, load_source
from safe_denoiser.runtime.bundle import Bundle

_NO_TORCH = """
import sys
import numpy as np
sys.modules["torch"] = None  # from here on, any import of torch raises ImportError
from safe_denoiser.runtime.bundle import Bundle
bundle, noise, out = sys.argv[1:]
np.save(out, Bundle(bundle, threads=1).sample([7, 1], noise=np.load(noise), steps=4).sample)
heavy = sorted({m.split(".")[0] for m in sys.modules} & {"torch", "diffusers", "transformers", "lightning"})
assert sys.modules["torch"] is None and heavy == ["torch"], heavy  # "torch" is only the blocking entry
"""


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled demo model with the safe denoiser (constant preset, the shipped bank), 4 DDIM steps."""
    args = {"model": "demo", "num_inference_steps": 4, "guidance_scale": 2.0, "bank": "bundled"}
    source = load_source({**args, "safe_denoiser": {"preset": "constant", "beta": 0.5}})
    out = tmp_path_factory.mktemp("no-torch") / "bundle"
    export_bundle(source, out, ExportOptions(verify=False))
    return out


def test_runtime_samples_without_torch(bundle: Path, tmp_path: Path) -> None:
    noise = np.random.default_rng(0).standard_normal((2, 1, 8, 8)).astype(np.float32)
    np.save(tmp_path / "noise.npy", noise)
    result = subprocess.run(
        [sys.executable, "-c", _NO_TORCH, str(bundle), str(tmp_path / "noise.npy"), str(tmp_path / "x.npy")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    want = Bundle(bundle, threads=1).sample([7, 1], noise=noise, steps=4)
    assert want.applied is not None and want.applied.any()  # the correction (kernel over the bank) ran
    assert np.array_equal(np.load(tmp_path / "x.npy"), want.sample)  # same sessions, inputs and thread count
