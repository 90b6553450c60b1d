"""``sparse_sae::sparse_decode``: ``x_hat = a @ W_dec + b_dec`` for a code given as
``(values, indices)``, with autograd through ``sparse_sae::sparse_decode_backward``."""
from __future__ import annotations

import torch
from torch import Tensor

from sparse_sae import reference
from sparse_sae._checks import check_op_args
from sparse_sae.ops._registry import _C, dispatch, register_impl
from sparse_sae.ops.cpu_dtypes import cpu_compute_dtype


@torch.library.custom_op("sparse_sae::sparse_decode", mutates_args=())
def sparse_decode(values: Tensor, indices: Tensor, W_dec: Tensor, b_dec: Tensor) -> Tensor:
    """``x_hat[i] = b_dec + sum_j values[i, j] * W_dec[indices[i, j]]`` (``B x D``).

    Shapes: ``values`` and ``indices`` (int64) ``B x k``, ``W_dec`` ``F x D``, ``b_dec`` ``D``.
    """
    B, k = values.shape if values.dim() == 2 else (None, None)
    F, D = W_dec.shape if W_dec.dim() == 2 else (None, None)
    check_op_args("sparse_decode", {"values": (B, k), "indices": (B, k), "W_dec": (F, D), "b_dec": (D,)},
                  {"values": values, "indices": indices, "W_dec": W_dec, "b_dec": b_dec}, indices, F)
    return dispatch("sparse_decode", values.device)(values, indices, W_dec, b_dec)


@sparse_decode.register_fake
def _(values, indices, W_dec, b_dec):
    torch._check(values.shape == indices.shape, lambda: "values and indices must have the same shape")
    return W_dec.new_empty(values.shape[0], W_dec.shape[1])


@torch.library.custom_op("sparse_sae::sparse_decode_backward", mutates_args=())
def sparse_decode_backward(grad: Tensor, values: Tensor, indices: Tensor, W_dec: Tensor) -> tuple[Tensor, Tensor]:
    """``(d_values, dW_dec)`` of :func:`sparse_decode` for the upstream ``grad`` (``B x D``)."""
    B, k = values.shape if values.dim() == 2 else (None, None)
    D = W_dec.shape[1] if W_dec.dim() == 2 else None
    check_op_args("sparse_decode_backward", {"grad": (B, D), "values": (B, k), "indices": (B, k), "W_dec": (None, D)},
                  {"grad": grad, "values": values, "indices": indices, "W_dec": W_dec})
    return dispatch("sparse_decode_backward", grad.device)(grad, values, indices, W_dec)


@sparse_decode_backward.register_fake
def _(grad, values, indices, W_dec):
    return values.new_empty(values.shape), W_dec.new_empty(W_dec.shape)


def _setup_context(ctx, inputs, output):
    values, indices, W_dec, b_dec = inputs
    ctx.save_for_backward(values, indices, W_dec)


def _backward(ctx, grad):
    values, indices, W_dec = ctx.saved_tensors
    d_values, dW_dec = sparse_decode_backward(grad, values, indices, W_dec)
    db_dec = grad.sum(0) if ctx.needs_input_grad[3] else None
    return d_values, None, dW_dec, db_dec


def _sparse_decode_cpu(values, indices, W_dec, b_dec):
    dt = cpu_compute_dtype(W_dec, values, b_dec)
    if dt is None:
        return reference.sparse_decode_ref(values, indices, W_dec, b_dec)
    out = _C.sparse_decode_cpu(values.to(dt), indices, W_dec.to(dt), b_dec.to(dt))
    return out.to(W_dec.dtype)


def _sparse_decode_backward_cpu(grad, values, indices, W_dec):
    dt = cpu_compute_dtype(W_dec, values, grad)
    if dt is None:
        return reference.sparse_decode_backward_ref(grad, values, indices, W_dec)
    d_values, dW_dec = _C.sparse_decode_backward_cpu(grad.to(dt), values.to(dt), indices, W_dec.to(dt))
    return d_values.to(values.dtype), dW_dec.to(W_dec.dtype)


sparse_decode.register_autograd(_backward, setup_context=_setup_context)
register_impl("sparse_decode", "reference", reference.sparse_decode_ref)
register_impl("sparse_decode_backward", "reference", reference.sparse_decode_backward_ref)
if _C is not None:
    register_impl("sparse_decode", "cpu", _sparse_decode_cpu)
    register_impl("sparse_decode_backward", "cpu", _sparse_decode_backward_cpu)
