"""What BatchTopK's selection over a data-parallel global batch costs one process.

Side by side, on one batch ``h`` (B x F, relu of Gaussian pre-activations), in one run:

- ``own``: ``ops.select(h, k, "batchtopk")``, the whole selection with the batch's own cut (one
  process, no data parallelism);
- ``cut``: ``distributed.global_batch_cut`` alone (the radix select over digit histograms; in one
  process its collectives are skipped, so this is its local work: on P processes add one
  all-reduce of 65536 counts per pass, one of the row count and one all-gather of one count);
- ``cut + select``: the cut and then ``ops.select(..., cut=cut)``, what a data-parallel process runs.

    python bench/batch_cut.py                           # B=2048, F=8192, k=32, float32 and bfloat16
    python bench/batch_cut.py --shape 4096,16384,64 --repeats 7

Prints the median of ``--repeats`` calls after one warm-up call, and the machine and versions.
On a GPU the histograms are PyTorch ops (``key_histogram_ref``); that path is not measured here.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

import sparse_sae as S
from sparse_sae.training import distributed


def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="2048,8192,32", help="B,F,k")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    B, F, k = (int(v) for v in args.shape.split(","))
    ctx = distributed.Context()
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} "
          f"threads, load {os.getloadavg()[0]:.1f}; python {platform.python_version()}, torch {torch.__version__}, "
          f"sparse_sae {S.__version__}; B={B} F={F} k={k}, median of {args.repeats}")
    print("| dtype | select, own cut (ms) | global_batch_cut (ms) | cut + select (ms) | cut + select / own |")
    print("|---|---|---|---|---|")
    gen = torch.Generator().manual_seed(0)
    for name in args.dtypes.split(","):
        dtype = getattr(torch, name)
        h = torch.relu(torch.randn(B, F, generator=gen)).to(dtype)
        own = median_ms(lambda: S.ops.select(h, k, "batchtopk"), args.repeats)
        cut = median_ms(lambda: distributed.global_batch_cut(h, k, ctx), args.repeats)
        both = median_ms(lambda: S.ops.select(h, k, "batchtopk", cut=distributed.global_batch_cut(h, k, ctx)),
                         args.repeats)
        print(f"| {name} | {own:.1f} | {cut:.1f} | {both:.1f} | {both / own:.2f}x |")


if __name__ == "__main__":
    main()
