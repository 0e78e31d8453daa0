"""Every file of a bundle hashed in ``manifest.json`` (``files``: relative path -> sha256) and checked on load.

So a flipped byte in a graph's weights, a truncated graph or a swapped tokenizer file is an error naming the file
at ``Manifest.load``, before onnxruntime sees the graph (it would otherwise load different weights silently, or
fail with a bare protobuf error). Hashing reads every byte once, ``HASH_THREADS`` files at a time (SHA-256 at
~1.5-1.8 GB/s per core from the page cache on a 2-core VM: ~2.1 s of an SD-1.4 bundle's start-up, its 3.4 GB weights
file alone ~2 s); ``check_files=False`` skips it for a bundle that is known to be intact.

The verified-files cache: a file whose hash matched is recorded with its stat stamp (size, mtime, ctime, inode,
device) in ``verify_cache_path()``; a later load whose file has the same stamp and whose manifest expects the same
hash does not read it again. Any write to the file changes its ctime, which no user process can set back, so a
changed file is hashed again. A file changed within ``RACY_SECONDS`` of the check is never recorded (the
file system's clock is coarse: two writes inside one tick can leave equal stamps, git's "racily clean" case). The
C++ runtime reads and writes the same file (cpp_runtime/src/integrity.cpp). A cache that cannot be read or written
is ignored: the files are hashed, nothing fails.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

__all__ = [
    "HASH_THREADS",
    "VERIFY_CACHE_ENV",
    "BundleFileError",
    "FileStamp",
    "Verification",
    "bundle_files",
    "file_sha256",
    "hash_files",
    "verify_cache_path",
    "verify_files",
]

_CHUNK = 1 << 20
VERIFY_CACHE_ENV = "SAFE_DENOISER_VERIFY_CACHE"  # the cache file; "" or "off": no cache
CACHE_VERSION = 1
MAX_CACHE_ENTRIES = 4096
RACY_SECONDS = 2.0
HASH_THREADS = min(4, os.cpu_count() or 1)  # files hashed at once by hash_files (and so verify_files)


class BundleFileError(ValueError):
    """A bundle file that is missing or differs from the hash its manifest records."""


def file_sha256(path: str | os.PathLike[str]) -> str:
    """sha256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def bundle_files(root: str | os.PathLike[str], entries: Iterable[str | None]) -> list[str]:
    """The files to hash, as sorted relative POSIX paths: each entry a file, or a folder (all files inside it)."""
    base = Path(root)
    found: set[str] = set()
    for entry in entries:
        if entry is None:
            continue
        path = base / entry
        if path.is_dir():
            found |= {p.relative_to(base).as_posix() for p in path.rglob("*") if p.is_file()}
        else:
            found.add(Path(entry).as_posix())
    return sorted(found)


def hash_files(root: str | os.PathLike[str], names: Iterable[str]) -> dict[str, str]:
    """``{relative path: sha256}`` of the named files under ``root``, ``HASH_THREADS`` files at a time (hashlib
    releases the GIL on large buffers: a bundle's big files, an SD-1.4 UNet's weights and its text encoder, hash on
    several cores at once)."""
    todo = list(names)
    with ThreadPoolExecutor(max_workers=max(1, min(len(todo), HASH_THREADS))) as pool:
        return dict(zip(todo, pool.map(lambda name: file_sha256(Path(root) / name), todo), strict=True))


class FileStamp(NamedTuple):
    """What changes whenever a file's bytes can have changed: size, mtime and ctime (ns), inode, device."""

    size: int
    mtime_ns: int
    ctime_ns: int
    ino: int
    dev: int

    @classmethod
    def of(cls, path: str | os.PathLike[str]) -> FileStamp:
        st = os.stat(path)
        return cls(st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev)

    def settled(self, now_ns: int) -> bool:
        """Whether the file last changed more than ``RACY_SECONDS`` ago (only then may its stamp be recorded)."""
        return now_ns - max(self.mtime_ns, self.ctime_ns) > RACY_SECONDS * 1e9


class Verification(NamedTuple):
    """How ``verify_files`` checked the files: ``hashed`` read and hashed, ``cached`` matched a recorded stamp."""

    hashed: int
    cached: int


def verify_cache_path() -> Path | None:
    """$SAFE_DENOISER_VERIFY_CACHE ("" or "off": None), else $XDG_CACHE_HOME (or ~/.cache)/safe-denoiser/
    verified-files.json."""
    value = os.environ.get(VERIFY_CACHE_ENV)
    if value is not None:
        return None if value in ("", "off") else Path(value)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "safe-denoiser" / "verified-files.json"


def _read_cache(path: Path | None) -> dict[str, Any]:
    """``{absolute path: {"stamp": [...], "sha256": hex}}``; empty when absent, unreadable or of another form."""
    if path is None:
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    files = data.get("files") if isinstance(data, dict) and data.get("version") == CACHE_VERSION else None
    return files if isinstance(files, dict) else {}


def _write_cache(path: Path, files: dict[str, Any]) -> None:
    """The entries whose files still exist (at most ``MAX_CACHE_ENTRIES``, the newest), written atomically; a cache
    that cannot be written is left as it was."""
    from safe_denoiser.files import OutputPathError, atomic_write_json

    kept = {k: v for k, v in files.items() if os.path.exists(k)}
    kept = dict(list(kept.items())[-MAX_CACHE_ENTRIES:])
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, {"version": CACHE_VERSION, "files": kept})
    except (OSError, OutputPathError):
        pass


def _cached(entry: Any, stamp: FileStamp, want: str) -> bool:
    return isinstance(entry, dict) and entry.get("sha256") == want and entry.get("stamp") == list(stamp)


def verify_files(
    root: str | os.PathLike[str], expected: Mapping[str, str], cache: Path | bool | None = True
) -> Verification:
    """``BundleFileError`` naming the first file that is missing or whose sha256 differs from ``expected``.

    ``cache``: True (the default) uses ``verify_cache_path()``; a path uses that file; False or None hashes every file.
    """
    base = Path(root)
    cache_path = verify_cache_path() if cache is True else (cache or None)
    entries = _read_cache(cache_path)
    names = sorted(expected)
    stamps = {name: FileStamp.of(base / name) for name in names if (base / name).is_file()}
    keys = {name: str((base / name).resolve()) for name in stamps}
    todo = [name for name in stamps if not _cached(entries.get(keys[name]), stamps[name], expected[name])]
    digests = hash_files(base, todo)
    hashed = cached = 0
    changed = False
    for name in names:  # path order: the first missing or differing file is the one named
        want = expected[name]
        if name not in stamps:
            raise BundleFileError(f"bundle {str(base)!r}: file {name!r} listed in the manifest is missing")
        if name not in digests:
            cached += 1
            continue
        got, stamp, key = digests[name], stamps[name], keys[name]
        hashed += 1
        if got == want and FileStamp.of(base / name) == stamp and stamp.settled(time.time_ns()):
            entries.pop(key, None)  # re-inserted last: the newest entries are the ones kept
            entries[key] = {"stamp": list(stamp), "sha256": got}
            changed = True
        if got != want:
            raise BundleFileError(
                f"bundle {str(base)!r}: file {name!r} does not match the manifest (sha256 {got[:16]}..., recorded "
                f"{want[:16]}...): it was changed or damaged after export (a partial copy, a flipped byte); copy or "
                "export the bundle again"
            )
    if changed and cache_path is not None:
        _write_cache(cache_path, entries)
    return Verification(hashed, cached)
