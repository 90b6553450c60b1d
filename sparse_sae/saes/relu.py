"""The soft-penalty SAEs: ReLU (``a = relu(z)``, with ``DecoderNormL1``) and JumpReLU
(learned per-latent thresholds, with ``L0``), coded by the fused ``ops.threshold_code``."""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from sparse_sae import ops
from sparse_sae._checks import check_real
from sparse_sae.penalties import L0, DecoderNormL1, Penalty
from sparse_sae.saes.base import SAEOutput, SparseAutoencoder, pack_dense_code


class ReLUSAE(SparseAutoencoder):
    """ReLU SAE: ``a = relu(z)``, usually trained with ``DecoderNormL1``.

    The code comes from the fused ``ops.threshold_code``: packed (``values``/``indices``, decoded
    sparsely, a sparse backward) once the code is sparse, a dense ``B x F`` code while about half
    of it is active (initialisation), chosen from a sampled density. ``code_regime`` (``"auto"``,
    ``"dense"``, ``"sparse"``) forces one (the loss and gradients are the same).
    """

    architecture = "relu"
    allowed_penalties = (DecoderNormL1,)
    code_regime = "auto"

    def thresholds(self):
        """The per-latent thresholds ``theta`` (``F``), or None for ReLU's 0."""
        return None

    def ste_bandwidth(self) -> float:
        """Width of the straight-through rectangle that moves the thresholds (unused by ReLU)."""
        return 1e-3

    def _threshold_code(self, xs):
        theta = self.thresholds()
        # autocast does not reach custom ops: the module casts (theta too: the op takes one dtype)
        cast = self._autocast(xs, self.W_enc, self.b_enc, self.b_dec, *(() if theta is None else (theta,)))
        return ops.threshold_code(*cast[:4], cast[4] if theta is not None else None, self.ste_bandwidth(),
                                  self.code_regime)

    def encode(self, x):
        code = self._threshold_code(self._checked_scaled_input(x))
        if code.is_dense:
            return pack_dense_code(code.dense, self.n_latents)
        return code.values, code.indices

    def _decoder_norm_l1(self, rows: int, *, dense=None, values=None, indices=None):
        """``(1/B) sum_ij a_ij ||W_dec_j||`` of a dense code ``a`` or a packed one."""
        norms = self.W_dec.norm(dim=1)
        if dense is not None:
            return (dense * norms).sum() / rows
        # summed by latent first (index_add_, whose backward is a gather): the gradient of W_dec's
        # norms is then a dense F-vector, the same bits for any thread count, which the
        # advanced-indexing backward of norms[indices] is not
        per_latent = values.new_zeros(self.n_latents).index_add_(0, indices.reshape(-1), values.reshape(-1))
        return (per_latent * norms).sum() / rows

    def forward(self, x) -> SAEOutput:
        xs = self._checked_scaled_input(x)
        code = self._threshold_code(xs)
        W_dec, b_dec = self._autocast(self.W_dec, self.b_dec)
        B = xs.shape[0]
        if code.is_dense:
            a = code.dense
            recon = a @ W_dec + b_dec
            decoded = {"code": a}
            def decoder_norm_l1():
                return self._decoder_norm_l1(B, dense=a)
        else:
            # the inactive band entries (value 0) ride along: their dL/da moves the thresholds
            values, indices = code.values, code.indices
            if code.band_values.shape[1] > 0:
                values = torch.cat([values, code.band_values], 1)
                indices = torch.cat([indices, code.band_indices], 1)
            recon = ops.sparse_decode(values, indices, W_dec, b_dec)
            decoded = {"values": code.values, "indices": code.indices}
            def decoder_norm_l1():
                return self._decoder_norm_l1(B, values=values, indices=indices)
        terms = {DecoderNormL1.name: decoder_norm_l1, L0.name: lambda: code.l0}
        losses = {"recon": self._recon_term(xs, recon)}
        losses.update({p.name: terms[p.name]() for p in self.penalties})
        self.update_firing_stats(code.fired, B)
        return self._output(recon, losses, code.fired, **decoded)


class JumpReLUSAE(ReLUSAE):
    """JumpReLU SAE: ``a = z * 1[z > theta_j]`` with learned thresholds ``theta = exp(log_threshold)``
    and straight-through gradients (rectangle kernel of width ``bandwidth``; GemmaScope)."""

    architecture = "jumprelu"
    allowed_penalties = (L0, DecoderNormL1)

    def __init__(self, d_in: int, n_latents: int, penalties: Sequence[Penalty] = (), *, bandwidth: float = 1e-3,
                 init_threshold: float = 1e-3, **kwargs):
        self.bandwidth = check_real(bandwidth, "bandwidth", positive=True)
        self.init_threshold = check_real(init_threshold, "init_threshold", positive=True)
        super().__init__(d_in, n_latents, penalties, **kwargs)
        self.log_threshold = nn.Parameter(torch.full((n_latents,), math.log(init_threshold),
                                                     dtype=self.W_enc.dtype, device=self.W_enc.device))

    def thresholds(self):
        return self.log_threshold.exp()

    def ste_bandwidth(self) -> float:
        return self.bandwidth

    def config(self) -> dict:
        cfg = super().config()
        cfg.update(bandwidth=self.bandwidth, init_threshold=self.init_threshold)
        return cfg
