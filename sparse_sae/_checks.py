"""Argument checks raised before any computation, each message naming the problem."""
from __future__ import annotations

import math

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_int(value, name: str, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low or (high is not None and value > high):
        bound = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be in {bound}, got {value}")
    return value


def check_optional_int(value, name: str, low: int, high: int | None = None) -> int | None:
    """``check_int``, or None."""
    return None if value is None else check_int(value, name, low, high)


def check_real(value, name: str, *, positive: bool = False) -> float:
    """A finite real number (an int or a float, not a bool): ``> 0`` with ``positive``, else ``>= 0``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        raise ValueError(f"{name} must be a finite {'positive' if positive else 'non-negative'} number, got {value!r}")
    return value


def check_activations(x, d_in: int, ref: torch.Tensor, check_finite: bool = True, name: str = "x"):
    """``x`` must be a finite, non-empty ``B x d_in`` floating tensor on ``ref``'s device and,
    outside autocast, of ``ref``'s dtype."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D (batch, d_in={d_in}), got shape {tuple(x.shape)}; "
                         f"flatten leading dimensions with {name}.reshape(-1, {d_in})")
    if x.shape[1] != d_in:
        raise ValueError(f"{name} has width {x.shape[1]} but the SAE expects d_in={d_in}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} is an empty batch (0 rows)")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor, got {x.dtype}")
    if x.device != ref.device:
        raise ValueError(f"{name} is on {x.device} but the SAE's parameters are on {ref.device}; "
                         f"move one with .to()")
    if x.dtype != ref.dtype and not torch.is_autocast_enabled(x.device.type):
        raise TypeError(f"{name} has dtype {x.dtype} but the SAE's parameters are {ref.dtype}; "
                        f"cast with {name}.to({ref.dtype}) or use torch.autocast")
    if check_finite and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or Inf")
    return x


def check_code(values, indices, n_latents: int, ref: torch.Tensor):
    """``(values, indices)`` must be matching ``B x k`` tensors with indices in ``[0, n_latents)``."""
    for t, n in ((values, "values"), (indices, "indices")):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{n} must be a torch.Tensor, got {type(t).__name__}")
        if t.device != ref.device:
            raise ValueError(f"{n} is on {t.device} but the SAE's parameters are on {ref.device}")
    if values.dim() != 2 or values.shape != indices.shape:
        raise ValueError(f"values and indices must be matching 2-D tensors, got {tuple(values.shape)} "
                         f"and {tuple(indices.shape)}")
    if indices.dtype != torch.int64:
        raise TypeError(f"indices must be int64, got {indices.dtype}")
    if values.dtype not in FLOAT_DTYPES:
        raise TypeError(f"values must be a floating tensor, got {values.dtype}")
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= n_latents):
        raise ValueError(f"indices must lie in [0, {n_latents})")
    if not bool(torch.isfinite(values).all()):
        raise ValueError("values contains NaN or Inf")


def check_op_args(op: str, shapes: dict, tensors: dict, indices=None, n_latents: int | None = None):
    """Checks of a kernel op's arguments, before any backend runs: every tensor 2-D/1-D of the
    expected ``shapes`` (name -> tuple, ``None`` for a free size) and on one device; ``indices``,
    if given, in ``[0, n_latents)`` (on the GPU an asynchronous device assert: no host sync)."""
    devices = {t.device for t in tensors.values() if t is not None}
    if len(devices) > 1:
        where = ", ".join(f"{n} on {t.device}" for n, t in tensors.items() if t is not None)
        raise ValueError(f"{op}: every tensor must be on one device, got {where}")
    for name, want in shapes.items():
        got = tuple(tensors[name].shape)
        if len(got) != len(want) or any(w is not None and g != w for g, w in zip(got, want)):
            shown = "(" + ", ".join("*" if w is None else str(w) for w in want) + ("," if len(want) == 1 else "") + ")"
            raise ValueError(f"{op}: {name} must have shape {shown}, got {got}")
    if indices is not None and indices.numel():
        if indices.dtype != torch.int64:
            raise TypeError(f"{op}: indices must be int64, got {indices.dtype}")
        in_range = (indices >= 0) & (indices < n_latents)
        if indices.device.type == "cuda":
            torch._assert_async(in_range.all(), f"{op}: indices must lie in [0, {n_latents})")
        elif not bool(in_range.all()):
            raise ValueError(f"{op}: indices must lie in [0, {n_latents})")
