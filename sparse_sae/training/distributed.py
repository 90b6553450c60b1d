"""Data-parallel training through ``torch.distributed`` (launched with ``torchrun``).

Each process holds a full copy of the SAE and takes its slice of every global batch. After the
backward pass :func:`all_reduce_gradients` averages the gradients (one flat all-reduce), so every
process takes the same optimizer step. NCCL on GPUs, gloo on CPUs.

For the result to equal one process on the global batch, per-batch normalisers must be global:
:func:`global_variance` gives the FVU denominator of the whole batch, and firing counts are summed
(:func:`all_reduce_sum`) before the dead-latent tracker sees them. What stays per process: the
batch-active set ``A`` of the paper's penalties and the BatchTopK selection (each over the local
rows), as in other data-parallel SAE trainers.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Context:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_with_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1


def init(device: torch.device) -> Context:
    """Makes ``device`` this process's current CUDA device, then joins the process group that
    ``torchrun`` set up (NCCL for CUDA, gloo otherwise); a single process gets a trivial context.

    The current device matters: Triton (and NCCL) launch on it, whatever device the tensors
    are on, so without it every rank would launch its kernels on GPU 0."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if dist.is_available() and dist.is_initialized():
        return Context(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    if not launched_with_torchrun():
        return Context()
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend)
    return Context(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


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


def all_reduce_sum(t: torch.Tensor, ctx: Context) -> torch.Tensor:
    if ctx.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_gradients(params, ctx: Context) -> None:
    """Averages the gradients of ``params`` over the processes with one flat all-reduce."""
    if not ctx.enabled:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= ctx.world_size
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset:offset + n].view_as(g))
        offset += n


@torch.no_grad()
def global_variance(x: torch.Tensor, ctx: Context) -> torch.Tensor:
    """``sum_i ||x_i - mean(x)||^2`` over the rows of all processes (float64)."""
    x = x.to(torch.float64)
    stats = torch.cat([x.sum(0), x.new_tensor([x.shape[0]])])
    all_reduce_sum(stats, ctx)
    mean = stats[:-1] / stats[-1]
    var = (x - mean).square().sum().reshape(1)
    return all_reduce_sum(var, ctx)[0]


def barrier(ctx: Context) -> None:
    if ctx.enabled:
        dist.barrier()


def shutdown(ctx: Context) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()
