"""overcomplete (PyPI ``overcomplete``): ``TopKSAE`` and ``BatchTopKSAE`` with the linear encoder
and its dictionary layer. It has no decoder bias, so its rows run (and are checked) with
``b_dec = 0``. The penalties are added to its pre-codes, whose gradient reaches the encoder."""
from __future__ import annotations

from importlib import metadata

import torch

from .common import Runner, Unavailable, peer_loss

NAME = "overcomplete"
PACKAGE = "overcomplete"
ZERO_B_DEC = True


def version() -> str:
    return metadata.version(PACKAGE)


def variants() -> tuple:
    return ("topk", "topk_off", "topk_ratio", "batchtopk")


def build(variant: str, w, k: int) -> Runner:
    if variant not in variants():
        raise Unavailable(f"overcomplete has no {variant} SAE in this comparison")
    try:
        from overcomplete.sae import BatchTopKSAE, TopKSAE
    except ImportError as exc:
        raise Unavailable(f"{PACKAGE} not installed (make bench-peers): {exc}") from exc
    except Exception as exc:  # noqa: BLE001 - a peer that breaks on import is a skipped row
        raise Unavailable(f"{PACKAGE} failed to import: {type(exc).__name__}: {exc}") from exc
    F, D = w.W_enc.shape
    dev = str(w.W_enc.device)
    if variant == "batchtopk":
        # Its top_k counts the whole batch; set per call from the batch size.
        sae = BatchTopKSAE(D, F, top_k=k, encoder_module="linear", device=dev)
    else:
        sae = TopKSAE(D, F, top_k=k, encoder_module="linear", device=dev)
    sae = sae.to(w.W_enc.dtype)
    with torch.no_grad():
        lin = sae.encoder.final_block[0]
        lin.weight.copy_(w.W_enc)
        lin.bias.copy_(w.b_enc)
        sae.dictionary._weights.copy_(w.W_dec)
    return _Overcomplete(sae, variant, k)


class _Overcomplete(Runner):
    note = ("no decoder bias: run and checked with b_dec = 0; it renormalizes the dictionary as "
            "W / (norm + 1e-8), hence a ~1e-7 gradient difference")

    def __init__(self, sae, variant, k):
        self.sae, self.variant, self.k, self.params = sae, variant, k, list(sae.parameters())

    def loss(self, x):
        if self.variant == "batchtopk":
            self.sae.top_k = self.k * x.shape[0]
        pre_codes, codes, recon = self.sae(x)
        return peer_loss(self.variant, x, recon, torch.relu(pre_codes), codes)

    def w_enc_grad(self):
        return self.sae.encoder.final_block[0].weight.grad
