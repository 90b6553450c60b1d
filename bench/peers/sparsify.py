"""EleutherAI sparsify (PyPI ``eai-sparsify``): ``SparseCoder`` with its fused Top-k encoder and
sparse decoder. The regularized loss is added to the pre-activations that its encoder returns;
its fused backward takes the gradient of the selected values only, so the penalty gradient
never reaches the encoder (the gradient check shows by how much)."""
from __future__ import annotations

import os
from importlib import metadata

import torch

from .common import Runner, Unavailable, peer_loss

NAME = "sparsify"
PACKAGE = "eai-sparsify"


def version() -> str:
    return metadata.version(PACKAGE)


def variants() -> tuple:
    return ("topk", "topk_off", "topk_ratio")


def _import(device):
    if device.type != "cuda":
        # Its Triton decoder needs a GPU; it reads this switch once, at import.
        os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")
    try:
        from sparsify import SparseCoder, SparseCoderConfig
    except ImportError as exc:
        raise Unavailable(f"{PACKAGE} not installed (make bench-peers): {exc}") from exc
    except Exception as exc:  # noqa: BLE001 - a peer that breaks on import is a skipped row
        raise Unavailable(f"{PACKAGE} failed to import: {type(exc).__name__}: {exc}") from exc
    return SparseCoder, SparseCoderConfig


def build(variant: str, w, k: int) -> Runner:
    if variant not in variants():
        raise Unavailable(f"sparsify has no {variant} SAE")
    SparseCoder, SparseCoderConfig = _import(w.W_enc.device)
    F, D = w.W_enc.shape
    sae = SparseCoder(D, SparseCoderConfig(num_latents=F, k=k), device=w.W_enc.device, dtype=w.W_enc.dtype)
    with torch.no_grad():
        sae.encoder.weight.copy_(w.W_enc)
        sae.encoder.bias.copy_(w.b_enc)
        sae.W_dec.copy_(w.W_dec)
        sae.b_dec.copy_(w.b_dec)
    return _Sparsify(sae, variant)


class _Sparsify(Runner):
    def __init__(self, sae, variant):
        self.sae, self.variant, self.params = sae, variant, list(sae.parameters())
        if variant != "topk":
            self.note = "penalty added to its pre-activations; its fused encoder drops that gradient"

    def loss(self, x):
        if self.variant == "topk":
            return self.sae(x).fvu          # its own forward and FVU
        top_acts, top_indices, pre_acts = self.sae.encode(x)
        recon = self.sae.decode(top_acts, top_indices)
        a = torch.zeros_like(pre_acts).scatter(1, top_indices, top_acts)
        return peer_loss(self.variant, x, recon, pre_acts, a)

    def w_enc_grad(self):
        return self.sae.encoder.weight.grad
