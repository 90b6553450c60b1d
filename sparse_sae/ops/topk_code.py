"""``sparse_sae::topk_code``: encode -> select -> penalty values as one autograd node.

Forward: ``h = encode(x)``, the (Batch)Top-k selection and its statistics, and the two
paper penalties, cheap once the row norms exist:
``R_off = (1/B) sum_i (n1_i - sum_j values_ij)`` (every positive selected entry is batch
active) and ``R_ratio = (1/B) sum_i n1_i / (n2_i + eps)``.

Backward: the upstream gradients of ``values`` and of the AuxK values are sparse; those of
``R_off`` and ``R_ratio`` scale the dense penalty gradient that ``penalty_backward`` rebuilds
on the fly. An unused penalty has no upstream gradient, so plain Top-k pays no dense term.
Without penalties (``penalized=False``, plain Top-k) the row norms are not computed, the
penalty values are zeros, and the node keeps only ``B x k`` tensors (and ``x``) for its
backward, never ``h``.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from sparse_sae import reference
from sparse_sae.ops import _registry
from sparse_sae.ops.encode import encode
from sparse_sae.ops.penalty_backward import penalty_backward
from sparse_sae.ops.select import _select, fake_code_widths


class TopKCode(NamedTuple):
    h: Tensor            # B x F, relu(z) (no gradient flows through it)
    values: Tensor       # B x width, differentiable
    indices: Tensor      # B x width, int64
    aux_values: Tensor   # B x k_aux, differentiable (B x 0 without AuxK)
    aux_indices: Tensor  # B x k_aux, int64
    off_support_l1: Tensor  # 0-d, differentiable
    l1_l2_ratio: Tensor     # 0-d, differentiable
    threshold: Tensor    # B
    active: Tensor       # F bool
    fired: Tensor        # F int64
    n1: Tensor           # B
    n2: Tensor           # B


@torch.library.custom_op("sparse_sae::topk_code", mutates_args=())
def _topk_code(x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor, k: int, mode: str, width: int,
               dead: Optional[Tensor], k_aux: int, ratio_eps: float, penalized: bool) -> tuple[
        Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    h = encode(x, W_enc, b_enc, b_dec, True)
    cut = _registry.batch_cut(h, k) if mode == "batchtopk" else None   # over the global batch (data parallelism)
    values, indices, threshold, active, fired, n1, n2, aux_values, aux_indices = _select(
        h, k, mode, width, None, dead, k_aux, penalized, cut)
    if penalized and _registry.reduces_batch_active():    # A over the global batch (data parallelism)
        active = _registry.batch_active(active)
        n1, n2 = reference.active_row_norms_ref(h, active)
    if penalized:
        r_off, r_ratio = reference.penalty_values_from_norms(n1, n2, values, ratio_eps)
    else:
        r_off, r_ratio = n1.new_zeros(()), n1.new_zeros(())
    return (h, values, indices, aux_values, aux_indices, r_off, r_ratio, threshold, active, fired, n1, n2)


@_topk_code.register_fake
def _(x, W_enc, b_enc, b_dec, k, mode, width, dead, k_aux, ratio_eps, penalized):
    B, F = x.shape[0], W_enc.shape[0]
    h = x.new_empty(B, F)
    w, ka = fake_code_widths(k, mode, width, dead, k_aux, F)
    acc = reference.acc_dtype(h.dtype)
    return (h, h.new_empty(B, w), h.new_empty(B, w, dtype=torch.int64), h.new_empty(B, ka),
            h.new_empty(B, ka, dtype=torch.int64), h.new_empty((), dtype=acc), h.new_empty((), dtype=acc),
            h.new_empty(B), h.new_empty(F, dtype=torch.bool), h.new_empty(F, dtype=torch.int64),
            h.new_empty(B, dtype=acc), h.new_empty(B, dtype=acc))


def _setup_context(ctx, inputs, output):
    x, W_enc, b_enc, b_dec, k, mode, width, dead, k_aux, ratio_eps, penalized = inputs
    h, values, indices, aux_values, aux_indices, _, _, threshold, active, fired, n1, n2 = output
    ctx.ratio_eps, ctx.penalized = ratio_eps, penalized
    ctx.save_for_backward(x, W_enc, b_dec, h if penalized else None, values, indices, aux_values, aux_indices,
                          active, n1, n2)
    ctx.mark_non_differentiable(h, indices, aux_indices, threshold, active, fired, n1, n2)
    # An unused penalty must arrive as None, not as a zero tensor: then plain Top-k pays no
    # dense term in the backward.
    ctx.set_materialize_grads(False)


def code_backward_terms(values, indices, aux_values, aux_indices, g_values, g_aux_values, g_off, g_ratio,
                        acc_dtype):
    """What ``penalty_backward`` takes from the upstream gradients of a code: ``(coef_off,
    coef_ratio, sp_indices, sp_grad)``, the penalty coefficients divided by ``B`` (None for an
    absent term) and the sparse part as ``dL/dz``: the support is excluded from ``R_off``, and
    entries with value 0 (unselected, or AuxK picks that are not dead) carry nothing."""
    B = values.shape[0]
    coef_off = g_off / B if g_off is not None else None
    coef_ratio = g_ratio / B if g_ratio is not None else None
    sp_grad = torch.zeros_like(values, dtype=acc_dtype) if g_values is None else g_values.to(acc_dtype)
    if coef_off is not None:
        sp_grad = sp_grad - coef_off
    sp_grad = sp_grad * (values > 0)
    sp_indices = indices
    if aux_values.shape[1] > 0 and g_aux_values is not None:
        sp_grad = torch.cat([sp_grad, g_aux_values.to(acc_dtype) * (aux_values > 0)], dim=1)
        sp_indices = torch.cat([indices, aux_indices], dim=1)
    return coef_off, coef_ratio, sp_indices, sp_grad


def _backward(ctx, g_h, g_values, g_indices, g_aux_values, g_aux_indices, g_off, g_ratio, *_):
    x, W_enc, b_dec, h, values, indices, aux_values, aux_indices, active, n1, n2 = ctx.saved_tensors
    if not ctx.penalized:   # the penalty outputs are constant zeros then: no gradient of theirs
        g_off = g_ratio = None
    coef_off, coef_ratio, sp_indices, sp_grad = code_backward_terms(
        values, indices, aux_values, aux_indices, g_values, g_aux_values, g_off, g_ratio, n1.dtype)
    need_dx = ctx.needs_input_grad[0]
    dW_enc, db_enc, db_dec, dx = penalty_backward(x, W_enc, b_dec, h, active, n1, n2, sp_indices, sp_grad,
                                                  coef_off, coef_ratio, ctx.ratio_eps, need_dx)
    return (dx if need_dx else None), dW_enc, db_enc, db_dec, None, None, None, None, None, None, None


_topk_code.register_autograd(_backward, setup_context=_setup_context)


def topk_code(x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor, k: int, mode: str = "topk", width: int = 0,
              dead: Optional[Tensor] = None, k_aux: int = 0,
              ratio_eps: float = reference.RATIO_EPS, penalized: bool = True) -> TopKCode:
    """The (Batch)Top-k code of ``x`` with its penalties; see the module docstring.

    ``mode`` is ``"topk"`` or ``"batchtopk"``; ``width`` as in :func:`sparse_sae.ops.select`;
    ``dead`` (``F`` bool) with ``k_aux > 0`` adds the AuxK candidates. ``penalized=False`` (no
    penalty term in the loss) skips the row norms and keeps no ``B x F`` tensor for the backward.
    """
    if mode not in ("topk", "batchtopk"):
        raise ValueError(f"mode must be 'topk' or 'batchtopk', got {mode!r}")
    return TopKCode(*_topk_code(x, W_enc, b_enc, b_dec, k, mode, width, dead, k_aux, ratio_eps, penalized))
