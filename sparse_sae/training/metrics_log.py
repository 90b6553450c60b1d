"""Training metrics: one JSON object per line in ``metrics.jsonl``, optionally mirrored to
TensorBoard (``torch.utils.tensorboard``, which needs the ``tensorboard`` package)."""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path


class MetricsLog:
    """Appends records ``{"step": ..., name: value, ...}`` to ``path``; ``tensorboard_dir`` adds
    scalars there. ``truncate_after`` drops records past a step (a resumed run rewrites them).

    An existing file is read first: a torn last line (a crash in mid-append) is dropped with a
    warning. When anything must go, the kept records are written to a new file that replaces the
    old one atomically, so a crash while resuming never loses the records before the checkpoint.
    """

    def __init__(self, path, tensorboard_dir=None, truncate_after: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.is_file():
            self._repair(truncate_after)
        self._file = open(self.path, "a")
        self._writer = None
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:
                raise ImportError("tensorboard=True needs the tensorboard package: pip install tensorboard") from exc
            self._writer = SummaryWriter(str(tensorboard_dir))

    def _repair(self, truncate_after: int | None) -> None:
        records, torn = _parse(self.path)
        kept = [r for r in records if truncate_after is None or r.get("step", 0) <= truncate_after]
        if torn:
            warnings.warn(f"{self.path}: dropped a torn last line (a crash while writing it): {torn[:80]!r}",
                          stacklevel=3)
        if len(kept) == len(records) and not torn:
            return
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            with open(tmp, "w") as f:
                f.write("".join(json.dumps(r) + "\n" for r in kept))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def write(self, record: dict) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._writer is not None:
            step = record["step"]
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._writer.add_scalar(key, value, step)

    def close(self) -> None:
        self._file.close()
        if self._writer is not None:
            self._writer.close()


def _parse(path: Path) -> tuple:
    """``(records, torn)``: the records of ``path``, and its last line when that line is torn (no
    newline and not valid JSON), else None. A bad line anywhere else is an error naming it."""
    text = path.read_text(errors="replace")
    lines = text.split("\n")
    torn = None
    if lines and lines[-1].strip():          # no trailing newline: the last append may have been cut
        try:
            json.loads(lines[-1])
        except json.JSONDecodeError:
            torn = lines.pop()
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} line {number} is not a JSON record ({exc}); the metrics log is damaged, "
                             f"fix or remove that line") from exc
        if not isinstance(record, dict):
            raise ValueError(f"{path} line {number} is not a JSON object")
        records.append(record)
    return records, torn


def read_metrics(path) -> list:
    """The records of a ``metrics.jsonl`` file (a torn last line is left out)."""
    return _parse(Path(path))[0]
