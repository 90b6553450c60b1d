"""Sparse decoder: ``x_hat = a @ W_dec + b_dec`` for a code ``(values, indices)`` (``B x k``),
and its backward, in Triton.

- forward: a gather-matmul, tiled over rows and ``D``, fp32 accumulation;
- ``d_values[i, j] = grad[i] . W_dec[indices[i, j]]``: one row and a block of its entries per
  program, reduced over ``D`` in fp32;
- ``dW_dec[l] = sum over the entries e of latent l of values[e] * grad[row(e)]``: grouped by
  latent (the CSC order of ``sparse_sae.ops.group_by_latent``), ``BL`` consecutive latents
  and one ``D`` block per program (most latents have few entries: a program per latent would
  be mostly launch cost), summed in a fixed order: deterministic, no ``B x k x D``
  intermediate, no atomics. Plain Top-k's encoder backward reuses this kernel.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._config import interpreting


def _blocks(D: int, cap: int) -> int:
    """A ``D`` block: the next power of two, at least 64 (the interpreter's floor), at most ``cap``."""
    return max(64, min(cap, triton.next_power_of_2(D)))


# ------------------------------------------------------------------------------ forward
@triton.jit
def sparse_decode_kernel(
    # pointers
    val_ptr, idx_ptr, w_ptr, b_ptr, out_ptr,
    # sizes
    B, K, D,
    # strides
    stride_w, stride_out,
    # meta-parameters
    BM: tl.constexpr, BD: tl.constexpr,
):
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rd = tl.program_id(1) * BD + tl.arange(0, BD)
    m_ok = rm < B
    d_ok = rd < D
    acc = tl.zeros((BM, BD), dtype=tl.float32)
    row_code = rm.to(tl.int64) * K
    for j in range(0, K):
        v = tl.load(val_ptr + row_code + j, mask=m_ok, other=0.0).to(tl.float32)
        i = tl.load(idx_ptr + row_code + j, mask=m_ok, other=0)
        # a zero entry (padding, AuxK with nothing dead) reads no decoder row
        w = tl.load(w_ptr + i[:, None] * stride_w + rd[None, :], mask=(m_ok & (v != 0))[:, None] & d_ok[None, :],
                    other=0.0)
        acc += v[:, None] * w.to(tl.float32)
    acc += tl.load(b_ptr + rd, mask=d_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rm[:, None].to(tl.int64) * stride_out + rd[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=m_ok[:, None] & d_ok[None, :])


# ------------------------------------------------------------------------------ backward: values
@triton.jit
def sparse_decode_dvalues_kernel(
    # pointers
    grad_ptr, idx_ptr, w_ptr, dval_ptr,
    # sizes
    K, D,
    # strides
    stride_grad, stride_w,
    # meta-parameters
    BJ: tl.constexpr, BD: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    rj = tl.program_id(1) * BJ + tl.arange(0, BJ)
    j_ok = rj < K
    i = tl.load(idx_ptr + row * K + rj, mask=j_ok, other=0)
    acc = tl.zeros((BJ,), dtype=tl.float32)
    for d0 in range(0, D, BD):
        rd = d0 + tl.arange(0, BD)
        d_ok = rd < D
        g = tl.load(grad_ptr + row * stride_grad + rd, mask=d_ok, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + i[:, None] * stride_w + rd[None, :], mask=j_ok[:, None] & d_ok[None, :], other=0.0)
        acc += tl.sum(w.to(tl.float32) * g[None, :], axis=1)
    tl.store(dval_ptr + row * K + rj, acc.to(dval_ptr.dtype.element_ty), mask=j_ok)


# ------------------------------------------------------------------------------ backward: rows by latent
@triton.jit
def accumulate_by_latent_kernel(
    # pointers: CSC offsets (F + 1) and entry ids, the entries' values, source rows, output
    start_ptr, entry_ptr, val_ptr, src_ptr, out_ptr, sum_ptr,
    # sizes
    F, D, WIDTH,
    # strides
    stride_src, stride_out,
    # meta-parameters
    HAS_SUM: tl.constexpr, BL: tl.constexpr, BE: tl.constexpr, BD: tl.constexpr,
):
    """``out[l] = sum_e val[e] * src[e // WIDTH]`` over the entries ``e`` of latent ``l``; with
    ``HAS_SUM``, also ``sum_ptr[l] = sum_e val[e]`` (written by the first ``D`` block)."""
    first = tl.program_id(0).to(tl.int64) * BL
    pid_d = tl.program_id(1)
    rd = pid_d * BD + tl.arange(0, BD)
    d_ok = rd < D
    for t in range(BL):
        lat = first + t
        if lat < F:
            lo = tl.load(start_ptr + lat)
            hi = tl.load(start_ptr + lat + 1)
            acc = tl.zeros((BD,), dtype=tl.float32)
            vsum = tl.zeros((BE,), dtype=tl.float32)
            for e0 in range(lo, hi, BE):
                re = e0 + tl.arange(0, BE)
                e_ok = re < hi
                ent = tl.load(entry_ptr + re, mask=e_ok, other=0)
                v = tl.load(val_ptr + ent, mask=e_ok, other=0.0).to(tl.float32)
                src = tl.load(src_ptr + (ent // WIDTH)[:, None] * stride_src + rd[None, :],
                              mask=e_ok[:, None] & d_ok[None, :], other=0.0)
                acc += tl.sum(v[:, None] * src.to(tl.float32), axis=0)
                vsum += v
            tl.store(out_ptr + lat * stride_out + rd, acc.to(out_ptr.dtype.element_ty), mask=d_ok)
            if HAS_SUM and pid_d == 0:
                tl.store(sum_ptr + lat, tl.sum(vsum, axis=0).to(sum_ptr.dtype.element_ty))


# ------------------------------------------------------------------------------ launchers
def sparse_decode(values: torch.Tensor, indices: torch.Tensor, W_dec: torch.Tensor, b_dec: torch.Tensor) -> torch.Tensor:
    """``x_hat`` (``B x D``, ``W_dec``'s dtype); ``indices`` int64 in ``[0, F)`` (checked by the caller)."""
    values, indices, W_dec, b_dec = (t.contiguous() for t in (values, indices, W_dec, b_dec))
    B, K = values.shape
    D = W_dec.shape[1]
    out = torch.empty(B, D, dtype=W_dec.dtype, device=W_dec.device)
    if B == 0 or D == 0:
        return out
    BM, BD = (64, _blocks(D, 128)) if interpreting() else (32, _blocks(D, 256))
    grid = (triton.cdiv(B, BM), triton.cdiv(D, BD))
    sparse_decode_kernel[grid](values, indices, W_dec, b_dec, out, B, K, D, W_dec.stride(0), out.stride(0),
                               BM=BM, BD=BD, num_warps=4)
    return out


def accumulate_by_latent(start: torch.Tensor, entries: torch.Tensor, vals: torch.Tensor, src: torch.Tensor,
                 out: torch.Tensor, width: int, sums: torch.Tensor | None = None) -> None:
    """Runs :func:`accumulate_by_latent_kernel` over every latent (``out`` is ``F x D``, contiguous)."""
    F, D = out.shape
    if F == 0 or D == 0:
        return
    # 8 latents a program on a GPU; 3 in the interpreter, so that tests' F leave a short last block
    BL, BE, BD = (3, 64, _blocks(D, 128)) if interpreting() else (8, 16, _blocks(D, 512))
    grid = (triton.cdiv(F, BL), triton.cdiv(D, BD))
    accumulate_by_latent_kernel[grid](start, entries, vals, src, out, sums if sums is not None else out,
                                      F, D, width, src.stride(0), out.stride(0), HAS_SUM=sums is not None,
                                      BL=BL, BE=BE, BD=BD, num_warps=4)


def sparse_decode_backward(grad: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, W_dec: torch.Tensor,
                           start: torch.Tensor, entries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(d_values, dW_dec)``; ``(start, entries)`` group the code's entries by latent
    (``sparse_sae.ops.group_by_latent``)."""
    grad, values, indices, W_dec = (t.contiguous() for t in (grad, values, indices, W_dec))
    B, K = values.shape
    F, D = W_dec.shape
    d_values = torch.empty(B, K, dtype=values.dtype, device=values.device)
    if B and K:
        BJ, BD = (64, _blocks(D, 128)) if interpreting() else (32, _blocks(D, 256))
        sparse_decode_dvalues_kernel[(B, triton.cdiv(K, BJ))](grad, indices, W_dec, d_values, K, D,
                                                             grad.stride(0), W_dec.stride(0), BJ=BJ, BD=BD,
                                                             num_warps=4)
    dW_dec = torch.empty(F, D, dtype=W_dec.dtype, device=W_dec.device)
    accumulate_by_latent(start, entries, values, grad, dW_dec, max(K, 1))
    return d_values, dW_dec
