"""sparse_sae's own modules: every variant, on the backend the ops pick for the device."""
from __future__ import annotations

import torch

import sparse_sae as S

from .common import BANDWIDTH, COEF_L0, COEF_L1, COEF_OFF, COEF_RATIO, VARIANTS, Runner, matryoshka_sizes

NAME = "ours"
PACKAGE = "sparse-sae"


def version() -> str:
    return S.__version__


def variants() -> tuple:
    return VARIANTS


def build(variant: str, w, k: int) -> Runner:
    D, F = w.W_enc.shape[1], w.W_enc.shape[0]
    kw = {"check_inputs": False, "dtype": w.W_enc.dtype, "device": w.W_enc.device}
    if variant == "topk":
        m = S.TopKSAE(D, F, k, **kw)
    elif variant == "topk_off":
        m = S.TopKSAE(D, F, k, [S.OffSupportL1(COEF_OFF)], **kw)
    elif variant == "topk_ratio":
        m = S.TopKSAE(D, F, k, [S.L1L2Ratio(COEF_RATIO)], **kw)
    elif variant == "batchtopk":
        m = S.BatchTopKSAE(D, F, k, **kw)
    elif variant == "relu_l1":
        m = S.ReLUSAE(D, F, [S.DecoderNormL1(COEF_L1)], **kw)
    elif variant == "jumprelu":
        m = S.JumpReLUSAE(D, F, [S.L0(COEF_L0)], bandwidth=BANDWIDTH, **kw)
    elif variant == "gated":
        m = S.GatedSAE(D, F, [S.DecoderNormL1(COEF_L1)], **kw)
    elif variant == "matryoshka":
        m = S.MatryoshkaTopKSAE(D, F, k, matryoshka_sizes(F), **kw)
    else:
        raise ValueError(f"unknown variant {variant!r}")
    with torch.no_grad():
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            getattr(m, name).copy_(getattr(w, name))
        if variant == "jumprelu":
            m.log_threshold.copy_(w.theta.log())
        if variant == "gated":
            m.r_mag.copy_(w.r_mag)
            m.b_mag.copy_(w.b_mag)
    return _Ours(m)


class _Ours(Runner):
    def __init__(self, m):
        self.m, self.params = m, list(m.parameters())

    def loss(self, x):
        return self.m(x).loss

    def w_enc_grad(self):
        return self.m.W_enc.grad
