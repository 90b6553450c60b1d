"""Streaming per-latent top-N: the N highest-scoring entries of every tracked latent, kept in a
fixed ``slots x N`` table whatever the number of rows streamed through it.

Entries arrive as flat ``(slot, score, row, value)`` tensors with rows in non-decreasing order
(batches in data order, each batch row-major). Ties in score go to the earlier row, so the result
is a pure function of the data, never of the batch size. With ``score = value`` it keeps the top
activations; with ``score = -hash(row, latent)`` it keeps a uniform random sample
(:func:`sample_scores`): the bottom-N of a hash is a deterministic reservoir.
"""
from __future__ import annotations

import torch

_MASK63 = (1 << 63) - 1


class StreamingTopN:
    """``scores``, ``rows`` (-1 where empty) and ``values`` (``slots x n``), best first."""

    def __init__(self, n_slots: int, n: int, score_dtype: torch.dtype = torch.float32):
        if n < 1:
            raise ValueError(f"n must be at least 1, got {n}")
        self.n_slots, self.n = n_slots, n
        self._empty = (-torch.inf if score_dtype.is_floating_point else torch.iinfo(score_dtype).min)
        self.scores = torch.full((n_slots, n), self._empty, dtype=score_dtype)
        self.rows = torch.full((n_slots, n), -1, dtype=torch.int64)
        self.values = torch.zeros(n_slots, n, dtype=torch.float32)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.scores, self.rows, self.values))

    def update(self, slots: torch.Tensor, scores: torch.Tensor, rows: torch.Tensor, values: torch.Tensor) -> None:
        if slots.numel() == 0:
            return
        scores = scores.to(self.scores.dtype)
        # Group by slot, best score first, earlier row first on ties (both sorts are stable and
        # the entries arrive in row order).
        order = torch.sort(scores, descending=True, stable=True).indices
        order = order[torch.sort(slots[order], stable=True).indices]
        s = slots[order]
        counts = torch.bincount(s, minlength=self.n_slots)
        rank = torch.arange(s.numel()) - (counts.cumsum(0) - counts)[s]
        keep = rank < self.n
        s, rank, order = s[keep], rank[keep], order[keep]
        cand_scores = torch.full_like(self.scores, self._empty)
        cand_rows = torch.full_like(self.rows, -1)
        cand_values = torch.zeros_like(self.values)
        cand_scores[s, rank] = scores[order]
        cand_rows[s, rank] = rows[order]
        cand_values[s, rank] = values[order].float()
        # What is held came from earlier rows: a stable sort keeps it ahead of equal new scores.
        merged = torch.cat([self.scores, cand_scores], 1)
        best = torch.sort(merged, dim=1, descending=True, stable=True).indices[:, :self.n]
        self.scores = merged.gather(1, best)
        self.rows = torch.cat([self.rows, cand_rows], 1).gather(1, best)
        self.values = torch.cat([self.values, cand_values], 1).gather(1, best)


def _mix64(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser on int64 (wrapping products, logical shifts), as a 63-bit value."""
    def shr(v, k):
        return (v >> k) & ((1 << (64 - k)) - 1)
    x = x + -7046029254386353131          # 0x9e3779b97f4a7c15: splitmix64's increment
    x = x ^ shr(x, 30)
    x = x * -4658895280553007687          # 0xbf58476d1ce4e5b9 as a signed int64
    x = x ^ shr(x, 27)
    x = x * -7723592293110705685          # 0x94d049bb133111eb
    x = x ^ shr(x, 31)
    return x & _MASK63


def sample_scores(rows: torch.Tensor, latents: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Scores whose per-latent top-N is a uniform random sample of that latent's entries: minus a
    hash of ``(seed, row, latent)``."""
    key = (rows.to(torch.int64) * 0x9E3779B1 + latents.to(torch.int64)) ^ (int(seed) * 0x632BE59BD9B4E019 & _MASK63)
    return -_mix64(key)
