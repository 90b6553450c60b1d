"""Saving and loading SAEs: ``sae_weights.safetensors`` plus ``config.json`` in a directory.

Files are written to temporary names and renamed into place, so an interrupted save
leaves the previous files intact.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from sparse_sae.penalties import penalty_from_config

FORMAT = "sparse_sae"
FORMAT_VERSION = 1
WEIGHTS_FILE = "sae_weights.safetensors"
CONFIG_FILE = "config.json"
EXPORT_CONFIG_FILE = "cfg.json"     # what SAELens and sparsify exports name their config


def folded_state(sae) -> dict:
    """The state dict with the input scale ``s`` folded in: an SAE fed ``x`` computes what the
    original computes on ``s * x``, with its reconstruction returned in input units."""
    state = {k: v.detach().clone() for k, v in sae.state_dict().items()}
    s = sae.input_scale
    if s is not None:
        state["W_enc"] = state["W_enc"] * s     # (s x - b) W^T = (x - b/s) (s W)^T
        state["b_dec"] = state["b_dec"] / s
        state["W_dec"] = state["W_dec"] / s     # recon / s = a (W_dec / s) + b_dec / s
    return state


def save(sae, directory, fold_input_scale: bool = True, activations: dict | None = None) -> None:
    """Writes ``sae`` to ``directory`` (created if needed). With ``fold_input_scale`` the input
    scale is folded into the weights and the saved SAE takes raw inputs. ``activations`` records
    where its inputs come from (``model``, ``layer``, ``hook_name``, ...; see :func:`saved_activations`)."""
    directory = Path(directory)
    if (directory / EXPORT_CONFIG_FILE).exists():
        # SAELens names its weights like ours: saving here would overwrite that export's weights
        raise FileExistsError(f"{directory} holds a SAELens or sparsify SAE ({EXPORT_CONFIG_FILE}); save to a folder "
                              f"of its own")
    directory.mkdir(parents=True, exist_ok=True)
    config = sae.config()
    if fold_input_scale and sae.input_scale is not None:
        state = folded_state(sae)
        config["input_scale"] = None
    else:
        state = {k: v.detach().clone() for k, v in sae.state_dict().items()}
    tensors = {k: v.cpu().contiguous() for k, v in state.items()}
    meta = {"format": FORMAT, "version": FORMAT_VERSION, "class": type(sae).__name__,
            "dtype": str(sae.W_enc.dtype).removeprefix("torch."), "config": config}
    if activations:
        meta["activations"] = dict(activations)
    _atomic_write(directory / WEIGHTS_FILE, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    _atomic_write(directory / CONFIG_FILE, lambda p: p.write_text(json.dumps(meta, indent=2) + "\n"))


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def saved_activations(directory) -> dict:
    """Where the inputs of the SAE saved in ``directory`` come from, as recorded at save time (by
    ``train`` from the data's ``metadata.json``, or by an import): ``model``, ``layer``,
    ``hook_name``...; empty when nothing was recorded."""
    path = Path(directory) / CONFIG_FILE
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from exc
    found = meta.get("activations") if isinstance(meta, dict) else None
    return dict(found) if isinstance(found, dict) else {}


def load(directory, device=None):
    """Loads an SAE saved by :func:`save`; ``device`` defaults to the CPU."""
    from sparse_sae.modules import ARCHITECTURES

    directory = Path(directory)
    cfg_path, w_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise FileNotFoundError(f"{p} not found: {directory} is not a saved sparse_sae SAE")
    try:
        meta = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{cfg_path} is not valid JSON: {exc}") from exc
    if meta.get("format") != FORMAT:
        raise ValueError(f"{cfg_path} is not a sparse_sae config (format={meta.get('format')!r})")
    cls = ARCHITECTURES.get(meta.get("class"))
    if cls is None:
        raise ValueError(f"{cfg_path} names unknown class {meta.get('class')!r}; expected one of "
                         f"{sorted(ARCHITECTURES)}")
    config = dict(meta["config"])
    config["penalties"] = [penalty_from_config(p) for p in config.get("penalties", [])]
    if config.get("auxk") is not None:
        config["auxk"] = penalty_from_config(config["auxk"])
    dtype = getattr(torch, meta.get("dtype", "float32"))
    sae = cls(**config, dtype=dtype, device=device)
    state = load_file(str(w_path), device=str(device) if device is not None else "cpu")
    sae.load_state_dict(state)
    return sae
