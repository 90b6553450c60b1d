"""Rows per second of the activation loader alone (read, shuffle, finite check), from .npy files
and from safetensors shards, with and without the prefetching thread, next to what one GPU step
needs: ``B / step time`` at the H200 floors of bench/roofline.py (a model: a real step is slower,
so it needs fewer rows per second than this).

    python bench/data_throughput.py --rows 131072 --d 768 --batch 4096 --out bench/results
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from roofline import stage_floors, step_floors  # noqa: E402

from sparse_sae.training.data import ActivationLoader, open_source  # noqa: E402
from sparse_sae.training.prefetch import PrefetchingLoader  # noqa: E402


def write_data(root: Path, rows: int, d: int, shards: int = 4) -> dict:
    data = torch.randn(rows, d, generator=torch.Generator().manual_seed(0))
    (root / "npy").mkdir()
    (root / "st").mkdir()
    for i, part in enumerate(data.chunk(shards)):
        np.save(root / "npy" / f"part_{i}.npy", part.numpy())
        save_file({"activations": part.contiguous()}, str(root / "st" / f"shard_{i:05d}.safetensors"))
    return {"npy": root / "npy", "safetensors": root / "st"}


def measure(path: Path, batch: int, budget_mb: float, batches: int, prefetch: bool, work_ms: float) -> dict:
    """Over ``batches`` batches: rows/s delivered, and the mean time the consumer waits inside
    ``next_batch``; ``work_ms`` of sleep per batch stands in for a GPU step (which leaves the CPU
    free), so with prefetching the loader's work overlaps it."""
    loader = ActivationLoader(open_source(path), batch, seed=1, memory_budget_mb=budget_mb)
    if prefetch:
        loader = PrefetchingLoader(loader, torch.device("cpu"), torch.float32)
    loader.next_batch()   # the first buffer fill is a one-time cost
    waited, start = 0.0, time.perf_counter()
    for _ in range(batches):
        t = time.perf_counter()
        loader.next_batch()
        waited += time.perf_counter() - t
        time.sleep(work_ms / 1e3)
    elapsed = time.perf_counter() - start
    if prefetch:
        loader.close()
    return dict(rows_per_s=batches * batch / elapsed, wait_ms=1e3 * waited / batches)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=131072)
    p.add_argument("--d", type=int, default=768)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--batches", type=int, default=60)
    p.add_argument("--budget-mb", type=float, default=256.0, help="shuffle buffer (the trainer's memory_budget_mb)")
    p.add_argument("--work-ms", type=float, default=20.0, help="simulated GPU step per batch (prefetch rows)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_data(Path(tmp), args.rows, args.d)
        for fmt, path in paths.items():
            alone = measure(path, args.batch, args.budget_mb, args.batches, False, 0.0)
            plain = measure(path, args.batch, args.budget_mb, args.batches, False, args.work_ms)
            ahead = measure(path, args.batch, args.budget_mb, args.batches, True, args.work_ms)
            rows.append(dict(format=fmt, alone=alone, plain_beside_step=plain, prefetch_beside_step=ahead))
    print(f"Loader: {args.rows} x {args.d} float32 rows, batch {args.batch}, shuffle buffer {args.budget_mb:g} MB; "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}; "
          f"torch {torch.__version__}. A step is stood in for by {args.work_ms:g} ms of sleep.\n")
    print("| format | loader alone (rows/s) | GB/s of fp32 | step waits, plain (ms/batch) | step waits, prefetch "
          "(ms/batch) | rows/s beside the step, plain | rows/s beside the step, prefetch |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        a, pl, pf = r["alone"], r["plain_beside_step"], r["prefetch_beside_step"]
        print(f"| {r['format']} | {a['rows_per_s']:,.0f} | {a['rows_per_s'] * args.d * 4 / 1e9:.2f} | "
              f"{pl['wait_ms']:.1f} | {pf['wait_ms']:.1f} | {pl['rows_per_s']:,.0f} | {pf['rows_per_s']:,.0f} |")
    print("\nWhat one H200 step needs at its floor (bench/roofline.py, bf16, B = 4096; a model):\n")
    print("| D | F | k | plain step floor (ms) | rows/s needed | GB/s of fp32 input |")
    print("|---|---|---|---|---|---|")
    needs = []
    for D, F, k in ((1024, 32768, 32), (4096, 32768, 32), (4096, 131072, 128)):
        plain, _ = step_floors(stage_floors(4096, D, F, k))
        need = 4096 / (plain / 1e3)
        needs.append(dict(D=D, F=F, k=k, step_floor_ms=plain, rows_per_s=need))
        print(f"| {D} | {F} | {k} | {plain:.2f} | {need:,.0f} | {need * D * 4 / 1e9:.1f} |")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "data_throughput.json").write_text(json.dumps(dict(args=vars(args) | {"out": str(args.out)},
                                                                       rows=rows, needs=needs), indent=1))


if __name__ == "__main__":
    main()
