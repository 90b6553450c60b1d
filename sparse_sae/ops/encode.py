"""``sparse_sae::encode``: ``h = relu((x - b_dec) @ W_enc.T + b_enc)``, with autograd."""
from __future__ import annotations

import torch
from torch import Tensor

from sparse_sae import reference
from sparse_sae._checks import check_op_args
from sparse_sae.ops._registry import _C, dispatch, register_impl


@torch.library.custom_op("sparse_sae::encode", mutates_args=())
def encode(x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor, relu: bool = True) -> Tensor:
    """Encoder pre-activations: ``relu((x - b_dec) @ W_enc.T + b_enc)`` (``B x F``); ``relu=False``
    returns ``z`` itself (JumpReLU thresholds ``z``).

    Shapes: ``x`` ``B x D``, ``W_enc`` ``F x D``, ``b_enc`` ``F``, ``b_dec`` ``D``.
    """
    F, D = W_enc.shape if W_enc.dim() == 2 else (None, None)
    check_op_args("encode", {"x": (None, D), "W_enc": (F, D), "b_enc": (F,), "b_dec": (D,)},
                  {"x": x, "W_enc": W_enc, "b_enc": b_enc, "b_dec": b_dec})
    return dispatch("encode", x.device)(x, W_enc, b_enc, b_dec, relu)


@encode.register_fake
def _(x, W_enc, b_enc, b_dec, relu=True):
    torch._check(x.dim() == 2 and W_enc.dim() == 2, lambda: "x and W_enc must be 2-D")
    torch._check(x.shape[1] == W_enc.shape[1], lambda: "x and W_enc must have the same width D")
    return x.new_empty(x.shape[0], W_enc.shape[0])


def _setup_context(ctx, inputs, output):
    x, W_enc, b_enc, b_dec, relu = inputs
    ctx.save_for_backward(x, W_enc, b_dec, output if relu else None)


def _backward(ctx, grad):
    x, W_enc, b_dec, h = ctx.saved_tensors
    G = grad if h is None else grad * (h > 0)
    dW_enc, db_enc, db_dec, dx = reference.encoder_grads_ref(G, x, W_enc, b_dec, need_dx=ctx.needs_input_grad[0])
    return dx, dW_enc, db_enc, db_dec, None


def _encode_cpu(x, W_enc, b_enc, b_dec, relu):
    """The encoder GEMM stays with ATen/BLAS; bias in the GEMM, ReLU in place (one B x F tensor)."""
    z = torch.addmm(b_enc, x - b_dec, W_enc.t())
    return z.relu_() if relu else z


encode.register_autograd(_backward, setup_context=_setup_context)
register_impl("encode", "reference", reference.encode_ref)
if _C is not None:
    register_impl("encode", "cpu", _encode_cpu)
