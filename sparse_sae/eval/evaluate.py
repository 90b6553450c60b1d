"""The evaluation driver: one SAE, one activation source, and optionally embeddings of the same
inputs (monosemanticity), labels (probing) and a ground-truth dictionary (recovery); returns the
report as a JSON-ready dict (:mod:`sparse_sae.eval.report` writes it out).

Rows are read in order from the source, ``batch_size`` at a time, up to ``max_rows``; row ``n`` of
the embeddings and labels describes row ``n`` of the activations, so both must have as many rows
as the data (or as the ``max_rows`` evaluated). Activations, embeddings and labels holding NaN or
Inf are refused with an error naming the file and rows: a score computed over them means nothing.
"""
from __future__ import annotations

import math
import platform
import time
from pathlib import Path

import numpy as np
import torch

from sparse_sae._version import __version__
from sparse_sae.eval.metrics import ReconstructionStats
from sparse_sae.eval.monosemanticity import MonosemanticityAccumulator, summarize_ms
from sparse_sae.eval.probing import BUDGETS, SparseCodes, probe
from sparse_sae.eval.recovery import feature_recovery
from sparse_sae.eval.robustness import K_FACTORS, forward_at_k, k_values
from sparse_sae.saes import TopKSAE
from sparse_sae.training.data import check_finite_rows, open_source


def _sae_info(sae) -> dict:
    info = {"class": type(sae).__name__, "d_in": sae.d_in, "n_latents": sae.n_latents,
            "penalties": [p.to_config() for p in sae.penalties], "dtype": str(sae.W_enc.dtype).removeprefix("torch.")}
    if isinstance(sae, TopKSAE):
        info["k"] = sae.k
    return info


def load_array(obj, name: str) -> torch.Tensor:
    """A tensor from a tensor, an array, or a ``.npy`` / ``.safetensors`` (one tensor) / ``.pt`` file."""
    if isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj)
    path = Path(obj)
    if not path.is_file():
        raise FileNotFoundError(f"{name} file {path} not found")
    if path.suffix == ".npy":
        return torch.from_numpy(np.load(path, allow_pickle=False))
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        tensors = load_file(str(path))
        if len(tensors) != 1:
            raise ValueError(f"{name} file {path} must hold one tensor, it holds {sorted(tensors)}")
        return next(iter(tensors.values()))
    if path.suffix == ".pt":
        t = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} file {path} must hold a tensor")
        return t
    raise ValueError(f"{name} file {path}: expected .npy, .safetensors or .pt")


def _check_rows(what: str, name, rows: int, data_rows: int, n: int) -> None:
    """Embeddings or labels must describe the data row for row: as many rows as the data, or as
    the ``n`` rows evaluated."""
    if rows not in (data_rows, n):
        raise ValueError(f"{name} has {rows} rows but the activation data has {data_rows}"
                         + (f" ({n} evaluated)" if n != data_rows else "")
                         + f"; row i of the {what} must describe row i of the data")


@torch.no_grad()
def evaluate(sae, data, *, embeddings=None, labels=None, dictionary=None, batch_size: int = 4096,
             max_rows: int | None = None, device=None, k_factors=K_FACTORS, budgets=BUDGETS,
             recovery_threshold: float = 0.9, progress=None) -> dict:
    """Evaluates ``sae`` on ``data`` (anything :func:`sparse_sae.training.data.open_source` takes).

    ``embeddings``: ``N x E`` (tensor or source) of the same inputs by an independent encoder,
    for the monosemanticity score. ``labels``: ``N`` integers, for probing. ``dictionary``:
    ``n_features x d_in`` true features, for recovery. ``device`` (default: the SAE's) is where
    the SAE runs; the SAE is moved there and keeps its train/eval mode. The report also carries
    the per-latent scores under ``_arrays`` (not JSON; :func:`~sparse_sae.eval.report.write_report`
    saves them).
    """
    t0 = time.perf_counter()
    source = open_source(data)
    if source.d != sae.d_in:
        raise ValueError(f"the data has width {source.d} but the SAE expects d_in={sae.d_in}")
    n = source.n_rows if max_rows is None else min(max_rows, source.n_rows)
    if n < 2:
        raise ValueError(f"evaluation needs at least 2 rows, the data has {source.n_rows}")
    dev = torch.device(device) if device is not None else sae.W_enc.device
    was_training = sae.training
    sae.to(dev).eval()
    dtype = sae.W_enc.dtype
    emb_src = None
    if embeddings is not None:
        if isinstance(embeddings, (str, Path)) and not Path(embeddings).exists():
            raise FileNotFoundError(f"embeddings file {embeddings} not found")
        emb_src = open_source(embeddings)
        name = f"embeddings {embeddings}" if isinstance(embeddings, (str, Path)) else "embeddings"
        _check_rows("embeddings", name, emb_src.n_rows, source.n_rows, n)
    if labels is not None:
        name = f"labels {labels}" if isinstance(labels, (str, Path)) else "labels"
        labels = load_array(labels, "labels").reshape(-1)
        _check_rows("labels", name, labels.shape[0], source.n_rows, n)
        if labels.is_floating_point() and not bool(torch.isfinite(labels).all()):
            bad = (~torch.isfinite(labels)).nonzero().flatten()
            raise ValueError(f"{name} has NaN or Inf at entry {int(bad[0])} ({bad.numel()} such entries)")
        labels = labels[:n]
    if dictionary is not None:
        dictionary = load_array(dictionary, "dictionary").float()
    say = progress or (lambda *_: None)

    stats = ReconstructionStats(sae.n_latents, device=dev)
    ms_acc = MonosemanticityAccumulator(sae.n_latents, emb_src.d, device=dev) if emb_src is not None else None
    kept_v, kept_i = [], []
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        x = source.rows(start, stop)
        check_finite_rows(source, start, x)
        x = x.to(dev, dtype)
        out = sae(x)
        values, indices = out.values, out.indices
        stats.update(x, out.recon, values, indices)
        if ms_acc is not None:
            emb = emb_src.rows(start, stop)
            check_finite_rows(emb_src, start, emb, what="embeddings")
            ms_acc.update(emb, values=values, indices=indices)
        if labels is not None:
            kept_v.append(values.cpu())
            kept_i.append(indices.cpu())
    say("reconstruction done")
    report = {"sae": _sae_info(sae), "data": {"rows": n, "d": source.d, "batch_size": batch_size},
              "reconstruction": stats.compute()}
    arrays = {"firing_frequency": (stats.fired.double() / n).cpu().numpy()}

    if isinstance(sae, TopKSAE):
        curve = []
        for kk in k_values(sae.k, sae.n_latents, k_factors):
            s = ReconstructionStats(sae.n_latents, device=dev)
            for start in range(0, n, batch_size):
                x = source.rows(start, min(start + batch_size, n)).to(dev, dtype)
                o = forward_at_k(sae, x, kk)
                s.update(x, o.recon, o.values, o.indices)
            r = s.compute()
            curve.append({"k": kk, "fvu": r["fvu"], "l0": r["l0"], "dead_fraction": r["dead_fraction"]})
        report["k_robustness"] = {"trained_k": sae.k, "rule": "batchtopk" if sae.mode == "batchtopk" else "topk",
                                  "curve": curve}
        say("k-robustness done")
        report["adaptive_sparsity"] = adaptive_sparsity(sae, source, n, batch_size, dev, dtype)
        say("adaptive sparsity done")
    else:
        report["k_robustness"] = {"skipped": f"{type(sae).__name__} has no k"}

    if ms_acc is not None:
        ms = ms_acc.compute()
        arrays["monosemanticity"] = ms.cpu().numpy()
        report["monosemanticity"] = summarize_ms(ms, stats.fired)
        say("monosemanticity done")
    if labels is not None:
        codes = SparseCodes(torch.cat(kept_v), torch.cat(kept_i), sae.n_latents)
        report["probing"] = probe(codes, labels, budgets=budgets)
        say("probing done")
    if dictionary is not None:
        report["recovery"] = feature_recovery(sae.W_dec, dictionary.to(sae.W_dec.device), recovery_threshold)
        say("recovery done")

    report["environment"] = {"sparse_sae": __version__, "torch": torch.__version__,
                             "python": platform.python_version(), "device": str(dev),
                             "threads": torch.get_num_threads()}
    report["time_s"] = round(time.perf_counter() - t0, 3)
    report["_arrays"] = arrays
    sae.train(was_training)
    return report


@torch.no_grad()
def adaptive_sparsity(sae, source, n: int, batch_size: int, dev, dtype) -> dict:
    """The Top-k encoder against its thresholded form (``sae.to_jumprelu``, per-latent thresholds
    calibrated for a mean L0 of k on the first half of the rows, at most 16384), both evaluated
    on the other half: FVU, mean L0 and the L0 spread across rows (std / mean)."""
    half = n // 2 if n >= 4 else n
    calib = source.rows(0, min(half, 16384)).to(dev, dtype)
    jr = sae.to_jumprelu(calib, batch_size=batch_size)
    start0 = half if half < n else 0
    out = {"calibration_rows": int(calib.shape[0]), "held_out_rows": n - start0, "target_l0": sae.k}
    for name, enc in (("topk", sae), ("thresholded", jr)):
        stats = ReconstructionStats(sae.n_latents, device=dev)
        per_row = []
        for start in range(start0, n, batch_size):
            x = source.rows(start, min(start + batch_size, n)).to(dev, dtype)
            o = enc(x)
            stats.update(x, o.recon, o.values, o.indices)
            per_row.append((o.values > 0).sum(1).double().cpu())
        r, l0 = stats.compute(), torch.cat(per_row)
        mean = float(l0.mean())
        out[name] = {"fvu": r["fvu"], "l0": mean,
                     "l0_spread": float(l0.std(unbiased=False)) / mean if mean > 0 else math.nan}
    return out


def finite_or_none(x):
    """JSON has no NaN: non-finite floats become None."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: finite_or_none(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [finite_or_none(v) for v in x]
    return x
