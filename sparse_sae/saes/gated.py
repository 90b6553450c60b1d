"""The Gated SAE (Rajamanoharan et al., 2024, "Improving Dictionary Learning with Gated Sparse
Autoencoders"): a gate decides which latents are active, a magnitude path how much.

``pi = (x - b_dec) W_gate^T + b_gate``; ``W_mag = exp(r_mag) * W_gate`` row-wise;
``f = 1[pi > 0] * relu((x - b_dec) W_mag^T + b_mag)``. The loss is the reconstruction from
``f``, ``lam * (1/B) sum_ij relu(pi_ij) ||W_dec_j||`` (``DecoderNormL1(lam)`` on the gate) and
the reconstruction from ``relu(pi)`` through the frozen (detached) decoder, weighted by
``aux_coef`` (``gate_aux``; 1 in the paper).

On our kernels: ``W_gate`` is ``W_enc`` and ``b_gate`` is ``b_enc``, so the gate ``relu(pi)`` is
a ReLU SAE's code and comes from the fused ``ops.threshold_code`` (one encoder GEMM, packed once
sparse, dense while half of it is active, its backward sparse on the active entries). The
magnitude path needs no GEMM of its own: on an active entry ``(x - b_dec) W_mag_j^T =
exp(r_mag_j) (pi_ij - b_gate_j)``, so ``f`` is computed on the packed entries only, and its
gradient reaches ``W_gate`` through the gate code's own backward. Both reconstructions are
sparse decodes of the same packed indices (dense ``a @ W_dec`` in the dense regime).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from sparse_sae import ops
from sparse_sae._checks import check_real
from sparse_sae.penalties import DecoderNormL1, Penalty
from sparse_sae.saes.base import SAEOutput, pack_dense_code
from sparse_sae.saes.relu import ReLUSAE


class GatedSAE(ReLUSAE):
    """Gated SAE; see the module docstring. ``W_enc``/``b_enc`` are the gate's ``W_gate``/``b_gate``;
    ``r_mag`` and ``b_mag`` (``F``) the magnitude path's. Takes ``DecoderNormL1`` (the gate's
    sparsity penalty, ``lam``); ``aux_coef`` weights the auxiliary reconstruction."""

    architecture = "gated"
    allowed_penalties = (DecoderNormL1,)

    def __init__(self, d_in: int, n_latents: int, penalties: Sequence[Penalty] = (), *, aux_coef: float = 1.0,
                 **kwargs):
        self.aux_coef = check_real(aux_coef, "aux_coef")
        super().__init__(d_in, n_latents, penalties, **kwargs)
        self.r_mag = nn.Parameter(torch.zeros(n_latents, dtype=self.W_enc.dtype, device=self.W_enc.device))
        self.b_mag = nn.Parameter(torch.zeros(n_latents, dtype=self.W_enc.dtype, device=self.W_enc.device))

    @torch.no_grad()
    def reset_parameters(self) -> None:
        super().reset_parameters()
        for name in ("r_mag", "b_mag"):
            if hasattr(self, name):
                getattr(self, name).zero_()

    def recon_terms(self) -> dict:
        return {"gate_aux": self.aux_coef}

    def _magnitudes(self, gate, indices=None):
        """``f`` from the gate code: ``relu(exp(r_mag) (pi - b_gate) + b_mag)`` where the gate is
        open (``pi > 0``), else 0. ``gate`` is dense ``B x F`` or packed at ``indices``."""
        r, b_gate, b_mag = self._autocast(self.r_mag, self.b_enc, self.b_mag)
        if indices is not None:
            r, b_gate, b_mag = r[indices], b_gate[indices], b_mag[indices]
        f = torch.relu(r.exp() * (gate - b_gate) + b_mag)
        return torch.where(gate > 0, f, torch.zeros_like(f))

    def _packed(self, f, indices):
        """The packed code ``(values, indices)`` of ``f``, each row's entries by descending value."""
        values, order = f.sort(dim=1, descending=True, stable=True)
        return values, indices.gather(1, order)

    def encode(self, x):
        code = self._threshold_code(self._checked_scaled_input(x))
        if code.is_dense:
            return pack_dense_code(self._magnitudes(code.dense), self.n_latents)
        return self._packed(self._magnitudes(code.values, code.indices), code.indices)

    def forward(self, x) -> SAEOutput:
        xs = self._checked_scaled_input(x)
        code = self._threshold_code(xs)     # the gate, relu(pi)
        W_dec, b_dec = self._autocast(self.W_dec, self.b_dec)
        frozen_W, frozen_b = W_dec.detach(), b_dec.detach()
        B, F = xs.shape[0], self.n_latents
        if code.is_dense:
            gate = code.dense
            f = self._magnitudes(gate)
            recon, gate_recon = f @ W_dec + b_dec, gate @ frozen_W + frozen_b
            fired = (f > 0).sum(0)
            decoded = {"code": f}
            sparsity = {"dense": gate}
        else:
            gate, indices = code.values, code.indices
            f = self._magnitudes(gate, indices)
            recon = ops.sparse_decode(f, indices, W_dec, b_dec)
            gate_recon = ops.sparse_decode(gate, indices, frozen_W, frozen_b)
            fired = torch.zeros(F, dtype=torch.int64, device=f.device).index_add_(
                0, indices.reshape(-1), (f > 0).reshape(-1).to(torch.int64))
            values, packed_indices = self._packed(f, indices)
            decoded = {"values": values, "indices": packed_indices}
            sparsity = {"values": gate, "indices": indices}
        losses = {"recon": self._recon_term(xs, recon), "gate_aux": self._recon_term(xs, gate_recon)}
        for p in self.penalties:    # DecoderNormL1: the gate's sparsity penalty
            losses[p.name] = self._decoder_norm_l1(B, **sparsity)
        self.update_firing_stats(fired.detach(), B)
        return self._output(recon, losses, fired.detach(), **decoded)

    def config(self) -> dict:
        cfg = super().config()
        cfg["aux_coef"] = self.aux_coef
        return cfg
