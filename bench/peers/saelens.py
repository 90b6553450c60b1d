"""SAELens (PyPI ``sae-lens``): ``TopKTrainingSAE`` and ``BatchTopKTrainingSAE``, with
``rescale_acts_by_decoder_norm=False`` (the decoder rows are unit norm, as in every row) and no
AuxK (no dead latents in a few steps). The penalties are added to its ``hidden_pre``, whose
gradient reaches the encoder. Its ``W_enc`` is ``D x F``; the gradient is handed back transposed."""
from __future__ import annotations

from importlib import metadata

import torch

from .common import Runner, Unavailable, peer_loss

NAME = "saelens"
PACKAGE = "sae-lens"


def version() -> str:
    return metadata.version(PACKAGE)


def variants() -> tuple:
    return ("topk", "topk_off", "topk_ratio", "batchtopk")


def build(variant: str, w, k: int) -> Runner:
    if variant not in variants():
        raise Unavailable(f"SAELens has no {variant} SAE in this comparison")
    try:
        from sae_lens import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig, TopKTrainingSAE, TopKTrainingSAEConfig
    except ImportError as exc:
        raise Unavailable(f"{PACKAGE} not installed (make bench-peers): {exc}") from exc
    except Exception as exc:  # noqa: BLE001 - a peer that breaks on import is a skipped row
        raise Unavailable(f"{PACKAGE} failed to import: {type(exc).__name__}: {exc}") from exc
    F, D = w.W_enc.shape
    kw = dict(d_in=D, d_sae=F, k=k, dtype=str(w.W_enc.dtype).removeprefix("torch."), device=str(w.W_enc.device),
              rescale_acts_by_decoder_norm=False, aux_loss_coefficient=0.0, decoder_init_norm=None)
    if variant == "batchtopk":
        sae = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(**kw))
    else:
        sae = TopKTrainingSAE(TopKTrainingSAEConfig(**kw))
    with torch.no_grad():
        sae.W_enc.copy_(w.W_enc.T)
        sae.b_enc.copy_(w.b_enc)
        sae.W_dec.copy_(w.W_dec)
        sae.b_dec.copy_(w.b_dec)
    return _SAELens(sae, variant)


class _SAELens(Runner):
    def __init__(self, sae, variant):
        self.sae, self.variant, self.params = sae, variant, list(sae.parameters())

    def loss(self, x):
        acts, hidden_pre = self.sae.encode_with_hidden_pre(x)
        recon = self.sae.decode(acts)
        if self.variant == "batchtopk":
            self.sae.update_topk_threshold(acts)
        return peer_loss(self.variant, x, recon, torch.relu(hidden_pre), acts)

    def w_enc_grad(self):
        return self.sae.W_enc.grad.T
