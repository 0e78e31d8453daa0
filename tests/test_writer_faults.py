"""Crash consistency of the output folder: a kill (SIGKILL of a forked writer) or an exception at each point of the
write path, then a rerun, gives 0 lost, 0 duplicated, 0 corrupt images and rows equal to a clean run's.

The writer runs on synthetic images (no model), so every fault point is hit exactly, and fast.
"""

from __future__ import annotations

import hashlib
import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import safe_denoiser.lightning.writer as writer_module
from safe_denoiser.lightning.data import PromptDataModule
from safe_denoiser.lightning.outputs import metadata_rows, read_image_record, stable_part
from safe_denoiser.lightning.prompts import PromptItem
from safe_denoiser.lightning.writer import GeneratedImage, ImageWriter

N_ITEMS = 7
BATCH = 3
SETTINGS = {"model": "synthetic", "num_inference_steps": 3, "guidance_scale": 7.5, "window": [0.0, 1000.0]}


class Crash(BaseException):
    """Stands for a crash in the raising variant (a BaseException, so nothing on the way catches it)."""


class _Trainer:
    global_rank = 0

    def __init__(self, datamodule: PromptDataModule) -> None:
        self.datamodule = datamodule


def pixels(item: PromptItem) -> np.ndarray:
    """The synthetic image of an item: a function of its seed only, like a real run's."""
    return np.random.default_rng(item.seed).integers(0, 256, (6, 5, 3), dtype=np.uint8)


def run(out: Path, prompts: Path) -> None:
    """One run as ``trainer.predict`` drives it: datamodule setup, writer setup, batches, teardown."""
    dm = PromptDataModule(str(prompts), str(out), batch_size=BATCH)
    dm.items, dm.skipped = dm.remaining_items(SETTINGS)
    writer = ImageWriter(str(out))
    trainer: Any = _Trainer(dm)
    writer.setup(trainer, None, "predict")  # type: ignore[arg-type]
    try:
        for batch in dm.predict_dataloader():
            info = [{"settings": SETTINGS, "correction_steps": it.seed % 4, "seconds": 0.25, "rank": 0} for it in batch]
            writer.write_images([GeneratedImage(it, pixels(it), i) for it, i in zip(batch, info, strict=True)])
    except BaseException as exc:
        writer.on_exception(trainer, None, exc)  # type: ignore[arg-type]
        raise
    writer.teardown(trainer, None, "predict")  # type: ignore[arg-type]
    dm.teardown("predict")


@pytest.fixture
def prompts(tmp_path: Path) -> Path:
    p = tmp_path / "prompts.csv"
    p.write_text("id,prompt,seed\n" + "".join(f"p{i},prompt {i},{10 + i}\n" for i in range(N_ITEMS)), encoding="utf-8")
    return p


def digests(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((out / "images").glob("*.png"))}


def assert_same_as_clean(out: Path, clean: Path) -> None:
    """0 lost, 0 corrupt (same bytes as a clean run), 0 duplicated rows, rows equal up to time and rank."""
    assert digests(out) == digests(clean)
    assert all(read_image_record(p) is not None for p in (out / "images").glob("*.png"))
    rows = metadata_rows(out)
    files = [r["file"] for r in rows]
    assert len(files) == len(set(files)) == N_ITEMS, files
    want = {r["file"]: stable_part(r) for r in metadata_rows(clean)}
    assert {r["file"]: stable_part(r) for r in rows} == want
    assert not [p for p in out.rglob("*.tmp")]


# ---- fault points: each wraps one step of the write path and dies on its n-th call -------------------------------
Die = Callable[[], None]


def _faulty_atomic_write(point: str, die: Die) -> Callable[..., Any]:
    real = writer_module.atomic_write

    def wrapped(path: Path, write: Callable[[Path], object], tag: str = "") -> Path:
        if point == "before_temp":
            die()
        if point == "after_temp":  # the temporary file is whole, the rename has not happened

            def write_then_die(tmp: Path) -> None:
                write(tmp)
                die()

            return real(path, write_then_die, tag)
        result = real(path, write, tag)
        die()  # after_rename: the image is in place, its row is not
        return result

    return wrapped


def _faulty_append(point: str, die: Die) -> Callable[[Path, str], None]:
    real = writer_module._append

    def wrapped(path: Path, text: str) -> None:
        if point == "inside_append":  # a row cut short: half the batch's bytes reached the file
            data = text.encode("utf-8")
            with path.open("ab") as f:
                f.write(data[: len(data) // 2])
            die()
        real(path, text)
        die()  # after_append

    return wrapped


POINTS = {  # fault point -> the call that dies (counted per wrapped function): inside the second batch
    "before_temp": 5,
    "after_temp": 5,
    "after_rename": 5,
    "inside_append": 2,
    "after_append": 2,
}


def _install(point: str, die_now: Die, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"n": 0}

    def die() -> None:
        calls["n"] += 1
        if calls["n"] == POINTS[point]:
            die_now()

    if point.endswith("append"):
        monkeypatch.setattr(writer_module, "_append", _faulty_append(point, die))
    else:
        monkeypatch.setattr(writer_module, "atomic_write", _faulty_atomic_write(point, die))


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("clean")
    p = root / "prompts.csv"
    p.write_text("id,prompt,seed\n" + "".join(f"p{i},prompt {i},{10 + i}\n" for i in range(N_ITEMS)), encoding="utf-8")
    run(root / "out", p)
    yield root / "out"


@pytest.mark.parametrize("point", list(POINTS))
def test_kill_at_each_point_then_rerun(
    point: str, prompts: Path, clean: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    pid = os.fork()
    if pid == 0:  # the child: run with the fault, die by SIGKILL at the point (no cleanup, no atexit)
        try:
            _install(point, lambda: os.kill(os.getpid(), signal.SIGKILL), monkeypatch)
            run(out, prompts)
        finally:
            os._exit(3)  # not reached when the fault fires
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, f"the fault at {point} did not fire"
    written = digests(out)
    assert 0 < len(written) < N_ITEMS or point == "before_temp"
    run(out, prompts)  # the rerun
    assert_same_as_clean(out, clean)
    # images finished before the kill were not redone
    assert all(digests(out)[name] == digest for name, digest in written.items())


@pytest.mark.parametrize("point", list(POINTS))
def test_exception_at_each_point_then_rerun(
    point: str, prompts: Path, clean: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"

    def crash() -> None:
        raise Crash(point)

    with monkeypatch.context() as m:
        _install(point, crash, m)
        with pytest.raises(Crash):
            run(out, prompts)
    run(out, prompts)
    assert_same_as_clean(out, clean)


def test_rows_rebuilt_from_images_say_so(prompts: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A row lost between the rename and the append comes back from the image, marked as recovered."""
    out = tmp_path / "out"

    def crash() -> None:
        raise Crash("after_rename")

    with monkeypatch.context() as m:
        _install("after_rename", crash, m)
        with pytest.raises(Crash):
            run(out, prompts)
    run(out, prompts)
    recovered = [r for r in metadata_rows(out) if r.get("recovered")]
    assert [r["file"] for r in recovered] == ["images/p3.png", "images/p4.png"]  # the second batch's renamed two
    assert all(r["seconds"] is None and r["rank"] is None for r in recovered)


def test_corrupt_image_is_regenerated_with_one_row(prompts: Path, clean: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    run(out, prompts)
    png = out / "images" / "p2.png"
    png.write_bytes(png.read_bytes()[:40])  # cut short by something else (a full disk, a copy)
    run(out, prompts)
    assert_same_as_clean(out, clean)


def test_partial_last_row_is_repaired_from_its_image(prompts: Path, clean: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    run(out, prompts)
    meta = out / "metadata" / "rank0.jsonl"
    text = meta.read_text(encoding="utf-8")
    meta.write_text(text[: len(text) - 30], encoding="utf-8")  # the last row cut mid-way
    run(out, prompts)
    assert_same_as_clean(out, clean)
    assert [r["file"] for r in metadata_rows(out) if r.get("recovered")] == ["images/p6.png"]


def test_rows_of_another_world_size_are_reconciled_too(prompts: Path, clean: Path, tmp_path: Path) -> None:
    """Rows left in rank1.jsonl by a two-process run (a duplicate, a row for a deleted image) are tidied."""
    out = tmp_path / "out"
    run(out, prompts)
    rows = (out / "metadata" / "rank0.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    (out / "metadata" / "rank1.jsonl").write_text(rows[0] + rows[5] + '{"id": "p', encoding="utf-8")
    (out / "images" / "p5.png").unlink()
    run(out, prompts)
    assert_same_as_clean(out, clean)


def test_resume_refuses_other_settings_and_names_them(prompts: Path, tmp_path: Path) -> None:
    from safe_denoiser.lightning.outputs import OutputFolder, SettingsMismatchError
    from safe_denoiser.lightning.prompts import load_prompts

    out = tmp_path / "out"
    run(out, prompts)
    items = load_prompts(prompts)
    other = {**SETTINGS, "guidance_scale": 5.0}
    folder = OutputFolder(out)
    with pytest.raises(SettingsMismatchError, match=r"setting 'guidance_scale': 7\.5 in the folder, 5\.0 in this run"):
        folder.prepare(items, other)
    folder.close()
    # the same id with another prompt is another image
    changed = [PromptItem(id=it.id, prompt="something else", seed=it.seed) if it.id == "p1" else it for it in items]
    with pytest.raises(SettingsMismatchError, match=r"prompt: 'prompt 1' in the image, 'something else'"):
        folder.prepare(changed, SETTINGS)
    folder.close()
    # told to overwrite: those images are to be generated again, and their rows are gone until they are
    resume = folder.prepare(changed, SETTINGS, overwrite=True)
    folder.close()
    assert resume.finished == {it.stem for it in items} - {"p1"}
    assert {r["id"] for r in metadata_rows(out)} == {it.id for it in items} - {"p1"}


def test_regenerating_everything_needs_no_overwrite(prompts: Path, tmp_path: Path) -> None:
    from safe_denoiser.lightning.outputs import OutputFolder
    from safe_denoiser.lightning.prompts import load_prompts

    out = tmp_path / "out"
    run(out, prompts)
    items = load_prompts(prompts)
    folder = OutputFolder(out)
    resume = folder.prepare(items, {**SETTINGS, "guidance_scale": 5.0}, skip_existing=False)
    folder.close()
    assert resume.finished == set() and metadata_rows(out) == []  # all to be made again, their rows gone
