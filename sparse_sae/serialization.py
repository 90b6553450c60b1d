"""Saving and loading SAEs: ``sae_weights.safetensors`` plus ``config.json`` in a directory.

Files are written to temporary names and renamed into place, so an interrupted save
leaves the previous files intact. Every file gets the mode a plain ``open`` would give it
(``0o666`` less the process umask): safetensors writes through a private temporary file, and
its 0600 would otherwise survive the rename and hide a shared SAE or dataset from colleagues.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
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


def _atomic_write(path: Path, write) -> None:
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


def load(directory, device=None):
    """Loads an SAE saved by :func:`save`; ``device`` defaults to the CPU. The SAE comes back in
    eval mode (``encode`` then updates no firing statistics); call ``.train()`` to train it further."""
    from sparse_sae.modules import ARCHITECTURES

    directory = Path(directory)
    cfg_path, w_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise FileNotFoundError(f"{p} not found: {directory} is not a saved sparse_sae SAE")
    meta = _read_meta(cfg_path)
    cls = ARCHITECTURES.get(meta.get("class"))
    if cls is None:
        raise ValueError(f"{cfg_path} names unknown class {meta.get('class')!r}; expected one of "
                         f"{sorted(ARCHITECTURES)}")
    config = dict(meta["config"])
    try:
        config["penalties"] = [penalty_from_config(p) for p in config.get("penalties", [])]
        if config.get("auxk") is not None:
            config["auxk"] = penalty_from_config(config["auxk"])
        sae = cls(**config, dtype=getattr(torch, meta.get("dtype", "float32")), device=device)
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        raise ValueError(f"{cfg_path} does not describe a valid {cls.__name__}: {type(exc).__name__}: {exc}") from exc
    try:
        state = load_file(str(w_path), device=str(device) if device is not None else "cpu")
        sae.load_state_dict(state)
    except (RuntimeError, SafetensorError, OSError) as exc:
        raise ValueError(f"{w_path} is damaged or does not match {cfg_path}: {' '.join(str(exc).split())}") from exc
    return sae.eval()
