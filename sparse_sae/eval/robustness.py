"""Robustness to the inference-time k: FVU and L0 of a Top-k (or BatchTopK) SAE trained at
``k`` when run at ``k'`` in ``{k/4, k/2, k, 2k, 4k}`` (rounded down, clamped to ``[1, F]``).

A Top-k SAE keeps each row's ``k'`` largest pre-activations. A BatchTopK SAE is run with its
batch rule (the ``B * k'`` largest of each evaluation batch), since its learned threshold
belongs to the trained ``k``; its numbers therefore depend on the evaluation batch size.
Architectures without a ``k`` (ReLU, JumpReLU) have no curve.
"""
from __future__ import annotations

import contextlib

import torch

from sparse_sae.saes import BatchTopKSAE, TopKSAE

K_FACTORS = (0.25, 0.5, 1, 2, 4)


def k_values(k: int, n_latents: int, factors=K_FACTORS) -> list:
    """The inference k's for a model trained at ``k``: ``int(f * k)`` clamped to ``[1, n_latents]``,
    without repeats, in increasing order."""
    return sorted({min(n_latents, max(1, int(f * k))) for f in factors})


@contextlib.contextmanager
def inference_k(sae, k: int):
    """Runs ``sae`` (in eval mode) with ``k`` active latents per row inside the block."""
    if not isinstance(sae, TopKSAE):
        raise TypeError(f"{type(sae).__name__} has no inference k")
    if not 1 <= k <= sae.n_latents:
        raise ValueError(f"k must be in [1, {sae.n_latents}], got {k}")
    k0, was_training = sae.k, sae.training
    sae.k = k
    sae.eval()
    try:
        yield sae
    finally:
        sae.k = k0
        sae.train(was_training)


def forward_at_k(sae, x: torch.Tensor, k: int):
    """``sae``'s output on ``x`` at inference k (no training state changes)."""
    with torch.no_grad(), inference_k(sae, k):
        if isinstance(sae, BatchTopKSAE):
            return TopKSAE.forward(sae, x)          # the batch rule at k, not the threshold
        return sae(x)
