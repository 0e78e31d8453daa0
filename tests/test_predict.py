"""trainer.predict end to end: same bytes for 1 or 2 processes and any batch size; kill and resume; bad input;
resume refuses a folder made with anything that shapes an image differently, naming it.

Runs go through the real command (``python -m safe_denoiser.cli predict``) in subprocesses (in-process "ddp"
would relaunch pytest), with ``SAFE_DENOISER_PLUGINS=safe_denoiser.testing`` so that they know the tiny test kinds.
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from safe_denoiser import NegativeBank
from safe_denoiser.lightning.writer import read_metadata
from safe_denoiser.models import PLUGINS_ENV

N_PROMPTS = 5  # not divisible by the world size of 2


def command(out: Path, prompts: Path, bank: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "safe_denoiser.cli",
        "predict",
        "--model.model=tiny-sd",
        "--model.num_inference_steps=3",
        "--model.height=32",
        "--model.width=32",
        f"--model.bank={bank}",
        "--model.safe_denoiser={preset: constant, beta: 0.5}",
        f"--data.prompts={prompts}",
        f"--data.output_dir={out}",
        "--trainer.accelerator=cpu",
        "--trainer.enable_progress_bar=false",
        *extra,
    ]


def run(cmd: list[str], timeout: float = 240) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", PLUGINS_ENV: "safe_denoiser.testing"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def digests(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((out / "images").glob("*.png"))}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("predict")
    prompts = root / "prompts.csv"
    rows = [f"p{i},a photo number {i},{100 + i}" for i in range(12)]
    prompts.write_text("case_number,prompt,evaluation_seed\n" + "\n".join(rows) + "\n", encoding="utf-8")
    bank = NegativeBank.from_tensor(torch.randn(16, 4, 16, 16, generator=torch.Generator().manual_seed(0)))
    return prompts, bank.save(root / "bank.safetensors")


@pytest.fixture(scope="module")
def reference(inputs: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """One process, batch size 1."""
    prompts, bank = inputs
    out = tmp_path_factory.mktemp("ref")
    res = run(command(out, prompts, bank, "--data.batch_size=1", f"--data.limit={N_PROMPTS}"))
    assert res.returncode == 0, res.stderr[-3000:]
    d = digests(out)
    assert len(d) == N_PROMPTS
    rows = read_metadata(out)
    assert set(rows) == {f"p{i}" for i in range(N_PROMPTS)}
    assert all(r["correction_steps"] == 3 for r in rows.values())  # the default window covers every step
    return d


def test_batch_size_does_not_change_bytes(inputs: tuple[Path, Path], reference: dict[str, str], tmp_path: Path) -> None:
    prompts, bank = inputs
    res = run(command(tmp_path, prompts, bank, "--data.batch_size=2", f"--data.limit={N_PROMPTS}"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert digests(tmp_path) == reference


def test_two_process_ddp_writes_the_same_bytes(
    inputs: tuple[Path, Path], reference: dict[str, str], tmp_path: Path
) -> None:
    prompts, bank = inputs
    extra = ("--trainer.devices=2", "--trainer.strategy=ddp", "--data.batch_size=2", f"--data.limit={N_PROMPTS}")
    res = run(command(tmp_path, prompts, bank, *extra))
    assert res.returncode == 0, res.stderr[-3000:]
    assert digests(tmp_path) == reference
    # every item once, split over both ranks
    ranks = sorted((tmp_path / "metadata").glob("rank*.jsonl"))
    assert [p.name for p in ranks] == ["rank0.jsonl", "rank1.jsonl"]
    ids = [line.split('"id": "')[1].split('"')[0] for p in ranks for line in p.read_text().splitlines()]
    assert sorted(ids) == [f"p{i}" for i in range(N_PROMPTS)]


def test_killed_run_resumes_without_redoing_or_clobbering(inputs: tuple[Path, Path], tmp_path: Path) -> None:
    prompts, bank = inputs
    cmd = command(tmp_path, prompts, bank, "--data.batch_size=1")
    env = {**os.environ, "OMP_NUM_THREADS": "1", PLUGINS_ENV: "safe_denoiser.testing"}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        deadline = time.monotonic() + 180
        while len(list((tmp_path / "images").glob("*.png"))) < 3:
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline, "no images appeared in time"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    first = {p.name: (p.stat().st_mtime_ns, p.stat().st_ino) for p in (tmp_path / "images").glob("*.png")}
    assert 3 <= len(first) < 12
    res = run(command(tmp_path, prompts, bank, "--data.batch_size=1"))
    assert res.returncode == 0, res.stderr[-3000:]
    after = {p.name: (p.stat().st_mtime_ns, p.stat().st_ino) for p in (tmp_path / "images").glob("*.png")}
    assert len(after) == 12
    assert all(after[name] == stamp for name, stamp in first.items())  # finished images untouched
    assert not list((tmp_path / "images").glob(".*.tmp"))
    # all valid, and equal to a clean run's bytes for the same items
    clean = tmp_path / "clean"
    assert run(command(clean, prompts, bank, "--data.batch_size=4")).returncode == 0
    assert digests(tmp_path) == digests(clean)
    assert set(read_metadata(tmp_path)) == {f"p{i}" for i in range(12)}


def test_bad_input_gives_clear_errors(inputs: tuple[Path, Path], tmp_path: Path) -> None:
    prompts, bank = inputs
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text("text_column\nx\n", encoding="utf-8")
    a_file = tmp_path / "a_file"
    a_file.write_text("keep me", encoding="utf-8")
    cases = [
        (command(tmp_path / "o1", bad_csv, bank), "no prompt column"),
        (command(a_file, prompts, bank), "is not a folder"),
        ([*command(tmp_path / "o2", prompts, bank), "--model.no_such_key=1"], "no_such_key"),
        (command(tmp_path / "o3", prompts, tmp_path / "missing.safetensors"), "does not exist"),
        ([*command(tmp_path / "o4", prompts, bank), "--model.safe_denoiser={preset: constant, betaa: 1}"], "betaa"),
    ]
    for cmd, message in cases:
        res = run(cmd)
        assert res.returncode != 0
        assert message in res.stderr, res.stderr[-2000:]
    assert a_file.read_text(encoding="utf-8") == "keep me"


# ---- resume: everything that shapes an image is compared, and a difference is named -----------------------------
def _bank(path: Path, seed: int, rows: int = 6) -> str:
    data = torch.randn(rows, 4, 16, 16, generator=torch.Generator().manual_seed(seed))
    return str(NegativeBank.from_tensor(data).save(path))


@pytest.fixture
def banks(tmp_path: Path) -> dict[str, str]:
    weights = tmp_path / "unet.safetensors"
    weights.write_bytes(b"not read by the tiny kind: hashed only")
    other = tmp_path / "other_unet.safetensors"
    other.write_bytes(b"other weights")
    return {
        "bank": _bank(tmp_path / "bank.safetensors", 0),
        "reference": _bank(tmp_path / "reference.safetensors", 1),
        "other": _bank(tmp_path / "other.safetensors", 2),
        "unet": str(weights),
        "other_unet": str(other),
    }


def base_section(banks: dict[str, str]) -> dict[str, Any]:
    return {
        "model": "tiny-sd",
        "num_inference_steps": 3,
        "height": 32,
        "width": 32,
        "bank": banks["bank"],
        "reference_bank": banks["reference"],
        "safe_denoiser": {"preset": "odds", "odds_scale": 2.0},
    }


def _folder_kind(name: str) -> str:
    """``name`` registered again as a folder kind (its folder is never read), which takes ``model_dir`` and
    ``unet_weights``: the kinds without a folder refuse them."""
    import dataclasses

    from safe_denoiser.models.registry import model_kind, register_model_kind

    return register_model_kind(dataclasses.replace(model_kind(name), name=f"{name}-folder", needs_model_dir=True)).name


# field -> a change of it (given the banks), and the setting the refusal names
CHANGES: dict[str, tuple[Any, str]] = {
    "model": (lambda b: {"model": _folder_kind("tiny-sdxl")}, "model"),
    "model_dir": (lambda b: {"model_dir": "/elsewhere"}, "model_dir"),
    "unet_weights": (lambda b: {"unet_weights": b["other_unet"]}, "unet_weights"),
    "scheduler": (lambda b: {"scheduler": "euler"}, "scheduler"),
    "num_inference_steps": (lambda b: {"num_inference_steps": 4}, "num_inference_steps"),
    "guidance_scale": (lambda b: {"guidance_scale": 3.0}, "guidance_scale"),
    "height": (lambda b: {"height": 16}, "height"),
    "width": (lambda b: {"width": 16}, "width"),
    "negative_prompt": (lambda b: {"negative_prompt": "blurry"}, "negative_prompt"),
    "bank": (lambda b: {"bank": b["other"]}, "bank"),
    "reference_bank": (lambda b: {"reference_bank": b["other"]}, "reference_bank"),
    "safe_denoiser": (lambda b: {"safe_denoiser": {"preset": "odds", "odds_scale": 3.0}}, "safe_denoiser.odds_scale"),
    "sld": (lambda b: {"sld": "medium"}, "sld"),
    "sld_concept": (lambda b: {"sld_concept": "a cat"}, "sld_concept"),
    "safree": (lambda b: {"safree": {}}, "safree"),
    "seed": (lambda b: {"seed": 1}, "seed"),
    "batch_invariant": (lambda b: {"batch_invariant": False}, "batch_invariant"),
}


def test_every_field_of_the_run_is_recorded_and_has_a_resume_case() -> None:
    import dataclasses

    from safe_denoiser.models import PRECISION_SETTING, ModelConfig

    names = [f.name for f in dataclasses.fields(ModelConfig)]
    assert sorted(CHANGES) == sorted(names)  # a new field needs its case here
    assert list(ModelConfig().image_settings(None, "32-true")) == [*names, PRECISION_SETTING]
    from safe_denoiser.lightning.module import SafeDiffusionModule

    config = ModelConfig(model="tiny-sd", guidance_scale=3.0)
    assert SafeDiffusionModule.from_config(config).config == config  # the module holds the config whole


def folder_with_one_image(out: Path, settings: dict[str, Any]) -> tuple[Any, list[Any]]:
    """A folder holding one (synthetic) image recorded with ``settings``, as a run writes it."""
    import numpy as np

    from safe_denoiser.lightning.data import PromptDataModule
    from safe_denoiser.lightning.prompts import PromptItem
    from safe_denoiser.lightning.writer import GeneratedImage, ImageWriter

    items = [PromptItem("p0", "a cat", 7)]
    dm = PromptDataModule("unused.txt", str(out))
    writer = ImageWriter(str(out))
    trainer: Any = type("T", (), {"global_rank": 0, "datamodule": None})()
    writer.setup(trainer, None, "predict")  # type: ignore[arg-type]
    writer.write_images([GeneratedImage(items[0], np.zeros((4, 4), np.uint8), {"settings": settings})])
    writer.teardown(trainer, None, "predict")  # type: ignore[arg-type]
    return dm, items


@pytest.mark.parametrize("field", sorted(CHANGES))
def test_resume_refuses_each_image_shaping_change_naming_it(field: str, banks: dict[str, str], tmp_path: Path) -> None:
    from safe_denoiser.lightning.module import SafeDiffusionModule
    from safe_denoiser.lightning.outputs import OutputFolder, SettingsMismatchError

    before = {
        **base_section(banks),
        "model": _folder_kind("tiny-sd"),
        "model_dir": "/here",
        "unet_weights": banks["unet"],
    }
    change, named = CHANGES[field]
    out = tmp_path / "out"
    _, items = folder_with_one_image(out, SafeDiffusionModule(**before).settings())
    after = SafeDiffusionModule(**{**before, **change(banks)}).settings()
    folder = OutputFolder(out)
    with pytest.raises(SettingsMismatchError, match=rf"setting '{re.escape(named)}': .* in the folder, .* in this run"):
        folder.prepare(items, after)
    folder.close()
    assert OutputFolder(out).prepare(items, SafeDiffusionModule(**before).settings()).finished == {"p0"}


def test_resume_refuses_another_precision(banks: dict[str, str], tmp_path: Path) -> None:
    from safe_denoiser.lightning.outputs import OutputFolder, SettingsMismatchError
    from safe_denoiser.models import ModelConfig

    config = ModelConfig(**base_section(banks))
    loaded = config.load_banks()
    _, items = folder_with_one_image(tmp_path / "out", config.image_settings(loaded, "32-true"))
    with pytest.raises(SettingsMismatchError, match=r"setting 'trainer\.precision': '32-true' in the folder, 'bf16"):
        OutputFolder(tmp_path / "out").prepare(items, config.image_settings(loaded, "bf16-mixed"))


def in_process(out: Path, prompts: Path, bank: str, *extra: str) -> int:
    from safe_denoiser.cli import main

    cmd = command(out, prompts, Path(bank), "--data.batch_size=2", "--data.limit=3", *extra)
    return main(cmd[3:])  # without "python -m safe_denoiser.cli"


def test_a_bank_replaced_under_the_same_path_is_refused_and_an_unchanged_rerun_redoes_nothing(
    inputs: tuple[Path, Path], tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    prompts, _ = inputs
    bank = _bank(tmp_path / "bank.safetensors", 0, rows=16)
    out = tmp_path / "out"
    assert in_process(out, prompts, bank) == 0
    stamps = {p.name: (p.stat().st_mtime_ns, p.stat().st_ino) for p in (out / "images").glob("*.png")}
    rows = (out / "metadata" / "rank0.jsonl").read_text(encoding="utf-8")
    assert len(stamps) == 3
    assert in_process(out, prompts, bank) == 0  # unchanged: resumes, nothing made again
    assert {p.name: (p.stat().st_mtime_ns, p.stat().st_ino) for p in (out / "images").glob("*.png")} == stamps
    assert (out / "metadata" / "rank0.jsonl").read_text(encoding="utf-8") == rows
    capfd.readouterr()
    _bank(tmp_path / "bank.safetensors", 5, rows=16)  # other content, same path
    assert in_process(out, prompts, bank) == 2
    err = capfd.readouterr().err
    assert "holds images made differently from this run: setting 'bank': 'sha256:" in err, err[-2000:]
    assert {p.name: (p.stat().st_mtime_ns, p.stat().st_ino) for p in (out / "images").glob("*.png")} == stamps
