"""Hostile inputs to the prompt readers, output paths, ``bank``, ``prompts``, ``report`` and ``export``: each is a
one-line error naming the field, flag, file or path and the expected form (exit code 2), and nothing already written
is lost or left half-written."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from safe_denoiser import cli
from safe_denoiser.core.bank import MAX_MEAN_SQUARE, BankError, NegativeBank
from safe_denoiser.devices import torch_device
from safe_denoiser.evaluation.prompt_sets import load_prompt_set
from safe_denoiser.files import OutputPathError, atomic_write, atomic_write_json, check_out_dir, check_out_file
from safe_denoiser.lightning.prompts import PromptSetError, load_prompts

BIG_FIELD = "a" * 200_000  # over csv.field_size_limit() (131072)
DEEP_JSON = "[" * 100_000 + "]" * 100_000  # deeper than Python's recursion limit


def _write(tmp_path: Path, name: str, body: str) -> Path:
    path = tmp_path / name
    path.write_text(body, encoding="utf-8")
    return path


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    rc = cli.main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return rc, err


# ---- prompt files: predict's reader and the public prompt-set loaders ----------------------------------------------
PREDICT_CASES = [
    ("big.csv", f'prompt,seed\n"{BIG_FIELD}",1\n', r"big\.csv line 2: a field is longer than 131072 characters"),
    ("more.csv", "prompt,seed\nx,1\ny,2,3\n", r"more\.csv line 3: 3 fields, the header has 2; expected one field"),
    ("fewer.csv", "prompt,seed\nx,1\ny\n", r"fewer\.csv line 3: 1 fields, the header has 2"),
    ("deep.jsonl", '{"prompt": "x"}\n' + DEEP_JSON + "\n", r"deep\.jsonl line 2: JSON nested deeper than Python can"),
    ("list.jsonl", '{"prompt": ["x"]}\n', r"list\.jsonl line 1: prompt must be a string or a number, got a JSON list"),
]


@pytest.mark.parametrize(("name", "body", "message"), PREDICT_CASES)
def test_predict_prompt_reader_refuses(tmp_path: Path, name: str, body: str, message: str) -> None:
    with pytest.raises(PromptSetError, match=message):
        load_prompts(_write(tmp_path, name, body))


def test_a_quoted_field_over_several_lines_is_one_row(tmp_path: Path) -> None:
    # the line number of a later row counts physical lines (the ragged-row check must not split quoted fields)
    path = _write(tmp_path, "p.csv", 'prompt,seed\n"two\nlines",1\ny,2,3\n')
    with pytest.raises(PromptSetError, match=r"p\.csv line 4: 3 fields"):
        load_prompts(path)
    assert [it.prompt for it in load_prompts(_write(tmp_path, "q.csv", 'prompt,seed\n"two\nlines",1\n'))] == [
        "two\nlines"
    ]


@pytest.mark.parametrize("kind", ["ring-a-bell", "mma-diffusion", "coco"])
@pytest.mark.parametrize(("name", "body", "message"), PREDICT_CASES[:3])
def test_prompt_set_loaders_refuse(tmp_path: Path, kind: str, name: str, body: str, message: str) -> None:
    with pytest.raises(PromptSetError, match=message):
        load_prompt_set(kind, _write(tmp_path, name, body))


def test_prompts_command_refuses_deep_json_and_keeps_the_old_output(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = _write(tmp_path, "out.jsonl", "earlier output\n")
    deep = _write(tmp_path, "captions.json", DEEP_JSON)
    rc, err = _run(["prompts", "coco", str(deep), "--out", str(out)], capsys)
    assert rc == 2 and "captions.json (a COCO captions JSON file): JSON nested deeper" in err
    subset = _write(tmp_path, "subset.txt", DEEP_JSON + "\n")
    csv = _write(tmp_path, "c.csv", "prompt,image_id\ncat,1\n")
    rc, err = _run(["prompts", "coco", str(csv), "--subset", str(subset), "--out", str(out)], capsys)
    assert rc == 2 and "is not a COCO image id" in err and len(err) < 400  # the value is clipped
    assert out.read_text() == "earlier output\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.csv", "captions.json", "out.jsonl", "subset.txt"]


def test_prompts_command_flags(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = _write(tmp_path, "p.csv", "prompt,evaluation_seed\nx,1\n")
    rc, err = _run(["prompts", "ring-a-bell", str(good), "--out", str(tmp_path)], capsys)
    assert rc == 2 and f"cannot write {str(tmp_path)!r}: it is a folder; expected a file path" in err
    rc, err = _run(
        ["prompts", "unlearndiffatk", str(good), "--out", str(tmp_path / "o.jsonl"), "--category", "x"], capsys
    )
    assert rc == 2 and "--category applies to the i2p format only, got format 'unlearndiffatk'" in err
    rc, err = _run(["prompts", "ring-a-bell", str(good), "--out", str(tmp_path / "o.jsonl"), "--subset", "s"], capsys)
    assert rc == 2 and "--subset applies to the coco format only" in err
    assert not (tmp_path / "o.jsonl").exists()


# ---- output paths ------------------------------------------------------------------------------------------------
def _fail(code: int) -> Any:
    def raise_(*args: Any, **kwargs: Any) -> None:
        raise OSError(code, os.strerror(code), str(args[0]) if args else None)

    return raise_


@pytest.mark.parametrize(
    ("code", "reason"),
    [
        (errno.EROFS, "the file system is read-only"),
        (errno.EACCES, "permission denied"),
        (errno.ENOSPC, "no space left on the device"),
        (errno.ENAMETOOLONG, "the name is too long; expected at most"),
    ],
)
@pytest.mark.parametrize("where", ["mkstemp", "replace"])
def test_atomic_write_errors_name_the_path_and_keep_the_target(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int, reason: str, where: str
) -> None:
    import tempfile

    target = _write(tmp_path, "result.json", '{"old": 1}\n')
    monkeypatch.setattr(*((tempfile, "mkstemp") if where == "mkstemp" else (os, "replace")), _fail(code))
    with pytest.raises(OutputPathError, match=f"cannot write '{target}': {reason}") as info:
        atomic_write_json(target, {"new": 2})
    assert info.value.errno == code and isinstance(info.value, OSError)
    assert target.read_text() == '{"old": 1}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.json"]  # no temporary file left


def test_an_error_reading_another_file_is_not_blamed_on_the_output(tmp_path: Path) -> None:
    def write(tmp: Path) -> None:
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "input.bin"))

    with pytest.raises(PermissionError) as info:
        atomic_write(tmp_path / "out.bin", write)
    assert not isinstance(info.value, OutputPathError)
    assert list(tmp_path.iterdir()) == []


def test_long_names_folders_and_files_in_the_way(tmp_path: Path) -> None:
    name = "n" * 250 + ".json"  # 255 bytes: allowed, although the temporary name is longer than that would be
    assert atomic_write_json(tmp_path / name, [1]).read_text() == "[\n  1\n]\n"
    too_long = tmp_path / ("n" * 300 + ".json")
    for check in (check_out_file, check_out_dir, lambda p: atomic_write_json(p, [1])):
        with pytest.raises(OutputPathError, match=r"the name is too long; expected at most 255 bytes per name"):
            check(too_long)
    with pytest.raises(OutputPathError, match="it is a folder; expected a file path"):
        atomic_write_json(tmp_path, [1])
    blocker = _write(tmp_path, "file", "x")
    with pytest.raises(OutputPathError, match="a part of it is a file, not a folder"):
        check_out_file(blocker / "sub" / "out.json")
    with pytest.raises(OutputPathError, match="a part of it is a file, not a folder"):
        atomic_write_json(blocker / "out.json", [1])
    assert blocker.read_text() == "x"


def test_read_only_and_unwritable_places_are_refused_before_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_statvfs = os.statvfs

    class ReadOnly:
        def __init__(self, path: Any) -> None:
            self.f_flag = real_statvfs(path).f_flag | os.ST_RDONLY

    monkeypatch.setattr(os, "statvfs", ReadOnly)
    with pytest.raises(OutputPathError, match=f"cannot write '{tmp_path}/new/out': the file system is read-only"):
        check_out_dir(tmp_path / "new" / "out")
    monkeypatch.setattr(os, "statvfs", real_statvfs)
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(OutputPathError, match="permission denied; expected a folder this user may write to"):
        check_out_file(tmp_path / "b.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_the_command_prints_an_output_error_as_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    good = _write(tmp_path, "p.csv", "prompt\nx\n")
    monkeypatch.setattr(os, "replace", _fail(errno.EROFS))
    rc, err = _run(["prompts", "ring-a-bell", str(good), "--out", str(tmp_path / "o.jsonl")], capsys)
    assert rc == 2
    assert err.strip().splitlines() == [
        f"safe-denoiser prompts: error: cannot write '{tmp_path}/o.jsonl': the file system is read-only; "
        "expected a path on a writable file system"
    ]


# ---- devices and banks -------------------------------------------------------------------------------------------
def test_devices_are_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert torch_device("cpu", "--device") == torch.device("cpu")
    with pytest.raises(ValueError, match="--device 'cuda': this machine has no CUDA device"):
        torch_device("cuda", "--device")
    for bad in ("foo", "", "meta", "cuda:x"):
        with pytest.raises(
            ValueError, match=f"--device must be a torch device such as cpu, cuda, cuda:1 or mps, got {bad!r}"
        ):
            torch_device(bad, "--device")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert torch_device("cuda:1").index == 1
    with pytest.raises(ValueError, match="this machine has 2 CUDA device"):
        torch_device("cuda:2")


@pytest.mark.parametrize(("device", "message"), [("cuda", "has no CUDA device"), ("foo", "must be a torch device")])
def test_bank_build_device(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], device: str, message: str
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    (tmp_path / "imgs").mkdir()
    out = tmp_path / "b.safetensors"
    argv = ["bank", "build", "--images", str(tmp_path / "imgs"), "--vae", str(tmp_path), "--out", str(out)]
    rc, err = _run([*argv, "--device", device], capsys)
    assert rc == 2 and message in err and repr(device) in err and not out.exists()


def test_bank_build_bounds_and_unwritable_out(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "imgs").mkdir()
    argv = ["bank", "build", "--images", str(tmp_path / "imgs"), "--vae", str(tmp_path)]
    rc, err = _run([*argv, "--out", str(tmp_path / "b.safetensors"), "--size", "100000000"], capsys)
    assert rc == 2 and "--size must be a positive multiple of 8 up to 8192, got 100000000" in err
    rc, err = _run([*argv, "--out", str(tmp_path / "b.safetensors"), "--batch-size", "0"], capsys)
    assert rc == 2 and "--batch-size must be a positive int, got 0" in err
    rc, err = _run([*argv, "--out", str(tmp_path / ("b" * 300 + ".safetensors"))], capsys)
    assert rc == 2 and "the name is too long" in err


def test_a_bank_too_large_for_float32_distances_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # MAX_MEAN_SQUARE = 1 / eps32 = 2^23: below it one float32 ulp of ||y||^2 is smaller than a unit-scale sample's
    # ||x||^2 = D. Values 1e15 (the hostile case: finite squared norms, 1e30 per element) are far beyond it.
    assert MAX_MEAN_SQUARE == 2.0**23
    with pytest.raises(
        BankError, match=r"too large for float32 kernel distances: .* mean square per element is 1e\+30"
    ):
        NegativeBank.from_tensor(torch.full((3, 4, 8, 8), 1e15))
    rms = MAX_MEAN_SQUARE**0.5
    NegativeBank.from_tensor(torch.full((2, 16), 0.99 * rms))  # just inside: accepted
    with pytest.raises(BankError, match=r"expected below 8\.39e\+06"):
        NegativeBank.from_tensor(torch.cat([torch.zeros(1, 16), torch.full((1, 16), 1.01 * rms)]))  # one bad item
    with pytest.raises(BankError, match="overflow float32"):  # beyond float32's range: the earlier message
        NegativeBank(torch.full((2, 4), 1e20))
    # a file holding such values (written around the constructor) is refused on load, naming the file
    from safetensors.torch import save_file

    path = tmp_path / "huge.safetensors"
    meta = {"format": "safe-denoiser.negative-bank/1", "count": "3", "sample_shape": "[64]"}
    save_file({"bank": torch.full((3, 64), 1e15)}, str(path), metadata=meta)
    with pytest.raises(BankError, match=f"bank file '{path}': bank values are too large"):
        NegativeBank.load(path)
    rc, err = _run(["bank", "info", str(path)], capsys)
    assert rc == 2 and "too large for float32 kernel distances" in err


# ---- report and export -------------------------------------------------------------------------------------------
def test_report_flags(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "run" / "images").mkdir(parents=True)
    run = ["--run", "A", "coco", str(tmp_path / "run")]
    blocker = _write(tmp_path, "file", "x")
    rc, err = _run(["report", *run, "--out", str(blocker), "--no-judge"], capsys)
    assert rc == 2 and "is a file; expected a directory" in err
    rc, err = _run(["report", *run, "--out", str(tmp_path / ("r" * 300)), "--no-judge"], capsys)
    assert rc == 2 and "the name is too long" in err
    rc, err = _run(["report", *run, "--out", str(tmp_path / "r"), "--judge", "os:path"], capsys)
    assert rc == 2 and "judge 'os:path' is a module; expected a factory" in err
    rc, err = _run(["report", *run, "--out", str(tmp_path / "r"), "--no-judge", "--image-size", "0"], capsys)
    assert rc == 2 and "--image-size must be a positive int (pixels), got 0" in err
    clip = ["--clip", str(tmp_path), "--device", "foo"]
    rc, err = _run(["report", *run, "--out", str(tmp_path / "r"), "--no-judge", *clip], capsys)
    assert rc == 2 and "--device must be a torch device" in err
    assert not (tmp_path / "r").exists()


def test_export_refuses_a_window_that_never_fires_and_bad_yaml(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _write(
        tmp_path,
        "win.yaml",
        "model:\n  model: demo\n  scheduler: ddim\n  num_inference_steps: 4\n  bank: bundled\n"
        "  safe_denoiser:\n    preset: constant\n    beta: 1.0\n    window: [2000, 3000]\n",
    )
    out = tmp_path / "bundle"
    rc, err = _run(["export", "--config", str(config), "--out", str(out)], capsys)
    assert rc == 2, err
    assert "model.safe_denoiser.window must contain at least one sampled timestep, got [2000, 3000]" in err
    assert "the 4 steps sample timesteps 249..999" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["win.yaml"]  # no bundle, no staging folder
    broken = _write(tmp_path, "broken.yaml", "model:\n  model: demo\n   bad: [\n")
    rc, err = _run(["export", "--config", str(broken), "--out", str(out)], capsys)
    assert (
        rc == 2 and f"--config {str(broken)!r} is not valid YAML (mapping values are not allowed here at line 3" in err
    )
    assert len(err.strip().splitlines()) == 1
