"""Synthetic activations in superposition from a known ground-truth dictionary.

Each sample is ``x = c @ dictionary + noise`` with a sparse non-negative code ``c``:
feature frequencies fall off as a power law (many rare features), magnitudes are random,
and features come in correlated pairs (the second of a pair fires more often when the
first does). Used by the demo and the tests, where the true features are known.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SyntheticData:
    dictionary: torch.Tensor   # n_features x d, unit rows
    frequencies: torch.Tensor  # n_features, firing probability of each feature
    pair_boost: float          # P(second of a pair fires | first fires)
    noise: float

    @property
    def d(self) -> int:
        return self.dictionary.shape[1]

    def sample(self, n: int, gen: torch.Generator) -> torch.Tensor:
        """``n`` activations (``n x d``, float32)."""
        nf = self.frequencies.shape[0]
        fires = torch.rand(n, nf, generator=gen) < self.frequencies
        # correlated pairs: feature 2m+1 also fires with probability pair_boost when 2m fires
        lead = fires[:, 0::2][:, : nf // 2]
        boost = torch.rand(n, nf // 2, generator=gen) < self.pair_boost
        fires[:, 1::2][:, : nf // 2] |= lead & boost
        magnitude = 0.5 + torch.rand(n, nf, generator=gen)
        codes = fires * magnitude
        x = codes @ self.dictionary
        return x + self.noise * torch.randn(n, self.d, generator=gen)


def make_synthetic(n_features: int = 2048, d: int = 128, mean_active: float = 12.0, zipf: float = 0.6,
                   pair_boost: float = 0.5, noise: float = 0.01, seed: int = 0) -> SyntheticData:
    """A random unit-norm dictionary and power-law firing frequencies averaging ``mean_active``
    features per sample."""
    gen = torch.Generator().manual_seed(seed)
    dictionary = torch.randn(n_features, d, generator=gen)
    dictionary /= dictionary.norm(dim=1, keepdim=True)
    rank = torch.randperm(n_features, generator=gen).to(torch.float32) + 1
    freq = rank ** -zipf
    freq = (freq * mean_active / freq.sum()).clamp(max=0.5)
    return SyntheticData(dictionary, freq, pair_boost, noise)


@torch.no_grad()
def feature_recovery(W_dec: torch.Tensor, dictionary: torch.Tensor, threshold: float = 0.9) -> dict:
    """How well decoder rows recover the true features: for each true feature the best cosine
    over latents; returns the mean of those and the fraction above ``threshold``."""
    w = W_dec.float() / W_dec.float().norm(dim=1, keepdim=True).clamp_min(1e-12)
    t = dictionary.float() / dictionary.float().norm(dim=1, keepdim=True)
    best = (t @ w.T).max(dim=1).values
    return {"mean_max_cos": float(best.mean()), "recovered": float((best > threshold).float().mean())}
