"""Fused encoder: ``h = relu((x - b_dec) @ W_enc.T + b_enc)`` in one Triton kernel.

The centring ``x - b_dec`` happens on the loaded ``x`` tile (rounded to the operand dtype,
as ``x - b_dec`` would be in PyTorch), the GEMM accumulates in fp32, and bias and ReLU run
in the epilogue, so ``h`` is written once. fp32 operands use exact (IEEE) products unless
TF32 is allowed.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._config import arch, config, dot, dot_precision, interpreting, upcast_dot


# ------------------------------------------------------------------------------ configs
# GROUP_N column tiles form a group (see the kernel's tile order): 8 tiles of 256 columns at
# D = 4096 in bf16 are 16 MB of W_enc, which stays in a Hopper's 50 MB L2 while every row tile
# passes through
GROUP_N = 8


def _grouped(num_warps, num_stages, BM, BN, BK):
    return config(num_warps, num_stages, BM=BM, BN=BN, BK=BK, GROUP_N=GROUP_N)


def hopper_configs():
    return [_grouped(8, 3, 128, 256, 64), _grouped(8, 4, 128, 128, 64), _grouped(4, 4, 128, 128, 64),
            _grouped(8, 3, 256, 128, 64), _grouped(4, 4, 64, 256, 64)]


def ampere_configs():
    return [_grouped(4, 4, 128, 128, 32), _grouped(8, 3, 128, 256, 32), _grouped(4, 4, 64, 128, 32)]


def fp32_configs():
    return [_grouped(4, 3, 64, 64, 32), _grouped(4, 3, 128, 64, 32), _grouped(8, 3, 128, 128, 32)]


# groups of 2 in the interpreter, so that the tests' small shapes have several groups and a short last one
INTERPRETER_CONFIG = dict(BM=64, BN=64, BK=64, GROUP_N=2)


# ------------------------------------------------------------------------------ kernel
@triton.jit
def encode_kernel(
    # pointers
    x_ptr, w_ptr, b_enc_ptr, b_dec_ptr, h_ptr,
    # sizes
    B, F, D,
    # strides (the inner dimension of every matrix is contiguous)
    stride_x, stride_w, stride_h,
    # meta-parameters
    RELU: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_N: tl.constexpr,
):
    # program id -> tile, in groups of GROUP_N column tiles: a group's tiles run for one row tile
    # after another, the GROUP_N tiles of a row tile side by side. Its W_enc columns stay in L2
    # while every row tile passes, and each x row tile is read from HBM once per group (once
    # per column tile, were the row tiles of one column tile run back to back, which for
    # B * D beyond L2 reads x num_n times)
    pid = tl.program_id(0)
    num_m = tl.cdiv(B, BM)
    num_n = tl.cdiv(F, BN)
    in_group = GROUP_N * num_m
    first_n = (pid // in_group) * GROUP_N
    group_n = tl.minimum(num_n - first_n, GROUP_N)      # the last group may be narrower
    pid_n = first_n + (pid % in_group) % group_n
    pid_m = (pid % in_group) // group_n
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    m_ok = rm < B
    n_ok = rn < F
    x_ptrs = x_ptr + rm[:, None].to(tl.int64) * stride_x + rk[None, :]
    w_ptrs = w_ptr + rn[None, :].to(tl.int64) * stride_w + rk[:, None]     # W_enc.T tile, BK x BN

    # masked loop over D into an fp32 accumulator
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, D, BK):
        k_ok = (k0 + rk) < D
        a = tl.load(x_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        bd = tl.load(b_dec_ptr + k0 + rk, mask=k_ok, other=0.0)
        a = (a.to(tl.float32) - bd[None, :].to(tl.float32)).to(x_ptr.dtype.element_ty)
        w = tl.load(w_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = dot(a, w, acc, PRECISION, UPCAST)
        x_ptrs += BK
        w_ptrs += BK

    # epilogue: bias, ReLU, one store of h
    acc += tl.load(b_enc_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if RELU:
        acc = tl.maximum(acc, 0.0)
    h_ptrs = h_ptr + rm[:, None].to(tl.int64) * stride_h + rn[None, :]
    tl.store(h_ptrs, acc.to(h_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@functools.lru_cache(maxsize=None)
def _autotuned_kernel(cc: int, fp32: bool):
    """The kernel autotuned over the configs of one architecture class (key: F and D, not B)."""
    configs = fp32_configs() if fp32 else (hopper_configs() if cc >= 90 else ampere_configs())
    return triton.autotune(configs=configs, key=["F", "D"])(encode_kernel)


# ------------------------------------------------------------------------------ launcher
def encode(x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, b_dec: torch.Tensor,
           relu: bool = True, allow_tf32: bool = False) -> torch.Tensor:
    """``relu((x - b_dec) @ W_enc.T + b_enc)`` (``B x F``, ``x``'s dtype). All four tensors share
    one dtype (fp16, bf16 or fp32) and device; the caller checks shapes."""
    x, W_enc, b_enc, b_dec = (t.contiguous() for t in (x, W_enc, b_enc, b_dec))
    B, D = x.shape
    F = W_enc.shape[0]
    h = torch.empty(B, F, dtype=x.dtype, device=x.device)
    if B == 0 or F == 0:
        return h
    args = (x, W_enc, b_enc, b_dec, h, B, F, D, x.stride(0), W_enc.stride(0), h.stride(0))
    precision = dot_precision(x.dtype, allow_tf32)
    if interpreting():
        c = INTERPRETER_CONFIG
        grid = (triton.cdiv(B, c["BM"]) * triton.cdiv(F, c["BN"]),)
        encode_kernel[grid](*args, RELU=relu, PRECISION=precision, UPCAST=upcast_dot(x.dtype), **c)
    else:
        grid = lambda META: (triton.cdiv(B, META["BM"]) * triton.cdiv(F, META["BN"]),)  # noqa: E731
        _autotuned_kernel(arch(x.device), x.dtype == torch.float32)[grid](*args, RELU=relu, PRECISION=precision, UPCAST=False)
    return h
