"""Dense-autograd PyTorch, as a researcher would write it: ``B x F`` codes, ``torch.topk``, the
penalties by plain autograd (bench/dense_topk.py); ReLU and JumpReLU likewise."""
from __future__ import annotations

import torch
from dense_threshold import DenseGatedSAE, DenseMatryoshkaSAE  # common.py put bench/ on sys.path
from dense_topk import DenseTopKSAE
from torch import nn

from sparse_sae import reference

from .common import BANDWIDTH, COEF_L0, COEF_L1, VARIANTS, Runner, coefs, fvu, matryoshka_sizes

NAME = "dense"
PACKAGE = "torch"


def version() -> str:
    return torch.__version__


def variants() -> tuple:
    return VARIANTS


def _rect(u):
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class _JumpReLU(torch.autograd.Function):
    """``z * 1[z > theta]`` with GemmaScope's straight-through threshold gradient, written out here
    (not taken from sparse_sae.reference, so the gradient check compares two implementations)."""

    @staticmethod
    def forward(ctx, z, theta, bw):
        ctx.save_for_backward(z, theta)
        ctx.bw = bw
        return z * (z > theta)

    @staticmethod
    def backward(ctx, g):
        z, theta = ctx.saved_tensors
        return g * (z > theta), (-(theta / ctx.bw) * _rect((z - theta) / ctx.bw) * g).sum(0), None


class _Heaviside(torch.autograd.Function):
    """``H(z - theta)`` for the L0 penalty: no gradient to z, the rectangle-kernel one to theta."""

    @staticmethod
    def forward(ctx, z, theta, bw):
        ctx.save_for_backward(z, theta)
        ctx.bw = bw
        return (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx, g):
        z, theta = ctx.saved_tensors
        return torch.zeros_like(z), (-(1.0 / ctx.bw) * _rect((z - theta) / ctx.bw) * g).sum(0), None


class DenseReLUSAE(nn.Module):
    """ReLU SAE with the decoder-norm-weighted l1, or (``jump=True``) JumpReLU with the L0
    penalty through the straight-through estimators (GemmaScope)."""

    def __init__(self, w, jump: bool):
        super().__init__()
        self.jump = jump
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            setattr(self, name, nn.Parameter(getattr(w, name).clone()))
        if jump:
            self.log_threshold = nn.Parameter(w.theta.log().clone())

    def forward(self, x):
        z = (x - self.b_dec) @ self.W_enc.T + self.b_enc
        if self.jump:
            theta = self.log_threshold.exp()
            a = _JumpReLU.apply(z, theta, BANDWIDTH)
            penalty = COEF_L0 * _Heaviside.apply(z, theta, BANDWIDTH).sum() / x.shape[0]
        else:
            a = torch.relu(z)
            penalty = COEF_L1 * (a * self.W_dec.norm(dim=1)).sum() / x.shape[0]
        return fvu(x, a @ self.W_dec + self.b_dec) + penalty


def build(variant: str, w, k: int) -> Runner:
    D, F = w.W_enc.shape[1], w.W_enc.shape[0]
    if variant in ("relu_l1", "jumprelu"):
        return _Dense(DenseReLUSAE(w, jump=variant == "jumprelu"))
    if variant in ("gated", "matryoshka"):
        m = (DenseGatedSAE(D, F, COEF_L1, dtype=w.W_enc.dtype) if variant == "gated"
             else DenseMatryoshkaSAE(D, F, k, matryoshka_sizes(F), dtype=w.W_enc.dtype)).to(w.W_enc.device)
        with torch.no_grad():
            for name, _ in m.named_parameters():
                getattr(m, name).copy_(getattr(w, name))
        return _Dense(m)
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}")
    off, ratio = coefs(variant)
    m = DenseTopKSAE(D, F, k, off, ratio, eps=reference.RATIO_EPS, dtype=w.W_enc.dtype, device=w.W_enc.device,
                     batch_topk=variant == "batchtopk")
    with torch.no_grad():
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            getattr(m, name).copy_(getattr(w, name))
    return _Dense(m)


class _Dense(Runner):
    def __init__(self, m):
        self.m, self.params = m, list(m.parameters())

    def loss(self, x):
        out = self.m(x)
        return out[0] if isinstance(out, tuple) else out

    def w_enc_grad(self):
        return self.m.W_enc.grad
