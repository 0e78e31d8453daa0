"""The README's 20-line API runs as written: its banks are files, its pipeline a tiny random-weight SD pipeline."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from safe_denoiser import NegativeBank
from safe_denoiser.diffusers.safe_scheduler import SafeScheduler, detach
from safe_denoiser.testing import tiny_sd_pipeline

README = Path(__file__).resolve().parent.parent / "README.md"
MARKER = "<!-- API: checked by the lead -->"


def api_block() -> str:
    text = README.read_text(encoding="utf-8")
    assert MARKER in text, "the README lost its API block marker"
    match = re.search(r"```python\n(.*?)```", text[text.index(MARKER) :], re.S)
    assert match is not None
    return match.group(1)


def test_readme_api_block_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gen = torch.Generator().manual_seed(0)
    for name in ("nudity_bank", "ordinary_bank"):
        NegativeBank.from_tensor(torch.randn(6, 4, 64, 64, generator=gen)).save(tmp_path / f"{name}.safetensors")
    monkeypatch.chdir(tmp_path)
    pipe = tiny_sd_pipeline(seed=0)
    scope: dict[str, object] = {"pipe": pipe}
    exec(compile(api_block(), str(README), "exec"), scope)
    eps, eps_safe = scope["eps"], scope["eps_safe"]
    assert isinstance(eps, torch.Tensor) and isinstance(eps_safe, torch.Tensor)
    assert eps_safe.shape == eps.shape and bool(torch.isfinite(eps_safe).all())
    record = scope["record"]
    assert record.applied.shape == (2,)  # type: ignore[attr-defined]
    assert isinstance(pipe.scheduler, SafeScheduler) and pipe.scheduler is scope["handle"]
    detach(pipe)
