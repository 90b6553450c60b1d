"""Launch settings and jit helpers shared by the kernels: interpreter detection,
per-architecture configs, and a ``tl.dot`` that survives the interpreter.

Under ``TRITON_INTERPRET=1`` the kernels run on CPU tensors through Triton's interpreter,
where autotuning would time numpy, so a single small config (blocks of 64) is used instead.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def arch(device: torch.device) -> int:
    """The compute capability as ``major * 10 + minor`` (0 for CPU tensors in the interpreter)."""
    if device.type != "cuda":
        return 0
    major, minor = torch.cuda.get_device_capability(device)
    return major * 10 + minor


def config(num_warps: int = 4, num_stages: int = 3, **blocks) -> triton.Config:
    return triton.Config(dict(blocks), num_warps=num_warps, num_stages=num_stages)


def dot_precision(dtype: torch.dtype, allow_tf32: bool) -> str:
    """``tl.dot`` input precision: exact fp32 (``ieee``) unless TF32 is allowed; half types ignore it."""
    return "tf32" if (dtype == torch.float32 and allow_tf32) else "ieee"


def upcast_dot(dtype: torch.dtype) -> bool:
    """Triton 3.8's interpreter multiplies bf16 operands as their raw uint16 bits; there, bf16
    tiles go through ``tl.dot`` as fp32 (exact: every bf16 value is an fp32 value)."""
    return interpreting() and dtype == torch.bfloat16


@triton.jit
def dot(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=PRECISION)
