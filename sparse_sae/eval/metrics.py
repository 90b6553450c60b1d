"""Reconstruction and sparsity metrics, accumulated batch by batch over an evaluation set.

- FVU ``sum ||x - x_hat||^2 / sum ||x - mean(x)||^2`` and explained variance ``1 - FVU``, both
  against the **per-dimension mean of the whole evaluation set** (not against zero, which
  overstates the explained variance of data with a large mean, and not per batch);
- MSE over all elements, mean cosine similarity of ``x`` and ``x_hat`` per row;
- L0 (nonzero code entries per row), effective number of active units per row
  ``(||a_i||_1 / ||a_i||_2)^2`` (0 for an all-zero row), which is L0 when the active values are
  equal and less when a few dominate;
- firing counts per latent: the dead fraction over the window of evaluated rows (latents that
  never fired in it) and the latent density histogram (``log10`` of the firing frequency).

Sums are kept in float64; the mean and the centred sum of squares are combined across batches
with Chan's parallel update, so a large mean does not cancel catastrophically.
"""
from __future__ import annotations

import math

import torch

DENSITY_BINS = 40          # histogram bins of log10(firing frequency)


class ReconstructionStats:
    """Accumulates reconstruction and sparsity statistics; :meth:`compute` gives the metrics."""

    def __init__(self, n_latents: int, device=None):
        self.n_latents = n_latents
        self.n = 0
        self.mean = None       # D, float64
        self.m2 = None         # D, centred sum of squares
        self.sse = 0.0         # sum ||x - x_hat||^2
        self.cos_sum = 0.0
        self.l0_sum = 0.0
        self.eff_sum = 0.0
        self.fired = torch.zeros(n_latents, dtype=torch.int64, device=device)

    @torch.no_grad()
    def update(self, x: torch.Tensor, x_hat: torch.Tensor, values: torch.Tensor, indices: torch.Tensor) -> None:
        """One batch: inputs ``x`` and reconstructions ``x_hat`` (``B x D``), code ``(values, indices)``
        (``B x w``; zero values are padding and do not count)."""
        x64, xh64 = x.detach().double(), x_hat.detach().double()
        b = x64.shape[0]
        mean_b = x64.mean(0)
        m2_b = (x64 - mean_b).square().sum(0)
        if self.mean is None:
            self.mean, self.m2 = mean_b, m2_b
        else:
            delta = mean_b - self.mean
            n = self.n + b
            self.mean = self.mean + delta * (b / n)
            self.m2 = self.m2 + m2_b + delta.square() * (self.n * b / n)
        self.n += b
        self.sse += float((x64 - xh64).square().sum())
        cos = torch.nn.functional.cosine_similarity(x64, xh64, dim=1, eps=1e-30)
        self.cos_sum += float(cos.sum())
        v = values.detach().double()
        active = v != 0
        self.l0_sum += float(active.sum())
        l1, l2 = v.abs().sum(1), v.norm(dim=1)
        eff = torch.where(l2 > 0, (l1 / l2.clamp_min(1e-300)).square(), torch.zeros_like(l1))
        self.eff_sum += float(eff.sum())
        self.fired.index_add_(0, indices[active].to(self.fired.device),
                              torch.ones(int(active.sum()), dtype=torch.int64, device=self.fired.device))

    def compute(self) -> dict:
        if self.n == 0:
            raise ValueError("no rows were evaluated")
        sst = float(self.m2.sum())
        fvu = self.sse / sst if sst > 0 else math.nan
        d = self.mean.numel()
        freq = self.fired.double() / self.n
        return {
            "rows": self.n,
            "fvu": fvu,
            "explained_variance": 1.0 - fvu,
            "mse": self.sse / (self.n * d),
            "cosine_similarity": self.cos_sum / self.n,
            "l0": self.l0_sum / self.n,
            "effective_active_units": self.eff_sum / self.n,
            "dead_fraction": float((self.fired == 0).double().mean()),
            "dead_window_rows": self.n,
            "density": density_histogram(freq),
        }


def density_histogram(freq: torch.Tensor, bins: int = DENSITY_BINS) -> dict:
    """Histogram of ``log10`` firing frequencies of the latents that fired; the ones that never
    fired are counted apart (``never_fired``)."""
    freq = freq.detach().double().cpu()
    alive = freq[freq > 0]
    out = {"never_fired": int((freq == 0).sum()), "n_latents": int(freq.numel())}
    if alive.numel() == 0:
        return {**out, "log10_edges": [], "counts": []}
    logf = alive.log10()
    lo, hi = math.floor(float(logf.min())), 0.0
    hi = max(hi, lo + 1e-9)
    counts = torch.histc(logf, bins=bins, min=lo, max=hi)
    edges = torch.linspace(lo, hi, bins + 1)
    return {**out, "log10_edges": [round(float(e), 6) for e in edges], "counts": [int(c) for c in counts]}


def reconstruction_metrics(x: torch.Tensor, x_hat: torch.Tensor, values: torch.Tensor,
                           indices: torch.Tensor, n_latents: int) -> dict:
    """The metrics of one set of rows held in memory (see :class:`ReconstructionStats`)."""
    stats = ReconstructionStats(n_latents, device=indices.device)
    stats.update(x, x_hat, values, indices)
    return stats.compute()
