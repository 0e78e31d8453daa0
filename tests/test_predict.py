"""trainer.predict end to end: same bytes for 1 or 2 processes and any batch size; kill and resume; bad input.

Runs go through the real command (``python -m safe_denoiser.cli predict``) in subprocesses: in-process "ddp"
would relaunch pytest.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from safe_denoiser import NegativeBank
from safe_denoiser.lightning.writer import read_metadata

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
        "--model.safe_denoiser={preset: theorem, eta: 0.5}",
        f"--data.prompts={prompts}",
        f"--data.output_dir={out}",
        "--trainer.accelerator=cpu",
        "--trainer.enable_progress_bar=false",
        *extra,
    ]


def run(cmd: list[str], timeout: float = 240) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
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
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
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
        ([*command(tmp_path / "o4", prompts, bank), "--model.safe_denoiser={preset: theorem, etaa: 1}"], "etaa"),
    ]
    for cmd, message in cases:
        res = run(cmd)
        assert res.returncode != 0
        assert message in res.stderr, res.stderr[-2000:]
    assert a_file.read_text(encoding="utf-8") == "keep me"
