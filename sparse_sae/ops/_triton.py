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

import contextlib
import functools

import torch

from sparse_sae import reference
from sparse_sae.ops._registry import fallback_warning, register_impl
from sparse_sae.ops.group_by_latent import group_by_latent
from sparse_sae.triton_kernels import encode as _encode
from sparse_sae.triton_kernels import penalty_backward as _penalty
from sparse_sae.triton_kernels import sparse_decode as _decode

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _kernel_dtype(op: str, *tensors) -> bool:
    """True when every tensor has one dtype the kernels take (index tensors are not passed);
    otherwise warns once that ``op`` uses the reference."""
    dtype = tensors[0].dtype
    if dtype in KERNEL_DTYPES and all(t.dtype == dtype for t in tensors):
        return True
    fallback_warning(op, f"the Triton kernels take one dtype among fp16, bf16 and fp32 "
                         f"(got {sorted({str(t.dtype) for t in tensors})})")
    return False


def device_guard(device: torch.device):
    """Makes ``device`` current for a launch: Triton launches on the current CUDA device, not on
    the tensors' (a rank of a multi-GPU run would otherwise launch on GPU 0 with its pointers)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _on_device_of_first_tensor(launcher):
    @functools.wraps(launcher)
    def launch(*args):
        with device_guard(args[0].device):
            return launcher(*args)
    return launch


def _allow_tf32() -> bool:
    """fp32 GEMMs follow PyTorch's setting: TF32 only when ``torch.set_float32_matmul_precision``
    allows it (the default, "highest", keeps exact fp32 products)."""
    return torch.get_float32_matmul_precision() != "highest"


@_on_device_of_first_tensor
def encode_triton(x, W_enc, b_enc, b_dec, relu):
    if not _kernel_dtype("encode", x, W_enc, b_enc, b_dec):
        return reference.encode_ref(x, W_enc, b_enc, b_dec, relu)
    return _encode.encode(x, W_enc, b_enc, b_dec, relu, allow_tf32=_allow_tf32())


@_on_device_of_first_tensor
def penalty_backward_triton(x, W_enc, b_dec, h, active, n1, n2, sp_indices, sp_grad, coef_off, coef_ratio,
                            ratio_eps, need_dx):
    if need_dx:
        fallback_warning("penalty_backward", "the Triton kernel computes no dx (an input that requires grad)")
    if need_dx or not _kernel_dtype("penalty_backward", x, W_enc, b_dec, *([] if h is None else [h])):
        dW_enc, db_enc, db_dec, dx = reference.penalty_backward_ref(
            x, W_enc, b_dec, h, active, n1, n2, sp_indices, sp_grad, coef_off, coef_ratio, ratio_eps, need_dx)
        return dW_enc, db_enc, db_dec, (dx if need_dx else x.new_empty(0))
    # entries with no gradient (unselected padding, AuxK picks with nothing dead) join no group
    start, entries = group_by_latent(sp_indices, W_enc.shape[0], keep=sp_grad != 0)
    dW_enc, db_enc = _penalty.penalty_backward(x - b_dec, h, active, n1, n2, coef_off, coef_ratio, ratio_eps,
                                               sp_indices, sp_grad, start, entries, allow_tf32=_allow_tf32())
    return dW_enc, db_enc, -(db_enc @ W_enc), x.new_empty(0)


@_on_device_of_first_tensor
def sparse_decode_triton(values, indices, W_dec, b_dec):
    if not _kernel_dtype("sparse_decode", values, W_dec, b_dec):
        return reference.sparse_decode_ref(values, indices, W_dec, b_dec)
    return _decode.sparse_decode(values, indices, W_dec, b_dec)


@_on_device_of_first_tensor
def sparse_decode_backward_triton(grad, values, indices, W_dec):
    if not _kernel_dtype("sparse_decode_backward", grad, values, W_dec):
        return reference.sparse_decode_backward_ref(grad, values, indices, W_dec)
    start, entries = group_by_latent(indices, W_dec.shape[0], keep=values != 0)   # zero entries add nothing to dW
    return _decode.sparse_decode_backward(grad, values, indices, W_dec, start, entries)


@_on_device_of_first_tensor
def threshold_code_triton(x, W_enc, b_enc, b_dec, theta, bandwidth, regime):
    """ReLU / JumpReLU code: the Triton encoder, then the select op's threshold packing (the CUDA
    radix select); its sparse backward runs the Triton penalty kernel's sparse part."""
    from sparse_sae.ops.threshold_code import _threshold_code_gpu
    return _threshold_code_gpu(x, W_enc, b_enc, b_dec, theta, bandwidth, regime)


LAUNCHERS = {"encode": encode_triton, "penalty_backward": penalty_backward_triton,
             "sparse_decode": sparse_decode_triton, "sparse_decode_backward": sparse_decode_backward_triton,
             "threshold_code": threshold_code_triton}
for _op, _launcher in LAUNCHERS.items():
    register_impl(_op, "triton", _launcher)
