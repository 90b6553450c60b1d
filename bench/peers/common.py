"""What every adapter shares: the variants, the shared weights, the loss added to a peer's
output, the training step, and the reference gradient of ``W_enc`` (``sparse_sae.reference``).

Conventions: weights are held in our layout (``W_enc``, ``W_dec`` are ``F x D``); an adapter
copies them into its implementation and hands its ``W_enc`` gradient back in that layout.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dense_topk import dense_penalties  # noqa: E402

from sparse_sae import reference  # noqa: E402

# Every variant the suite knows, in table order.
VARIANTS = ("topk", "topk_off", "topk_ratio", "batchtopk", "relu_l1", "jumprelu", "gated", "matryoshka")
VARIANT_TITLES = {"topk": "Top-k", "topk_off": "Top-k + off-support l1", "topk_ratio": "Top-k + l1/l2 ratio",
                  "batchtopk": "BatchTopK", "relu_l1": "ReLU + l1", "jumprelu": "JumpReLU", "gated": "Gated",
                  "matryoshka": "Matryoshka Top-k"}
# Penalty coefficients of the regularized variants (those of bench/cpu_step.py), the ReLU l1
# and the JumpReLU L0 coefficients and bandwidth.
COEF_OFF, COEF_RATIO, COEF_L1, COEF_L0 = 0.02, 0.01, 1e-3, 1e-3
BANDWIDTH, THETA = 1e-3, 0.5


def matryoshka_sizes(F: int) -> list:
    """The Matryoshka variant's prefix sizes: F/8, F/2 and F."""
    return [max(1, F // 8), max(2, F // 2), F]


def coefs(variant: str) -> tuple[float, float]:
    """``(coef_off, coef_ratio)`` of a Top-k variant."""
    return (COEF_OFF if variant == "topk_off" else 0.0, COEF_RATIO if variant == "topk_ratio" else 0.0)


class Unavailable(Exception):
    """A peer that cannot run here (not installed, or not this variant/device): a skipped row."""


@dataclass
class Weights:
    W_enc: torch.Tensor
    b_enc: torch.Tensor
    W_dec: torch.Tensor
    b_dec: torch.Tensor
    theta: torch.Tensor = field(default=None)
    r_mag: torch.Tensor = field(default=None)    # the Gated SAE's magnitude path
    b_mag: torch.Tensor = field(default=None)

    def to(self, device=None, dtype=None) -> "Weights":
        return Weights(*(t.to(device=device, dtype=dtype) for t in
                         (self.W_enc, self.b_enc, self.W_dec, self.b_dec, self.theta, self.r_mag, self.b_mag)))

    def without_b_dec(self) -> "Weights":
        return replace(self, b_dec=torch.zeros_like(self.b_dec))


def shared_weights(D: int, F: int, seed: int = 0) -> Weights:
    """Unit-norm decoder rows (every peer normalizes them), an encoder near the decoder (the
    usual tied init, perturbed so the check is not degenerate), small nonzero biases; float32."""
    g = torch.Generator().manual_seed(seed)
    W_dec = torch.randn(F, D, generator=g)
    W_dec /= W_dec.norm(dim=1, keepdim=True)
    W_enc = W_dec + 0.3 * torch.randn(F, D, generator=g) / D ** 0.5
    b_enc = 0.1 * torch.randn(F, generator=g)
    b_dec = 0.1 * torch.randn(D, generator=g)
    r_mag = 0.2 * torch.randn(F, generator=g)
    b_mag = 0.1 * torch.randn(F, generator=g)
    return Weights(W_enc, b_enc, W_dec, b_dec, torch.full((F,), THETA), r_mag, b_mag)


def batch(B: int, D: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(B, D, generator=torch.Generator().manual_seed(seed))


def fvu(x, recon):
    return (x - recon).pow(2).sum() / (x - x.mean(0)).pow(2).sum()


def peer_loss(variant: str, x, recon, h, a):
    """FVU plus the variant's penalties from a peer's dense post-ReLU pre-activations ``h`` and
    code ``a``: the same loss for every Top-k row, so the rows do the same work."""
    off, ratio = coefs(variant)
    return fvu(x, recon) + dense_penalties(h, a, off, ratio, reference.RATIO_EPS)


class Runner:
    """One implementation of one variant. ``loss(x)`` is the full loss, ``params`` what the
    optimizer updates, ``w_enc_grad()`` the ``F x D`` gradient after ``backward``; ``note`` says
    what differs from the reference (shown in the row)."""

    note = ""

    def loss(self, x):  # pragma: no cover - each adapter defines it
        raise NotImplementedError

    def w_enc_grad(self):  # pragma: no cover
        raise NotImplementedError

    params: list


def make_step(runner: Runner, x, lr: float = 1e-4):
    """One full training step: forward, loss, backward, Adam."""
    opt = torch.optim.Adam(runner.params, lr=lr)

    def step():
        loss = runner.loss(x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def reference_w_enc_grad(variant: str, w: Weights, x, k: int) -> torch.Tensor:
    """``dL/dW_enc`` of the variant's loss by ``sparse_sae.reference`` in float64."""
    w = w.to(dtype=torch.float64)
    x = x.to(torch.float64)
    W_enc = w.W_enc.clone().requires_grad_(True)
    if variant in ("topk", "topk_off", "topk_ratio", "batchtopk"):
        off, ratio = coefs(variant)
        loss = reference.topk_sae_loss_ref(x, W_enc, w.b_enc, w.W_dec, w.b_dec, k,
                                           mode="batchtopk" if variant == "batchtopk" else "topk",
                                           coef_off=off, coef_ratio=ratio)[0]
    elif variant == "relu_l1":
        a = reference.encode_ref(x, W_enc, w.b_enc, w.b_dec)
        recon = a @ w.W_dec + w.b_dec
        loss = reference.fvu_ref(x, recon) + COEF_L1 * (a * w.W_dec.norm(dim=1)).sum() / x.shape[0]
    elif variant == "jumprelu":
        z = reference.encode_ref(x, W_enc, w.b_enc, w.b_dec, relu=False)
        a = reference.jumprelu_ref(z, w.theta, BANDWIDTH)
        loss = reference.fvu_ref(x, a @ w.W_dec + w.b_dec) + COEF_L0 * reference.l0_ref(z, w.theta, BANDWIDTH)
    elif variant == "gated":
        loss = reference.gated_sae_loss_ref(x, W_enc, w.b_enc, w.r_mag, w.b_mag, w.W_dec, w.b_dec,
                                            coef_sparsity=COEF_L1)[0]
    elif variant == "matryoshka":
        loss = reference.matryoshka_topk_loss_ref(x, W_enc, w.b_enc, w.W_dec, w.b_dec, k,
                                                  matryoshka_sizes(w.W_enc.shape[0]))[0]
    else:
        raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS}")
    loss.backward()
    return W_enc.grad


def rel_error(got, want) -> float:
    got, want = got.detach().to(torch.float64).cpu(), want.detach().to(torch.float64).cpu()
    return float((got - want).norm() / want.norm().clamp_min(1e-300))
