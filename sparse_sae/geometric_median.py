"""Geometric median by Weiszfeld's iteration, used to initialise ``b_dec`` from data."""
from __future__ import annotations

import torch


@torch.no_grad()
def geometric_median(points: torch.Tensor, max_iter: int = 100, tol: float = 1e-6) -> torch.Tensor:
    """The point minimising the sum of Euclidean distances to the rows of ``points`` (``N x D``),
    computed in float64 and returned in ``points``' dtype."""
    p = points.to(torch.float64)
    median = p.mean(0)
    for _ in range(max_iter):
        dist = (p - median).norm(dim=1).clamp_min(1e-12)   # a point on the median gets a finite weight
        w = 1.0 / dist
        new = (w[:, None] * p).sum(0) / w.sum()
        shift = (new - median).norm()
        median = new
        if shift <= tol * (median.norm() + 1e-12):
            break
    return median.to(points.dtype)
