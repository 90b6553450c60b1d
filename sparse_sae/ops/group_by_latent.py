"""Index building for the sparse decoder's backward: a code's entries grouped by latent.

``group_by_latent(indices, n_latents)`` returns ``(start, entries)``: the flat entry ids
(``row * width + j``) sorted by latent, stable (row-major order within a latent, so sums
over a group are deterministic), and ``start`` (``F + 1`` offsets): the entries of latent
``l`` are ``entries[start[l]:start[l + 1]]``. On CUDA tensors a counting-sort kernel of
``sparse_sae._C`` (radix sort by latent); elsewhere a stable ``torch.sort``.
"""
from __future__ import annotations

import torch
from torch import Tensor

from sparse_sae.ops._registry import _C


def group_by_latent_ref(indices: Tensor, n_latents: int) -> tuple[Tensor, Tensor]:
    flat = indices.reshape(-1)
    _, entries = torch.sort(flat, stable=True)
    counts = torch.bincount(flat, minlength=n_latents)[:n_latents]   # ids == n_latents: left out
    start = torch.zeros(n_latents + 1, dtype=torch.int64, device=flat.device)
    start[1:] = counts.cumsum(0)
    return start, entries


def group_by_latent(indices: Tensor, n_latents: int, keep: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """See the module docstring. ``indices`` is an int64 tensor of latent ids in ``[0, n_latents)``.

    ``keep`` (a bool tensor shaped like ``indices``) leaves the other entries out of every group:
    they sort after the last latent, past ``start[n_latents]``, so no kernel visits them (entries
    with a zero gradient or value: padding, AuxK picks when nothing is dead)."""
    if indices.dtype != torch.int64:
        raise TypeError(f"indices must be int64, got {indices.dtype}")
    if keep is not None:
        indices = torch.where(keep, indices, n_latents)   # the id n_latents: a bucket past the end
    if indices.is_cuda and _C is not None and getattr(_C, "with_cuda", False) and n_latents < 2 ** 31 - 1:
        start, entries = _C.group_by_latent_cuda(indices, n_latents)
        return start, entries
    return group_by_latent_ref(indices, n_latents)
