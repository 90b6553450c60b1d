"""Export to and import from the on-disk formats of SAELens and EleutherAI sparsify, without
depending on either package.

SAELens (``cfg.json`` + ``sae_weights.safetensors``): ``W_enc`` is ``d_in x d_sae``, ``W_dec``
``d_sae x d_in``, ``b_enc`` ``d_sae``, ``b_dec`` ``d_in``, and JumpReLU adds ``threshold``
(``d_sae``). ``cfg.json`` names the ``architecture`` (``standard``, ``topk``, ``jumprelu``) with
``d_in``, ``d_sae``, ``dtype``, ``device``, ``apply_b_dec_to_input``, ``normalize_activations``,
``k`` for Top-k, and a ``metadata`` block.

sparsify (``cfg.json`` + ``sae.safetensors``): ``encoder.weight`` ``d_sae x d_in``,
``encoder.bias``, ``W_dec`` ``d_sae x d_in``, ``b_dec``; ``cfg.json`` has ``d_in``, ``k``,
``num_latents``, ``expansion_factor``, ``normalize_decoder``, ``activation`` (``topk``),
``multi_topk``, ``skip_connection``, ``transcode``. sparsify holds Top-k SAEs only.

An input scale is folded into the exported weights (both formats take raw activations).
Penalties and AuxK are training settings: they are not exported, and an imported SAE has none.
A BatchTopK SAE exports to SAELens as ``jumprelu`` with its learned global threshold (how it
runs at inference); it cannot go to sparsify.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from sparse_sae.serialization import _atomic_write, folded_state

SAELENS_WEIGHTS, SAELENS_CONFIG = "sae_weights.safetensors", "cfg.json"
SPARSIFY_WEIGHTS, SPARSIFY_CONFIG = "sae.safetensors", "cfg.json"


def _dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def _write(directory, weights_name: str, tensors: dict, cfg: dict) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    _atomic_write(directory / weights_name, lambda p: save_file(tensors, str(p)))
    _atomic_write(directory / SAELENS_CONFIG, lambda p: p.write_text(json.dumps(cfg, indent=2) + "\n"))
    return directory


def _read(directory, weights_name: str, what: str) -> tuple:
    directory = Path(directory)
    cfg_path, w_path = directory / SAELENS_CONFIG, directory / weights_name
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise FileNotFoundError(f"{p} not found: {directory} is not a {what} SAE directory")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{cfg_path} is not valid JSON: {exc}") from exc
    try:
        tensors = load_file(str(w_path))
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        raise ValueError(f"{w_path} is not a readable safetensors file: {exc}") from exc
    return cfg, tensors


def _need(tensors: dict, keys, path) -> None:
    missing = [k for k in keys if k not in tensors]
    if missing:
        raise ValueError(f"{path} lacks tensor(s) {missing}; it has {sorted(tensors)}")


# ---------------------------------------------------------------------------------------- SAELens
def to_saelens(sae, directory, *, hook_name: str | None = None, model_name: str | None = None) -> Path:
    """Writes ``sae`` in the SAELens format to ``directory``."""
    from sparse_sae.modules import BatchTopKSAE, JumpReLUSAE, ReLUSAE, TopKSAE

    state = folded_state(sae)
    tensors = {"W_enc": state["W_enc"].T, "W_dec": state["W_dec"], "b_enc": state["b_enc"], "b_dec": state["b_dec"]}
    cfg = {"d_in": sae.d_in, "d_sae": sae.n_latents, "dtype": _dtype_name(sae.W_enc), "device": "cpu",
           "apply_b_dec_to_input": True, "normalize_activations": "none", "reshape_activations": "none",
           "metadata": {"hook_name": hook_name, "model_name": model_name, "exported_by": "sparse_sae"}}
    if isinstance(sae, BatchTopKSAE):
        thr = float(sae.threshold)
        if thr < 0:
            raise ValueError("this BatchTopKSAE has no learned threshold yet (train it first); SAELens runs it as "
                             "a JumpReLU with that threshold")
        # the threshold acts on the scaled pre-activations; the folded encoder already yields them
        cfg["architecture"] = "jumprelu"
        tensors["threshold"] = torch.full((sae.n_latents,), thr, dtype=state["b_enc"].dtype)
    elif isinstance(sae, TopKSAE):
        cfg["architecture"] = "topk"
        cfg["k"] = sae.k
    elif isinstance(sae, JumpReLUSAE):
        cfg["architecture"] = "jumprelu"
        tensors["threshold"] = state["log_threshold"].exp()
    elif isinstance(sae, ReLUSAE):
        cfg["architecture"] = "standard"
    else:
        raise TypeError(f"cannot export a {type(sae).__name__} to SAELens")
    return _write(directory, SAELENS_WEIGHTS, tensors, cfg)


def from_saelens(directory, device=None):
    """Reads an SAELens SAE (``standard``, ``topk`` or ``jumprelu``) from ``directory``."""
    from sparse_sae.modules import JumpReLUSAE, ReLUSAE, TopKSAE

    cfg, t = _read(directory, SAELENS_WEIGHTS, "SAELens")
    w_path = Path(directory) / SAELENS_WEIGHTS
    _need(t, ("W_enc", "W_dec", "b_enc", "b_dec"), w_path)
    arch = cfg.get("architecture", "standard")
    d_in, d_sae = t["W_enc"].shape
    if t["W_dec"].shape != (d_sae, d_in):
        raise ValueError(f"{w_path}: W_enc is {tuple(t['W_enc'].shape)} (d_in x d_sae) but W_dec is "
                         f"{tuple(t['W_dec'].shape)}, expected {(d_sae, d_in)}")
    if not cfg.get("apply_b_dec_to_input", True):
        raise ValueError(f"{directory}: apply_b_dec_to_input=false is not supported (sparse_sae always subtracts "
                         f"b_dec before encoding)")
    if cfg.get("normalize_activations", "none") not in ("none", None):
        raise ValueError(f"{directory}: normalize_activations={cfg['normalize_activations']!r} is not supported; "
                         f"fold the scaling into the weights first")
    dtype = t["W_enc"].dtype
    state = {"W_enc": t["W_enc"].T.contiguous(), "W_dec": t["W_dec"], "b_enc": t["b_enc"], "b_dec": t["b_dec"]}
    if arch == "topk":
        k = cfg.get("k") or (cfg.get("activation_fn_kwargs") or {}).get("k")
        if k is None:
            raise ValueError(f"{directory}: a topk SAE config must give k")
        sae = TopKSAE(d_in, d_sae, int(k), dtype=dtype, device=device)
    elif arch == "jumprelu":
        _need(t, ("threshold",), w_path)
        thr = t["threshold"].clamp_min(torch.finfo(torch.float32).tiny)
        sae = JumpReLUSAE(d_in, d_sae, dtype=dtype, device=device,
                          init_threshold=float(thr.mean()) if float(thr.mean()) > 0 else 1e-3)
        state["log_threshold"] = thr.log()
    elif arch == "standard":
        sae = ReLUSAE(d_in, d_sae, dtype=dtype, device=device)
    else:
        raise ValueError(f"{directory}: SAELens architecture {arch!r} is not supported (standard, topk, jumprelu)")
    _load(sae, state)
    return sae


# ---------------------------------------------------------------------------------------- sparsify
def to_sparsify(sae, directory) -> Path:
    """Writes a Top-k ``sae`` in EleutherAI sparsify's format to ``directory``."""
    from sparse_sae.modules import BatchTopKSAE, TopKSAE

    if not isinstance(sae, TopKSAE) or isinstance(sae, BatchTopKSAE):
        raise TypeError(f"sparsify holds Top-k SAEs only, got a {type(sae).__name__}")
    state = folded_state(sae)
    tensors = {"encoder.weight": state["W_enc"], "encoder.bias": state["b_enc"], "W_dec": state["W_dec"],
               "b_dec": state["b_dec"]}
    cfg = {"activation": "topk", "expansion_factor": max(1, sae.n_latents // sae.d_in), "normalize_decoder": True,
           "num_latents": sae.n_latents, "k": sae.k, "multi_topk": False, "skip_connection": False,
           "transcode": False, "d_in": sae.d_in}
    return _write(directory, SPARSIFY_WEIGHTS, tensors, cfg)


def from_sparsify(directory, device=None):
    """Reads an EleutherAI sparsify Top-k SAE from ``directory``."""
    from sparse_sae.modules import TopKSAE

    cfg, t = _read(directory, SPARSIFY_WEIGHTS, "sparsify")
    w_path = Path(directory) / SPARSIFY_WEIGHTS
    _need(t, ("encoder.weight", "W_dec", "b_dec"), w_path)
    for key in ("skip_connection", "transcode"):
        if cfg.get(key):
            raise ValueError(f"{directory}: {key}=true is not supported")
    if cfg.get("activation", "topk") != "topk":
        raise ValueError(f"{directory}: activation {cfg['activation']!r} is not supported (topk only)")
    d_sae, d_in = t["encoder.weight"].shape
    if int(cfg.get("d_in", d_in)) != d_in or t["W_dec"].shape != (d_sae, d_in):
        raise ValueError(f"{w_path}: encoder.weight is {tuple(t['encoder.weight'].shape)}, W_dec "
                         f"{tuple(t['W_dec'].shape)}, cfg d_in {cfg.get('d_in')}: shapes disagree")
    if "k" not in cfg:
        raise ValueError(f"{directory}/cfg.json must give k")
    dtype = t["encoder.weight"].dtype
    sae = TopKSAE(d_in, d_sae, int(cfg["k"]), dtype=dtype, device=device)
    b_enc = t.get("encoder.bias", torch.zeros(d_sae, dtype=dtype))
    _load(sae, {"W_enc": t["encoder.weight"], "b_enc": b_enc, "W_dec": t["W_dec"], "b_dec": t["b_dec"]})
    return sae


def _load(sae, state: dict) -> None:
    with torch.no_grad():
        for name, value in state.items():
            param = getattr(sae, name)
            if param.shape != value.shape:
                raise ValueError(f"{name} has shape {tuple(value.shape)}, expected {tuple(param.shape)}")
            param.copy_(value.to(param.dtype))
    if not all(math.isfinite(float(p.detach().abs().sum())) for p in sae.parameters()):
        raise ValueError("the imported weights contain NaN or Inf")
