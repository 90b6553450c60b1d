"""Saving and loading SAEs: ``sae_weights.safetensors`` plus ``config.json`` in a directory.

A latent-parallel SAE is saved in shards instead: ``sae_weights-00000-of-00004.safetensors`` ...,
one per process, each holding its slice of the per-latent tensors (rows ``[lo, hi)``) and a copy
of the others (``b_dec``, a threshold); ``config.json`` then names them under ``"shards"``
(``count``, the row ``bounds`` of each file, the ``sliced`` tensor names). :func:`read` merges the
shards into the whole SAE's tensors; :func:`read` with ``rows`` reads only a slice, from either
layout (a shard resuming with another number of shards reads just the rows it needs).

Files are written atomically, with the process umask's mode (:func:`sparse_sae._files.atomic_write`):
an interrupted save leaves the previous files intact.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors import safe_open
from safetensors.torch import save_file

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


def shard_file_name(index: int, count: int, stem: str = "sae_weights") -> str:
    """``sae_weights-00001-of-00004.safetensors``: the file of shard ``index`` of ``count``."""
    return f"{stem}-{index:05d}-of-{count:05d}.safetensors"


def write_tensors(path: Path, tensors: dict) -> None:
    """``tensors`` (moved to the CPU) as a safetensors file at ``path``, atomically."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    atomic_write(Path(path), lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))


def _check_target(directory) -> Path:
    directory = Path(directory)
    if (directory / EXPORT_CONFIG_FILE).exists():
        # SAELens names its weights like ours: saving here would overwrite that export's weights
        raise FileExistsError(f"{directory} holds a SAELens or sparsify SAE ({EXPORT_CONFIG_FILE}); save to a folder "
                              f"of its own")
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def write(directory, *, class_name: str, dtype: torch.dtype, config: dict, tensors: dict | None,
          activations: dict | None = None, shards: dict | None = None) -> None:
    """Writes ``tensors`` and ``config.json`` (the constructor arguments ``config`` of
    ``class_name``) to ``directory``, created if needed; each file atomically. With ``shards``
    (``{"count", "bounds", "sliced"}``) ``tensors`` is None: ``config.json`` names the shard
    files, which each process writes with :func:`write_shard`."""
    directory = _check_target(directory)
    meta = {"format": FORMAT, "version": FORMAT_VERSION, "class": class_name,
            "dtype": str(dtype).removeprefix("torch."), "config": config}
    if activations:
        meta["activations"] = dict(activations)
    if shards is not None:
        meta["shards"] = {"count": int(shards["count"]), "bounds": [[int(a), int(b)] for a, b in shards["bounds"]],
                          "sliced": list(shards["sliced"])}
    else:
        write_tensors(directory / WEIGHTS_FILE, tensors)
    atomic_write(directory / CONFIG_FILE, lambda p: p.write_text(json.dumps(meta, indent=2) + "\n"))


def write_shard(directory, index: int, count: int, tensors: dict) -> None:
    """Shard ``index`` of ``count`` of a sharded save (see the module docstring)."""
    write_tensors(_check_target(directory) / shard_file_name(index, count), tensors)


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


def read_meta(directory) -> dict:
    """The checked ``config.json`` of the SAE saved in ``directory`` (penalties as saved, as dicts)."""
    cfg_path = Path(directory) / CONFIG_FILE
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path} not found: {directory} is not a saved sparse_sae SAE")
    return _read_meta(cfg_path)


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


def _shard_layout(meta: dict, cfg_path: Path) -> list:
    """``[(file name, lo, hi), ...]`` of a sharded save's ``"shards"``, checked: contiguous row
    bounds covering the ``n_latents`` of the config."""
    shards = meta["shards"]
    try:
        count, bounds, sliced = int(shards["count"]), [tuple(map(int, b)) for b in shards["bounds"]], shards["sliced"]
        n = int(meta["config"]["n_latents"])
        ok = (len(bounds) == count >= 1 and bounds[0][0] == 0 and bounds[-1][1] == n and isinstance(sliced, list)
              and all(a <= b for a, b in bounds) and all(x[1] == y[0] for x, y in zip(bounds, bounds[1:])))
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{cfg_path} has an unreadable 'shards' entry: {exc}") from exc
    if not ok:
        raise ValueError(f"{cfg_path}: its shards' row bounds {shards.get('bounds')} do not cover the "
                         f"{meta['config'].get('n_latents')} latents in order")
    return [(shard_file_name(i, count), a, b) for i, (a, b) in enumerate(bounds)]


def read_rows(parts: list, rows: tuple, sliced, device=None) -> dict:
    """From safetensors files ``parts = [(path, lo, hi), ...]`` (consecutive row ranges of one
    matrix set), the tensors whose names are in ``sliced`` (None: every tensor) cut to rows
    ``[rows[0], rows[1])`` and the others as the first file holds them. Only the files that hold
    those rows are opened."""
    lo, hi = rows
    cut = (lambda key: True) if sliced is None else (lambda key: key in sliced)
    pieces, whole = {}, None
    for path, a, b in parts:
        if whole is not None and not (a < hi and b > lo):
            continue
        with safe_open(str(path), framework="pt", device="cpu") as f:
            if whole is None:
                whole = {key: f.get_tensor(key) for key in f.keys() if not cut(key)}
            if a < hi and b > lo:
                for key in f.keys():
                    if cut(key):
                        pieces.setdefault(key, []).append(f.get_slice(key)[max(lo, a) - a:min(hi, b) - a])
    tensors = dict(whole or {})
    tensors.update({key: torch.cat(p) for key, p in pieces.items()})
    return {k: v.to(device) for k, v in tensors.items()} if device is not None else tensors


def read(directory, device=None, rows: tuple | None = None, sliced=()) -> tuple[dict, dict, Path]:
    """What :func:`write` wrote: ``(meta, tensors, config_path)``, the metadata checked for
    structure and version and its penalties rebuilt as :class:`~sparse_sae.penalties.Penalty`
    objects; the tensors on ``device`` (default CPU), a sharded save's merged. With ``rows``,
    only rows ``[lo, hi)`` of the per-latent tensors (``sliced``; a sharded save names its own)."""
    directory = Path(directory)
    cfg_path = directory / CONFIG_FILE
    meta = read_meta(directory)
    if "shards" in meta:
        layout = _shard_layout(meta, cfg_path)
        sliced = meta["shards"]["sliced"]
    else:
        n = meta["config"].get("n_latents")     # a bad value is reported when the SAE is built
        layout = [(WEIGHTS_FILE, 0, n if isinstance(n, int) else 0)]
    for name, _, _ in layout:
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory / name} not found: {directory} is not a complete saved sparse_sae SAE")
    config = dict(meta["config"])
    try:
        config["penalties"] = [penalty_from_config(p) for p in config.get("penalties", [])]
        if config.get("auxk") is not None:
            config["auxk"] = penalty_from_config(config["auxk"])
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        raise ValueError(f"{cfg_path} does not describe a valid {meta.get('class')}: {type(exc).__name__}: "
                         f"{exc}") from exc
    meta["config"] = config
    if rows is None:
        rows = (0, layout[-1][2])
    try:
        tensors = read_rows([(directory / name, a, b) for name, a, b in layout], rows, sliced,
                            device="cpu" if device is None else device)
    except (RuntimeError, SafetensorError, OSError, TypeError) as exc:
        what = (f"{directory / layout[0][0]} is" if len(layout) == 1 else f"the weight shards in {directory} are")
        raise ValueError(f"{what} damaged or does not match {cfg_path}: {' '.join(str(exc).split())}") from exc
    return meta, tensors, cfg_path
