"""Saving and loading SAEs: ``sae_weights.safetensors`` plus ``config.json`` in a directory.

Files are written atomically, with the process umask's mode (:func:`sparse_sae._files.atomic_write`):
an interrupted save leaves the previous files intact.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from sparse_sae._files import atomic_write
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


def write(directory, *, class_name: str, dtype: torch.dtype, config: dict, tensors: dict,
          activations: dict | None = None) -> None:
    """Writes ``tensors`` and ``config.json`` (the constructor arguments ``config`` of
    ``class_name``) to ``directory``, created if needed; each file atomically."""
    directory = Path(directory)
    if (directory / EXPORT_CONFIG_FILE).exists():
        # SAELens names its weights like ours: saving here would overwrite that export's weights
        raise FileExistsError(f"{directory} holds a SAELens or sparsify SAE ({EXPORT_CONFIG_FILE}); save to a folder "
                              f"of its own")
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    meta = {"format": FORMAT, "version": FORMAT_VERSION, "class": class_name,
            "dtype": str(dtype).removeprefix("torch."), "config": config}
    if activations:
        meta["activations"] = dict(activations)
    atomic_write(directory / WEIGHTS_FILE, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    atomic_write(directory / CONFIG_FILE, lambda p: p.write_text(json.dumps(meta, indent=2) + "\n"))


_DTYPES = ("float32", "float64", "bfloat16", "float16")


def _read_meta(cfg_path: Path) -> dict:
    """``config.json`` checked for structure and version before anything is built from it."""
    try:
        meta = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{cfg_path} is not valid JSON: {exc}") from exc
    if not isinstance(meta, dict):
        raise ValueError(f"{cfg_path} must hold a JSON object, got {type(meta).__name__}")
    if meta.get("format") != FORMAT:
        raise ValueError(f"{cfg_path} is not a sparse_sae config (format={meta.get('format')!r})")
    version = meta.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
        raise ValueError(f"{cfg_path} has format version {version!r}; this sparse_sae reads versions up to "
                         f"{FORMAT_VERSION} (a newer release wrote it?)")
    if not isinstance(meta.get("config"), dict):
        raise ValueError(f"{cfg_path} has no 'config' object (the SAE's constructor arguments)")
    if meta.get("dtype", "float32") not in _DTYPES:
        raise ValueError(f"{cfg_path} names dtype {meta.get('dtype')!r}; expected one of {list(_DTYPES)}")
    return meta


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


def read(directory, device=None) -> tuple[dict, dict, Path]:
    """What :func:`write` wrote: ``(meta, tensors, config_path)``, the metadata checked for
    structure and version and its penalties rebuilt as :class:`~sparse_sae.penalties.Penalty`
    objects; the tensors on ``device`` (default CPU)."""
    directory = Path(directory)
    cfg_path, w_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise FileNotFoundError(f"{p} not found: {directory} is not a saved sparse_sae SAE")
    meta = _read_meta(cfg_path)
    config = dict(meta["config"])
    try:
        config["penalties"] = [penalty_from_config(p) for p in config.get("penalties", [])]
        if config.get("auxk") is not None:
            config["auxk"] = penalty_from_config(config["auxk"])
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        raise ValueError(f"{cfg_path} does not describe a valid {meta.get('class')}: {type(exc).__name__}: "
                         f"{exc}") from exc
    meta["config"] = config
    try:
        tensors = load_file(str(w_path), device=str(device) if device is not None else "cpu")
    except (RuntimeError, SafetensorError, OSError) as exc:
        raise ValueError(f"{w_path} is damaged or does not match {cfg_path}: {' '.join(str(exc).split())}") from exc
    return meta, tensors, cfg_path
