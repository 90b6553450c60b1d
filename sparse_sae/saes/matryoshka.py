"""Matryoshka Top-k SAE (nested dictionaries, as in SAELens and dictionary_learning): the
prefixes ``m_1 < m_2 < ... < m_n = F`` of the latent list each reconstruct the input from the
same Top-k code, and their reconstruction terms are summed, so the first ``m_1`` latents learn
the coarsest features on their own, the next ones refinements.

``losses["recon"]`` is the whole dictionary's term (the one the trainer logs as FVU);
``losses["matryoshka"]`` the sum over the strict prefixes; the loss adds both with weight 1
(the sum over every prefix) and the paper's penalties unchanged.

The prefix reconstructions come from one ``ops.sparse_decode`` call: each selected entry falls
in one band ``[m_{g-1}, m_g)`` of the latent list; the code is stacked once per strict prefix
band with the other bands' values zeroed (``(n - 1) B`` rows of the same width ``k``), decoded
without bias, and the bands' partial reconstructions are summed in order (a cumulative sum),
so prefix ``g`` is ``b_dec + sum_{h <= g} partial_h``. The decode costs ``(n - 1) B k D``
multiply-adds next to the encoder's ``B F D``, under 1% of the step at the usual sizes.
"""
from __future__ import annotations

from typing import Sequence

import torch

from sparse_sae import ops
from sparse_sae._checks import check_int
from sparse_sae.penalties import Penalty
from sparse_sae.saes.topk import TopKSAE


def check_matryoshka_sizes(sizes, n_latents: int) -> tuple:
    """The prefix sizes, strictly increasing integers in ``[1, n_latents]``, ending at ``n_latents``
    (appended when absent)."""
    if isinstance(sizes, (str, bytes)) or not hasattr(sizes, "__iter__"):
        raise TypeError(f"matryoshka_sizes must be a sequence of integers, got {type(sizes).__name__}")
    sizes = [check_int(m, "each matryoshka size", 1, n_latents) for m in sizes]
    if not sizes:
        raise ValueError("matryoshka_sizes must name at least one prefix size")
    if any(b <= a for a, b in zip(sizes, sizes[1:])):
        raise ValueError(f"matryoshka_sizes must be strictly increasing, got {sizes}")
    if sizes[-1] != n_latents:
        sizes.append(n_latents)
    return tuple(sizes)


class MatryoshkaTopKSAE(TopKSAE):
    """Top-k SAE whose nested prefixes ``matryoshka_sizes`` (``m_1 < ... < F``) each reconstruct
    the input; see the module docstring. Takes the Top-k SAE's penalties and AuxK."""

    architecture = "matryoshka"

    def __init__(self, d_in: int, n_latents: int, k: int, matryoshka_sizes: Sequence[int],
                 penalties: Sequence[Penalty] = (), **kwargs):
        super().__init__(d_in, n_latents, k, penalties, **kwargs)
        self.matryoshka_sizes = check_matryoshka_sizes(matryoshka_sizes, self.n_latents)
        # the band boundaries on the device, made once (not a host-to-device copy per step)
        self.register_buffer("_band_bounds", torch.tensor(self.matryoshka_sizes[:-1], dtype=torch.int64,
                                                          device=self.W_enc.device), persistent=False)

    def recon_terms(self) -> dict:
        return {"matryoshka": 1.0} if len(self.matryoshka_sizes) > 1 else {}

    def prefix_recons(self, values, indices, W_dec, b_dec) -> list:
        """The reconstruction of each strict prefix (``m_1 .. m_{n-1}``), in the scaled input's units."""
        bands = torch.bucketize(indices, self._band_bounds, right=True)     # B x k: the band of each entry
        n = len(self.matryoshka_sizes) - 1
        B, w = values.shape
        per_band = torch.stack([torch.where(bands == g, values, torch.zeros_like(values)) for g in range(n)])
        partial = ops.sparse_decode(per_band.reshape(n * B, w), indices.repeat(n, 1), W_dec,
                                    torch.zeros_like(b_dec)).reshape(n, B, -1)
        return list((partial.cumsum(0) + b_dec).unbind(0))

    def _further_recon_losses(self, xs, values, indices, W_dec, b_dec) -> dict:
        if len(self.matryoshka_sizes) == 1:
            return {}
        terms = [self._recon_term(xs, r) for r in self.prefix_recons(values, indices, W_dec, b_dec)]
        return {"matryoshka": torch.stack(terms).sum()}

    def config(self) -> dict:
        cfg = super().config()
        cfg["matryoshka_sizes"] = list(self.matryoshka_sizes)
        return cfg
