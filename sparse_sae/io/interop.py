"""Export to and import from the on-disk formats of SAELens and EleutherAI sparsify, without
depending on either package (tests/peers checks both directions with their own loaders).

SAELens (``cfg.json`` + ``sae_weights.safetensors``): ``W_enc`` is ``d_in x d_sae``, ``W_dec``
``d_sae x d_in``, ``b_enc`` ``d_sae``, ``b_dec`` ``d_in``; JumpReLU adds ``threshold`` (``d_sae``),
a BatchTopK training checkpoint ``topk_threshold`` (a scalar). ``cfg.json`` names the
``architecture`` with ``d_in``, ``d_sae``, ``dtype``, ``apply_b_dec_to_input``,
``normalize_activations``, ``k`` and ``rescale_acts_by_decoder_norm`` for Top-k, and a
``metadata`` block (``sae_lens_version``, ``model_name``, ``hook_name``, ...).

sparsify (``cfg.json`` + ``sae.safetensors``): ``encoder.weight`` ``d_sae x d_in``,
``encoder.bias``, ``W_dec`` ``d_sae x d_in``, ``b_dec``; ``cfg.json`` has ``d_in``, ``k``,
``num_latents``, ``expansion_factor``, ``normalize_decoder``, ``activation``, ``multi_topk``,
``skip_connection``, ``transcode``. sparsify holds Top-k SAEs only.

Export: an input scale is folded into the weights (both formats take raw activations).
Penalties, AuxK and the JumpReLU bandwidth are training settings and are not exported. A
BatchTopK SAE goes to SAELens as ``jumprelu`` with its learned global threshold (how it runs at
inference), and cannot go to sparsify. :func:`export_notes` says what an export drops or converts.

Import: every ``cfg.json`` key is either understood (and applied) or known to have no effect on
what the loaded SAE computes (training settings, descriptions); any other key is refused rather
than ignored. :func:`read_saelens` / :func:`read_sparsify` also return what was converted or left out.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors.torch import load_file, save_file

from sparse_sae._files import atomic_write
from sparse_sae._version import __version__
from sparse_sae.saes.serialization import CONFIG_FILE, folded_state

SAELENS_WEIGHTS, SPARSIFY_WEIGHTS, EXPORT_CONFIG = "sae_weights.safetensors", "sae.safetensors", "cfg.json"
# The SAELens release whose cfg.json layout to_saelens writes (the one the peer tests load with,
# pinned in bench/peers/requirements.txt). SAELens reads a config without a version as pre-6.0
# and then drops its metadata.
SAELENS_FORMAT_VERSION = "6.54.12"

FORMATS = ("saelens", "sparsify")


class Imported(NamedTuple):
    """An imported SAE, where its inputs come from (``model``, ``hook_name`` when the file says),
    and what the import converted or left out."""

    sae: object
    activations: dict
    notes: list


# ---------------------------------------------------------------------------------------- files
def held_format(directory) -> str | None:
    """Which SAE ``directory`` holds: ``sparse_sae``, ``saelens``, ``sparsify`` or None."""
    d = Path(directory)
    if (d / SPARSIFY_WEIGHTS).exists():
        return "sparsify"
    if (d / CONFIG_FILE).exists():
        return "sparse_sae"
    if (d / EXPORT_CONFIG).exists() or (d / SAELENS_WEIGHTS).exists():
        return "saelens"
    return None


def check_target(directory, fmt: str, overwrite: bool = False) -> None:
    """Refuses to write a ``fmt`` SAE into a folder that holds another SAE: SAELens and sparsify
    both name their config ``cfg.json``, and SAELens and sparse_sae both name their weights
    ``sae_weights.safetensors``. ``overwrite`` replaces an earlier SAE of the same format only."""
    held = held_format(directory)
    if held is None or (held == fmt and overwrite):
        return
    names = {"sparse_sae": "a sparse_sae SAE (config.json)", "saelens": "a SAELens SAE (cfg.json)",
             "sparsify": "a sparsify SAE (sae.safetensors)"}
    if held == fmt:
        raise FileExistsError(f"{directory} already holds {names[held]}; pass overwrite=True (--overwrite) to "
                              f"replace it, or choose an empty folder")
    raise FileExistsError(f"{directory} holds {names[held]}; write the {fmt} SAE to a folder of its own (the "
                          f"formats share file names, so one would overwrite the other)")


def _dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def _write(directory, weights_name: str, tensors: dict, cfg: dict, fmt: str, overwrite: bool) -> Path:
    directory = Path(directory)
    check_target(directory, fmt, overwrite)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    atomic_write(directory / weights_name, lambda p: save_file(tensors, str(p)))
    atomic_write(directory / EXPORT_CONFIG, lambda p: p.write_text(json.dumps(cfg, indent=2) + "\n"))
    return directory


def _read(directory, weights_name: str, what: str) -> tuple:
    directory = Path(directory)
    cfg_path, w_path = directory / EXPORT_CONFIG, directory / weights_name
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise FileNotFoundError(f"{p} not found: {directory} is not a {what} SAE directory")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{cfg_path} is not valid JSON: {exc}") from exc
    if not isinstance(cfg, dict):
        raise ValueError(f"{cfg_path} must hold a JSON object, got {type(cfg).__name__}")
    try:
        tensors = load_file(str(w_path))
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        raise ValueError(f"{w_path} is not a readable safetensors file: {exc}") from exc
    return cfg, tensors


def _check_tensors(tensors: dict, need, optional, path) -> None:
    missing = [k for k in need if k not in tensors]
    if missing:
        raise ValueError(f"{path} lacks tensor(s) {missing}; it has {sorted(tensors)}")
    extra = sorted(set(tensors) - set(need) - set(optional))
    if extra:
        raise ValueError(f"{path} holds tensor(s) {extra} that sparse_sae has no counterpart for; refusing to "
                         f"import a different SAE than the file describes")


def _check_keys(cfg: dict, understood, harmless, path, what: str) -> list:
    """The keys of ``cfg`` that are only harmless (to list as not carried over); raises on others."""
    unknown = sorted(set(cfg) - set(understood) - set(harmless))
    if unknown:
        raise ValueError(f"{path}: key(s) {unknown} are not understood by sparse_sae's {what} import; refusing "
                         f"rather than ignoring them (they may change what the SAE computes)")
    return sorted(k for k in cfg if k in harmless and k not in understood)


def _float_dtype(name, path) -> torch.dtype:
    dtype = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"{path}: dtype {name!r} is not a floating torch dtype")
    return dtype


def _same_dim(cfg: dict, key: str, value: int, path) -> None:
    if key in cfg and cfg[key] not in (None, 0) and int(cfg[key]) != value:
        raise ValueError(f"{path}: cfg {key}={cfg[key]} but the weights have {value}")


def _load(sae, state: dict) -> None:
    with torch.no_grad():
        for name, value in state.items():
            param = getattr(sae, name)
            if param.shape != value.shape:
                raise ValueError(f"{name} has shape {tuple(value.shape)}, expected {tuple(param.shape)}")
            param.copy_(value.to(param.dtype))
    if not all(math.isfinite(float(p.detach().abs().sum())) for p in sae.parameters()):
        raise ValueError("the imported weights contain NaN or Inf")


# ---------------------------------------------------------------------------------------- export
def export_notes(sae, fmt: str) -> list:
    """What exporting ``sae`` to ``fmt`` (``saelens`` or ``sparsify``) leaves out or converts."""
    from sparse_sae.saes import BatchTopKSAE, GatedSAE, JumpReLUSAE, MatryoshkaTopKSAE

    notes = []
    if sae.input_scale is not None:
        notes.append(f"input scale {sae.input_scale:.6g} folded into the weights (the export takes raw activations)")
    if isinstance(sae, BatchTopKSAE) and fmt == "saelens":
        notes.append(f"BatchTopK (k={sae.k} per row on average) becomes a SAELens JumpReLU with the learned global "
                     f"threshold {float(sae.threshold):.6g} on every latent, which is how it runs at inference; k "
                     f"is not carried over")
    left = [f"{type(p).__name__}({p.coef:g})" for p in sae.penalties]
    if getattr(sae, "auxk", None) is not None:
        left.append(f"AuxK({sae.auxk.coef:g})")
    if isinstance(sae, JumpReLUSAE):
        left.append(f"bandwidth {sae.bandwidth:g}")
    if isinstance(sae, GatedSAE):
        left.append(f"aux_coef {sae.aux_coef:g}")
    if isinstance(sae, MatryoshkaTopKSAE):
        left.append(f"matryoshka_sizes {list(sae.matryoshka_sizes)} (it runs as a plain Top-k SAE at inference)")
    if left:
        notes.append("training settings not carried over: " + ", ".join(left))
    if fmt == "sparsify" and not _unit_rows(folded_state(sae)["W_dec"]):
        norms = folded_state(sae)["W_dec"].double().norm(dim=1)
        notes.append(f"decoder rows are not unit norm ({float(norms.min()):.3g} to {float(norms.max()):.3g}), so "
                     f"the config says normalize_decoder: false (sparsify's trainer would otherwise renormalise "
                     f"them, which changes the SAE)")
    return notes


def saelens_names(activations: dict) -> dict:
    """SAELens metadata names (``model_name``, ``hook_name``, ``hf_hook_name``) for the activations
    recorded with a saved SAE (:func:`sparse_sae.saes.serialization.saved_activations`). A module-name
    layer is a transformers module path; an int layer ``L`` (``hidden_states[L]`` of transformers)
    is named ``hidden_states.L``, since its TransformerLens name depends on the model."""
    layer = activations.get("layer")
    hook, hf_hook = activations.get("hook_name"), activations.get("hf_hook_name")
    if hook is None and layer is not None:
        hook = layer if isinstance(layer, str) else f"hidden_states.{layer}"
    if hf_hook is None and isinstance(layer, str):
        hf_hook = layer
    return {"model_name": activations.get("model"), "hook_name": hook, "hf_hook_name": hf_hook}


def _unit_rows(W_dec: torch.Tensor, tol: float = 1e-4) -> bool:
    return bool(((W_dec.double().norm(dim=1) - 1).abs() <= tol).all())


def to_saelens(sae, directory, *, hook_name: str | None = None, model_name: str | None = None,
               hf_hook_name: str | None = None, overwrite: bool = False) -> Path:
    """Writes ``sae`` in the SAELens 6.x format to ``directory``; ``hook_name``, ``model_name`` (and
    ``hf_hook_name``, a transformers module path) go to its metadata. Refuses a folder that holds
    another SAE (``overwrite`` replaces an earlier SAELens export)."""
    from sparse_sae.saes import BatchTopKSAE, GatedSAE, JumpReLUSAE, ReLUSAE, TopKSAE

    state = folded_state(sae)
    tensors = {"W_enc": state["W_enc"].T, "W_dec": state["W_dec"], "b_enc": state["b_enc"], "b_dec": state["b_dec"]}
    metadata = {"sae_lens_version": SAELENS_FORMAT_VERSION, "sae_lens_training_version": None,
                "model_name": model_name, "hook_name": hook_name, "hf_hook_name": hf_hook_name,
                "exported_by": f"sparse_sae {__version__}"}
    cfg = {"d_in": sae.d_in, "d_sae": sae.n_latents, "dtype": _dtype_name(sae.W_enc), "device": "cpu",
           "apply_b_dec_to_input": True, "normalize_activations": "none", "reshape_activations": "none",
           "metadata": {k: v for k, v in metadata.items() if v is not None or k == "sae_lens_training_version"}}
    if isinstance(sae, BatchTopKSAE):
        thr = float(sae.threshold)
        if thr < 0:
            raise ValueError("this BatchTopKSAE has no learned threshold yet (train it first); SAELens runs it as "
                             "a JumpReLU with that threshold")
        # the threshold acts on the scaled pre-activations; the folded encoder already yields them
        cfg["architecture"] = "jumprelu"
        tensors["threshold"] = torch.full((sae.n_latents,), thr, dtype=state["b_enc"].dtype)
    elif isinstance(sae, TopKSAE):
        # written out: SAELens's training class defaults it to true and would rescale the codes
        cfg.update(architecture="topk", k=sae.k, rescale_acts_by_decoder_norm=False)
    elif isinstance(sae, JumpReLUSAE):
        cfg["architecture"] = "jumprelu"
        tensors["threshold"] = state["log_threshold"].exp()
    elif isinstance(sae, GatedSAE):
        cfg["architecture"] = "gated"
        tensors.update(b_gate=tensors.pop("b_enc"), r_mag=state["r_mag"], b_mag=state["b_mag"])
    elif isinstance(sae, ReLUSAE):
        cfg["architecture"] = "standard"
    else:
        raise TypeError(f"cannot export a {type(sae).__name__} to SAELens")
    return _write(directory, SAELENS_WEIGHTS, tensors, cfg, "saelens", overwrite)


def to_sparsify(sae, directory, *, overwrite: bool = False) -> Path:
    """Writes a Top-k ``sae`` in EleutherAI sparsify's format to ``directory``. Refuses a folder
    that holds another SAE (``overwrite`` replaces an earlier sparsify export)."""
    from sparse_sae.saes import BatchTopKSAE, TopKSAE

    if not isinstance(sae, TopKSAE) or isinstance(sae, BatchTopKSAE):
        raise TypeError(f"sparsify holds Top-k SAEs only, got a {type(sae).__name__}")
    state = folded_state(sae)
    tensors = {"encoder.weight": state["W_enc"], "encoder.bias": state["b_enc"], "W_dec": state["W_dec"],
               "b_dec": state["b_dec"]}
    # normalize_decoder tells sparsify's trainer to keep the rows unit norm; say so only when they are
    cfg = {"activation": "topk", "expansion_factor": max(1, sae.n_latents // sae.d_in),
           "normalize_decoder": _unit_rows(state["W_dec"]), "num_latents": sae.n_latents, "k": sae.k,
           "multi_topk": False, "skip_connection": False, "transcode": False, "d_in": sae.d_in}
    return _write(directory, SPARSIFY_WEIGHTS, tensors, cfg, "sparsify", overwrite)


# ---------------------------------------------------------------------------------------- SAELens import
# cfg.json keys by what they mean for the loaded SAE (sae_lens 6.x config dataclasses; pre-6.0 names
# as SAELens's handle_pre_6_0_config maps them).
_SAELENS_UNDERSTOOD = {"architecture", "d_in", "d_sae", "dtype", "apply_b_dec_to_input", "normalize_activations",
                       "reshape_activations", "metadata", "model_name", "hook_name", "hook_point", "activation_fn",
                       "activation_fn_str", "activation_fn_kwargs", "finetuning_scaling_factor",
                       "sae_lens_version"}
_SAELENS_ARCH_KEYS = {
    "standard": set(),
    "gated": set(),
    "jumprelu": {"jumprelu_bandwidth", "jumprelu_init_threshold"},
    "topk": {"k", "rescale_acts_by_decoder_norm"},
    "batchtopk": {"k", "rescale_acts_by_decoder_norm", "topk_threshold_lr"},
}
# no effect on what the loaded SAE computes: training settings (listed as not carried over) ...
_SAELENS_TRAINING = {
    "decoder_init_norm", "use_sparse_activations", "aux_loss_coefficient", "l1_coefficient", "lp_norm",
    "l1_warm_up_steps", "jumprelu_sparsity_loss_mode", "l0_coefficient", "l0_warm_up_steps",
    "pre_act_loss_coefficient", "jumprelu_tanh_scale", "jumprelu_ste_to_input", "target_l0",
}
# ... and where it runs or what it was trained on
_SAELENS_DESCRIPTIVE = {
    "device", "model_class_name", "hook_head_index", "hook_point_head_index", "hook_layer",
    "model_from_pretrained_kwargs", "prepend_bos", "exclude_special_tokens", "neuronpedia_id", "context_size",
    "seqpos_slice", "dataset_path", "dataset_trust_remote_code", "sae_lens_training_version", "hf_hook_name",
}
_SAELENS_OTHER_ARCH = {
    "abstopk": "an AbsTopK SAE (selects by |z| and keeps negative codes); sparse_sae's Top-k keeps the largest "
               "positive pre-activations",
    "matryoshka_batchtopk": "a Matryoshka BatchTopK training checkpoint (nested losses); save it with "
                            "save_inference_model and import the jumprelu SAE that writes",
}


def _saelens_arch(cfg: dict, path) -> str:
    act = cfg.get("activation_fn", cfg.get("activation_fn_str"))
    arch = cfg.get("architecture")
    if arch is None:                 # a pre-6.0 config: SAELens derives it from the activation
        arch = "topk" if act == "topk" else "standard"
    if arch in _SAELENS_OTHER_ARCH:
        raise ValueError(f"{path}: this is {_SAELENS_OTHER_ARCH[arch]}; it cannot be imported")
    if arch not in _SAELENS_ARCH_KEYS:
        raise ValueError(f"{path}: SAELens architecture {arch!r} is not supported (supported: standard, gated, "
                         f"topk, jumprelu, and batchtopk training checkpoints)")
    want = "topk" if arch in ("topk", "batchtopk") else "relu"
    if act is not None and act != want:
        raise ValueError(f"{path}: activation_fn {act!r} does not match architecture {arch!r} (expected {want!r})")
    kwargs = cfg.get("activation_fn_kwargs") or {}
    if set(kwargs) - ({"k"} if want == "topk" else set()):
        raise ValueError(f"{path}: activation_fn_kwargs {kwargs} are not understood for architecture {arch!r}")
    return arch


def read_saelens(directory, device=None) -> Imported:
    """Reads an SAELens SAE (``standard``, ``gated``, ``topk``, ``jumprelu``, or a ``batchtopk``
    training checkpoint) from ``directory``: the SAE computes the codes and reconstructions that
    SAELens's own ``SAE.load_from_disk`` does."""
    from sparse_sae.saes import BatchTopKSAE, GatedSAE, JumpReLUSAE, ReLUSAE, TopKSAE

    cfg, t = _read(directory, SAELENS_WEIGHTS, "SAELens")
    path, w_path = Path(directory) / EXPORT_CONFIG, Path(directory) / SAELENS_WEIGHTS
    arch = _saelens_arch(cfg, path)
    dropped = _check_keys(cfg, _SAELENS_UNDERSTOOD | _SAELENS_ARCH_KEYS[arch], _SAELENS_TRAINING | _SAELENS_DESCRIPTIVE,
                          path, "SAELens")
    dropped = [k for k in dropped if k in _SAELENS_TRAINING]
    extra = {"jumprelu": ("threshold",), "batchtopk": ("topk_threshold",)}.get(arch, ())
    optional = ("scaling_factor", "log_threshold") if arch == "jumprelu" else ("scaling_factor",)
    if arch == "jumprelu" and "log_threshold" in t and "threshold" not in t:   # older SAELens checkpoints
        t["threshold"] = t.pop("log_threshold").exp()
    if arch == "gated":   # b_gate is our b_enc (W_enc is shared by the gate and magnitude paths)
        _check_tensors(t, ("W_enc", "W_dec", "b_gate", "r_mag", "b_mag", "b_dec"), optional, w_path)
        t["b_enc"] = t.pop("b_gate")
    else:
        _check_tensors(t, ("W_enc", "W_dec", "b_enc", "b_dec") + extra, optional, w_path)
    if "scaling_factor" in t:        # pre-6.0 finetuning scale: SAELens drops it when it is all ones
        if not torch.all(t["scaling_factor"] == 1):
            raise ValueError(f"{w_path}: a finetuning scaling_factor other than 1 is not supported")
        del t["scaling_factor"]
    if cfg.get("finetuning_scaling_factor"):
        raise ValueError(f"{path}: finetuning_scaling_factor=true is not supported")
    norm = cfg.get("normalize_activations", "none")
    if norm not in ("none", None, False):
        raise ValueError(f"{path}: normalize_activations={norm!r} is not supported: the SAE expects activations "
                         f"normalised in a way its files do not fully describe; fold the normalisation into the "
                         f"weights in SAELens (e.g. fold_activation_norm_scaling_factor), save, then import")
    if cfg.get("reshape_activations", "none") not in ("none", None):
        raise ValueError(f"{path}: reshape_activations={cfg['reshape_activations']!r} is not supported")

    dtype = _float_dtype(cfg["dtype"], path) if "dtype" in cfg else t["W_enc"].dtype
    t = {k: v.to(dtype) for k, v in t.items()}       # SAELens casts the weights to the config's dtype
    d_in, d_sae = t["W_enc"].shape
    if t["W_dec"].shape != (d_sae, d_in) or t["b_enc"].shape != (d_sae,) or t["b_dec"].shape != (d_in,):
        raise ValueError(f"{w_path}: W_enc is {tuple(t['W_enc'].shape)} (d_in x d_sae) but W_dec is "
                         f"{tuple(t['W_dec'].shape)}, b_enc {tuple(t['b_enc'].shape)}, b_dec {tuple(t['b_dec'].shape)}")
    _same_dim(cfg, "d_in", d_in, path)
    _same_dim(cfg, "d_sae", d_sae, path)
    W_enc, b_enc, W_dec, b_dec = t["W_enc"].T.contiguous(), t["b_enc"], t["W_dec"], t["b_dec"]
    notes = []
    if not cfg.get("apply_b_dec_to_input", True):
        # SAELens encodes x @ W_enc + b_enc; sparse_sae encodes (x - b_dec) @ W_enc.T + b_enc
        shift = t["W_enc"].double().T @ b_dec.double()
        b_enc = (b_enc.double() + shift).to(dtype)
        if arch == "gated":   # the magnitude path's encoder is exp(r_mag) * W_enc
            t["b_mag"] = (t["b_mag"].double() + t["r_mag"].double().exp() * shift).to(dtype)
        notes.append("apply_b_dec_to_input=false: b_dec @ W_enc folded into the encoder's biases")
    if arch in ("topk", "batchtopk") and cfg.get("rescale_acts_by_decoder_norm", arch == "batchtopk"):
        # as SAELens's fold_W_dec_norm: the codes it computes (hidden_pre * ||W_dec_j||) unchanged
        n = W_dec.norm(dim=-1).clamp(min=1e-8)
        W_enc, b_enc, W_dec = W_enc * n[:, None], b_enc * n, W_dec / n[:, None]
        notes.append("rescale_acts_by_decoder_norm=true: decoder norms folded into the encoder (W_enc and b_enc "
                     "scaled by each ||W_dec_j||, W_dec rows set to unit norm), as SAELens's fold_W_dec_norm; "
                     "codes and reconstructions unchanged")
    state = {"W_enc": W_enc, "W_dec": W_dec, "b_enc": b_enc, "b_dec": b_dec}
    kw = {"dtype": dtype, "device": device}
    if arch == "topk":
        k = cfg.get("k") or (cfg.get("activation_fn_kwargs") or {}).get("k")
        if k is None:
            raise ValueError(f"{path}: a topk SAE config must give k")
        sae = TopKSAE(d_in, d_sae, int(k), **kw)
    elif arch == "batchtopk":
        if cfg.get("k") is None:
            raise ValueError(f"{path}: a batchtopk SAE config must give k")
        sae = BatchTopKSAE(d_in, d_sae, int(cfg["k"]), threshold_momentum=float(cfg.get("topk_threshold_lr", 0.01)),
                           **kw)
        sae.threshold.fill_(float(t["topk_threshold"]))
        notes.append(f"BatchTopK training checkpoint: imported as a BatchTopKSAE with its global threshold "
                     f"{float(t['topk_threshold']):.6g} (used in eval mode, as SAELens's jumprelu inference SAE)")
    elif arch == "jumprelu":
        thr = t["threshold"]
        low = int((thr <= 0).sum())
        if low:
            notes.append(f"{low} threshold(s) <= 0 raised to the smallest positive float (they act as a ReLU, "
                         f"as in SAELens)")
        thr = thr.double().clamp_min(torch.finfo(torch.float32).tiny)
        sae = JumpReLUSAE(d_in, d_sae, bandwidth=float(cfg.get("jumprelu_bandwidth", 1e-3)),
                          init_threshold=float(cfg.get("jumprelu_init_threshold") or thr.mean()), **kw)
        state["log_threshold"] = thr.log()
    elif arch == "gated":
        sae = GatedSAE(d_in, d_sae, **kw)
        state.update(r_mag=t["r_mag"], b_mag=t["b_mag"])
        notes.append("gated: SAELens's W_enc and b_gate are the gate's (sparse_sae's W_enc and b_enc); the "
                     "magnitude path shares W_enc, scaled by exp(r_mag)")
    else:
        sae = ReLUSAE(d_in, d_sae, **kw)
    _load(sae, state)
    meta = cfg.get("metadata") or {}
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: metadata must be an object, got {type(meta).__name__}")
    activations = {k: v for k, v in {
        "model": meta.get("model_name", cfg.get("model_name")),
        "hook_name": meta.get("hook_name", cfg.get("hook_name", cfg.get("hook_point"))),
        "hf_hook_name": meta.get("hf_hook_name", cfg.get("hf_hook_name"))}.items() if v is not None}
    if dropped:
        notes.append("training settings not carried over: " + ", ".join(f"{k}={cfg[k]}" for k in dropped))
    return Imported(sae, activations, notes)


def from_saelens(directory, device=None):
    """Reads an SAELens SAE from ``directory`` (see :func:`read_saelens`)."""
    return read_saelens(directory, device).sae


# ---------------------------------------------------------------------------------------- sparsify import
_SPARSIFY_UNDERSTOOD = {"activation", "k", "num_latents", "expansion_factor", "d_in", "skip_connection", "transcode"}
_SPARSIFY_HARMLESS = {"normalize_decoder", "multi_topk"}     # training settings


def read_sparsify(directory, device=None) -> Imported:
    """Reads an EleutherAI sparsify Top-k SAE from ``directory``: the SAE computes the codes and
    reconstructions that sparsify's own ``SparseCoder.load_from_disk`` does."""
    from sparse_sae.saes import TopKSAE

    cfg, t = _read(directory, SPARSIFY_WEIGHTS, "sparsify")
    path, w_path = Path(directory) / EXPORT_CONFIG, Path(directory) / SPARSIFY_WEIGHTS
    dropped = _check_keys(cfg, _SPARSIFY_UNDERSTOOD, _SPARSIFY_HARMLESS, path, "sparsify")
    if cfg.get("transcode"):
        raise ValueError(f"{path}: a transcoder (transcode=true) predicts another layer's output; sparse_sae SAEs "
                         f"reconstruct their input")
    if cfg.get("skip_connection") or "W_skip" in t:
        raise ValueError(f"{path}: a skip connection (W_skip) is not supported")
    if cfg.get("activation", "topk") != "topk":
        raise ValueError(f"{path}: activation {cfg['activation']!r} is not supported (topk only)")
    _check_tensors(t, ("encoder.weight", "W_dec", "b_dec"), ("encoder.bias",), w_path)
    dtype = next(iter(t.values())).dtype            # sparsify builds the SAE in its first tensor's dtype
    t = {k: v.to(dtype) for k, v in t.items()}
    d_sae, d_in = t["encoder.weight"].shape
    if t["W_dec"].shape != (d_sae, d_in) or t["b_dec"].shape != (d_in,):
        raise ValueError(f"{w_path}: encoder.weight is {tuple(t['encoder.weight'].shape)}, W_dec "
                         f"{tuple(t['W_dec'].shape)}, b_dec {tuple(t['b_dec'].shape)}: shapes disagree")
    _same_dim(cfg, "d_in", d_in, path)
    _same_dim(cfg, "num_latents", d_sae, path)
    if "k" not in cfg:
        raise ValueError(f"{path} must give k")
    sae = TopKSAE(d_in, d_sae, int(cfg["k"]), dtype=dtype, device=device)
    b_enc = t.get("encoder.bias", torch.zeros(d_sae, dtype=dtype))
    _load(sae, {"W_enc": t["encoder.weight"], "b_enc": b_enc, "W_dec": t["W_dec"], "b_dec": t["b_dec"]})
    notes = ["training settings not carried over: " + ", ".join(f"{k}={cfg[k]}" for k in dropped)] if dropped else []
    return Imported(sae, {}, notes)


def from_sparsify(directory, device=None):
    """Reads an EleutherAI sparsify Top-k SAE from ``directory`` (see :func:`read_sparsify`)."""
    return read_sparsify(directory, device).sae
