"""Atomic file writes: a temporary file in the same folder, then a rename, so readers never see half a file."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["atomic_write", "atomic_write_json", "check_out_dir", "staging_dir"]


def _umask() -> int:
    """The process's umask (read by setting and restoring it)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], object], tag: str = "") -> Path:
    """``write(tmp)`` then ``os.replace(tmp, path)``; the temporary file is removed if anything fails.

    ``tag`` goes into the temporary name (``.<name>.<random>.<tag>.tmp``) so a writer can find its own leftovers.
    """
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=f".{tag}.tmp" if tag else ".tmp", dir=out.parent)
    os.close(fd)
    try:
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


def check_out_dir(path: str | os.PathLike[str]) -> Path:
    """``path`` as an output folder: it must be a directory or not exist yet (nothing is created here)."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(
            f"output folder {str(out)!r} is a file; expected a directory (existing or to be created)"
        )
    return out


def staging_dir(parent: str | os.PathLike[str], prefix: str, suffix: str = ".tmp") -> Path:
    """A new temporary folder in ``parent`` to fill and then rename into place (a folder written atomically).

    It gets the permissions of a normal folder (``tempfile.mkdtemp`` creates 0700; results are meant to be shared).
    """
    folder = Path(tempfile.mkdtemp(prefix=prefix, suffix=suffix, dir=parent))
    os.chmod(folder, 0o777 & ~_umask())
    return folder
