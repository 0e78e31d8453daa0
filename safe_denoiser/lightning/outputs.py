"""The output folder of ``safe-denoiser predict``: layout, the record inside each PNG, and resuming.

``images/<stem>.png`` is the unit of work and the source of truth: each PNG carries its own record (the item and
everything that determines its pixels) in text chunks, and is renamed into place whole. ``metadata/rank<r>.jsonl``
holds one row per image (the record plus the rank and time, which stay out of the PNG so that its bytes do not
depend on them); it is an index that ``OutputFolder.prepare`` reconciles with the images on every start: rows of
missing, corrupt or to-be-regenerated images are dropped, duplicates kept once, and a row lost to a kill (between
the rename and the append, or mid-append) is rebuilt from its image. So after a kill at any point and a rerun,
there is exactly one row per finished image.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from safe_denoiser.files import atomic_write
from safe_denoiser.lightning.lock import FolderInUseError, FolderLock
from safe_denoiser.lightning.prompts import PromptItem, clip_text

__all__ = [
    "IMAGES",
    "METADATA",
    "RECORD_KEY",
    "SETTINGS_KEY",
    "VOLATILE_KEYS",
    "OutputFolder",
    "OutputFolderError",
    "SettingsMismatchError",
    "check_output_dir",
    "image_path",
    "metadata_rows",
    "read_image_record",
    "read_metadata",
]

IMAGES = "images"
METADATA = "metadata"
RECORD_KEY = "safe-denoiser"  # PNG text chunk: the item and its deterministic results (JSON)
SETTINGS_KEY = "settings"  # PNG text chunk: the run's settings (JSON, sorted keys)
VOLATILE_KEYS = ("seconds", "rank")  # row fields that vary from run to run: JSONL only, never in the PNG


class OutputFolderError(ValueError):
    """An output folder that cannot be used: not a folder, not writable."""


class SettingsMismatchError(ValueError):
    """A resumed folder holds images made with other settings (or for other prompts)."""


def image_path(output_dir: str | os.PathLike[str], item: PromptItem) -> Path:
    """Where ``item``'s image goes."""
    return Path(output_dir) / IMAGES / f"{item.stem}.png"


def metadata_path(output_dir: str | os.PathLike[str], rank: int) -> Path:
    """Rank ``rank``'s metadata file."""
    return Path(output_dir) / METADATA / f"rank{rank}.jsonl"


def read_image_record(path: Path) -> dict[str, Any] | None:
    """The row an image stands for (its record and settings), or None when the file is not a whole, valid PNG."""
    try:
        with Image.open(path) as im:
            text = dict(im.info)  # text chunks precede the pixel data, so they are read at open
            im.verify()  # checks every chunk's CRC up to IEND: a truncated or corrupt file fails here
        record = json.loads(text[RECORD_KEY])
        if not isinstance(record, dict):
            return None
        if SETTINGS_KEY in text:
            record[SETTINGS_KEY] = json.loads(text[SETTINGS_KEY])
        return record
    except (OSError, SyntaxError, ValueError, KeyError, TypeError):
        return None


def _read_rows(path: Path) -> tuple[list[dict[str, Any]], int]:
    """A JSONL file's whole, valid rows, and how many lines were dropped (a row cut short by a kill, garbage)."""
    rows: list[dict[str, Any]] = []
    dropped = 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            dropped += 1
            continue
        if isinstance(row, dict) and isinstance(row.get("file"), str):
            rows.append(row)
        else:
            dropped += 1
    return rows, dropped


def metadata_rows(output_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every rank's metadata rows, in file order (duplicates, if any, included)."""
    files = sorted((Path(output_dir) / METADATA).glob("rank*.jsonl"))
    return [row for f in files for row in _read_rows(f)[0]]


def read_metadata(output_dir: str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
    """All ranks' metadata rows, by item id."""
    return {row["id"]: row for row in metadata_rows(output_dir)}


def stable_part(row: Mapping[str, Any]) -> dict[str, Any]:
    """A row without its run-dependent fields: what its image records."""
    return {k: v for k, v in row.items() if k not in (*VOLATILE_KEYS, "recovered")}


def _json_normal(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples become lists), for comparisons with stored settings."""
    return json.loads(json.dumps(value, sort_keys=True))


def check_output_dir(output_dir: str | os.PathLike[str]) -> Path:
    """The folder, checked usable before anything is made: a folder (or creatable), writable where it will write.

    Nothing is created here; ``OutputFolder.prepare`` creates the folders once every check has passed.
    """
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"output_dir {str(out)!r} exists and is not a folder")
    for sub in (out / IMAGES, out / METADATA):
        if sub.exists() and not sub.is_dir():
            raise NotADirectoryError(f"output_dir {str(out)!r}: {sub.name!r} exists and is not a folder")
    probe = out
    while not probe.exists():  # the nearest existing ancestor is where the folders will be created
        probe = probe.parent
    targets = [probe] + [p for p in (out, out / IMAGES, out / METADATA) if p.exists()]
    targets += sorted((out / METADATA).glob("rank*.jsonl")) if (out / METADATA).is_dir() else []
    for target in targets:
        mode = os.W_OK | (os.X_OK if target.is_dir() else 0)
        if not os.access(target, mode):
            what = "folder" if target.is_dir() else "file"
            raise OutputFolderError(
                f"output_dir {str(out)!r}: the {what} {str(target)!r} is not writable by this user; fix its "
                "permissions or choose another data.output_dir"
            )
    return out


@dataclass
class Resume:
    """What ``OutputFolder.prepare`` found: the finished images (by file stem) and what it repaired."""

    finished: set[str] = field(default_factory=set)
    rebuilt_rows: int = 0
    dropped_rows: int = 0
    removed_temp_files: int = 0


class OutputFolder:
    """One rank's view of an output folder: the lock, start-up checks and repairs, and tidying after a failure.

    Rank 0 prepares the folder for the whole run (``prepare``); other ranks only ``lock`` it for their own files.
    """

    def __init__(self, output_dir: str | os.PathLike[str], rank: int = 0) -> None:
        self.root = Path(output_dir)
        self.rank = rank
        self.lock_ = FolderLock(self.root, f"rank{rank}")
        self._created: list[Path] = []
        self.wrote_any = False

    @property
    def temp_tag(self) -> str:
        """The tag in this process's temporary file names: rank and pid, so only their owner removes them."""
        return f"rank{self.rank}-pid{os.getpid()}"

    def lock(self) -> OutputFolder:
        """Check the folder, create what is missing, take this rank's lock and remove this rank's stale temp files."""
        check_output_dir(self.root)
        for folder in (self.root, self.root / IMAGES, self.root / METADATA):
            self._mkdir(folder)
        self.lock_.acquire()
        self._sweep_temp_files(self.rank)
        return self

    def _mkdir(self, folder: Path) -> None:
        missing = [p for p in (folder, *folder.parents) if not p.exists()]
        folder.mkdir(parents=True, exist_ok=True)
        self._created.extend(reversed(missing))

    def _sweep_temp_files(self, rank: int) -> int:
        """Remove rank ``rank``'s temporary files: their writer is dead, since that rank's lock is held here."""
        stale = [p for sub in (IMAGES, METADATA) for p in (self.root / sub).glob(f".*.rank{rank}-pid*.tmp")]
        stale += [p for sub in (IMAGES, METADATA) for p in (self.root / sub).glob(f".*.rank{rank}.tmp")]  # old name
        for p in stale:
            p.unlink(missing_ok=True)
        return len(stale)

    def prepare(
        self,
        items: Sequence[PromptItem],
        settings: Mapping[str, Any] | None = None,
        *,
        skip_existing: bool = True,
        overwrite: bool = False,
    ) -> Resume:
        """Lock, check the finished images against this run's settings and items, and reconcile the metadata.

        Images made with other settings (or for another prompt or seed under the same id) raise
        ``SettingsMismatchError`` naming the difference, unless ``overwrite``: then they are regenerated.
        Without ``skip_existing`` every item of ``items`` is regenerated (so only other images are compared).
        """
        self.lock()
        result = Resume()
        others = self._lock_other_ranks()
        try:
            result.removed_temp_files = sum(self._sweep_temp_files(r) for r in [self.rank, *others])
            images = {p.stem: read_image_record(p) for p in sorted((self.root / IMAGES).glob("*.png"))}
            by_stem = {it.stem: it for it in items}
            redo = set(by_stem) if not skip_existing else set()  # regenerated anyway: their differences do not matter
            problems = _mismatches({s: r for s, r in images.items() if s not in redo}, by_stem, settings)
            if problems and not overwrite:
                raise SettingsMismatchError(
                    f"output_dir {str(self.root)!r} holds images made differently from this run: "
                    + "; ".join(problems)
                    + ". Rerun with data.overwrite=true to regenerate them, or choose another data.output_dir"
                )
            if overwrite:
                redo |= {s for s, it in by_stem.items() if (rec := images.get(s)) and _differs(rec, it, settings)}
            result.rebuilt_rows, result.dropped_rows = self._reconcile(images, redo, [self.rank, *others])
            result.finished = {s for s, rec in images.items() if rec is not None and s not in redo}
        finally:
            for lock in others.values():
                lock.release()
        return result

    def _lock_other_ranks(self) -> dict[int, FolderLock]:
        """The locks of the other ranks that left files here (a previous run's), so that their files can be tidied."""
        ranks = {int(p.stem[4:]) for p in (self.root / METADATA).glob("rank*.jsonl") if p.stem[4:].isdigit()}
        n = len(".lock-rank")
        ranks |= {int(p.name[n:]) for p in self.root.glob(".lock-rank*") if p.name[n:].isdigit()}
        held: dict[int, FolderLock] = {}
        try:
            for r in sorted(ranks - {self.rank}):
                held[r] = FolderLock(self.root, f"rank{r}").acquire()
        except FolderInUseError:
            for lock in held.values():
                lock.release()
            raise
        return held

    def _reconcile(
        self, images: Mapping[str, dict[str, Any] | None], redo: set[str], ranks: Iterable[int]
    ) -> tuple[int, int]:
        """Exactly one row per finished image (not in ``redo``); rows rebuilt from images go to this rank's file."""
        kept: set[str] = set()
        dropped = 0
        for r in sorted(ranks):
            path = metadata_path(self.root, r)
            if not path.is_file():
                continue
            rows, bad = _read_rows(path)
            keep: list[dict[str, Any]] = []
            for row in rows:
                stem = Path(row["file"]).stem
                record = images.get(stem)
                if record is None or stem in redo or stem in kept or stable_part(row) != record:
                    continue
                kept.add(stem)
                keep.append(row)
            if bad or len(keep) != len(rows):
                dropped += bad + len(rows) - len(keep)
                self._rewrite(path, keep)
        rebuilt = [
            {**rec, "seconds": None, "rank": None, "recovered": True}
            for stem, rec in sorted(images.items())
            if rec is not None and stem not in redo and stem not in kept
        ]
        if rebuilt:
            mine = metadata_path(self.root, self.rank)
            self._rewrite(mine, (_read_rows(mine)[0] if mine.is_file() else []) + rebuilt)
        return len(rebuilt), dropped

    def _rewrite(self, path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
        text = "".join(json.dumps(row, allow_nan=False) + "\n" for row in rows)
        atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), self.temp_tag)

    def close(self) -> None:
        """Release the lock; when nothing was written, remove what this run created (a failed start leaves nothing)."""
        if not self.wrote_any and self._created and self.lock_.held:
            self.lock_.path.unlink(missing_ok=True)  # while held: nobody else can be using this one
            for folder in reversed(self._created):
                try:
                    folder.rmdir()  # only if empty
                except OSError:
                    break
        self._created = []
        self.lock_.release()


def _settings_differences(stored: Any, current: Mapping[str, Any]) -> list[str]:
    """``key: <stored> in the folder, <current> in this run`` for each setting that differs."""
    if not isinstance(stored, dict):
        return [f"settings: {clip_text(stored)} in the folder"]
    return _differences(stored, _json_normal(dict(current)), "")


def _differences(stored: Mapping[str, Any], now: Mapping[str, Any], prefix: str) -> list[str]:
    """One line per differing key; a section (guidance, SLD, SAFREE) present on both sides names its inner key,
    so that a long value is never clipped down to two texts that look alike."""
    found: list[str] = []
    for k in sorted(set(stored) | set(now)):
        old, new = stored.get(k), now.get(k)
        if old == new:
            continue
        if isinstance(old, dict) and isinstance(new, dict):
            found += _differences(old, new, f"{prefix}{k}.")
        else:
            found.append(f"setting {prefix + k!r}: {clip_text(old)} in the folder, {clip_text(new)} in this run")
    return found


def _item_differences(record: Mapping[str, Any], item: PromptItem) -> list[str]:
    """The item fields (id, prompt, seed, ...) of an image that differ from this run's item of the same file name."""
    want = _json_normal(item.to_dict())
    return [
        f"{k}: {clip_text(record.get(k))} in the image, {clip_text(v)} in this run's prompt set"
        for k, v in want.items()
        if k in record and record[k] != v  # images of older versions lack some fields
    ]


def _differs(record: Mapping[str, Any], item: PromptItem, settings: Mapping[str, Any] | None) -> bool:
    by_settings = settings is not None and bool(_settings_differences(record.get(SETTINGS_KEY), settings))
    return by_settings or bool(_item_differences(record, item))


def _mismatches(
    images: Mapping[str, dict[str, Any] | None], items: Mapping[str, PromptItem], settings: Mapping[str, Any] | None
) -> list[str]:
    """Human-readable differences between the folder's images and this run (at most a few, with counts)."""
    problems: dict[str, list[str]] = {}
    for stem, record in images.items():
        if record is None:
            continue
        found = _settings_differences(record.get(SETTINGS_KEY), settings) if settings is not None else []
        if stem in items:
            found += _item_differences(record, items[stem])
        for text in found:
            problems.setdefault(text, []).append(stem)
    return [f"{text} ({len(stems)} image(s), e.g. {clip_text(stems[0] + '.png')})" for text, stems in problems.items()][
        :8
    ]
