"""SAELens (PyPI ``sae-lens``): ``TopKTrainingSAE`` and ``BatchTopKTrainingSAE``, with
``rescale_acts_by_decoder_norm=False`` (the decoder rows are unit norm, as in every row) and no
AuxK (no dead latents in a few steps). The penalties are added to its ``hidden_pre``, whose
gradient reaches the encoder. Its ``W_enc`` is ``D x F``; the gradient is handed back transposed.

``GatedTrainingSAE``: its own encode (gate and magnitude GEMMs) and decode, with the loss of
the comparison (FVU, the gate's decoder-norm l1, the auxiliary reconstruction through the frozen
decoder, as the paper and our GatedSAE have it; SAELens's own trainer uses a squared error and
does not freeze the decoder there); the gate pre-activation is recomputed for the auxiliary
terms, as SAELens's ``calculate_aux_loss`` does. SAELens's Matryoshka SAE is BatchTopK only:
no Top-k row."""
from __future__ import annotations

from importlib import metadata

import torch

from .common import COEF_L1, Runner, Unavailable, fvu, peer_loss

NAME = "saelens"
PACKAGE = "sae-lens"


def version() -> str:
    return metadata.version(PACKAGE)


def variants() -> tuple:
    return ("topk", "topk_off", "topk_ratio", "batchtopk", "gated", "matryoshka")   # matryoshka: a skipped row saying why


def build(variant: str, w, k: int) -> Runner:
    if variant == "matryoshka":
        raise Unavailable("SAELens's Matryoshka SAE is BatchTopK only (this row is Matryoshka Top-k)")
    if variant not in variants():
        raise Unavailable(f"SAELens has no {variant} SAE in this comparison")
    if variant == "gated":
        return _build_gated(w)
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


def _build_gated(w) -> Runner:
    try:
        from sae_lens import GatedTrainingSAE, GatedTrainingSAEConfig
    except ImportError as exc:
        raise Unavailable(f"{PACKAGE} not installed or has no gated SAE (make bench-peers): {exc}") from exc
    F, D = w.W_enc.shape
    sae = GatedTrainingSAE(GatedTrainingSAEConfig(d_in=D, d_sae=F, dtype=str(w.W_enc.dtype).removeprefix("torch."),
                                                  device=str(w.W_enc.device), decoder_init_norm=None))
    with torch.no_grad():
        for name, value in dict(W_enc=w.W_enc.T, b_gate=w.b_enc, r_mag=w.r_mag, b_mag=w.b_mag, W_dec=w.W_dec,
                                b_dec=w.b_dec).items():
            getattr(sae, name).copy_(value)
    return _SAELensGated(sae)


class _SAELensGated(Runner):
    def __init__(self, sae):
        self.sae, self.params = sae, list(sae.parameters())

    def loss(self, x):
        acts, _ = self.sae.encode_with_hidden_pre(x)
        recon = self.sae.decode(acts)
        gate = torch.relu((x - self.sae.b_dec) @ self.sae.W_enc + self.sae.b_gate)
        sparsity = (gate * self.sae.W_dec.norm(dim=1)).sum() / x.shape[0]
        frozen = gate @ self.sae.W_dec.detach() + self.sae.b_dec.detach()
        return fvu(x, recon) + COEF_L1 * sparsity + fvu(x, frozen)

    def w_enc_grad(self):
        return self.sae.W_enc.grad.T


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
