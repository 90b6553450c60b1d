"""Training metrics: one JSON object per line in ``metrics.jsonl``, optionally mirrored to
TensorBoard (``torch.utils.tensorboard``, which needs the ``tensorboard`` package)."""
from __future__ import annotations

import json
from pathlib import Path


class MetricsLog:
    """Appends records ``{"step": ..., name: value, ...}`` to ``path``; ``tensorboard_dir`` adds
    scalars there. ``truncate_after`` drops records past a step (a resumed run rewrites them)."""

    def __init__(self, path, tensorboard_dir=None, truncate_after: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if truncate_after is not None and self.path.is_file():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= truncate_after]
            self.path.write_text("".join(line + "\n" for line in kept))
        self._file = open(self.path, "a")
        self._writer = None
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:
                raise ImportError("tensorboard=True needs the tensorboard package: pip install tensorboard") from exc
            self._writer = SummaryWriter(str(tensorboard_dir))

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


def read_metrics(path) -> list:
    """The records of a ``metrics.jsonl`` file."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
