"""Monosemanticity score (MS) of every latent (Pach et al. 2025, "Sparse Autoencoders Learn
Monosemantic Features in Vision-Language Models").

For latent ``f`` with activations ``a_n`` over ``N`` inputs, min-max scaled over the set, and
embeddings ``E_n`` of the same inputs by an independent encoder::

    MS_f = sum_{n<m} a_n a_m cos(E_n, E_m) / sum_{n<m} a_n a_m

The pairwise sums are expanded so the cost is linear in ``N``: with ``e_n = E_n / ||E_n||``
(``w_n = ||e_n||^2``: 1, or 0 for an all-zero embedding, whose cosine is taken as 0)::

    sum_{n<m} a_n a_m e_n.e_m = (||sum_n a_n e_n||^2 - sum_n a_n^2 w_n) / 2
    sum_{n<m} a_n a_m         = ((sum_n a_n)^2   - sum_n a_n^2) / 2

Min-max scaling ``a' = (a - lo) / (hi - lo)``: the ratio does not depend on ``hi - lo``, and the
shift ``lo`` is applied to the moments, so every sum can be accumulated in one pass over the
data (:class:`MonosemanticityAccumulator`) without knowing ``lo`` and ``hi`` in advance. Sums are
float64 by default: the expanded form subtracts two large numbers.

A latent that never fires (or is constant over the set) has no score (NaN), nor does one that
is nonzero after scaling on a single input (no pair); :func:`summarize_ms` reports them apart.
"""
from __future__ import annotations

import math

import torch

_REL_TOL = 1e-12     # a pair sum below this fraction of (sum a')^2 means "fewer than two inputs"


def _check_pair(activations, embeddings):
    for t, name in ((activations, "activations"), (embeddings, "embeddings")):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D (N x ...), got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be floating, got {t.dtype}")
    if activations.shape[0] != embeddings.shape[0]:
        raise ValueError(f"activations has {activations.shape[0]} rows but embeddings has {embeddings.shape[0]}; "
                         f"they must describe the same inputs")
    if activations.shape[0] < 2:
        raise ValueError("monosemanticity needs at least 2 inputs")
    emb_vals = embeddings.coalesce().values() if embeddings.is_sparse else embeddings
    if not bool(torch.isfinite(activations).all()) or not bool(torch.isfinite(emb_vals).all()):
        raise ValueError("activations and embeddings must be finite (no NaN or Inf)")


def _unit_rows(emb, dtype):
    """``e_n = E_n / ||E_n||`` (zero rows stay zero) and ``w_n = ||e_n||^2``."""
    if emb.is_sparse:
        emb = emb.coalesce().to(dtype)
        idx, val = emb.indices(), emb.values()
        norm2 = torch.zeros(emb.shape[0], dtype=dtype, device=emb.device).index_add_(0, idx[0], val.square())
        inv = torch.where(norm2 > 0, norm2.rsqrt(), torch.zeros_like(norm2))
        unit = torch.sparse_coo_tensor(idx, val * inv[idx[0]], emb.shape, check_invariants=False).coalesce()
    else:
        emb = emb.to(dtype)
        norm2 = emb.square().sum(1)
        inv = torch.where(norm2 > 0, norm2.rsqrt(), torch.zeros_like(norm2))
        unit = emb * inv[:, None]
    return unit, (norm2 > 0).to(dtype)


def _ms_from_moments(P, esum, s1, s2, t1, t2, wsum, n, lo, hi):
    """Scores from the moments of the raw activations (see the module docstring); ``P`` is
    ``c x E`` (``sum_n a_n e_n``), the others per latent (``c``) or global scalars."""
    num = (P - lo[:, None] * esum[None, :]).square().sum(1) - (t2 - 2 * lo * t1 + lo.square() * wsum)
    sa = s1 - n * lo
    den = sa.square() - (s2 - 2 * lo * s1 + n * lo.square())
    ok = (hi > lo) & (den > _REL_TOL * sa.square())
    return torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), torch.full_like(num, math.nan))


@torch.no_grad()
def monosemanticity(activations: torch.Tensor, embeddings: torch.Tensor, *, latent_batch: int | None = None,
                    dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """MS of every latent: ``activations`` ``N x F`` (the SAE code of ``N`` inputs), ``embeddings``
    ``N x E`` (the same inputs embedded by an independent encoder; dense or sparse COO). Returns
    ``F`` scores on ``activations``' device, NaN for latents that never fire (or are constant, or
    nonzero after scaling on one input only). Linear in ``N``; ``latent_batch`` latents at a time
    (default: about 64 MiB of ``c x E`` moments)."""
    _check_pair(activations, embeddings)
    n, f = activations.shape
    dev = activations.device
    unit, w = _unit_rows(embeddings.to(dev), dtype)
    e_dim = unit.shape[1]
    esum = (torch.sparse.sum(unit, 0).to_dense() if unit.is_sparse else unit.sum(0))
    wsum = w.sum()
    unit_t = unit.t().coalesce() if unit.is_sparse else None
    c = latent_batch or max(1, min(f, (64 << 20) // (8 * (e_dim + n))))
    out = torch.empty(f, dtype=dtype, device=dev)
    for start in range(0, f, c):
        a = activations[:, start:start + c].to(dtype)
        P = torch.sparse.mm(unit_t, a).t() if unit_t is not None else a.t() @ unit
        lo, hi = a.amin(0), a.amax(0)
        out[start:start + c] = _ms_from_moments(P, esum, a.sum(0), a.square().sum(0), w @ a, w @ a.square(),
                                                wsum, n, lo, hi)
    return out


class MonosemanticityAccumulator:
    """One-pass MS over batches too large to hold as ``N x F``: ``update`` with each batch's code
    (dense ``B x F``, or sparse ``values``/``indices`` ``B x w``) and embeddings (``B x E``),
    then ``compute()``. Holds ``F x E`` float64 moments."""

    def __init__(self, n_latents: int, emb_dim: int, device=None, dtype: torch.dtype = torch.float64):
        self.f, self.e_dim, self.dtype = n_latents, emb_dim, dtype
        z = lambda *s: torch.zeros(*s, dtype=dtype, device=device)   # noqa: E731
        self.P, self.esum = z(n_latents, emb_dim), z(emb_dim)
        self.s1, self.s2, self.t1, self.t2 = z(n_latents), z(n_latents), z(n_latents), z(n_latents)
        self.vmin = torch.full((n_latents,), math.inf, dtype=dtype, device=device)
        self.vmax = torch.full((n_latents,), -math.inf, dtype=dtype, device=device)
        self.count = torch.zeros(n_latents, dtype=torch.int64, device=device)   # rows with a stored entry
        self.wsum, self.n = 0.0, 0

    @torch.no_grad()
    def update(self, embeddings, activations=None, values=None, indices=None) -> None:
        dev = self.P.device
        emb = embeddings.to(dev)
        if emb.is_sparse:
            emb = emb.to_dense()
        if emb.dim() != 2 or emb.shape[1] != self.e_dim:
            raise ValueError(f"embeddings must be B x {self.e_dim}, got {tuple(emb.shape)}")
        unit, w = _unit_rows(emb, self.dtype)
        b = unit.shape[0]
        if activations is not None:
            if activations.shape != (b, self.f):
                raise ValueError(f"activations must be {b} x {self.f}, got {tuple(activations.shape)}")
            a = activations.to(dev, self.dtype)
            self.P += a.t() @ unit
            self.s1 += a.sum(0)
            self.s2 += a.square().sum(0)
            self.t1 += w @ a
            self.t2 += w @ a.square()
            self.vmin = torch.minimum(self.vmin, a.amin(0))
            self.vmax = torch.maximum(self.vmax, a.amax(0))
            self.count += b
        else:
            if values is None or indices is None or values.shape != indices.shape or values.shape[0] != b:
                raise ValueError("give activations (B x F) or matching values and indices (B x w)")
            v, idx = values.to(dev, self.dtype), indices.to(dev)
            keep = v != 0
            rows = torch.arange(b, device=dev)[:, None].expand_as(idx)[keep]
            v, idx = v[keep], idx[keep]
            step = max(1, (1 << 22) // self.e_dim)            # bounds the (entries x E) temporary
            for s in range(0, v.numel(), step):
                self.P.index_add_(0, idx[s:s + step], v[s:s + step, None] * unit[rows[s:s + step]])
            self.s1.index_add_(0, idx, v)
            self.s2.index_add_(0, idx, v.square())
            self.t1.index_add_(0, idx, v * w[rows])
            self.t2.index_add_(0, idx, v.square() * w[rows])
            self.vmin.scatter_reduce_(0, idx, v, "amin")
            self.vmax.scatter_reduce_(0, idx, v, "amax")
            self.count.index_add_(0, idx, torch.ones_like(idx))
        self.esum += unit.sum(0)
        self.wsum += float(w.sum())
        self.n += b

    def compute(self) -> torch.Tensor:
        if self.n < 2:
            raise ValueError("monosemanticity needs at least 2 inputs")
        implicit_zero = self.count < self.n          # some row did not store this latent: its value is 0
        zero = torch.zeros_like(self.vmin)
        lo = torch.where(implicit_zero, torch.minimum(self.vmin, zero), self.vmin)
        hi = torch.where(implicit_zero, torch.maximum(self.vmax, zero), self.vmax)
        return _ms_from_moments(self.P, self.esum, self.s1, self.s2, self.t1, self.t2,
                                torch.tensor(self.wsum, dtype=self.dtype, device=self.P.device), self.n, lo, hi)


def summarize_ms(ms: torch.Tensor, fired: torch.Tensor | None = None) -> dict:
    """Mean/median/quantiles of the defined scores; latents without a score counted apart
    (``never_fired`` from ``fired`` counts when given, ``undefined`` in all)."""
    ms = ms.detach().double().cpu()
    ok = ~torch.isnan(ms)
    out = {"n_latents": int(ms.numel()), "scored": int(ok.sum()), "undefined": int((~ok).sum())}
    if fired is not None:
        out["never_fired"] = int((fired.cpu() == 0).sum())
    if ok.any():
        s = ms[ok]
        q = torch.quantile(s, torch.tensor([0.1, 0.5, 0.9], dtype=s.dtype))
        out.update(mean=float(s.mean()), p10=float(q[0]), median=float(q[1]), p90=float(q[2]))
    return out
