"""Atomic file writes: a temporary file in the same folder, then a rename, so readers never see half a file.

A path that cannot be written (read-only file system, no permission, a name too long, a folder in the way, a full
disk) raises ``OutputPathError`` naming the path and the reason, which the ``safe-denoiser`` command prints as one
line; the target is untouched and no temporary file is left behind.
"""

from __future__ import annotations

import csv
import errno
import io
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = [
    "OutputPathError",
    "atomic_write",
    "atomic_write_csv",
    "atomic_write_json",
    "check_out_dir",
    "check_out_file",
    "check_place",
    "staging_dir",
]

TEMP_STEM = 64  # characters of the target's name kept in a temporary name (the rest would overflow NAME_MAX)

# errno -> why the path cannot be written and what is expected instead
_REASONS = {
    errno.EROFS: "the file system is read-only; expected a path on a writable file system",
    errno.EACCES: "permission denied; expected a folder this user may write to",
    errno.EPERM: "operation not permitted; expected a folder this user may write to",
    errno.ENAMETOOLONG: "the name is too long; expected at most {name_max} bytes per name and {path_max} per path",
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "the disk quota is exhausted",
    errno.EFBIG: "the file is larger than the file system allows",
    errno.EISDIR: "it is a folder; expected a file path",
    errno.ENOTDIR: "a part of it is a file, not a folder; expected a path through folders",
    errno.EEXIST: "a part of it is a file, not a folder; expected a path through folders",
    errno.ELOOP: "it has too many symbolic links",
    errno.ENOENT: "its folder does not accept new files",
}


class OutputPathError(OSError):
    """An output path that cannot be written: ``cannot write '<path>': <reason>``."""

    def __init__(self, path: str | os.PathLike[str], reason: str, code: int = 0) -> None:
        super().__init__(code, f"cannot write {_clip(str(path))!r}: {reason}")
        self.path = Path(path)

    def __str__(self) -> str:
        return str(self.strerror)


def _clip(text: str, limit: int = 200) -> str:
    """The path, cut in the middle when longer than ``limit`` characters (a too-long name is itself the error)."""
    return text if len(text) <= limit else f"{text[:100]}...{text[-90:]} ({len(text)} characters)"


def _limit(folder: Path, name: str, default: int) -> int:
    """``os.pathconf`` limit ``name`` of the file system holding ``folder`` (its nearest existing ancestor)."""
    for parent in (folder, *folder.parents):
        try:
            return int(os.pathconf(parent, name))
        except (OSError, ValueError):
            continue
    return default


def _refusal(path: Path, code: int) -> OutputPathError:
    limits = {"name_max": _limit(path.parent, "PC_NAME_MAX", 255), "path_max": _limit(path.parent, "PC_PATH_MAX", 4096)}
    return OutputPathError(path, _REASONS[code].format(**limits), code)


@contextmanager
def _output(path: Path, files: tuple[str, ...] | None = None) -> Iterator[None]:
    """Turn a file-system error about writing ``path`` into ``OutputPathError`` naming it; with ``files``, only
    errors about those files (or about no file: a full disk) are turned (a writer may also read other files)."""
    try:
        yield
    except OutputPathError:
        raise
    except OSError as exc:
        if exc.errno not in _REASONS or (files is not None and exc.filename not in (None, *files)):
            raise
        raise _refusal(path, exc.errno) from exc


def _umask() -> int:
    """The process's umask (read by setting and restoring it)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], object], tag: str = "") -> Path:
    """``write(tmp)`` then ``os.replace(tmp, path)``; the temporary file is removed if anything fails.

    ``tag`` goes into the temporary name (``.<name>.<random>.<tag>.tmp``) so a writer can find its own leftovers.
    Raises ``OutputPathError`` when ``path`` cannot be written (the target is left as it was).
    """
    out = Path(path)
    with _output(out):
        if out.is_dir():  # os.replace would say so only after the temporary file is written
            raise _refusal(out, errno.EISDIR)
        out.parent.mkdir(parents=True, exist_ok=True)
        prefix = f".{out.name[:TEMP_STEM]}."
        fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=f".{tag}.tmp" if tag else ".tmp", dir=out.parent)
    os.close(fd)
    try:
        with _output(out, (tmp, str(out))):
            write(Path(tmp))
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; results are meant to be shared
            os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def atomic_write_json(path: str | os.PathLike[str], data: Any) -> Path:
    """JSON (indented, trailing newline) written with ``atomic_write``."""
    text = json.dumps(data, indent=2) + "\n"
    return atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def atomic_write_csv(path: str | os.PathLike[str], columns: Sequence[str], rows: Iterable[Mapping[str, str]]) -> Path:
    """CSV with the header ``columns`` and one line per mapping (LF line ends), written with ``atomic_write``: the
    same rows give the same bytes."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    text = buffer.getvalue()
    return atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def check_out_dir(path: str | os.PathLike[str]) -> Path:
    """``path`` as an output folder: a directory or not there yet, in a place that can be written (``check_place``).
    Nothing is created."""
    out = Path(path)
    with _output(out):
        if out.exists() and not out.is_dir():
            raise NotADirectoryError(
                f"output folder {str(out)!r} is a file; expected a directory (existing or to be created)"
            )
    return check_place(out)


def check_out_file(path: str | os.PathLike[str]) -> Path:
    """``path`` as a file to write later: not a folder, in a place that can be written (``check_place``)."""
    out = Path(path)
    with _output(out):
        if out.is_dir():
            raise _refusal(out, errno.EISDIR)
    return check_place(out)


def check_place(out: Path) -> Path:
    """Raise ``OutputPathError`` now, before slow work, if ``out`` could not be created: a name or path the file
    system cannot hold, a file where a folder is needed, a read-only file system, a folder this user cannot write."""
    with _output(out):
        name_max, path_max = _limit(out.parent, "PC_NAME_MAX", 255), _limit(out.parent, "PC_PATH_MAX", 4096)
        if len(os.fsencode(out.name)) > name_max or len(os.fsencode(out.absolute())) >= path_max:
            raise _refusal(out, errno.ENAMETOOLONG)
        # where new entries go: inside an existing folder ``out``, else in the nearest existing folder above it
        folder = out if out.is_dir() else next(p for p in out.absolute().parents if p.exists())
        if not folder.is_dir():
            raise _refusal(out, errno.ENOTDIR)
        if os.statvfs(folder).f_flag & os.ST_RDONLY:
            raise _refusal(out, errno.EROFS)
        if not os.access(folder, os.W_OK | os.X_OK):
            raise _refusal(out, errno.EACCES)
    return out


def staging_dir(parent: str | os.PathLike[str], prefix: str, suffix: str = ".tmp") -> Path:
    """A new temporary folder in ``parent`` to fill and then rename into place (a folder written atomically).

    It gets the permissions of a normal folder (``tempfile.mkdtemp`` creates 0700; results are meant to be shared).
    """
    with _output(Path(parent) / f"{prefix}{suffix}"):
        folder = Path(tempfile.mkdtemp(prefix=prefix, suffix=suffix, dir=parent))
    os.chmod(folder, 0o777 & ~_umask())
    return folder
