"""Training checkpoints: written atomically, read back for an exact resume.

A checkpoint is a directory ``<out_dir>/checkpoints/step_<N>/`` holding

- ``sae_weights.safetensors`` and ``config.json``: the SAE as :func:`sparse_sae.save` writes it
  (input scale not folded, so training resumes on the same parameters);
- ``train_config.json``: the :class:`~sparse_sae.config.TrainConfig`;
- ``trainer_state.pt``: the optimizer state, the step, the data position and the RNG states.

It is written under a temporary name and renamed into place; then ``<out_dir>/checkpoints/latest``
(a one-line file naming it) is replaced atomically. A crash at any point leaves the previous
checkpoint and ``latest`` intact. Older checkpoints beyond ``keep`` are removed afterwards.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from sparse_sae.serialization import _atomic_write

CHECKPOINTS = "checkpoints"
LATEST = "latest"
STATE_FILE = "trainer_state.pt"
TRAIN_CONFIG_FILE = "train_config.json"


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


def save_checkpoint(out_dir, step: int, sae, train_config: dict, state: dict, keep: int = 2) -> Path:
    """Writes the checkpoint of ``step`` and points ``latest`` at it; returns its directory."""
    root = checkpoint_root(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    tmp = root / f".step_{step:08d}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    sae.save(tmp, fold_input_scale=False)
    (tmp / TRAIN_CONFIG_FILE).write_text(json.dumps(train_config, indent=2) + "\n")
    torch.save(state, tmp / STATE_FILE)
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    _fsync_dir(tmp)
    if final.exists():                      # re-saving the same step (e.g. after a resume)
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    _atomic_write(root / LATEST, lambda p: p.write_text(final.name + "\n"))
    _prune(root, keep, final.name)
    return final


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
    """``(sae, train_config_dict, state)`` of the checkpoint at ``path`` (see :func:`latest_checkpoint`)."""
    from sparse_sae.serialization import load

    ckpt = latest_checkpoint(path)
    if ckpt is None:
        raise FileNotFoundError(f"no checkpoint found at {path} (expected a run directory with "
                                f"{CHECKPOINTS}/{LATEST}, or a step_* checkpoint directory)")
    try:
        train_config = json.loads((ckpt / TRAIN_CONFIG_FILE).read_text())
        state = torch.load(ckpt / STATE_FILE, map_location="cpu", weights_only=True)
        sae = load(ckpt, device=device)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"checkpoint {ckpt} is incomplete: {exc}") from exc
    except (ValueError, RuntimeError, json.JSONDecodeError) as exc:
        raise ValueError(f"checkpoint {ckpt} is unreadable: {exc}") from exc
    return sae, train_config, state
