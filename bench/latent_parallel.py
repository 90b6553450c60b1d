"""Latent parallelism (sparse_sae.saes.sharded.ShardedTopKSAE): a measurement here and a model
of 8 GPUs.

Measured: one training step (forward, backward, Adam) of a Top-k SAE with both paper penalties
split over P in {1, 2, 4} gloo processes on this machine's CPU, every process on the same batch,
and the bytes each rank hands to the collectives per step (counted by wrapping
``torch.distributed.all_reduce`` / ``all_gather``). On a 2-core machine P = 4 runs 4 processes
on 2 cores (one torch thread each): the times show the overhead of the collectives and of the
oversubscription, not a speed-up.

Model (not a measurement): for one node of 8 GPUs with NVLink, per rank the parameters with their
fp32 master copies, gradients and Adam moments (16 bytes per parameter), the pre-activations of
one batch on the slice, the communication per step and its time at the link bandwidth, and the
largest dictionary that fits, next to the data-parallel limit (every rank the whole SAE).

    python bench/latent_parallel.py                          # both, the tables of bench/RESULTS.md
    python bench/latent_parallel.py --model-only
    python bench/latent_parallel.py --shape 512,128,4096,16 --steps 3 --warmup 1   # a quick smoke run
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# ------------------------------------------------------------------------------------------- model
GPU_MEMORY_GB = 141.0      # H200 HBM3e
USABLE = 0.9               # left for the CUDA context, allocator slack, NCCL buffers
LINK_GBPS = 900.0          # NVLink, per GPU, one direction
BYTES_PER_PARAM = 16       # fp32 master (4) + gradient (4) + Adam moments (8)


def comm_bytes_per_rank(B: int, D: int, k: int, P: int, value_bytes: int = 4) -> int:
    """Bytes each rank sends per step with ring collectives: the candidates' all-gather (values and
    int64 indices, B x k), the all-reduces of the reconstruction (B x D), of the row norms and the
    selected sums (3 x B) and of the encoder's dL/db_dec (D; the training input needs no gradient,
    so no B x D dL/dx)."""
    if P == 1:
        return 0
    ring = 2 * (P - 1) / P
    gather = (P - 1) * B * k * (value_bytes + 8)
    return int(gather + ring * (B * D * value_bytes + 3 * B * 4 + D * 4))


def per_rank_memory_gb(D: int, F: int, B: int, P: int) -> float:
    """Parameters and optimizer state of the slice, plus the slice's pre-activations (bf16) and
    their fp32 working copy for the penalty gradient."""
    params = (F // P) * (2 * D + 1) + D
    return (params * BYTES_PER_PARAM + B * (F // P) * (2 + 4)) / 1e9


def largest_f(D: int, B: int, P: int) -> int:
    budget = GPU_MEMORY_GB * USABLE * 1e9 - D * BYTES_PER_PARAM
    per_latent = (BYTES_PER_PARAM * (2 * D + 1) + 6 * B) / P
    return int(budget / per_latent)


def model_table(B: int = 4096, k: int = 32) -> str:
    lines = [f"Model, not a measurement: 8 GPUs of {GPU_MEMORY_GB:g} GB ({USABLE:.0%} usable), NVLink "
             f"{LINK_GBPS:g} GB/s per GPU, B={B}, k={k}, fp32 master weights, gradients and Adam moments "
             f"({BYTES_PER_PARAM} B per parameter), bf16 pre-activations with an fp32 working copy.", "",
             "| D | F | P (latent) | memory per rank (GB) | sent per rank per step (MB) | comm time (ms) | "
             "largest F, latent-parallel | largest F, data-parallel |",
             "|---|---|---|---|---|---|---|---|"]
    for D in (2048, 4096, 8192):
        for F, P in ((1 << 20, 8), (1 << 22, 8)):
            sent = comm_bytes_per_rank(B, D, k, P)
            lines.append(f"| {D} | {F:,} | {P} | {per_rank_memory_gb(D, F, B, P):.1f} | {sent / 1e6:.0f} | "
                         f"{sent / (LINK_GBPS * 1e9) * 1e3:.2f} | {largest_f(D, B, P):,} | {largest_f(D, B, 1):,} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ measurement
def _count_collectives(counter: dict):
    real_reduce, real_gather = dist.all_reduce, dist.all_gather

    def all_reduce(t, *a, **kw):
        counter["bytes"] += t.numel() * t.element_size()
        return real_reduce(t, *a, **kw)

    def all_gather(out, t, *a, **kw):
        counter["bytes"] += t.numel() * t.element_size()
        return real_gather(out, t, *a, **kw)
    dist.all_reduce, dist.all_gather = all_reduce, all_gather


def _step_times(model, x, steps: int, warmup: int, before=None, after=None) -> list:
    """Seconds of each of ``steps`` training steps (forward, backward, decoder constraint, Adam)
    after ``warmup``; ``before``/``after`` run around each (a barrier, a counter reset)."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    times = []
    for i in range(warmup + steps):
        if before is not None:
            before()
        t0 = time.perf_counter()
        out = model(x)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        model.remove_parallel_grad_()
        opt.step()
        model.normalize_decoder_()
        if after is not None:
            after()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def _summary(times) -> dict:
    ts = sorted(times)
    return {"median_ms": 1e3 * statistics.median(ts), "p20_ms": 1e3 * ts[len(ts) // 5],
            "p80_ms": 1e3 * ts[min(len(ts) - 1, 4 * len(ts) // 5)]}


def _worker(rank, world, store, shape, steps, warmup, result_path):
    import sparse_sae as S
    from sparse_sae.saes import sharded as sharded_mod
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
        B, D, F, k = shape
        torch.manual_seed(0)
        whole = S.TopKSAE(D, F, k, [S.OffSupportL1(0.02), S.L1L2Ratio(0.01)])
        model = sharded_mod.ShardedTopKSAE.from_full(whole)
        x = torch.randn(B, D, generator=torch.Generator().manual_seed(1))
        counter = {"bytes": 0}
        _count_collectives(counter)

        def before():
            dist.barrier()
            counter["bytes"] = 0
        times = _step_times(model, x, steps, warmup, before, dist.barrier)
        if rank == 0:
            Path(result_path).write_text(json.dumps({"times": times, "bytes": counter["bytes"]}))
    finally:
        dist.destroy_process_group()


def measure(shape, world: int, steps: int, warmup: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        result = os.path.join(tmp, "result.json")
        mp.spawn(_worker, args=(world, os.path.join(tmp, "store"), shape, steps, warmup, result), nprocs=world)
        data = json.loads(Path(result).read_text())
    return {"P": world, **_summary(data["times"]), "bytes_per_rank": data["bytes"]}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def measure_whole(shape, steps: int, warmup: int) -> dict:
    """The same step on the whole TopKSAE (the fused kernels), one process, every core."""
    import sparse_sae as S
    B, D, F, k = shape
    torch.manual_seed(0)
    sae = S.TopKSAE(D, F, k, [S.OffSupportL1(0.02), S.L1L2Ratio(0.01)])
    x = torch.randn(B, D, generator=torch.Generator().manual_seed(1))
    return _summary(_step_times(sae, x, steps, warmup))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="1024,256,8192,32", help="B,D,F,k of the measurement (default: %(default)s)")
    p.add_argument("--shards", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--steps", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--model-only", action="store_true", help="print the 8-GPU model only")
    p.add_argument("--out", type=Path, default=None, help="directory for latent_parallel.json")
    args = p.parse_args(argv)
    print(model_table())
    if args.model_only:
        return 0
    shape = tuple(int(v) for v in args.shape.split(","))
    rows = [measure(shape, P, args.steps, args.warmup) for P in args.shards]
    whole = measure_whole(shape, args.steps, args.warmup)
    B, D, F, k = shape
    print(f"\nMeasured: {_cpu_name()}, {os.cpu_count()} cores, torch "
          f"{torch.__version__}, gloo; B={B}, D={D}, F={F}, k={k}, float32, Top-k + OffSupportL1 + L1L2Ratio; "
          f"median of {args.steps} steps after {args.warmup}\n")
    print("| P | step (ms), p20-p80 | handed to collectives per rank per step (KB) | expected (KB) |")
    print("|---|---|---|---|")
    for r in rows:
        # what each rank hands to the collectives (the model above counts what crosses a ring):
        # candidates' values and indices (B x k), the reconstruction (B x D), 3 row sums, dL/db_dec
        handed = 12 * B * k + 4 * B * D + 12 * B + 4 * D
        print(f"| {r['P']} | {r['median_ms']:.1f} ({r['p20_ms']:.1f}-{r['p80_ms']:.1f}) | "
              f"{r['bytes_per_rank'] / 1e3:.0f} | {handed / 1e3:.0f} |")
    print(f"| whole TopKSAE, 1 process (fused kernels) | {whole['median_ms']:.1f} ({whole['p20_ms']:.1f}-"
          f"{whole['p80_ms']:.1f}) | - | - |")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "latent_parallel.json").write_text(json.dumps({"shape": shape, "rows": rows, "whole": whole},
                                                                  indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
