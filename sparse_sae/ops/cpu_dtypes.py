"""Which dtype the C++ CPU kernels compute in for a given set of inputs.

The kernels are compiled for float32 and float64. Half types (bfloat16 under
``torch.autocast("cpu", dtype=torch.bfloat16)``, float16) run them in float32: the inputs
are widened, every sum is accumulated in float32, and the outputs are rounded back to the
inputs' dtype once. Other mixes of dtypes use the reference.
"""
from __future__ import annotations

import torch

HALF_TYPES = (torch.bfloat16, torch.float16)


def cpu_compute_dtype(*tensors: torch.Tensor) -> torch.dtype | None:
    """float32 or float64 when the C++ kernels take these tensors (one dtype among them, or only
    half types), else None."""
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) != 1:
        return None
    (dtype,) = dtypes
    if dtype in (torch.float32, torch.float64):
        return dtype
    return torch.float32 if dtype in HALF_TYPES else None
