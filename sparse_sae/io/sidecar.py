"""The examples sidecar: what each activation row shows in the feature browser.

``sparse-sae extract`` writes it next to the shards, one int32 record per activation row, in the
shards' row order:

- ``examples.bin``: ``n_rows x len(columns)`` little-endian int32, written as rows stream in;
- ``examples.json``: the kind, the columns and what the ids mean.

Kinds and columns:

- ``text``: ``doc, pos, token``: document number (the n-th non-empty line of the text file),
  position among the document's kept tokens, token id; ``tokens`` maps each id that occurs to its display string.
- ``image``: ``image, patch``: image number and patch index in the ``grid`` (row-major;
  -1 for a CLS/register token); ``images`` lists the image paths under ``root``, ``crop`` how
  the model's processor fitted an image to its input (``center``: ``shortest_edge`` resized,
  then the centre ``crop_size`` cut; ``stretch``: resized whole).
- ``label``: ``label``: an index into ``labels``, one short string per row (e.g. the true
  features of synthetic data).

A directory without the sidecar (older extractions, ``.npy`` data) still trains; the browser
then shows row numbers and says why it cannot show more.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

SIDECAR_JSON = "examples.json"
SIDECAR_BIN = "examples.bin"
VERSION = 1
COLUMNS = {"text": ("doc", "pos", "token"), "image": ("image", "patch"), "label": ("label",)}


class SidecarWriter:
    """Appends records to ``examples.bin`` (under a temporary name until :meth:`close`), so
    memory does not grow with the data."""

    def __init__(self, out_dir, kind: str):
        if kind not in COLUMNS:
            raise ValueError(f"kind must be one of {sorted(COLUMNS)}, got {kind!r}")
        self.out_dir, self.kind, self.columns = Path(out_dir), kind, COLUMNS[kind]
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._tmp = self.out_dir / (SIDECAR_BIN + ".tmp")
        self._file = open(self._tmp, "wb")
        self.n_rows = 0

    def add(self, records) -> None:
        arr = np.ascontiguousarray(np.asarray(records, dtype="<i4"))
        if arr.ndim != 2 or arr.shape[1] != len(self.columns):
            raise ValueError(f"{self.kind} records must be n x {len(self.columns)} ({', '.join(self.columns)}), "
                             f"got shape {arr.shape}")
        self._file.write(arr.tobytes())
        self.n_rows += arr.shape[0]

    def close(self, **info) -> dict:
        """Finishes the files; ``info`` (JSON-ready) describes the ids (``tokens``, ``images``...)."""
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self._tmp, self.out_dir / SIDECAR_BIN)
        meta = {"version": VERSION, "kind": self.kind, "columns": list(self.columns), "n_rows": self.n_rows, **info}
        tmp = self.out_dir / (SIDECAR_JSON + ".tmp")
        tmp.write_text(json.dumps(meta) + "\n")
        os.replace(tmp, self.out_dir / SIDECAR_JSON)
        return meta

    def abort(self) -> None:
        self._file.close()
        self._tmp.unlink(missing_ok=True)


class Sidecar:
    """A sidecar read back: ``meta`` and ``records`` (memory-mapped ``n_rows x columns``)."""

    def __init__(self, meta: dict, records: np.ndarray):
        self.meta, self.records = meta, records
        self.kind = meta["kind"]

    def column(self, name: str) -> np.ndarray:
        return self.records[:, self.meta["columns"].index(name)]

    def group_bounds(self, row: int) -> tuple:
        """``[start, stop)`` of the rows of the same document or image as ``row`` (they are contiguous)."""
        col = self.column("doc" if self.kind == "text" else "image")
        key = col[row]
        lo, hi = row, row + 1
        # documents and images are short: walk outwards instead of searching the whole column
        while lo > 0 and col[lo - 1] == key:
            lo -= 1
        while hi < len(col) and col[hi] == key:
            hi += 1
        return lo, hi


def read_sidecar(data_dir, n_rows: int) -> tuple:
    """``(Sidecar or None, reason)``: the sidecar of ``data_dir`` checked against ``n_rows``
    activation rows, or None and why there is none."""
    if not isinstance(data_dir, (str, os.PathLike)):
        return None, "the data was given in memory, with no examples sidecar; rows are shown by number"
    path = Path(data_dir)
    meta_path, bin_path = path / SIDECAR_JSON, path / SIDECAR_BIN
    if not path.is_dir() or not meta_path.is_file():
        return None, (f"{path} has no {SIDECAR_JSON}: it was written before `sparse-sae extract` kept examples, "
                      f"or it is not an extraction directory; run `sparse-sae extract` again to see the text or "
                      f"image behind each row. Rows are shown by number.")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        return None, f"{meta_path} is not valid JSON ({exc}); rows are shown by number"
    if meta.get("kind") not in COLUMNS or meta.get("version") != VERSION:
        return None, f"{meta_path}: unknown sidecar kind/version {meta.get('kind')!r}/{meta.get('version')!r}"
    n_cols = len(meta["columns"])
    if not bin_path.is_file() or bin_path.stat().st_size != 4 * n_cols * meta["n_rows"]:
        return None, f"{bin_path} is missing or truncated; rows are shown by number"
    if meta["n_rows"] != n_rows:
        return None, (f"the sidecar describes {meta['n_rows']} rows but the activations have {n_rows}; "
                      f"rows are shown by number")
    records = np.memmap(bin_path, dtype="<i4", mode="r", shape=(meta["n_rows"], n_cols)) if n_rows else \
        np.zeros((0, n_cols), dtype="<i4")
    return Sidecar(meta, records), ""
