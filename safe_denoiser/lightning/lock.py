"""``FolderLock``: one writer per output folder and rank, with a message that says which process holds it.

An advisory ``flock`` on ``<folder>/.lock-<name>``: the kernel releases it when its holder dies, however it dies
(SIGKILL, OOM, node reboot), so a killed run's lock never blocks the rerun, and no pid-liveness guess is needed.
The lock file is never deleted while in use (deleting a locked file lets a second process lock a new inode);
it records the holder (pid, host, start time, command line) only so that a refused run can say who holds it.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import os
import socket
import sys
from pathlib import Path
from types import TracebackType

__all__ = ["FolderInUseError", "FolderLock"]


class FolderInUseError(FileExistsError):
    """Another live process writes into this output folder (and rank)."""


def _holder_line() -> str:
    when = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    command = " ".join(sys.argv)[:300]
    return f"pid {os.getpid()} on host {socket.gethostname()}, started {when}: {command}\n"


class FolderLock:
    """``with FolderLock(folder, "rank0"):`` or ``acquire()`` / ``release()``; raises ``FolderInUseError``."""

    def __init__(self, folder: str | os.PathLike[str], name: str) -> None:
        self.path = Path(folder) / f".lock-{name}"
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        """Whether this object holds the lock."""
        return self._fd is not None

    def acquire(self) -> FolderLock:
        """Take the lock without waiting; ``FolderInUseError`` naming the holder if another process has it."""
        if self._fd is not None:
            return self
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "a process that is starting up"
            os.close(fd)
            raise FolderInUseError(
                f"output folder {str(self.path.parent)!r} is in use by another run ({self.path.name} held by "
                f"{holder}); wait for it to finish, stop it, or choose another data.output_dir"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, _holder_line().encode("utf-8"), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        """Give the lock up (the file stays: see the module docstring)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)
        finally:
            os.close(fd)  # closing the last descriptor releases the flock

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()
