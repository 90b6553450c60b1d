"""Synthetic activations in superposition from a known ground-truth dictionary.

Each sample is ``x = c @ dictionary + noise`` with a sparse non-negative code ``c``:

- many more features than dimensions (the demo uses 16x), unit-norm random directions;
- power-law firing frequencies (``zipf``): a few common features and a long tail of rare ones;
- correlated features: features come in groups of ``group_size``; when a group's first feature
  fires, each other member also fires with probability ``group_boost``, so members co-occur far
  more often than independence predicts (a trap for a sparse code, which can merge them);
- magnitudes uniform in ``[0.5, 1.5)``.

Codes are drawn sparsely (per-feature binomial counts), so sampling costs ``O(n * mean_active * d)``
rather than ``O(n * n_features)``. Used by the demo and the tests, where the true features are known.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SyntheticData:
    dictionary: torch.Tensor   # n_features x d, unit rows
    frequencies: torch.Tensor  # n_features, independent firing probability of each feature
    group_size: int            # features per correlated group
    group_boost: float         # P(member fires | the group's first feature fires)
    noise: float

    @property
    def d(self) -> int:
        return self.dictionary.shape[1]

    @property
    def n_features(self) -> int:
        return self.dictionary.shape[0]

    def sample_codes(self, n: int, gen: torch.Generator) -> tuple:
        """``(rows, features, magnitudes)`` of the nonzero code entries of ``n`` samples."""
        nf = self.n_features
        counts = torch.binomial(torch.full((nf,), float(n)), self.frequencies, generator=gen).long()
        feats = torch.repeat_interleave(torch.arange(nf), counts)
        rows = torch.randint(0, n, (feats.numel(),), generator=gen)
        if self.group_size > 1 and self.group_boost > 0:
            lead = feats % self.group_size == 0
            lrows, lfeats = rows[lead], feats[lead]
            extra_r, extra_f = [rows], [feats]
            for offset in range(1, self.group_size):
                keep = (torch.rand(lrows.numel(), generator=gen) < self.group_boost) & (lfeats + offset < nf)
                extra_r.append(lrows[keep])
                extra_f.append(lfeats[keep] + offset)
            rows, feats = torch.cat(extra_r), torch.cat(extra_f)
        mags = 0.5 + torch.rand(feats.numel(), generator=gen)
        return rows, feats, mags

    def sample(self, n: int, gen: torch.Generator) -> torch.Tensor:
        """``n`` activations (``n x d``, float32)."""
        rows, feats, mags = self.sample_codes(n, gen)
        x = torch.zeros(n, self.d)
        x.index_add_(0, rows, mags[:, None] * self.dictionary[feats])
        return x + self.noise * torch.randn(n, self.d, generator=gen)


def make_synthetic(n_features: int = 3072, d: int = 192, mean_active: float = 8.0, zipf: float = 1.0,
                   group_size: int = 3, group_boost: float = 0.5, noise: float = 0.01, seed: int = 0,
                   max_frequency: float = 0.2) -> SyntheticData:
    """A random unit-norm dictionary and power-law firing frequencies that average ``mean_active``
    independently firing features per sample (correlated group members add more)."""
    # A stream of its own: seeded like torch's global RNG, the dictionary would equal an SAE's
    # random initialisation (same seed, same shape) and be "recovered" before any training.
    gen = torch.Generator().manual_seed(0x5EED_D1C7 + 7919 * seed)
    dictionary = torch.randn(n_features, d, generator=gen)
    dictionary /= dictionary.norm(dim=1, keepdim=True)
    rank = torch.randperm(n_features, generator=gen).to(torch.float64) + 1
    freq = rank ** -zipf
    freq = (freq * mean_active / freq.sum()).clamp(max=max_frequency).to(torch.float32)
    return SyntheticData(dictionary, freq, group_size, group_boost, noise)
