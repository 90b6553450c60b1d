"""Data- and latent-parallel training through ``torch.distributed`` (launched with ``torchrun``).

The processes form a ``data x latent`` mesh (rank ``= d * latent_size + l``). Without latent
parallelism (``latent_size = 1``) each process holds a full copy of the SAE; with it, the
``latent_size`` processes of a data replica share one SAE, each holding a slice of its latents
(:class:`sparse_sae.saes.sharded.ShardedTopKSAE`), and see the same rows. Each data replica
takes its slice of every global batch; after the backward pass :func:`all_reduce_gradients`
averages the gradients over the data replicas (one flat all-reduce), so every replica takes the
same optimizer step. NCCL on GPUs, gloo on CPUs.

For the result to equal one process on the global batch, per-batch quantities must be global:
:func:`global_variance` gives the denominators of the whole batch (the FVU's, and AuxK's: the
residual's variance), firing counts are summed (:func:`all_reduce_sum`) before the dead-latent
tracker sees them, and the paper's batch-active set ``A`` is the union over the data replicas
(:func:`union_over_data`, one all-reduce of ``F`` flags, through
``sparse_sae.ops.reduce_batch_active``), and BatchTopK selects the ``k`` x global rows largest
entries of the global batch (:func:`global_batch_cut`, a radix select over histograms
summed across the replicas, through ``sparse_sae.ops.reduce_batch_selection``), its learned threshold following
the global batch's smallest selected value (:func:`min_over_data`); on a ``data x latent`` mesh
too (the histograms then sum over every process, and a row's ties go to the slices in order).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from sparse_sae.ops.select import KEY_BITS, key_histogram, value_of_key


@dataclass(frozen=True)
class Context:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    latent_size: int = 1
    data_group: object = None      # the processes holding the same latents (None: every process)
    latent_group: object = None    # the processes of this data replica (None: this process alone)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def data_size(self) -> int:
        return self.world_size // self.latent_size

    @property
    def data_rank(self) -> int:
        return self.rank // self.latent_size


def _mesh(ctx: Context, latent_size: int) -> Context:
    """``ctx`` with its ``data x latent`` process groups; every process creates every group, in
    the same order, as torch.distributed requires."""
    if latent_size == 1:
        return ctx
    if ctx.world_size % latent_size:
        raise ValueError(f"latent_parallel={latent_size} must divide the number of processes {ctx.world_size}")
    data_size = ctx.world_size // latent_size
    data_group = latent_group = None
    for d in range(data_size):
        group = dist.new_group([d * latent_size + l for l in range(latent_size)])
        if d == ctx.rank // latent_size:
            latent_group = group
    for l in range(latent_size):
        group = dist.new_group([d * latent_size + l for d in range(data_size)])
        if l == ctx.rank % latent_size:
            data_group = group
    return Context(ctx.rank, ctx.world_size, ctx.local_rank, latent_size, data_group, latent_group)


def launched_with_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1


def init(device: torch.device, latent_size: int = 1) -> Context:
    """Makes ``device`` this process's current CUDA device, then joins the process group that
    ``torchrun`` set up (NCCL for CUDA, gloo otherwise); a single process gets a trivial context.

    The current device matters: Triton (and NCCL) launch on it, whatever device the tensors
    are on, so without it every rank would launch its kernels on GPU 0."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not (dist.is_available() and dist.is_initialized()):
        if not launched_with_torchrun():
            if latent_size > 1:
                raise ValueError(f"latent_parallel={latent_size} needs {latent_size} processes or a multiple "
                                 f"(torchrun --nproc-per-node ...); to resume a latent-parallel run in one "
                                 f"process, pass --latent-parallel 1")
            return Context()
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    ctx = Context(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    return _mesh(ctx, latent_size)


def device_for(requested: str) -> torch.device:
    """``auto`` picks this process's GPU (``LOCAL_RANK``) when there is one, else the CPU."""
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    device = torch.device(requested)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {requested!r} requested but CUDA is not available")
        if device.index is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return device


def all_reduce_sum(t: torch.Tensor, ctx: Context, over_data: bool = False) -> torch.Tensor:
    """Sums ``t`` over every process, or with ``over_data`` over the data replicas only (the
    processes that hold the same latents and see different rows)."""
    if over_data:
        if ctx.data_size > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=ctx.data_group)
    elif ctx.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def union_over_data(mask: torch.Tensor, ctx: Context) -> torch.Tensor:
    """The OR of a bool ``mask`` over the data replicas (the batch-active set of the global batch)."""
    if ctx.data_size == 1:
        return mask
    m = mask.to(torch.int32)
    dist.all_reduce(m, op=dist.ReduceOp.MAX, group=ctx.data_group)
    return m.bool()


def min_over_data(t: torch.Tensor, ctx: Context) -> torch.Tensor:
    """The minimum of a 0-d tensor over the data replicas."""
    if ctx.data_size == 1:
        return t
    m = t.detach().reshape(1).clone()
    dist.all_reduce(m, op=dist.ReduceOp.MIN, group=ctx.data_group)
    return m[0]


def _all_gather_cat(t: torch.Tensor, group, size: int) -> torch.Tensor:
    """``t`` of every process of ``group`` (``size`` of them, each the same shape), stacked in rank order."""
    if size == 1:
        return t.reshape(1, *t.shape)
    parts = [torch.empty_like(t) for _ in range(size)]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.stack(parts)


@torch.no_grad()
def global_batch_cut(h: torch.Tensor, k: int, ctx: Context, by_row: bool = False, digit_bits: int = 16):
    """This process's share of BatchTopK's selection over the global batch (the rows of every data
    replica, in rank order): the ``k * global_rows`` largest entries, ties to the lower global flat
    index. ``h`` is this process's rows, and its latents on a ``data x latent`` mesh.

    Returns ``select``'s ``cut``, the value at the cut and how many entries equal to it this process
    takes (float64, on ``h``'s device); with ``by_row``, ``(value, takes)``: the value in ``h``'s
    dtype and the ties each row takes (int64, ``B``), which a latent slice needs (a row's ties
    run across the slices of the latents).

    A radix select on the selection kernels' keys, ``digit_bits`` a pass (16: one pass for 16-bit
    types, two for float32), each pass one histogram (``ops.select.key_histogram``) summed over
    the processes. Collectives only, no host synchronisation."""
    if not 1 <= digit_bits <= 16 or KEY_BITS[h.dtype] % digit_bits:
        raise ValueError(f"digit_bits must divide {KEY_BITS[h.dtype]} and be at most 16, got {digit_bits}")
    B, F = h.shape
    h = h.detach()
    n_bins = 1 << digit_bits
    sliced = ctx.latent_size > 1       # the histograms then sum every process: all rows, all latents
    rows = all_reduce_sum(torch.tensor([B], dtype=torch.int64, device=h.device), ctx, over_data=True)
    remaining = rows * k                       # rank of the cut from the top among the matching entries
    high = torch.zeros(1, dtype=torch.int64, device=h.device)     # the key's digits fixed so far
    for shift in range(KEY_BITS[h.dtype] - digit_bits, -1, -digit_bits):
        local = key_histogram(h, high, shift, digit_bits)
        hist = all_reduce_sum(local.clone(), ctx, over_data=not sliced)
        from_top = hist.flip(0).cumsum(0)      # from_top[i]: entries with a digit >= n_bins - 1 - i
        i = torch.searchsorted(from_top, remaining)
        d = (n_bins - 1) - i
        remaining = remaining - (from_top[i] - hist[d])
        high = torch.bitwise_left_shift(high, digit_bits) | d     # a 64-bit key wraps to its bit pattern
        ties_here = local[d]
    value = value_of_key(high[0], h.dtype)
    # the ties of the cut go to the lowest global flat indices: the replicas in rank order, within
    # a replica its rows in order and, within a row, the latent slices in order
    if by_row:
        ties_row = (h == value).sum(1)
        per_slice = _all_gather_cat(ties_row, ctx.latent_group, ctx.latent_size)      # P x B
        replica_ties = per_slice.sum().reshape(1)
        flat = per_slice.T.reshape(-1)                                                 # (row, slice) order
        before_row = (flat.cumsum(0) - flat).view(B, ctx.latent_size)[:, ctx.rank % ctx.latent_size]
    else:
        ties_row, replica_ties, before_row = ties_here, ties_here.reshape(1), 0
    before = _all_gather_cat(replica_ties, ctx.data_group, ctx.data_size)[:ctx.data_rank].sum() + before_row
    take = (remaining - before).clamp(min=0).minimum(ties_row)
    if by_row:
        return value, take
    return torch.cat([value.to(torch.float64).reshape(1), take.to(torch.float64)])


def all_reduce_gradients(params, ctx: Context) -> None:
    """Averages the gradients of ``params`` over the data replicas with one flat all-reduce."""
    if ctx.data_size == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=ctx.data_group)
    flat /= ctx.data_size
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset:offset + n].view_as(g))
        offset += n


@torch.no_grad()
def global_variance(x: torch.Tensor, ctx: Context) -> torch.Tensor:
    """``sum_i ||x_i - mean(x)||^2`` over the rows of all data replicas (float64)."""
    x = x.to(torch.float64)
    stats = torch.cat([x.sum(0), x.new_tensor([x.shape[0]])])
    all_reduce_sum(stats, ctx, over_data=True)
    mean = stats[:-1] / stats[-1]
    var = (x - mean).square().sum().reshape(1)
    return all_reduce_sum(var, ctx, over_data=True)[0]


def barrier(ctx: Context) -> None:
    if ctx.enabled:
        dist.barrier()


def shutdown(ctx: Context) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()
