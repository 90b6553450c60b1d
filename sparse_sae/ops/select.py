"""``sparse_sae::select``: the selection step and its statistics, in one op.

Per row of ``h`` the selected values and indices (descending value, ties to the lower
index), the row threshold, the batch-active set, the fired counts per latent, the row l1
and l2 norms over the batch-active units, and the AuxK candidates among dead latents.
No gradient flows through selection (DESIGN.md 2).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from sparse_sae._checks import FLOAT_DTYPES, check_op_args
from sparse_sae import reference
from sparse_sae.ops._registry import _C, dispatch, fallback_warning, register_impl
from sparse_sae.ops.cpu_dtypes import cpu_compute_dtype

MODES = ("topk", "batchtopk", "threshold")


class SelectResult(NamedTuple):
    values: Tensor        # B x width, h's dtype
    indices: Tensor       # B x width, int64
    threshold: Tensor     # B, each row's smallest selected value
    active: Tensor        # F bool, the batch-active set A
    fired: Tensor         # F int64, rows where each latent is selected with a positive value
    n1: Tensor            # B, ||h_i[A]||_1 (float32, float64 for float64 h)
    n2: Tensor            # B, ||h_i[A]||_2
    aux_values: Tensor    # B x k_aux (B x 0 without AuxK)
    aux_indices: Tensor   # B x k_aux, int64


@torch.library.custom_op("sparse_sae::select", mutates_args=())
def _select(h: Tensor, k: int, mode: str, width: int, threshold: Optional[Tensor], dead: Optional[Tensor],
            k_aux: int, norms: bool = True, cut: Optional[Tensor] = None) -> tuple[
        Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return tuple(dispatch("select", h.device)(h, k, mode, width, threshold, dead, k_aux, norms, cut))


def fake_code_widths(k: int, mode: str, width: int, dead: Optional[Tensor], k_aux: int, F: int):
    """The code's width and the AuxK width that a selection returns, for the fake (meta)
    implementations of ``select`` and the ops built on it: ``k`` for Top-k, ``min(width, F)``
    for a fixed width, else a size known only at run time; ``k_aux`` clamped to ``F`` as every
    backend does, 0 without dead latents."""
    if mode == "topk":
        w = k
    elif width > 0:
        w = min(width, F)
    else:
        w = torch.library.get_ctx().new_dynamic_size()
    return w, (min(k_aux, F) if dead is not None else 0)


@_select.register_fake
def _(h, k, mode, width, threshold, dead, k_aux, norms=True, cut=None):
    B, F = h.shape
    w, ka = fake_code_widths(k, mode, width, dead, k_aux, F)
    acc = reference.acc_dtype(h.dtype)
    return (h.new_empty(B, w), h.new_empty(B, w, dtype=torch.int64), h.new_empty(B),
            h.new_empty(F, dtype=torch.bool), h.new_empty(F, dtype=torch.int64),
            h.new_empty(B, dtype=acc), h.new_empty(B, dtype=acc),
            h.new_empty(B, ka), h.new_empty(B, ka, dtype=torch.int64))


def select(h: Tensor, k: int = 0, mode: str = "topk", width: int = 0, threshold: Optional[Tensor] = None,
           dead: Optional[Tensor] = None, k_aux: int = 0, norms: bool = True, cut: Optional[Tensor] = None) -> SelectResult:
    """Selection on ``h`` (``B x F``, non-negative).

    ``mode="topk"``: the ``k`` largest entries of each row. ``mode="batchtopk"``: the
    ``B * k`` largest of the batch. ``mode="threshold"``: entries above ``threshold``
    (``F``). The last two pack each row into ``width`` columns (0: the largest row count),
    padding with zero values. With ``dead`` (``F`` bool) and ``k_aux > 0``, also the AuxK
    candidates: each row's ``k_aux`` largest entries among dead latents. ``norms=False`` skips
    the row norms ``n1``, ``n2`` (returned as zeros), which only the penalties read.

    ``cut`` (BatchTopK only; a float64 ``(value, ties)`` on ``h``'s device) replaces the batch's own
    cut: every entry above ``value`` and the first ``ties`` entries equal to it in flat order are
    selected (this process's share of a selection over the global batch of a data-parallel run,
    which ``reduce_batch_selection`` passes to the ops).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not torch.is_tensor(h) or h.dim() != 2 or h.dtype not in FLOAT_DTYPES:
        raise ValueError(f"select: h must be a 2-D floating tensor, got "
                         f"{(tuple(h.shape), h.dtype) if torch.is_tensor(h) else type(h).__name__}")
    if h.shape[0] == 0:
        raise ValueError("select: h is an empty batch (0 rows)")
    F = h.shape[1]
    check_op_args("select", {"h": (None, F), **({"threshold": (F,)} if threshold is not None else {}),
                             **({"dead": (F,)} if dead is not None else {})},
                  {"h": h, "threshold": threshold, "dead": dead})
    if dead is not None and dead.dtype != torch.bool:
        raise TypeError(f"select: dead must be a bool tensor, got {dead.dtype}")
    if mode == "threshold" and threshold is None:
        raise ValueError("mode='threshold' needs a threshold tensor")
    if mode != "threshold" and not 1 <= k <= h.shape[1]:
        raise ValueError(f"k must be in [1, {h.shape[1]}], got {k}")
    check_cut(cut, mode, h)
    return SelectResult(*_select(h, k, mode, width, threshold, dead, k_aux, norms, cut))


def check_cut(cut: Optional[Tensor], mode: str, h: Tensor) -> None:
    """A given BatchTopK cut is a float64 ``(value, ties)`` on ``h``'s device."""
    if cut is None:
        return
    if mode != "batchtopk":
        raise ValueError(f"cut is BatchTopK's (mode='batchtopk'), got mode={mode!r}")
    if not (torch.is_tensor(cut) and cut.shape == (2,) and cut.dtype == torch.float64 and cut.device == h.device):
        raise ValueError(f"cut must be a float64 tensor (value, ties) on {h.device}, got "
                         f"{tuple(cut.shape) if torch.is_tensor(cut) else type(cut).__name__}")


def _select_reference(h, k, mode, width, threshold, dead, k_aux, norms=True, cut=None):
    if mode == "topk":
        values, indices = reference.topk_select_ref(h, k)
    elif mode == "batchtopk":
        values, indices = reference.batchtopk_select_ref(h, k, width, cut)
    else:
        values, indices = reference.threshold_select_ref(h, threshold, width)
    fired = reference.fired_counts_ref(values, indices, h.shape[1])
    active = fired > 0
    if norms:
        n1, n2 = reference.active_row_norms_ref(h, active)
    else:
        n1, n2 = (torch.zeros(h.shape[0], dtype=reference.acc_dtype(h.dtype), device=h.device) for _ in range(2))
    if dead is not None and k_aux > 0:
        aux_values, aux_indices = reference.auxk_select_ref(h, dead, min(k_aux, h.shape[1]))
    else:
        aux_values = h.new_zeros(h.shape[0], 0)
        aux_indices = torch.zeros(h.shape[0], 0, dtype=torch.int64, device=h.device)
    return (values, indices, reference.row_threshold_ref(values), active, fired, n1, n2,
            aux_values, aux_indices)


def _select_cpu(h, k, mode, width, threshold, dead, k_aux, norms=True, cut=None):
    dt = cpu_compute_dtype(h)
    if dt is None:
        return _select_reference(h, k, mode, width, threshold, dead, k_aux, norms, cut)
    if threshold is not None:   # rounded to h's dtype first, as the reference compares them
        threshold = threshold.to(h.dtype).to(dt).expand(h.shape[1]).contiguous()
    out = _C.select_cpu(h.to(dt).contiguous(), k, mode, width, threshold,
                        dead.contiguous() if dead is not None else None, k_aux, norms, cut)
    values, indices, row_threshold, active, fired, n1, n2, aux_values, aux_indices = out
    # half types: values exactly h's (widening is exact), norms stay in the float32 accumulator
    return (values.to(h.dtype), indices, row_threshold.to(h.dtype), active, fired, n1, n2,
            aux_values.to(h.dtype), aux_indices)


# ------------------------------------------------------------------ a radix select pass over a batch
KEY_BITS = {torch.float64: 64, torch.float32: 32, torch.bfloat16: 16, torch.float16: 16}
_INT_OF = {64: torch.int64, 32: torch.int32, 16: torch.int16}


def ordered_keys(h: Tensor) -> Tensor:
    """The selection kernels' keys of ``h``'s values (csrc/select_common.h ``ordered_key``: unsigned,
    in the values' order, ``-0`` as ``+0``), as int64 bit patterns (a 64-bit key above 2^63 reads
    as negative)."""
    bits = KEY_BITS[h.dtype]
    h = h.reshape(-1)
    b = torch.where(h == 0, torch.zeros_like(h), h).view(_INT_OF[bits]).to(torch.int64)
    if bits == 64:
        return torch.where(b < 0, ~b, b ^ (-1 << 63))
    full, sign = (1 << bits) - 1, 1 << (bits - 1)
    b = b & full
    return torch.where(b & sign != 0, ~b & full, b | sign)


def value_of_key(key: Tensor, dtype: torch.dtype) -> Tensor:
    """The value (0-d, ``dtype``) whose :func:`ordered_keys` key is ``key`` (an int64 bit pattern)."""
    bits = KEY_BITS[dtype]
    if bits == 64:
        b = torch.where(key < 0, key ^ (-1 << 63), ~key)
    else:
        full, sign = (1 << bits) - 1, 1 << (bits - 1)
        b = torch.where(key & sign != 0, key ^ sign, ~key & full)
        b = torch.where(b >= sign, b - (1 << bits), b)        # the signed integer of those bits
    return b.reshape(1).to(_INT_OF[bits]).view(dtype)[0]


def key_histogram_ref(h: Tensor, high: Tensor, shift: int, bits: int) -> Tensor:
    """:func:`key_histogram` in PyTorch ops (no host synchronisation), in chunks of about 2^22
    entries, which bounds the temporary keys."""
    key_bits, n_bins = KEY_BITS[h.dtype], 1 << bits
    hist = torch.zeros(n_bins + 1, dtype=torch.int64, device=h.device)     # the last bin: no match
    flat = h.reshape(-1)
    up = key_bits - shift - bits                                            # key bits above the digit
    for i in range(0, flat.numel(), 1 << 22):
        key = ordered_keys(flat[i:i + (1 << 22)])
        digit = (key >> shift) & (n_bins - 1)
        if up > 0:
            digit = torch.where(((key >> (shift + bits)) & ((1 << up) - 1)) == high.reshape(()), digit, n_bins)
        hist.index_add_(0, digit, torch.ones_like(digit))
    return hist[:n_bins]


def key_histogram(h: Tensor, high: Tensor, shift: int, bits: int) -> Tensor:
    """Counts (``2^bits``, int64) of the digits ``(key >> shift) & (2^bits - 1)`` of ``h``'s
    :func:`ordered_keys`, over the entries whose key bits from ``shift + bits`` up equal ``high``
    (one int64 on ``h``'s device; every entry when there are no such bits): one pass of a radix
    select, which data parallelism sums over the processes to select over the global batch
    (``sparse_sae.training.distributed.global_batch_cut``). The C++ kernel on the CPU, PyTorch ops
    elsewhere."""
    if not 1 <= bits <= 16 or shift < 0 or shift + bits > KEY_BITS[h.dtype]:
        raise ValueError(f"key_histogram needs 1 <= bits <= 16 and 0 <= shift <= {KEY_BITS[h.dtype]} - bits, "
                         f"got shift={shift}, bits={bits}")
    if h.device.type == "cpu" and _C is not None:
        return _C.key_histogram_cpu(h.contiguous(), high.reshape(1), shift, bits)
    return key_histogram_ref(h, high, shift, bits)


def cuda_max_select() -> int:
    """Most entries one row may hold in the CUDA selection (k, k_aux or a packed width), as the
    extension was built (csrc/select_common.h: kMaxSelect)."""
    return _C.max_select


def _select_cuda(h, k, mode, width, threshold, dead, k_aux, norms=True, cut=None):
    cap, F = cuda_max_select(), h.shape[1]
    if h.dtype not in (torch.float32, torch.float16, torch.bfloat16) or F >= 2 ** 31:
        fallback_warning("select", f"the CUDA selection takes float32, float16 and bfloat16 with F < 2^31 "
                                   f"(got {h.dtype}, F = {F})")
        return _select_reference(h, k, mode, width, threshold, dead, k_aux, norms, cut)
    if (k if mode == "topk" else min(width, F)) > cap:   # the kernel clamps width to F
        fallback_warning("select", f"k or the packed width is above the CUDA selection's {cap} entries per row")
        return _select_reference(h, k, mode, width, threshold, dead, k_aux, norms, cut)
    if threshold is not None:
        threshold = threshold.to(h.dtype).expand(F).contiguous()
    h = h.contiguous()
    aux_on_kernel = dead is not None and 0 < min(k_aux, F) <= cap
    out = _C.select_cuda(h, k, mode, width, threshold, dead.contiguous() if aux_on_kernel else None,
                         k_aux if aux_on_kernel else 0, norms, cut)
    if not out:   # exact width (width = 0) and a row selects more than the kernel's buffer
        fallback_warning("select", f"a row selects more than {cap} entries at the exact packed width "
                                   "(width = 0); pass a width (e.g. BatchTopKSAE's max_k_per_row) to stay on "
                                   "the GPU")
        return _select_reference(h, k, mode, width, threshold, dead, k_aux, norms, cut)
    out = list(out)
    if dead is not None and k_aux > 0 and not aux_on_kernel:   # the main selection stays on the kernel
        fallback_warning("select", f"k_aux = {k_aux} is above the CUDA selection's {cap} entries per row; "
                                   "the AuxK candidates use the reference")
        out[7:9] = reference.auxk_select_ref(h, dead, min(k_aux, F))
    return tuple(out)


register_impl("select", "reference", _select_reference)
if _C is not None:
    register_impl("select", "cpu", _select_cpu)
    if _C.with_cuda:
        register_impl("select", "cuda", _select_cuda)
