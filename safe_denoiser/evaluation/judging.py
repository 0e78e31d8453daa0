"""Judge an ``ImageWriter`` folder incrementally: only images not yet judged are judged; a killed run resumes.

Results live beside the images in ``<run>/judgements/<judge>/``: ``judge.json`` (what identifies the judge's
scores) and ``part-<time>-<pid>.jsonl`` files, each written atomically once and never changed, one row per image
(``stem``, ``file``, ``size``, ``mtime_ns``, ``p_unsafe``, ``scores``, ``detail``). A kill loses at most the part
being judged; its temporary file is removed on the next run. An image whose size or modification time changed
since it was judged is judged again (the later row wins).
"""

from __future__ import annotations

import functools
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from safe_denoiser.evaluation.judges import Judge
from safe_denoiser.files import atomic_write, atomic_write_json
from safe_denoiser.lightning.writer import IMAGES

__all__ = ["JUDGEMENTS", "JudgeStats", "image_files", "judge_folder", "load_judgements", "read_image"]

JUDGEMENTS = "judgements"
_TAG = "judge"


@dataclass(frozen=True)
class JudgeStats:
    """What one ``judge_folder`` call did."""

    judged: int
    already: int
    unreadable: list[str]


def image_files(run_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """The run's PNGs by stem (an ``ImageWriter`` folder: ``images/<id>.png``)."""
    folder = Path(run_dir) / IMAGES
    if not folder.is_dir():
        raise NotADirectoryError(f"{str(run_dir)!r} is not an ImageWriter output folder: it has no {IMAGES}/ folder")
    return {p.stem: p for p in sorted(folder.glob("*.png")) if not p.name.startswith(".")}


def read_image(path: Path) -> np.ndarray | None:
    """RGB uint8 pixels, or None when the file is not a readable image."""
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except (OSError, SyntaxError, ValueError):
        return None


def _judge_dir(run_dir: str | os.PathLike[str], name: str) -> Path:
    return Path(run_dir) / JUDGEMENTS / name


def load_judgements(run_dir: str | os.PathLike[str], name: str) -> dict[str, dict[str, Any]]:
    """Every judged image's latest row, by stem."""
    rows: dict[str, dict[str, Any]] = {}
    folder = _judge_dir(run_dir, name)
    for part in sorted(folder.glob("part-*.jsonl")):
        for lineno, line in enumerate(part.read_text(encoding="utf-8").splitlines(), 1):
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(
                    f"{part} line {lineno}: not valid JSON ({exc.msg}); delete the file to rejudge"
                ) from exc
            rows[row["stem"]] = row
    return rows


def _check_identity(folder: Path, judge: Judge) -> None:
    """The folder's scores must come from the same judge model and settings (the threshold aside)."""
    ident = judge.describe()
    path = folder / "judge.json"
    if path.is_file():
        old = json.loads(path.read_text(encoding="utf-8"))
        differs = {k for k in set(old) | set(ident) if k != "threshold" and old.get(k) != ident.get(k)}
        if differs:
            raise ValueError(
                f"{path} records another {judge.name} setting ({', '.join(sorted(differs))} differ): its scores are "
                "not comparable; move that folder away to judge again with these settings"
            )
    else:
        atomic_write_json(path, ident)


def _stamp(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


def judge_folder(
    run_dir: str | os.PathLike[str],
    judge: Judge,
    part_size: int = 64,
    progress: Callable[[int, int], None] | None = None,
) -> JudgeStats:
    """Judge the images of ``run_dir`` not yet judged by ``judge``, ``part_size`` images per result file."""
    files = image_files(run_dir)
    folder = _judge_dir(run_dir, judge.name)
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob(f".*.{_TAG}.tmp"):  # a part being written when a run was killed
        stale.unlink()
    _check_identity(folder, judge)
    done = load_judgements(run_dir, judge.name)
    todo = []
    for stem, path in files.items():
        size, mtime = _stamp(path)
        row = done.get(stem)
        if row is None or row.get("size") != size or row.get("mtime_ns") != mtime:
            todo.append(stem)
    unreadable: list[str] = []
    judged = 0
    for start in range(0, len(todo), part_size):
        stems, images, stamps = [], [], []
        for stem in todo[start : start + part_size]:
            stamp = _stamp(files[stem])  # before reading: a file replaced meanwhile is judged again next time
            pixels = read_image(files[stem])
            if pixels is None:
                unreadable.append(stem)
                continue
            stems.append(stem)
            images.append(pixels)
            stamps.append(stamp)
        if not images:
            continue
        verdicts = judge.judge(images)
        if len(verdicts) != len(images):
            raise ValueError(f"judge {judge.name!r} returned {len(verdicts)} verdicts for {len(images)} images")
        lines = [
            json.dumps({"stem": s, "file": f"{IMAGES}/{files[s].name}", "size": st[0], "mtime_ns": st[1]} | v.to_dict())
            + "\n"
            for s, st, v in zip(stems, stamps, verdicts, strict=True)
        ]
        text = "".join(lines)
        name = f"part-{time.time_ns():020d}-{os.getpid()}.jsonl"
        atomic_write(folder / name, functools.partial(Path.write_text, data=text, encoding="utf-8"), _TAG)
        judged += len(images)
        if progress is not None:
            progress(judged, len(todo))
    return JudgeStats(judged=judged, already=len(files) - len(todo), unreadable=unreadable)
