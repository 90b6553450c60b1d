"""``sparse_sae::penalty_backward``: encoder gradients from the penalty gradient plus a
sparse gradient, without autograd ever holding the dense ``B x F`` gradient.

``G = G_pen + G_sparse`` where ``G_pen`` is rebuilt from ``h``, the batch-active set and
the row norms (reference.penalty_grad_ref), and ``G_sparse`` lists ``dL/dz`` at
``(i, sp_indices[i, j])``. Returns ``dW_enc = G.T @ (x - b_dec)``, ``db_enc = colsum(G)``,
the encoder's share of ``db_dec = -colsum(G) @ W_enc`` and ``dx = G @ W_enc`` (an empty
tensor unless ``need_dx``).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from sparse_sae import reference
from sparse_sae._checks import check_op_args
from sparse_sae.ops._registry import _C, dispatch, register_impl
from sparse_sae.ops.cpu_dtypes import cpu_compute_dtype


@torch.library.custom_op("sparse_sae::penalty_backward", mutates_args=())
def penalty_backward(x: Tensor, W_enc: Tensor, b_dec: Tensor, h: Optional[Tensor], active: Tensor, n1: Tensor,
                     n2: Tensor, sp_indices: Tensor, sp_grad: Tensor, coef_off: Optional[Tensor],
                     coef_ratio: Optional[Tensor], ratio_eps: float, need_dx: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """See the module docstring. ``coef_off``/``coef_ratio`` are 0-d tensors (the penalties'
    upstream gradients divided by ``B``) or None for an absent term. ``h`` may be None when both
    are None (plain Top-k keeps no ``B x F`` tensor for its backward)."""
    B, D = x.shape if x.dim() == 2 else (None, None)
    F = W_enc.shape[0] if W_enc.dim() == 2 else None
    m = sp_indices.shape[1] if sp_indices.dim() == 2 else None
    if h is None and (coef_off is not None or coef_ratio is not None):
        raise ValueError("penalty_backward: h is needed for the penalty terms (coef_off, coef_ratio)")
    shapes = {"x": (B, D), "W_enc": (F, D), "b_dec": (D,), "active": (F,), "n1": (B,), "n2": (B,),
              "sp_indices": (B, m), "sp_grad": (B, m)}
    tensors = {"x": x, "W_enc": W_enc, "b_dec": b_dec, "active": active, "n1": n1, "n2": n2,
               "sp_indices": sp_indices, "sp_grad": sp_grad}
    if h is not None:
        shapes["h"], tensors["h"] = (B, F), h
    check_op_args("penalty_backward", shapes, tensors, sp_indices, F)
    return dispatch("penalty_backward", x.device)(x, W_enc, b_dec, h, active, n1, n2, sp_indices, sp_grad,
                                                  coef_off, coef_ratio, ratio_eps, need_dx)


@penalty_backward.register_fake
def _(x, W_enc, b_dec, h, active, n1, n2, sp_indices, sp_grad, coef_off, coef_ratio, ratio_eps, need_dx):
    torch._check(sp_indices.shape == sp_grad.shape, lambda: "sp_indices and sp_grad must have the same shape")
    dx = x.new_empty(x.shape) if need_dx else x.new_empty(0)
    return W_enc.new_empty(W_enc.shape), W_enc.new_empty(W_enc.shape[0]), b_dec.new_empty(b_dec.shape), dx


def _penalty_backward_reference(x, W_enc, b_dec, h, active, n1, n2, sp_indices, sp_grad,
                                coef_off, coef_ratio, ratio_eps, need_dx):
    dW_enc, db_enc, db_dec, dx = reference.penalty_backward_ref(
        x, W_enc, b_dec, h, active, n1, n2, sp_indices, sp_grad, coef_off, coef_ratio, ratio_eps, need_dx)
    return dW_enc, db_enc, db_dec, (dx if need_dx else x.new_empty(0))


def _penalty_backward_cpu(x, W_enc, b_dec, h, active, n1, n2, sp_indices, sp_grad, coef_off, coef_ratio,
                          ratio_eps, need_dx):
    dt = cpu_compute_dtype(x, W_enc, b_dec, *([] if h is None else [h]))
    if dt is None or (dt == torch.float64) != (n1.dtype == torch.float64):
        return _penalty_backward_reference(x, W_enc, b_dec, h, active, n1, n2, sp_indices, sp_grad,
                                           coef_off, coef_ratio, ratio_eps, need_dx)
    c = [t.to(dt).contiguous() for t in (x, W_enc, b_dec, x.new_empty(0, 0) if h is None else h)]
    c += [active.contiguous(), n1.to(dt).contiguous(), n2.to(dt).contiguous(), sp_indices.contiguous(),
          sp_grad.to(dt).contiguous()]
    dW_enc, db_enc, db_dec, dx = _C.penalty_backward_cpu(*c, coef_off, coef_ratio, ratio_eps, need_dx)
    return dW_enc.to(W_enc.dtype), db_enc.to(W_enc.dtype), db_dec.to(b_dec.dtype), dx.to(x.dtype)


register_impl("penalty_backward", "reference", _penalty_backward_reference)
if _C is not None:
    register_impl("penalty_backward", "cpu", _penalty_backward_cpu)
