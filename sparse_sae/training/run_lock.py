"""One process owns a run directory at a time.

:class:`RunLock` holds an exclusive ``fcntl.flock`` on ``<out_dir>/run.lock`` for the life of a
run and writes the holder's PID and host into it. The operating system releases the lock when
the process dies, however it dies (``kill -9`` included), so a stale lock file never blocks a
resume. A second process that tries the same directory is refused with a message naming the
holder. (``flock`` locks are advisory and, on some network filesystems, local to one machine.)
"""
from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path

LOCK_FILE = "run.lock"


class RunLockedError(FileExistsError):
    """Another process holds the run directory."""


class RunLock:
    """``acquire()`` takes the lock on ``out_dir`` (created if needed) or raises
    :class:`RunLockedError`; ``release()`` gives it back. Also a context manager."""

    def __init__(self, out_dir):
        self.path = Path(out_dir) / LOCK_FILE
        self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> "RunLock":
        if self._fd is not None:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise RunLockedError(f"{self.path.parent} is in use by another run ({holder}); wait for it to finish "
                                 f"or choose another out_dir") from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on host {socket.gethostname()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)        # the file stays (unlinking it would race a waiting process)
        finally:
            os.close(fd)               # closing releases the flock

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self):
        if self._fd is not None:
            os.close(self._fd)


def _read_holder(fd: int) -> str:
    try:
        text = os.pread(fd, 256, 0).decode(errors="replace").strip()
    except OSError:
        text = ""
    return text or "holder not yet recorded"
