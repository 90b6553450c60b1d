"""The ``triton`` backend: the Triton kernels of ``sparse_sae.triton_kernels`` registered for
``encode``, ``penalty_backward``, ``sparse_decode`` and ``sparse_decode_backward``.

They run on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1`` (Triton's
interpreter; ``SPARSE_SAE_BACKEND=triton`` selects them there), which is how CI checks the
module path against the reference without a GPU. Selection stays with the ``cuda`` backend
(DESIGN.md 4). Inputs the kernels do not cover fall back to the reference: float64, mixed
dtypes, and ``dx`` of the penalty backward (``need_dx``; activations cached from a model
need no gradient). Importing this module raises ImportError when Triton is missing.
"""
from __future__ import annotations

import torch

from sparse_sae import reference
from sparse_sae.backends import register_impl
from sparse_sae.ops.group_by_latent import group_by_latent
from sparse_sae.triton_kernels import encode as _encode
from sparse_sae.triton_kernels import penalty_backward as _penalty
from sparse_sae.triton_kernels import sparse_decode as _decode

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _kernel_dtype(*tensors) -> bool:
    """True when every tensor has one dtype the kernels take (index tensors are not passed)."""
    dtype = tensors[0].dtype
    return dtype in KERNEL_DTYPES and all(t.dtype == dtype for t in tensors)


def _allow_tf32() -> bool:
    """fp32 GEMMs follow PyTorch's setting: TF32 only when ``torch.set_float32_matmul_precision``
    allows it (the default, "highest", keeps exact fp32 products)."""
    return torch.get_float32_matmul_precision() != "highest"


def encode_triton(x, W_enc, b_enc, b_dec, relu):
    if not _kernel_dtype(x, W_enc, b_enc, b_dec):
        return reference.encode_ref(x, W_enc, b_enc, b_dec, relu)
    return _encode.encode(x, W_enc, b_enc, b_dec, relu, allow_tf32=_allow_tf32())


def penalty_backward_triton(x, W_enc, b_dec, h, active, n1, n2, sp_indices, sp_grad, coef_off, coef_ratio,
                            ratio_eps, need_dx):
    if need_dx or not _kernel_dtype(x, W_enc, b_dec, h):
        dW_enc, db_enc, db_dec, dx = reference.penalty_backward_ref(
            x, W_enc, b_dec, h, active, n1, n2, sp_indices, sp_grad, coef_off, coef_ratio, ratio_eps, need_dx)
        return dW_enc, db_enc, db_dec, (dx if need_dx else x.new_empty(0))
    start, entries = group_by_latent(sp_indices, W_enc.shape[0])
    dW_enc, db_enc = _penalty.penalty_backward(x - b_dec, h, active, n1, n2, coef_off, coef_ratio, ratio_eps,
                                               sp_indices, sp_grad, start, entries, allow_tf32=_allow_tf32())
    return dW_enc, db_enc, -(db_enc @ W_enc), x.new_empty(0)


def sparse_decode_triton(values, indices, W_dec, b_dec):
    if not _kernel_dtype(values, W_dec, b_dec):
        return reference.sparse_decode_ref(values, indices, W_dec, b_dec)
    return _decode.sparse_decode(values, indices, W_dec, b_dec)


def sparse_decode_backward_triton(grad, values, indices, W_dec):
    if not _kernel_dtype(grad, values, W_dec):
        return reference.sparse_decode_backward_ref(grad, values, indices, W_dec)
    start, entries = group_by_latent(indices, W_dec.shape[0])
    return _decode.sparse_decode_backward(grad, values, indices, W_dec, start, entries)


register_impl("encode", "triton", encode_triton)
register_impl("penalty_backward", "triton", penalty_backward_triton)
register_impl("sparse_decode", "triton", sparse_decode_triton)
register_impl("sparse_decode_backward", "triton", sparse_decode_backward_triton)
