"""Straightforward dense-autograd ReLU + decoder-norm l1 and JumpReLU + L0 SAEs, written as a
researcher would (the math sparse_sae's ReLUSAE and JumpReLUSAE ran before the fused threshold
code): dense ``B x F`` code, ``a @ W_dec``, straight-through threshold gradients by a custom
autograd function. The baseline of the soft-penalty rows of bench/cpu_step.py."""
from __future__ import annotations

import math

import torch
from torch import nn

from sparse_sae import reference


class DenseThresholdSAE(nn.Module):
    """``jump=False``: ReLU with ``coef_l1 * (a * ||W_dec||).sum() / B``; ``jump=True``: JumpReLU
    with ``coef_l0 * L0`` (rectangle kernel of width ``bandwidth``)."""

    def __init__(self, d_in: int, n_latents: int, jump: bool, coef_l1: float = 0.0, coef_l0: float = 0.0,
                 bandwidth: float = 1e-3, init_threshold: float = 1e-3, dtype=torch.float32):
        super().__init__()
        self.jump, self.coef_l1, self.coef_l0, self.bandwidth = jump, coef_l1, coef_l0, bandwidth
        W = torch.randn(n_latents, d_in, dtype=dtype)
        W = W / W.norm(dim=1, keepdim=True)
        self.W_enc = nn.Parameter(W.clone())
        self.b_enc = nn.Parameter(torch.zeros(n_latents, dtype=dtype))
        self.W_dec = nn.Parameter(W.clone())
        self.b_dec = nn.Parameter(torch.zeros(d_in, dtype=dtype))
        if jump:
            self.log_threshold = nn.Parameter(torch.full((n_latents,), math.log(init_threshold), dtype=dtype))

    def forward(self, x):
        z = (x - self.b_dec) @ self.W_enc.T + self.b_enc
        if self.jump:
            theta = self.log_threshold.exp()
            a = reference.jumprelu_ref(z, theta, self.bandwidth)
        else:
            a = torch.relu(z)
        recon = a @ self.W_dec + self.b_dec
        loss = (x - recon).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
        if self.coef_l1:
            loss = loss + self.coef_l1 * (a * self.W_dec.norm(dim=1)).sum() / x.shape[0]
        if self.jump and self.coef_l0:
            loss = loss + self.coef_l0 * reference.l0_ref(z, theta, self.bandwidth)
        return loss, recon


class DenseGatedSAE(nn.Module):
    """The Gated SAE by dense autograd (``reference.gated_sae_loss_ref``: the gate and the
    magnitude path as two ``B x F`` GEMMs, dense ``f @ W_dec`` and ``relu(pi) @ W_dec``)."""

    def __init__(self, d_in: int, n_latents: int, coef_l1: float, dtype=torch.float32):
        super().__init__()
        self.coef_l1 = coef_l1
        W = torch.randn(n_latents, d_in, dtype=dtype)
        W = W / W.norm(dim=1, keepdim=True)
        self.W_enc, self.W_dec = nn.Parameter(W.clone()), nn.Parameter(W.clone())
        for name, size in (("b_enc", n_latents), ("r_mag", n_latents), ("b_mag", n_latents), ("b_dec", d_in)):
            setattr(self, name, nn.Parameter(torch.zeros(size, dtype=dtype)))

    def forward(self, x):
        loss, _, f = reference.gated_sae_loss_ref(x, self.W_enc, self.b_enc, self.r_mag, self.b_mag, self.W_dec,
                                                  self.b_dec, coef_sparsity=self.coef_l1)
        return loss, f


class DenseMatryoshkaSAE(nn.Module):
    """Matryoshka Top-k by dense autograd (``reference.matryoshka_topk_loss_ref``: the dense
    ``B x F`` code, ``torch.topk``, one dense decode per prefix, as dictionary_learning writes it)."""

    def __init__(self, d_in: int, n_latents: int, k: int, sizes, dtype=torch.float32):
        super().__init__()
        self.k, self.sizes = k, list(sizes)
        W = torch.randn(n_latents, d_in, dtype=dtype)
        W = W / W.norm(dim=1, keepdim=True)
        self.W_enc, self.W_dec = nn.Parameter(W.clone()), nn.Parameter(W.clone())
        self.b_enc = nn.Parameter(torch.zeros(n_latents, dtype=dtype))
        self.b_dec = nn.Parameter(torch.zeros(d_in, dtype=dtype))

    def forward(self, x):
        return reference.matryoshka_topk_loss_ref(x, self.W_enc, self.b_enc, self.W_dec, self.b_dec, self.k, self.sizes)
