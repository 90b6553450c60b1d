"""Training checkpoints: written atomically, read back for an exact resume.

A checkpoint is a directory ``<out_dir>/checkpoints/step_<N>/`` holding

- ``sae_weights.safetensors`` and ``config.json``: the SAE as :func:`sparse_sae.save` writes it
  (input scale not folded, so training resumes on the same parameters);
- ``train_config.json``: the :class:`~sparse_sae.training.config.TrainConfig`;
- ``trainer_state.pt``: the optimizer state, the step, the data position and the RNG states;
- ``manifest.json``, written last: each other file's size and sha256.

A latent-parallel run writes its SAE in shards, each process its own slice
(``sae_weights-<i>-of-<P>.safetensors``, see :mod:`sparse_sae.saes.serialization`), and the
per-latent optimizer moments likewise (``optimizer-<i>-of-<P>.safetensors``, named
``<parameter>.<state>``, e.g. ``W_dec.exp_avg``); ``trainer_state.pt`` then holds the rest of the
optimizer state and ``"optimizer_shards"`` (their ``count`` and row ``bounds``). Nothing is
gathered on one process, and :func:`read_optimizer_rows` reads back any row range, so a run
resumes with another number of shards. The processes share the run directory (one node, or a
shared file system).

It is written under a temporary name and renamed into place; then ``<out_dir>/checkpoints/latest``
(a one-line file naming it) is replaced atomically. A crash at any point leaves the previous
checkpoint and ``latest`` intact. Older checkpoints beyond ``keep`` are removed afterwards.

Resuming checks the manifest: a checkpoint damaged later (a truncated file, a flipped bit on
disk, an emptied file) is reported, naming the file and what is wrong, and the newest intact
checkpoint of the run is used instead, with a warning.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Callable, NamedTuple

import torch

from sparse_sae._files import atomic_write
from sparse_sae.saes import CONFIG_FILE, load, serialization

CHECKPOINTS = "checkpoints"
LATEST = "latest"
STATE_FILE = "trainer_state.pt"
TRAIN_CONFIG_FILE = "train_config.json"
MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = "sparse_sae.checkpoint"
OPTIMIZER_STEM = "optimizer"


class Checkpoint(NamedTuple):
    path: Path
    sae: object
    train_config: dict
    state: dict


def checkpoint_root(out_dir) -> Path:
    return Path(out_dir) / CHECKPOINTS


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def checkpoint_tmp_dir(out_dir, step: int) -> Path:
    """Where the checkpoint of ``step`` is written before it is committed (renamed into place)."""
    return checkpoint_root(out_dir) / f".step_{step:08d}.tmp"


def begin_checkpoint(out_dir, step: int) -> Path:
    """Creates the empty directory the checkpoint of ``step`` is written into; returns it."""
    tmp = checkpoint_tmp_dir(out_dir, step)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def commit_checkpoint(out_dir, step: int, tmp: Path, train_config: dict, state: dict, keep: int = 2) -> Path:
    """Completes ``tmp`` (which holds the SAE's files) with the training configuration, ``state``
    and the manifest, renames it into place, points ``latest`` at it and prunes older checkpoints
    beyond ``keep``; returns its directory. A failure removes ``tmp``."""
    root = checkpoint_root(out_dir)
    final = root / f"step_{step:08d}"
    try:
        atomic_write(tmp / TRAIN_CONFIG_FILE, lambda p: p.write_text(json.dumps(train_config, indent=2) + "\n"))
        atomic_write(tmp / STATE_FILE, lambda p: _torch_save(state, p))
        atomic_write(tmp / MANIFEST_FILE, lambda p: p.write_text(json.dumps(_manifest(tmp, step), indent=2) + "\n"))
        _fsync_dir(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)     # a failed save leaves no half checkpoint behind
        raise
    if final.exists():                      # re-saving the same step (e.g. after a resume)
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    atomic_write(root / LATEST, lambda p: p.write_text(final.name + "\n"))
    _prune(root, keep, final.name)
    return final


def save_checkpoint(out_dir, step: int, sae, train_config: dict, state: dict, keep: int = 2) -> Path:
    """Writes the checkpoint of ``step`` and points ``latest`` at it; returns its directory."""
    tmp = begin_checkpoint(out_dir, step)
    try:
        sae.save(tmp, fold_input_scale=False)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return commit_checkpoint(out_dir, step, tmp, train_config, state, keep)


def write_optimizer_shard(ckpt: Path, index: int, count: int, tensors: dict) -> None:
    """Shard ``index`` of ``count`` of the per-latent optimizer state (``{"W_dec.exp_avg": rows, ...}``)."""
    serialization.write_tensors(Path(ckpt) / serialization.shard_file_name(index, count, OPTIMIZER_STEM), tensors)


def read_optimizer_rows(ckpt: Path, shards: dict, rows: tuple) -> dict:
    """Rows ``[lo, hi)`` of every tensor of the optimizer shards described by ``shards``
    (``trainer_state.pt``'s ``"optimizer_shards"``), on the CPU."""
    count = int(shards["count"])
    parts = [(Path(ckpt) / serialization.shard_file_name(i, count, OPTIMIZER_STEM), int(a), int(b))
             for i, (a, b) in enumerate(shards["bounds"])]
    try:
        return serialization.read_rows(parts, rows, sliced=None)
    except (RuntimeError, OSError) as exc:
        raise ValueError(f"checkpoint {ckpt}: its optimizer shards are unreadable: {' '.join(str(exc).split())}") \
            from exc


def _torch_save(obj, path: Path) -> None:
    # through a Python file: a failed write then raises an OSError that names the cause (torch
    # writing to a path reports only "enforce fail at inline_container.cc")
    with open(path, "wb") as f:
        torch.save(obj, f)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _manifest(ckpt: Path, step: int) -> dict:
    files = {p.name: {"size": p.stat().st_size, "sha256": _sha256(p)}
             for p in sorted(ckpt.iterdir()) if p.is_file() and p.name != MANIFEST_FILE}
    return {"format": MANIFEST_FORMAT, "version": 1, "step": step, "files": files}


def verify_checkpoint(ckpt, share: tuple[int, int] | None = None) -> str | None:
    """What is wrong with checkpoint directory ``ckpt`` against its manifest (a file missing, of the
    wrong size or with the wrong sha256), or None when it is intact. A checkpoint written before
    manifests existed has nothing to check against: None (loading it is the test).
    ``share=(i, n)`` hashes only every ``n``-th file from the ``i``-th (in name order; every file's
    presence and size are still checked): ``n`` processes checking one checkpoint together."""
    ckpt = Path(ckpt)
    manifest_path = ckpt / MANIFEST_FILE
    if not manifest_path.is_file():
        return None
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
        if manifest.get("format") != MANIFEST_FORMAT or not isinstance(files, dict):
            raise ValueError("not a checkpoint manifest")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        return f"{manifest_path} is unreadable ({exc})"
    for position, (name, want) in enumerate(sorted(files.items())):
        path = ckpt / name
        if not path.is_file():
            return f"{path} is missing"
        size = path.stat().st_size
        if size != want.get("size"):
            return f"{path} has {size} bytes, the manifest says {want.get('size')} (truncated?)"
        if share is not None and position % share[1] != share[0]:
            continue
        if _sha256(path) != want.get("sha256"):
            return f"{path} does not match its sha256 in the manifest (corrupted on disk)"
    return None


def _read_checkpoint(ckpt: Path, device, load_sae, verify) -> Checkpoint:
    problem = verify(ckpt)
    if problem is not None:
        raise ValueError(problem)
    try:
        train_config = json.loads((ckpt / TRAIN_CONFIG_FILE).read_text())
        state = torch.load(ckpt / STATE_FILE, map_location="cpu", weights_only=True)
        sae = load_sae(ckpt) if load_sae is not None else load(ckpt, device=device)
    except FileNotFoundError as exc:
        raise ValueError(f"checkpoint {ckpt} is incomplete: {exc}") from exc
    except (ValueError, RuntimeError, EOFError, OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"checkpoint {ckpt} is unreadable: {' '.join(str(exc).split())}") from exc
    if not isinstance(train_config, dict) or not isinstance(state, dict) or "step" not in state:
        raise ValueError(f"checkpoint {ckpt} is unreadable: {TRAIN_CONFIG_FILE} or {STATE_FILE} has the wrong "
                         f"structure")
    return Checkpoint(ckpt, sae, train_config, state)


def _candidates(path: Path) -> list:
    """A run's checkpoints, the one ``latest`` names first, then the others newest first."""
    root = path / CHECKPOINTS if (path / CHECKPOINTS).is_dir() else path
    done = sorted((p for p in root.glob("step_*") if p.is_dir()), reverse=True)
    marker = root / LATEST
    if marker.is_file():
        target = root / marker.read_text().strip()
        if target in done:
            done.remove(target)
            done.insert(0, target)
    return done


def read_checkpoint(path, device=None, load_sae: Callable | None = None,
                    verify: Callable = verify_checkpoint) -> Checkpoint:
    """The checkpoint at ``path``, checked against its manifest and loaded. ``path`` is a checkpoint
    directory (used as is; an error if damaged) or a run directory: its latest checkpoint, or,
    when that one is damaged, the newest intact one, with a warning naming what is wrong.
    ``load_sae(directory)`` loads the SAE (default: :func:`sparse_sae.load`, the whole SAE, on
    ``device``; a latent-parallel run reads its slice); ``verify(directory)`` says what is wrong
    with a checkpoint (the trainer's processes check one together, each hashing a share)."""
    path = Path(path)
    if (path / STATE_FILE).is_file() or (path / MANIFEST_FILE).is_file():
        return _read_checkpoint(path, device, load_sae, verify)
    problems = []
    for ckpt in _candidates(path):
        try:
            found = _read_checkpoint(ckpt, device, load_sae, verify)
        except ValueError as exc:
            problems.append(str(exc))
            continue
        if problems:
            warnings.warn(f"damaged checkpoint(s) skipped: {'; '.join(problems)}. Resuming from {ckpt}, the "
                          f"newest intact checkpoint", stacklevel=2)
        return found
    if problems:
        raise ValueError(f"no intact checkpoint in {path}: {'; '.join(problems)}")
    raise FileNotFoundError(f"no checkpoint found at {path} (expected a run directory with "
                            f"{CHECKPOINTS}/{LATEST}, or a step_* checkpoint directory)")


def _prune(root: Path, keep: int, current: str) -> None:
    done = sorted(p for p in root.glob("step_*") if p.is_dir())
    for p in done[:-keep] if keep > 0 else []:
        if p.name != current:
            shutil.rmtree(p, ignore_errors=True)


def latest_checkpoint(path) -> Path | None:
    """The checkpoint directory that ``path`` designates: a checkpoint itself, or a run directory
    (its ``checkpoints/latest``). None when the run has no checkpoint yet."""
    path = Path(path)
    if (path / STATE_FILE).is_file():
        return path
    root = path / CHECKPOINTS if (path / CHECKPOINTS).is_dir() else path
    marker = root / LATEST
    if marker.is_file():
        target = root / marker.read_text().strip()
        if (target / STATE_FILE).is_file():
            return target
    done = sorted(p for p in root.glob("step_*") if (p / STATE_FILE).is_file())
    return done[-1] if done else None


def load_checkpoint(path, device=None) -> tuple:
    """``(sae, train_config_dict, state)`` of the checkpoint at ``path`` (see :func:`read_checkpoint`)."""
    ckpt = read_checkpoint(path, device=device)
    return ckpt.sae, ckpt.train_config, ckpt.state


def resolve_sae_path(path) -> Path:
    """The saved SAE that ``path`` designates: a saved SAE directory (``config.json`` +
    weights), a run directory (its ``final/``, else its latest checkpoint) or a checkpoint."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"SAE {path} not found")
    if (path / CONFIG_FILE).is_file():
        return path
    if (path / "final" / CONFIG_FILE).is_file():
        return path / "final"
    ckpt = latest_checkpoint(path)
    if ckpt is not None:
        return ckpt
    raise FileNotFoundError(f"{path} holds no saved SAE (no {CONFIG_FILE}, no final/, no checkpoint)")
