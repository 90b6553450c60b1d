"""Ground-truth feature recovery, for data with a known dictionary (:mod:`sparse_sae.eval.synthetic`).

- ``mean_max_cos``: for each true feature, the best cosine over decoder rows, averaged;
- ``recovered``: the fraction of true features whose best cosine exceeds ``threshold``;
- ``matching_score``: a one-to-one matching (each latent used at most once) maximising the
  total cosine, found exactly by the Hungarian method; the mean matched cosine over the true
  features (a feature left unmatched when there are fewer latents scores 0), and
  ``matched_recovered``, the fraction whose matched cosine exceeds ``threshold``. Unlike the
  max, one latent cannot take credit for several features (merged correlated features).

The assignment uses ``scipy.optimize.linear_sum_assignment`` when scipy is installed, else
:func:`linear_sum_assignment` here (exact, shortest augmenting paths; slower on large problems);
the report says which (``matching_solver``).
"""
from __future__ import annotations

import numpy as np
import torch


def _unit(w: torch.Tensor) -> torch.Tensor:
    w = w.detach().double().cpu()
    return w / w.norm(dim=1, keepdim=True).clamp_min(1e-300)


def linear_sum_assignment(cost: np.ndarray) -> tuple:
    """Rows and columns of a minimum-cost assignment of the ``n x m`` matrix ``cost`` (``n <= m``
    handled directly, ``n > m`` by transposing): every row of the smaller side is assigned.
    Exact: shortest augmenting paths with dual potentials (Jonker-Volgenant), vectorised over
    columns; ``O(n^2 m)`` in the worst case."""
    cost = np.asarray(cost, dtype=np.float64)
    if cost.ndim != 2:
        raise ValueError(f"cost must be 2-D, got shape {cost.shape}")
    if not np.isfinite(cost).all():
        raise ValueError("cost must be finite")
    if cost.shape[0] > cost.shape[1]:
        c, r = linear_sum_assignment(cost.T)
        order = np.argsort(r)
        return r[order], c[order]
    n, m = cost.shape
    u, v = np.zeros(n + 1), np.zeros(m + 1)
    p = np.zeros(m + 1, dtype=np.int64)          # p[j]: row (1-based) assigned to column j; column 0 is virtual
    way = np.zeros(m + 1, dtype=np.int64)
    a = np.vstack([np.zeros((1, m)), cost])     # 1-based rows
    for i in range(1, n + 1):
        p[0], j0 = i, 0
        minv = np.full(m + 1, np.inf)
        used = np.zeros(m + 1, dtype=bool)
        while True:
            used[j0] = True
            i0 = p[j0]
            free = ~used[1:]
            cur = a[i0] - u[i0] - v[1:]
            better = free & (cur < minv[1:])
            minv[1:][better] = cur[better]
            way[1:][better] = j0
            cand = np.where(free, minv[1:], np.inf)
            j1 = int(np.argmin(cand)) + 1
            delta = cand[j1 - 1]
            u[p[used]] += delta
            v[used] -= delta
            minv[1:][free] -= delta
            j0 = j1
            if p[j0] == 0:
                break
        while j0:
            j1 = way[j0]
            p[j0] = p[j1]
            j0 = j1
    cols = np.nonzero(p[1:])[0]
    rows = p[1:][cols] - 1
    order = np.argsort(rows)
    return rows[order], cols[order]


def _assign(score: np.ndarray) -> tuple:
    """Maximum-score assignment and the solver's name."""
    try:
        from scipy.optimize import linear_sum_assignment as scipy_lsa
    except ImportError:
        r, c = linear_sum_assignment(-score)
        return r, c, "sparse_sae.eval.recovery.linear_sum_assignment"
    r, c = scipy_lsa(score, maximize=True)
    return r, c, "scipy.optimize.linear_sum_assignment"


@torch.no_grad()
def feature_recovery(W_dec: torch.Tensor, dictionary: torch.Tensor, threshold: float = 0.9,
                     matching: bool = True) -> dict:
    """Recovery of the rows of ``dictionary`` (``n_features x D``) by the decoder rows ``W_dec``
    (``F x D``); see the module docstring."""
    for t, name in ((W_dec, "W_dec"), (dictionary, "dictionary")):
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            raise ValueError(f"{name} must be a 2-D tensor")
    if W_dec.shape[1] != dictionary.shape[1]:
        raise ValueError(f"W_dec has width {W_dec.shape[1]} but the dictionary has width {dictionary.shape[1]}")
    cos = _unit(dictionary) @ _unit(W_dec).T                     # n_features x F
    best = cos.max(dim=1).values
    out = {"n_features": int(cos.shape[0]), "threshold": threshold, "mean_max_cos": float(best.mean()),
           "recovered": float((best > threshold).double().mean())}
    if matching:
        r, c, solver = _assign(cos.numpy())
        matched = np.zeros(cos.shape[0])
        matched[r] = cos.numpy()[r, c]
        out.update(matching_score=float(matched.mean()), matched_recovered=float((matched > threshold).mean()),
                   matching_solver=solver)
    return out
