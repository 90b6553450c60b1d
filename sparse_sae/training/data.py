"""Activation data: sources of ``N x D`` rows and a shuffling, resumable batch loader.

Sources (all return float32 CPU rows):

- :class:`TensorSource`: an in-memory ``N x D`` tensor.
- :class:`NpySource`: one or more ``.npy`` files, memory-mapped (only the rows read are loaded).
- :class:`ShardSource`: a directory of ``.safetensors`` shards, each holding one ``n_i x D``
  tensor (what ``sparse-sae extract`` writes); only shard headers are read up front.

:func:`open_source` picks one from a tensor or a path. :class:`ActivationLoader` turns a source
into batches with a fixed memory budget: each epoch the rows are cut into blocks, the blocks
are permuted, consecutive blocks fill a buffer of at most ``memory_budget_mb`` and the buffer's
rows are permuted. Every batch is a pure function of ``(seed, epoch, position)``, so the state
``{"epoch", "position"}`` resumes the stream exactly, and a data-parallel rank takes its slice of
the same global batch.

Rows holding NaN or Inf stop the loader with :class:`NonFiniteDataError`, naming the file and
its rows; ``skip_nonfinite=True`` drops such rows from their batch instead and counts them.
"""
from __future__ import annotations

import json
import struct
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from sparse_sae._checks import check_int

SHARD_SUFFIX = ".safetensors"
_NPY_FLOAT = (np.float16, np.float32, np.float64)


class ActivationSource:
    """``n_rows`` rows of width ``d``; :meth:`rows` reads a contiguous range as float32."""

    n_rows: int
    d: int

    def rows(self, start: int, stop: int) -> torch.Tensor:  # pragma: no cover - each source defines it
        raise NotImplementedError

    def __len__(self) -> int:
        return self.n_rows

    def head(self, n: int) -> torch.Tensor:
        """The first ``min(n, n_rows)`` rows (for ``b_dec`` initialisation and input scaling)."""
        return self.rows(0, min(n, self.n_rows))

    def locate(self, row: int) -> tuple:
        """``(name, local_row)``: the file (or object) holding global row ``row``, and its row there."""
        return "(in-memory tensor)", row


class NonFiniteDataError(ValueError):
    """Activation rows hold NaN or Inf."""


def check_finite_rows(source: ActivationSource, start: int, rows: torch.Tensor, what: str = "activation data",
                      hint: str = "") -> None:
    """Raises :class:`NonFiniteDataError` if ``rows`` (rows ``start..`` of ``source``) hold NaN or Inf,
    naming the file and the range of bad rows in it."""
    if bool(torch.isfinite(rows.sum())):      # one pass, no mask: the usual case (a sum that overflows
        return                                # without NaN/Inf is left to the exact check below)
    bad = ~torch.isfinite(rows).all(dim=1)
    if not bool(bad.any()):
        return
    where = (bad.nonzero().flatten() + start).tolist()
    name, first = source.locate(where[0])
    in_file = [r for r in where if source.locate(r)[0] == name]
    last = source.locate(in_file[-1])[1]
    span = f"row {first}" if first == last else f"rows {first}-{last}"
    raise NonFiniteDataError(f"{what} {name} has NaN or Inf in {span} ({len(in_file)} bad row(s) there; rows "
                             f"count from 0){hint}")


class TensorSource(ActivationSource):
    """Rows of an in-memory ``N x D`` floating tensor."""

    def __init__(self, tensor: torch.Tensor):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"tensor must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.dim() != 2 or tensor.shape[0] == 0:
            raise ValueError(f"tensor must be a non-empty N x D tensor, got shape {tuple(tensor.shape)}")
        if not tensor.is_floating_point():
            raise TypeError(f"tensor must be floating, got {tensor.dtype}")
        self.tensor = tensor.detach()
        self.n_rows, self.d = tensor.shape

    def rows(self, start, stop):
        return self.tensor[start:stop].to(device="cpu", dtype=torch.float32)


class _Concat(ActivationSource):
    """Rows of several parts of equal width, one after another."""

    def __init__(self, parts: Sequence, names: Sequence[str]):
        widths = {}
        for part, name in zip(parts, names):
            widths.setdefault(part[1], name)
        if len(widths) > 1:
            desc = ", ".join(f"{name} has width {w}" for w, name in widths.items())
            raise ValueError(f"ragged activation data: all files must have the same width, but {desc}")
        self._parts = parts            # (n_rows, d, reader(start, stop) -> np or torch)
        self._names = list(names)
        self.d = parts[0][1]
        self._offsets = np.cumsum([0] + [p[0] for p in parts])
        self.n_rows = int(self._offsets[-1])
        if self.n_rows == 0:
            raise ValueError(f"activation data has no rows ({', '.join(self._names)})")

    def locate(self, row):
        i = int(np.searchsorted(self._offsets, row, side="right")) - 1
        return self._names[i], row - int(self._offsets[i])

    def rows(self, start, stop):
        out, pos = [], start
        while pos < stop:
            i = int(np.searchsorted(self._offsets, pos, side="right")) - 1
            lo = int(self._offsets[i])
            hi = min(stop, int(self._offsets[i + 1]))
            n, d, read = self._parts[i]
            chunk = read(pos - lo, hi - lo)
            if isinstance(chunk, np.ndarray):   # a memory-mapped view: copy out the rows read
                chunk = torch.from_numpy(np.array(chunk, dtype=np.float32))
            out.append(chunk.to(torch.float32))
            pos = hi
        return torch.cat(out) if len(out) != 1 else out[0].contiguous()


class NpySource(_Concat):
    """``.npy`` files of ``n_i x D`` floats, memory-mapped."""

    def __init__(self, paths: Sequence):
        paths = [Path(p) for p in paths]
        if not paths:
            raise ValueError("no .npy files given")
        parts = []
        for p in paths:
            try:
                arr = np.load(p, mmap_mode="r", allow_pickle=False)
            except FileNotFoundError:
                raise
            except Exception as exc:  # noqa: BLE001 - numpy raises several types for a bad file
                raise ValueError(f"{p} is not a readable .npy file: {exc}") from exc
            if arr.ndim != 2 or arr.dtype.type not in _NPY_FLOAT:
                raise ValueError(f"{p} must hold a 2-D float array (rows x width), got shape {arr.shape} "
                                 f"and dtype {arr.dtype}")
            parts.append((arr.shape[0], arr.shape[1], lambda a, b, arr=arr: arr[a:b]))
        super().__init__(parts, [str(p) for p in paths])


def _shard_header(path: Path) -> dict:
    """The JSON header of a safetensors file, checked against the file size."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ValueError(f"corrupt shard {path}: file too short ({size} bytes) to be safetensors")
        n = struct.unpack("<Q", raw)[0]
        if n > size - 8:
            raise ValueError(f"corrupt shard {path}: header length {n} exceeds the file size {size}")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"corrupt shard {path}: unreadable header ({exc})") from exc
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end != size:
        raise ValueError(f"corrupt shard {path}: expected {8 + n + end} bytes, found {size} (truncated write?)")
    return header


class ShardSource(_Concat):
    """A directory of safetensors shards, each with one ``n_i x D`` tensor named ``key``
    (default: the shard's only tensor), read in file-name order."""

    def __init__(self, directory, key: str | None = None):
        from safetensors import safe_open

        directory = Path(directory)
        paths = sorted(directory.glob("*" + SHARD_SUFFIX))
        if not paths:
            raise FileNotFoundError(f"no {SHARD_SUFFIX} shards in {directory}")
        parts = []
        for p in paths:
            header = _shard_header(p)
            names = [k for k in header if k != "__metadata__"]
            name = key if key is not None else (names[0] if len(names) == 1 else None)
            if name is None or name not in header:
                raise ValueError(f"shard {p} holds tensors {names}; pass key= to choose one"
                                 if key is None else f"shard {p} has no tensor {key!r} (it has {names})")
            shape = header[name]["shape"]
            if len(shape) != 2:
                raise ValueError(f"shard {p}: tensor {name!r} must be 2-D (rows x width), got shape {shape}")

            def read(a, b, p=p, name=name):
                with safe_open(str(p), framework="pt") as f:
                    return f.get_slice(name)[a:b]

            parts.append((shape[0], shape[1], read))
        super().__init__(parts, [str(p) for p in paths])


EXTRACT_METADATA = "metadata.json"      # written by `sparse-sae extract` beside its shards


def activations_metadata(data) -> dict:
    """Where the activations in ``data`` come from (``model``, ``layer``, ``tokens``, ``kind``), as
    ``sparse-sae extract`` recorded them in the directory's ``metadata.json``; empty for other data."""
    if not isinstance(data, (str, Path)) or not (Path(data) / EXTRACT_METADATA).is_file():
        return {}
    try:
        meta = json.loads((Path(data) / EXTRACT_METADATA).read_text())
    except (OSError, json.JSONDecodeError):
        return {}                    # describes the data only; a damaged file must not stop training
    if not isinstance(meta, dict):
        return {}
    return {k: meta[k] for k in ("model", "layer", "tokens", "kind") if meta.get(k) is not None}


def open_source(data, key: str | None = None) -> ActivationSource:
    """An :class:`ActivationSource` from a tensor, an ``ActivationSource``, a ``.npy`` file, a
    directory of ``.npy`` files or a directory of safetensors shards."""
    if isinstance(data, ActivationSource):
        return data
    if isinstance(data, torch.Tensor):
        return TensorSource(data)
    if isinstance(data, np.ndarray):
        return TensorSource(torch.from_numpy(data))
    if not isinstance(data, (str, Path)):
        raise TypeError(f"data must be a tensor, a path or an ActivationSource, got {type(data).__name__}")
    path = Path(data)
    if not path.exists():
        raise FileNotFoundError(f"activation data {path} not found; give a .npy file, a directory of .npy "
                                f"files, or a directory of safetensors shards (from `sparse-sae extract`)")
    if path.is_file():
        if path.suffix == ".npy":
            return NpySource([path])
        if path.suffix == SHARD_SUFFIX:
            raise ValueError(f"{path} is a single shard; pass its directory")
        raise ValueError(f"{path}: unsupported data file (expected .npy or a directory of shards)")
    try:
        entries = sorted(path.iterdir())
    except PermissionError as exc:
        raise PermissionError(f"activation data directory {path} is not readable: {exc}") from exc
    if any(p.suffix == SHARD_SUFFIX for p in entries):
        ignored = [p.name for p in entries if p.suffix == ".npy"]
        if ignored:
            warnings.warn(f"{path} holds safetensors shards and .npy files; only the shards are read, ignoring "
                          f"{', '.join(ignored)}", stacklevel=2)
        return ShardSource(path, key)
    npys = [p for p in entries if p.suffix == ".npy"]
    if npys:
        return NpySource(npys)
    raise FileNotFoundError(f"{path} holds no .safetensors shards and no .npy files")


class ActivationLoader:
    """Shuffled batches of ``batch_size`` rows from ``source``, indefinitely (epoch after epoch).

    ``memory_budget_mb`` bounds the rows held at once (the shuffle buffer); ``block_rows`` is the
    size of the contiguous runs read from disk. ``rank``/``world_size`` take this process's slice
    of each global batch. ``state_dict()``/``load_state_dict()`` save and restore the position.
    Rows with NaN or Inf raise :class:`NonFiniteDataError` when read, unless ``skip_nonfinite``:
    then they are dropped from their batch (which comes out shorter) and counted in
    ``skipped_rows`` (over the global batch, so every rank agrees); a global batch that would leave
    a process no row is skipped whole.
    """

    def __init__(self, source: ActivationSource, batch_size: int, *, seed: int = 0, shuffle: bool = True,
                 memory_budget_mb: float = 1024, block_rows: int | None = None, rank: int = 0,
                 world_size: int = 1, skip_nonfinite: bool = False):
        self.source = source
        self.batch_size = check_int(batch_size, "batch_size", 1)
        self.world_size = check_int(world_size, "world_size", 1)
        self.rank = check_int(rank, "rank", 0, world_size - 1)
        if batch_size % world_size:
            raise ValueError(f"batch_size {batch_size} must be divisible by the number of processes {world_size}")
        if not memory_budget_mb > 0:
            raise ValueError(f"memory_budget_mb must be positive, got {memory_budget_mb}")
        self.seed, self.shuffle = int(seed), bool(shuffle)
        budget_rows = int(memory_budget_mb * 2**20) // (4 * source.d)
        self.buffer_rows = max(min(budget_rows, source.n_rows), min(batch_size, source.n_rows), 1)
        self.block_rows = block_rows or max(1, self.buffer_rows // 16)
        self.skip_nonfinite = bool(skip_nonfinite)
        self.epoch, self.position, self.skipped_rows = 0, 0, 0
        self._cache_key, self._cache, self._planned_epoch = None, None, None

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "batch_size": self.batch_size,
                "n_rows": self.source.n_rows, "skipped_rows": self.skipped_rows}

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "batch_size", "n_rows"):
            if key in state and state[key] != getattr(self, key, None) and not (
                    key == "n_rows" and state[key] == self.source.n_rows):
                raise ValueError(f"data position saved for {key}={state[key]}, but this run has "
                                 f"{key}={self.source.n_rows if key == 'n_rows' else getattr(self, key)}")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self.skipped_rows = int(state.get("skipped_rows", 0))

    # ------------------------------------------------------------------ order
    def _block_order(self, epoch: int) -> torch.Tensor:
        n_blocks = -(-self.source.n_rows // self.block_rows)
        if not self.shuffle:
            return torch.arange(n_blocks)
        return torch.randperm(n_blocks, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch))

    def _buffer(self, epoch: int, index: int) -> torch.Tensor:
        """Buffer ``index`` of ``epoch``: consecutive permuted blocks, rows permuted."""
        if self._cache_key == (epoch, index):
            return self._cache
        self._ensure_epoch(epoch)
        first, last = self._buffer_starts[index], self._buffer_starts[index + 1]
        pieces = []
        for b in self._order[first:last].tolist():
            start = b * self.block_rows
            piece = self.source.rows(start, min(start + self.block_rows, self.source.n_rows))
            if not self.skip_nonfinite:
                check_finite_rows(self.source, start, piece, hint="; fix the data, or drop such rows with "
                                  "skip_nonfinite (--skip-nonfinite)")
            pieces.append(piece)
        rows = torch.cat(pieces)
        if self.shuffle:
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) * 1_000_033 + index)
            rows = rows[torch.randperm(rows.shape[0], generator=g)]
        self._cache_key, self._cache = (epoch, index), rows
        return rows

    def _ensure_epoch(self, epoch: int) -> None:
        if self._planned_epoch != epoch:
            self._order = self._block_order(epoch)
            self._buffer_starts = self._plan(self._order)
            self._planned_epoch = epoch

    def _plan(self, order) -> list:
        """Block indices at which each buffer starts (and a final end marker)."""
        sizes = [min(self.block_rows, self.source.n_rows - b * self.block_rows) for b in order.tolist()]
        starts, filled = [0], 0
        for i, s in enumerate(sizes):
            if filled and filled + s > self.buffer_rows:
                starts.append(i)
                filled = 0
            filled += s
        starts.append(len(sizes))
        self._buffer_row_starts = np.cumsum([0] + [sum(sizes[a:b]) for a, b in zip(starts[:-1], starts[1:])])
        return starts

    def _take(self, n: int) -> torch.Tensor:
        out = []
        while n > 0:
            self._ensure_epoch(self.epoch)
            idx = int(np.searchsorted(self._buffer_row_starts, self.position, side="right")) - 1
            buf = self._buffer(self.epoch, idx)
            lo = self.position - int(self._buffer_row_starts[idx])
            chunk = buf[lo:lo + n]
            out.append(chunk)
            n -= chunk.shape[0]
            self.position += chunk.shape[0]
            if self.position >= self.source.n_rows:
                self.epoch, self.position = self.epoch + 1, 0
        return torch.cat(out) if len(out) != 1 else out[0]

    def next_batch(self) -> torch.Tensor:
        """This process's rows of the next global batch (``batch_size / world_size`` rows).

        With ``skip_nonfinite``, a global batch in which some process's share has no finite row
        at all is skipped whole, on every process (each reads the whole global batch, so all agree
        without a collective), and its rows counted: training on an empty share would stop that
        process while the others wait for it in a collective."""
        per = self.batch_size // self.world_size
        mine = slice(self.rank * per, (self.rank + 1) * per)
        if not self.skip_nonfinite:
            return self._take(self.batch_size)[mine]
        batches_per_epoch = -(-self.source.n_rows // self.batch_size)
        for _ in range(batches_per_epoch + 1):
            batch = self._take(self.batch_size)
            finite = torch.isfinite(batch).all(dim=1)
            n_bad = int((~finite).sum())
            if not n_bad:
                return batch[mine]                  # a view: no copy in the common case
            if finite.view(self.world_size, per).any(dim=1).all():
                self.skipped_rows += n_bad
                return batch[mine][finite[mine]]
            self.skipped_rows += self.batch_size
        raise NonFiniteDataError(f"activation data: in every batch of an epoch ({self.source.n_rows} rows), some "
                                 f"process's {per} rows are all NaN or Inf, so skip_nonfinite leaves it "
                                 f"nothing to train on")

    def __iter__(self):
        while True:
            yield self.next_batch()
