"""A straightforward dense-autograd regularized Top-k SAE, written as a researcher would:
dense ``B x F`` code, ``torch.topk``, and the paper's penalties by plain autograd. The
baseline the benchmarks compare with (and a second, independent check of the loss)."""
from __future__ import annotations

import torch
from torch import nn


def dense_penalties(h, a, coef_off: float = 0.0, coef_ratio: float = 0.0, eps: float = 1e-6):
    """The paper's two penalties from the dense ``B x F`` post-ReLU pre-activations ``h`` and code
    ``a``, by plain autograd (0 when both coefficients are 0). Also what the benchmark adds to a
    peer's output where the peer exposes its pre-activations."""
    loss = h.new_zeros(())
    if coef_off or coef_ratio:
        active = (a > 0).any(0)
        hA = h * active
        if coef_off:
            loss = loss + coef_off * (hA * (a == 0)).sum() / h.shape[0]
        if coef_ratio:
            l1, l2 = hA.sum(1), hA.norm(dim=1)
            loss = loss + coef_ratio * (l1 / (l2 + eps)).mean()
    return loss


class DenseTopKSAE(nn.Module):
    """``batch_topk=True`` keeps the ``B * k`` largest entries of the whole batch (BatchTopK)."""

    def __init__(self, d_in: int, n_latents: int, k: int, coef_off: float = 0.0, coef_ratio: float = 0.0,
                 eps: float = 1e-6, dtype=torch.float32, device=None, batch_topk: bool = False):
        super().__init__()
        self.k, self.coef_off, self.coef_ratio, self.eps = k, coef_off, coef_ratio, eps
        self.batch_topk = batch_topk
        W = torch.randn(n_latents, d_in, dtype=dtype, device=device)
        W = W / W.norm(dim=1, keepdim=True)
        self.W_enc = nn.Parameter(W.clone())
        self.b_enc = nn.Parameter(torch.zeros(n_latents, dtype=dtype, device=device))
        self.W_dec = nn.Parameter(W.clone())
        self.b_dec = nn.Parameter(torch.zeros(d_in, dtype=dtype, device=device))

    def forward(self, x):
        h = torch.relu((x - self.b_dec) @ self.W_enc.T + self.b_enc)
        if self.batch_topk:
            top = h.flatten().topk(self.k * h.shape[0])
            a = torch.zeros_like(h).flatten().scatter(-1, top.indices, top.values).view_as(h)
        else:
            top = h.topk(self.k, dim=-1)
            a = torch.zeros_like(h).scatter(-1, top.indices, top.values)
        recon = a @ self.W_dec + self.b_dec
        loss = (x - recon).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
        loss = loss + dense_penalties(h, a, self.coef_off, self.coef_ratio, self.eps)
        return loss, recon
