"""Writing files safely: each file is written to a temporary name and renamed into place, so an
interrupted write leaves the previous file intact, and gets the mode a plain ``open`` would give it
(``0o666`` less the process umask): safetensors and ``torch.save`` write through private temporary
files, and their 0600 would otherwise survive the rename and hide a shared SAE or dataset from
colleagues."""
from __future__ import annotations

import os
from pathlib import Path

from safetensors import SafetensorError


def process_umask() -> int:
    """The process umask, read without changing it where Linux allows (``/proc``); elsewhere
    set and restored at once."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: Path, write) -> None:
    """Calls ``write(tmp)`` then renames ``tmp`` to ``path``. A failed write (disk full, file-size
    limit, permission) removes ``tmp`` and raises :class:`OSError` naming ``path``, whatever the
    serializer raised (torch and safetensors raise ``RuntimeError``/``SafetensorError``)."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~process_umask())
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, (RuntimeError, SafetensorError)):
            cause = _os_error_behind(exc)     # e.g. torch.save's "enforce fail" hides "File too large"
            reason = str(cause) if cause is not None else " ".join(str(exc).split())
            raise OSError(f"could not write {path}: {reason}") from exc
        raise


def _os_error_behind(exc: BaseException) -> OSError | None:
    """The OSError that ``exc`` was raised while handling, if any."""
    seen = exc.__cause__ or exc.__context__
    while seen is not None and not isinstance(seen, OSError):
        seen = seen.__cause__ or seen.__context__
    return seen
