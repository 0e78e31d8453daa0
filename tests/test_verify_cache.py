"""The verified-files cache (runtime/integrity.py, cpp_runtime/src/integrity.cpp): a bundle file whose hash matched
is not read again while its stat stamp (size, mtime, ctime, inode, device) is unchanged; any write changes the ctime,
so a changed file is hashed again and refused. Both runtimes read and write the one cache file."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
from test_cpp_bundle_checks import flip_byte
from test_cpp_runtime import bundles, copy_bundle, cpp, run

from safe_denoiser.runtime import integrity
from safe_denoiser.runtime.integrity import (
    RACY_SECONDS,
    VERIFY_CACHE_ENV,
    BundleFileError,
    FileStamp,
    Verification,
    hash_files,
    verify_cache_path,
    verify_files,
)
from safe_denoiser.runtime.manifest import Manifest

__all__ = ["bundles", "cpp"]  # fixtures shared with test_cpp_runtime


def _bundle_dir(tmp_path: Path) -> tuple[Path, dict[str, str], bytes]:
    root = tmp_path / "b"
    root.mkdir()
    payload = np.random.default_rng(1).bytes((1 << 20) + 5)
    (root / "denoiser.onnx").write_bytes(payload)
    (root / "vocab.json").write_text("{}", encoding="utf-8")
    return root, hash_files(root, ["denoiser.onnx", "vocab.json"]), payload


def test_verified_files_cache_skips_unchanged_files_and_rehashes_changed_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A second check of unchanged files reads none of them; a rewrite (even with the same size and the old mtime
    put back) changes the ctime, so the file is hashed again and the change is caught."""
    root, digests, payload = _bundle_dir(tmp_path)
    cache = tmp_path / "cache" / "verified.json"
    now = [FileStamp.of(root / "denoiser.onnx").ctime_ns + 10**10]  # 10 s after the files were written: settled
    monkeypatch.setattr(integrity.time, "time_ns", lambda: now[0])
    assert verify_files(root, digests, cache) == Verification(hashed=2, cached=0)
    assert cache.is_file()
    assert verify_files(root, digests, cache) == Verification(hashed=0, cached=2)
    # Another manifest expecting other bytes of the same file: the cached hash does not stand in for it.
    with pytest.raises(BundleFileError, match=r"file 'vocab.json' does not match"):
        verify_files(root, {**digests, "vocab.json": "0" * 64}, cache)
    flipped = bytearray(payload)
    flipped[1000] ^= 0x01
    mtime = (root / "denoiser.onnx").stat().st_mtime_ns
    (root / "denoiser.onnx").write_bytes(bytes(flipped))
    os.utime(root / "denoiser.onnx", ns=(mtime, mtime))  # same size, same mtime: only the ctime tells
    now[0] = FileStamp.of(root / "denoiser.onnx").ctime_ns + 10**10
    with pytest.raises(BundleFileError, match=r"file 'denoiser.onnx' does not match the manifest"):
        verify_files(root, digests, cache)


def test_verified_files_cache_never_records_a_file_changed_just_now(tmp_path: Path) -> None:
    """Files written within RACY_SECONDS are hashed every time (the clock's tick could hide a second write)."""
    root, digests, _ = _bundle_dir(tmp_path)
    cache = tmp_path / "verified.json"
    assert verify_files(root, digests, cache) == Verification(hashed=2, cached=0)
    assert verify_files(root, digests, cache) == Verification(hashed=2, cached=0)
    assert not cache.exists()


def test_verified_files_cache_off_unreadable_or_unwritable_means_hashing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, digests, _ = _bundle_dir(tmp_path)
    monkeypatch.setattr(integrity.time, "time_ns", lambda: FileStamp.of(root / "denoiser.onnx").ctime_ns + 10**10)
    for off in (False, None):
        assert verify_files(root, digests, off) == Verification(hashed=2, cached=0)
    garbage = tmp_path / "garbage.json"
    garbage.write_text("{not json", encoding="utf-8")
    assert verify_files(root, digests, garbage) == Verification(hashed=2, cached=0)  # replaced by a good one
    assert verify_files(root, digests, garbage) == Verification(hashed=0, cached=2)
    blocked = tmp_path / "a_file" / "verified.json"
    (tmp_path / "a_file").write_text("in the way", encoding="utf-8")
    assert verify_files(root, digests, blocked) == Verification(hashed=2, cached=0)  # cannot be written: no error
    monkeypatch.setenv(VERIFY_CACHE_ENV, "off")
    assert verify_cache_path() is None
    monkeypatch.setenv(VERIFY_CACHE_ENV, str(garbage))
    assert verify_cache_path() == garbage and verify_files(root, digests) == Verification(hashed=0, cached=2)
    monkeypatch.delenv(VERIFY_CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert verify_cache_path() == tmp_path / "xdg" / "safe-denoiser" / "verified-files.json"


@pytest.mark.parametrize("name", ["demo_theorem", "tiny_external"])
def test_cpp_and_python_share_the_cache_and_refuse_a_changed_file(
    cpp: Path, bundles: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    """C++ ``info`` records the files, then skips them; the Python runtime reads what C++ wrote and the other way
    round; a flipped byte with the old mtime put back is refused by both. tiny_external: the C++ runtime hashes its
    weights files on a worker thread and the rest on the opening thread; both threads' records reach the cache."""
    b = copy_bundle(bundles, tmp_path, name)
    listed = Manifest.load(b, check_files=False).files
    time.sleep(RACY_SECONDS + 0.2)  # the copies' ctimes must be settled before either runtime records them
    cache = tmp_path / "cache" / "verified-files.json"
    monkeypatch.setenv(VERIFY_CACHE_ENV, str(cache))

    def info() -> tuple[int, int]:
        out = json.loads(run(cpp, "info", "--bundle", str(b)).stdout)
        return out["files_hashed"], out["files_from_cache"]

    n = len(listed)
    assert info() == (n, 0) and cache.is_file()
    assert info() == (0, n)
    assert verify_files(b, listed) == Verification(hashed=0, cached=n)  # Python reads the C++ runtime's entries
    cache.unlink()
    assert verify_files(b, listed) == Verification(hashed=n, cached=0)
    assert info() == (0, n)  # and C++ reads Python's
    monkeypatch.setenv(VERIFY_CACHE_ENV, "off")
    assert info() == (n, 0)
    monkeypatch.setenv(VERIFY_CACHE_ENV, str(cache))
    target = b / "denoiser.onnx"
    mtime = target.stat().st_mtime_ns
    flip_byte(target, target.stat().st_size // 2)
    os.utime(target, ns=(mtime, mtime))
    proc = run(cpp, "info", "--bundle", str(b), check=False)
    assert proc.returncode != 0 and "file 'denoiser.onnx' does not match the manifest" in proc.stderr
    with pytest.raises(BundleFileError, match=r"file 'denoiser\.onnx' does not match"):
        verify_files(b, listed)


@pytest.mark.parametrize("threads", [1, 3])
def test_parallel_hashing_names_the_first_bad_file_in_path_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, threads: int
) -> None:
    """verify_files hashes files on HASH_THREADS threads; whatever finishes first, the file named is the first in
    path order that is missing or differs, and the counts are those of one thread."""
    import hashlib

    monkeypatch.setattr(integrity, "HASH_THREADS", threads)
    contents = {"a.onnx": b"a" * 5000, "b.onnx.data": os.urandom(3 << 20), "c/tok.json": b"{}", "d.onnx": b"d"}
    (tmp_path / "c").mkdir()
    for name, data in contents.items():
        (tmp_path / name).write_bytes(data)
    expected = {name: hashlib.sha256(data).hexdigest() for name, data in contents.items()}
    assert verify_files(tmp_path, expected, cache=False) == Verification(hashed=4, cached=0)
    (tmp_path / "d.onnx").write_bytes(b"e")  # differs, last in path order
    (tmp_path / "c" / "tok.json").unlink()  # missing, before it
    with pytest.raises(BundleFileError, match=r"file 'c/tok\.json' listed in the manifest is missing"):
        verify_files(tmp_path, expected, cache=False)
    flip_byte(tmp_path / "b.onnx.data", 1 << 20)  # differs, before both
    with pytest.raises(BundleFileError, match=r"file 'b\.onnx\.data' does not match the manifest"):
        verify_files(tmp_path, expected, cache=False)
