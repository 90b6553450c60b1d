"""Penalty backward: ``dW_enc = G.T @ (x - b_dec)`` and ``db_enc = colsum(G)`` for
``G = G_pen + G_sparse``, without ever writing the dense ``G_pen`` to memory.

The GEMM's prologue rebuilds each ``G_pen`` tile from ``h``, the batch-active set and the row
norms (DESIGN.md 2, with the exact ``eps`` derivative of docs/design-notes.md):
``G_ij = [h_ij > 0][j in A] (coef_off + coef_ratio (1/(n2_i + eps) - n1_i h_ij / (n2_i (n2_i + eps)^2)))``.
The tile is rounded to the weights' dtype and multiplied on tensor cores with fp32
accumulation; in fp16 it is first scaled by a power of two (``fp16_gradient_scale``), since
``coef / B`` is subnormal or zero there, and the accumulator unscaled at the end. Column blocks with no batch-active latent are written as
zeros without reading ``h``; with ``SKIP_EMPTY`` a tile with no positive active entry skips its
product. The sparse part (``sp_grad`` at ``(i, sp_indices[i, j])``, grouped by latent) joins the
same accumulator: when a latent block holds few entries, as extra K steps whose ``G`` tile is
one-hot by latent (``SPARSE_STEPS``; ``dW_enc`` is rounded once); when it holds many (large ``k``,
small ``F``), where those one-hot steps would waste tensor-core work, the decoder's
:func:`accumulate_by_latent_kernel` writes it first and the GEMM starts from it. Without penalty terms
(plain Top-k) only the sparse part runs, by :func:`accumulate_by_latent_kernel`.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._config import arch, config, dot, dot_precision, interpreting, upcast_dot
from .sparse_decode import accumulate_by_latent


# ------------------------------------------------------------------------------ configs
# A data-dependent branch around the product (SKIP_EMPTY) stops Triton 3.8 from pipelining the
# K loop, and a tile of 64 x 128 entries with none positive is rare before h gets very sparse,
# so most configs keep the loop pipelined; whole latent blocks with no active latent are always
# skipped. Every config compiles without register spills (ptxas -v, checked by the sm_90/sm_80
# tests) under Triton 3.6 and 3.8, with and without the sparse steps: 128 x 256 tiles spilled
# 40-750 bytes a thread, so the largest tile is 128 x 128, and the sparse steps take BE = 16
# entries at a time (a one-hot tile of BF x 16).
def hopper_configs():
    return [config(8, 4, BF=128, BD=128, BB=64, SKIP_EMPTY=False, BE=16),
            config(4, 4, BF=64, BD=128, BB=64, SKIP_EMPTY=False, BE=16),
            config(8, 3, BF=128, BD=128, BB=64, SKIP_EMPTY=False, BE=16),
            config(8, 4, BF=128, BD=128, BB=32, SKIP_EMPTY=True, BE=16)]


def ampere_configs():
    return [config(8, 3, BF=128, BD=128, BB=32, SKIP_EMPTY=False, BE=16),
            config(4, 3, BF=128, BD=64, BB=32, SKIP_EMPTY=False, BE=16),
            config(4, 4, BF=64, BD=128, BB=32, SKIP_EMPTY=True, BE=16)]


def fp32_configs():
    """fp32 weights (exact fp32 products, or TF32 when PyTorch's matmul precision allows it): the
    first config keeps the K loop pipelined (no per-tile skip)."""
    return [config(8, 2, BF=64, BD=64, BB=32, SKIP_EMPTY=False, BE=16),
            config(8, 3, BF=64, BD=64, BB=32, SKIP_EMPTY=True, BE=16),
            config(8, 2, BF=64, BD=64, BB=32, SKIP_EMPTY=True, BE=16)]


INTERPRETER_CONFIG = dict(BF=64, BD=64, BB=64, SKIP_EMPTY=True, BE=64)


# ------------------------------------------------------------------------------ kernel
@triton.jit
def penalty_grad_gemm_kernel(
    # pointers: inputs (active is the F bool mask viewed as uint8; coef_* are 1-element fp32)
    h_ptr, xc_ptr, active_ptr, n1_ptr, n2_ptr, coef_off_ptr, coef_ratio_ptr, g_scale_ptr,
    # pointers: the sparse part grouped by latent (CSC offsets, entry ids, latent ids, fp32 grads)
    start_ptr, entry_ptr, sp_idx_ptr, sp_grad_ptr,
    # pointers: outputs
    dw_ptr, db_ptr,
    # sizes
    B, F, D, WIDTH, ratio_eps,
    # strides
    stride_h, stride_xc, stride_dw,
    # meta-parameters
    HAS_OFF: tl.constexpr, HAS_RATIO: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    SPARSE_STEPS: tl.constexpr, SCALE_G: tl.constexpr, BF: tl.constexpr, BD: tl.constexpr, BB: tl.constexpr,
    SKIP_EMPTY: tl.constexpr, BE: tl.constexpr,
):
    # program id -> tile: the D tiles of one latent block run back to back, so each block of
    # h's columns comes from HBM once and from L2 after (x - b_dec is small and stays there)
    pid = tl.program_id(0)
    num_d = tl.cdiv(D, BD)
    pid_d = pid % num_d
    pid_f = pid // num_d
    rf = pid_f * BF + tl.arange(0, BF)
    rd = pid_d * BD + tl.arange(0, BD)
    rb = tl.arange(0, BB)
    f_ok = rf < F
    d_ok = rd < D
    act = tl.load(active_ptr + rf, mask=f_ok, other=0) != 0

    dw_ptrs = dw_ptr + rf[:, None].to(tl.int64) * stride_dw + rd[None, :]
    # fp16: G tiles are scaled by a power of two before rounding (coef / B is subnormal or zero in
    # fp16) and the fp32 accumulator is unscaled at the end; exact apart from the rounding itself
    g_scale = 1.0
    if SCALE_G:
        g_scale = tl.load(g_scale_ptr)
    if SPARSE_STEPS:
        acc = tl.zeros((BF, BD), dtype=tl.float32)
        colsum = tl.zeros((BF,), dtype=tl.float32)
    else:   # start from the sparse part, already in dW and db
        acc = tl.load(dw_ptrs, mask=f_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32) * g_scale
        colsum = tl.load(db_ptr + rf, mask=f_ok, other=0.0).to(tl.float32)
    if tl.max(act.to(tl.int32), axis=0) > 0:   # a block with no active latent has G = 0
        c_off = 0.0
        c_ratio = 0.0
        if HAS_OFF:
            c_off = tl.load(coef_off_ptr).to(tl.float32)
        if HAS_RATIO:
            c_ratio = tl.load(coef_ratio_ptr).to(tl.float32)
        h_ptrs = h_ptr + rb[None, :].to(tl.int64) * stride_h + rf[:, None]          # h.T tile, BF x BB
        xc_ptrs = xc_ptr + rb[:, None].to(tl.int64) * stride_xc + rd[None, :]      # BB x BD
        for b0 in range(0, B, BB):
            b_ok = (b0 + rb) < B
            hv = tl.load(h_ptrs, mask=f_ok[:, None] & b_ok[None, :], other=0.0).to(tl.float32)
            live = (hv > 0) & act[:, None]
            # prologue: the penalty gradient of this tile, from h and the row norms
            g = tl.zeros((BF, BB), dtype=tl.float32) + c_off
            if HAS_RATIO:
                n1 = tl.load(n1_ptr + b0 + rb, mask=b_ok, other=0.0).to(tl.float32)
                n2 = tl.load(n2_ptr + b0 + rb, mask=b_ok, other=0.0).to(tl.float32)
                alive = n2 > 0
                n2s = tl.where(alive, n2, 1.0)
                inv = tl.where(alive, 1.0 / (n2s + ratio_eps), 0.0)
                scale = tl.where(alive, n1 / (n2s * (n2s + ratio_eps) * (n2s + ratio_eps)), 0.0)
                g += c_ratio * (inv[None, :] - scale[None, :] * hv)
            g = tl.where(live, g, 0.0)
            colsum += tl.sum(g, axis=1)
            if SCALE_G:
                g = g * g_scale
            xc = tl.load(xc_ptrs, mask=b_ok[:, None] & d_ok[None, :], other=0.0)
            if SKIP_EMPTY:   # loads stay outside the branch, so the loop is still pipelined
                if tl.max(live.to(tl.int32)) > 0:
                    acc = dot(g.to(xc_ptr.dtype.element_ty), xc, acc, PRECISION, UPCAST)
            else:
                acc = dot(g.to(xc_ptr.dtype.element_ty), xc, acc, PRECISION, UPCAST)
            h_ptrs += BB * stride_h
            xc_ptrs += BB * stride_xc

    # the sparse part: this latent block's entries (contiguous in CSC order) as extra K steps
    # whose G tile is one-hot by latent, rounded like G, times the gathered rows of x - b_dec
    if SPARSE_STEPS:
        lo = tl.load(start_ptr + pid_f * BF)
        hi = tl.load(start_ptr + tl.minimum(pid_f * BF + BF, F))
        # BE entries a step (BE < BB): the one-hot tile is BF x BE, so this loop does not spill
        # the accumulator's registers even with the largest tiles
        re0 = tl.arange(0, BE)
        for e0 in range(lo, hi, BE):
            re = e0 + re0
            e_ok = re < hi
            ent = tl.load(entry_ptr + re, mask=e_ok, other=0)
            lat = tl.load(sp_idx_ptr + ent, mask=e_ok, other=-1)
            v = tl.load(sp_grad_ptr + ent, mask=e_ok, other=0.0)
            gs = tl.where(rf[:, None] == lat[None, :], v[None, :], 0.0)                 # BF x BE
            colsum += tl.sum(gs, axis=1)
            if SCALE_G:
                gs = gs * g_scale
            xs = tl.load(xc_ptr + (ent // WIDTH)[:, None] * stride_xc + rd[None, :],
                         mask=e_ok[:, None] & d_ok[None, :], other=0.0)
            acc = dot(gs.to(xc_ptr.dtype.element_ty), xs, acc, PRECISION, UPCAST)

    # epilogue: dW_enc tile, and db_enc from the first D tile
    if SCALE_G:
        acc = acc * (1.0 / g_scale)
    tl.store(dw_ptrs, acc.to(dw_ptr.dtype.element_ty), mask=f_ok[:, None] & d_ok[None, :])
    if pid_d == 0:
        tl.store(db_ptr + rf, colsum.to(db_ptr.dtype.element_ty), mask=f_ok)


@functools.lru_cache(maxsize=None)
def _autotuned_kernel(cc: int, fp32: bool):
    """The kernel autotuned over one architecture's configs (key: F and D, not the batch)."""
    configs = fp32_configs() if fp32 else (hopper_configs() if cc >= 90 else ampere_configs())
    # dW and db are inputs too without SPARSE_STEPS: tuning runs must not accumulate into them
    return triton.autotune(configs=configs, key=["F", "D", "HAS_OFF", "HAS_RATIO", "SPARSE_STEPS"],
                           restore_value=["dw_ptr", "db_ptr"])(penalty_grad_gemm_kernel)


def sparse_steps_pay(n_entries: int, B: int, F: int, block_f: int = 128) -> bool:
    """Whether the sparse part as one-hot K steps adds at most 1/8 to the dense K loop: a latent
    block holds about ``n_entries * block_f / F`` entries, against ``B`` dense rows."""
    return n_entries * block_f * 8 <= B * F


# Largest |G| entry after scaling: well inside fp16's range (65504), so that the scaled tile
# neither overflows nor loses the small entries to subnormals.
FP16_G_TARGET = 2.0 ** 12


def fp16_gradient_scale(n1, n2, c_off, c_ratio, ratio_eps, sp_grad):
    """A power of two ``s`` (1-element fp32 tensor, on the device: no host sync) such that
    ``s * max|G| ~ FP16_G_TARGET``. ``|G_pen_ij| <= |c_off| + |c_ratio| (1/(n2_i + eps) +
    n1_i / (n2_i + eps)^2)`` since ``h_ij <= n2_i``; the sparse part is bounded by ``max|sp_grad|``."""
    inv = torch.where(n2 > 0, 1.0 / (n2 + ratio_eps), torch.zeros_like(n2))   # rows with n2 = 0 get no G_pen
    pen = c_off.abs() + c_ratio.abs() * (inv + n1 * inv * inv).amax().reshape(1)
    bound = torch.maximum(pen, sp_grad.abs().amax().reshape(1) if sp_grad.numel() else pen)
    bound = torch.where(bound > 0, bound, torch.ones_like(bound))
    return torch.exp2(torch.floor(torch.log2(FP16_G_TARGET / bound))).clamp(2.0 ** -60, 2.0 ** 60)


# ------------------------------------------------------------------------------ launcher
def penalty_backward(xc: torch.Tensor, h: torch.Tensor, active: torch.Tensor, n1: torch.Tensor, n2: torch.Tensor,
                     coef_off: torch.Tensor | None, coef_ratio: torch.Tensor | None, ratio_eps: float,
                     sp_indices: torch.Tensor, sp_grad: torch.Tensor, start: torch.Tensor, entries: torch.Tensor,
                     allow_tf32: bool = False, sparse_steps: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dW_enc, db_enc)`` in ``xc``'s dtype, for ``xc = x - b_dec`` (``B x D``, the weights'
    dtype), ``h`` (``B x F``; None without penalty terms), ``active`` (``F`` bool), the row norms ``n1, n2`` (``B``), the
    penalties' 0-d coefficients (already divided by ``B``; None when absent) and the sparse
    gradient ``sp_grad`` at ``sp_indices`` (``B x w``), grouped by latent as ``(start, entries)``
    (``sparse_sae.ops.group_by_latent``). ``sparse_steps`` picks how the sparse part joins the
    GEMM (see the module docstring; None: by :func:`sparse_steps_pay`)."""
    xc, sp_grad = xc.contiguous(), sp_grad.contiguous()
    B, D = xc.shape
    F = start.numel() - 1
    db = torch.empty(F, dtype=xc.dtype, device=xc.device)
    if coef_off is None and coef_ratio is None:   # plain Top-k: the sparse part alone (h may be None)
        dW = torch.empty(F, D, dtype=xc.dtype, device=xc.device)
        accumulate_by_latent(start, entries, sp_grad, xc, dW, max(sp_grad.shape[1], 1), sums=db)
        return dW, db
    h = h.contiguous()
    if sparse_steps is None:
        sparse_steps = sparse_steps_pay(sp_grad.numel(), B, F)
    scale_g = xc.dtype == torch.float16
    # without sparse steps the GEMM starts from the sparse part in dW: in fp16 it stays in fp32
    # there (as fp16 its small entries would be subnormals), and the result is cast once
    dW = torch.empty(F, D, dtype=torch.float32 if scale_g and not sparse_steps else xc.dtype, device=xc.device)
    f32 = dict(dtype=torch.float32, device=xc.device)
    c_off = coef_off.reshape(1).to(**f32) if coef_off is not None else torch.zeros(1, **f32)
    c_ratio = coef_ratio.reshape(1).to(**f32) if coef_ratio is not None else torch.zeros(1, **f32)
    n1, n2, sp_grad = n1.to(torch.float32).contiguous(), n2.to(torch.float32).contiguous(), sp_grad.to(torch.float32)
    g_scale = fp16_gradient_scale(n1, n2, c_off, c_ratio, ratio_eps, sp_grad) if scale_g else c_off
    args = (h, xc, active.contiguous().view(torch.uint8), n1, n2, c_off, c_ratio, g_scale, start, entries,
            sp_indices.contiguous(), sp_grad, dW, db, B, F, D, max(sp_grad.shape[1], 1), float(ratio_eps),
            h.stride(0), xc.stride(0), dW.stride(0))
    if not sparse_steps:
        accumulate_by_latent(start, entries, sp_grad, xc, dW, max(sp_grad.shape[1], 1), sums=db)
    flags = dict(HAS_OFF=coef_off is not None, HAS_RATIO=coef_ratio is not None, SPARSE_STEPS=sparse_steps,
                 SCALE_G=scale_g,
                 PRECISION=dot_precision(xc.dtype, allow_tf32), UPCAST=upcast_dot(xc.dtype))
    if interpreting():
        c = INTERPRETER_CONFIG
        grid = (triton.cdiv(F, c["BF"]) * triton.cdiv(D, c["BD"]),)
        penalty_grad_gemm_kernel[grid](*args, **flags, **c)
    else:
        grid = lambda META: (triton.cdiv(F, META["BF"]) * triton.cdiv(D, META["BD"]),)  # noqa: E731
        _autotuned_kernel(arch(xc.device), xc.dtype == torch.float32)[grid](*args, **flags)
    return dW.to(xc.dtype), db
