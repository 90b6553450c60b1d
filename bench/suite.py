"""The benchmark against the peers: one full training step (forward, loss, backward, Adam) of
each variant in each implementation of bench/peers (ours, dense PyTorch, sparsify,
overcomplete, SAELens), from the same weights on the same batch.

Per row: the median step time (the implementations of one variant take turns, step by step,
after warm-up, so machine noise hits them alike), its ratio to ours, the peak memory (CPU:
growth of the resident set's high-water mark over the state after setup, in a fresh process
per row; GPU: growth of ``torch.cuda.max_memory_allocated`` over setup), and the relative error
of the ``W_enc`` gradient against ``sparse_sae.reference`` in float64 on the same weights and a
batch of ``--grad-batch`` rows. A peer that is missing or lacks a variant is a skipped row with
the reason. Every row runs with the same thread count (``--threads``; OMP_NUM_THREADS too).

    python bench/suite.py --threads 2                   # CPU shapes, JSON to bench/results/
    python bench/suite.py --device cuda                 # GPU shapes in bf16 (bench/gpu_peers.py)
    python bench/suite.py --shapes 64,16,128,4 --steps 2 --warmup 1 --out /tmp/b   # smoke
    python bench/report.py bench/results/suite_cpu.json # the README table
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

CPU_SHAPES = ["2048,512,8192,32", "4096,512,8192,64"]
GPU_SHAPES = [f"4096,{D},{F},{k}" for D, F, k in itertools.product((1024, 4096), (32768, 131072), (32, 128))]
DTYPES = ("float32", "bfloat16", "float16", "float64")


def parse_shape(spec: str) -> tuple:
    try:
        B, D, F, k = (int(v) for v in spec.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a shape is B,D,F,k (four integers), got {spec!r}") from None
    if min(B, D, F, k) < 1 or k > F or B < 2:
        raise argparse.ArgumentTypeError(f"shape {spec!r}: need B >= 2, D, F, k >= 1 and k <= F")
    return B, D, F, k


def build_parser(prog=None) -> argparse.ArgumentParser:
    from peers import ADAPTERS
    from peers.common import VARIANTS
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="default: float32 on cpu, bfloat16 on cuda")
    p.add_argument("--shapes", nargs="+", type=parse_shape, default=None,
                   help=f"B,D,F,k (default: {' '.join(CPU_SHAPES)} on cpu; B=4096, D in 1024/4096, "
                        "F in 32768/131072, k in 32/128 on cuda)")
    p.add_argument("--impls", nargs="+", choices=ADAPTERS, default=list(ADAPTERS))
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--steps", type=int, default=7, help="measured steps per row (default 7)")
    p.add_argument("--warmup", type=int, default=2, help="warm-up steps per row (default 2)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch and OpenMP threads for every row (default: torch's current count)")
    p.add_argument("--grad-batch", type=int, default=1024, help="rows of the gradient-check batch (default 1024)")
    p.add_argument("--grad-dtype", choices=DTYPES, default="float64",
                   help="dtype every implementation runs the gradient check in (default float64: in float32, "
                        "rounding flips a few entries across h = 0 or the selection boundary, which moves the "
                        "dense penalty gradient by ~1e-4 whatever the implementation)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")
    p.add_argument("--no-grad-check", action="store_true", help="skip the gradient check")
    p.add_argument("--out", type=Path, default=HERE / "results", help="directory for suite_<device>.json")
    p.add_argument("--_memory-row", nargs=3, metavar=("IMPL", "VARIANT", "SHAPE"), help=argparse.SUPPRESS)
    return p


def set_threads(n) -> int:
    """Same thread count for every row, and for the memory subprocesses through the environment."""
    import torch
    if n is not None:
        if n < 1:
            raise SystemExit("--threads must be at least 1")
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[var] = str(n)
        torch.set_num_threads(n)
    return torch.get_num_threads()


# ---------------------------------------------------------------------------------------- setup
def setup(impl: str, variant: str, shape, device, dtype, seed: int = 0):
    """``(runner, weights, x)`` for one row, or raises ``Unavailable``."""
    from peers import load
    from peers.common import Unavailable, batch, shared_weights
    mod = load(impl)
    if variant not in mod.variants():
        raise Unavailable(f"{impl} has no {variant} SAE")
    B, D, F, k = shape
    w = shared_weights(D, F, seed).to(device, dtype)
    if getattr(mod, "ZERO_B_DEC", False):
        w = w.without_b_dec()
    x = batch(B, D, seed + 1).to(device, dtype)
    return mod.build(variant, w, k), w, x


def _sync(device):
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_variant(variant: str, impls, shape, device, dtype, steps: int, warmup: int) -> dict:
    """Interleaved step times (seconds) per implementation, or the reason it was skipped."""
    from peers.common import Unavailable, make_step
    fns, out = {}, {}
    for impl in impls:
        try:
            runner, _, x = setup(impl, variant, shape, device, dtype)
        except Unavailable as exc:
            out[impl] = {"skipped": str(exc)}
            continue
        fns[impl] = make_step(runner, x)
        out[impl] = {"note": runner.note, "times": []}
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    _sync(device)
    for _ in range(steps):
        for impl, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            _sync(device)
            out[impl]["times"].append(time.perf_counter() - t0)
    return out


def grad_check(impl: str, variant: str, shape, device, dtype, grad_batch: int) -> float:
    """Relative error of the row's ``W_enc`` gradient against the float64 reference."""
    from peers.common import batch, reference_w_enc_grad, rel_error
    B, D, F, k = shape
    runner, w, _ = setup(impl, variant, (max(2, min(B, grad_batch)), D, F, k), device, dtype)
    x = batch(max(2, min(B, grad_batch)), D, seed=2).to(device, dtype)
    runner.loss(x).backward()
    return rel_error(runner.w_enc_grad(), reference_w_enc_grad(variant, w, x, k))


def memory_row(impl: str, variant: str, shape, device, dtype, steps: int = 2) -> float:
    """Peak memory growth (MB) over the state after setup during ``steps`` training steps."""
    import torch
    from cpu_step import vm_hwm_kb
    from peers.common import make_step
    runner, _, x = setup(impl, variant, shape, device, dtype)
    fn = make_step(runner, x)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        for _ in range(steps):
            fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2 ** 20
    base = vm_hwm_kb()
    for _ in range(steps):
        fn()
    return (vm_hwm_kb() - base) / 1024.0


def memory_in_subprocess(impl, variant, shape, args) -> float:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_memory-row", impl, variant, ",".join(map(str, shape)),
           "--device", args.device, "--dtype", args.dtype]
    if args.threads is not None:
        cmd += ["--threads", str(args.threads)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"memory subprocess failed: {res.stderr.strip().splitlines()[-1:]}")
    return float(res.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------- environment
def environment(device, dtype, threads: int) -> dict:
    from importlib import metadata

    import torch
    from cpu_step import environment as cpu_env
    from peers import ADAPTERS, load

    import sparse_sae as S
    from sparse_sae.ops._registry import backend_for
    env = cpu_env()
    env.update(device=str(device), dtype=str(dtype).removeprefix("torch."), torch_threads=threads,
               omp_num_threads=os.environ.get("OMP_NUM_THREADS"), platform=platform.platform(),
               backend={op: backend_for(op, device) for op in ("encode", "select", "penalty_backward",
                                                               "sparse_decode")})
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    versions = {"sparse-sae": S.__version__, "torch": torch.__version__}
    for impl in ADAPTERS[2:]:
        pkg = load(impl).PACKAGE
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    env["versions"] = versions
    return env


# ---------------------------------------------------------------------------------------- main
def run(args, command: str, save=None) -> dict:
    import torch
    from peers.common import BANDWIDTH, COEF_L0, COEF_L1, COEF_OFF, COEF_RATIO, THETA, Unavailable
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")
    dtype = getattr(torch, args.dtype)
    if "ours" not in args.impls:
        args.impls = ["ours", *args.impls]     # every ratio is to ours
    threads = set_threads(args.threads)
    env = environment(device, dtype, threads)
    env["loadavg_start"] = os.getloadavg()
    results = []
    for shape in args.shapes:
        B, D, F, k = shape
        for variant in args.variants:
            timed = time_variant(variant, args.impls, shape, device, dtype, args.steps, args.warmup)
            ours_ms = None
            for impl in args.impls:
                row = {"B": B, "D": D, "F": F, "k": k, "variant": variant, "impl": impl, **timed[impl]}
                if "times" in row:
                    ts = sorted(row.pop("times"))
                    row["median_ms"] = 1e3 * statistics.median(ts)
                    row["p20_ms"] = 1e3 * ts[len(ts) // 5]
                    row["p80_ms"] = 1e3 * ts[min(len(ts) - 1, (4 * len(ts)) // 5)]
                    if impl == "ours":
                        ours_ms = row["median_ms"]
                    row["ratio_to_ours"] = row["median_ms"] / ours_ms if ours_ms else None
                    if not args.no_memory:
                        try:
                            row["peak_mb"] = memory_in_subprocess(impl, variant, shape, args)
                        except RuntimeError as exc:
                            row["peak_mb_error"] = str(exc)
                    if not args.no_grad_check:
                        try:
                            row["grad_rel_error"] = grad_check(impl, variant, shape, device,
                                                               getattr(torch, args.grad_dtype), args.grad_batch)
                        except Unavailable as exc:    # pragma: no cover - it built a moment ago
                            row["grad_error"] = str(exc)
                results.append(row)
                print(_progress(row), file=sys.stderr, flush=True)
            if save is not None:
                save({"env": env, "command": command, "partial": True, "rows": results})
    env["loadavg_end"] = os.getloadavg()
    return {"env": env, "command": command,
            "settings": {"steps": args.steps, "warmup": args.warmup, "grad_batch": args.grad_batch,
                         "step": "forward, loss, backward, Adam (lr 1e-4); same loss formula for every row "
                                 "of a variant (FVU + the variant's penalties)",
                         "memory": ("growth of torch.cuda.max_memory_allocated over setup during 2 steps"
                                    if device.type == "cuda" else
                                    "growth of the resident set's high-water mark (VmHWM) over setup during "
                                    "2 steps, in a fresh process per row"),
                         "grad_check": "relative Frobenius error of dL/dW_enc against sparse_sae.reference in "
                                       "float64, same weights, batch of min(B, grad_batch) rows, each implementation run in "
                                       f"{args.grad_dtype}",
                         "coefficients": {"off_support_l1": COEF_OFF, "l1_l2_ratio": COEF_RATIO,
                                          "relu_decoder_norm_l1": COEF_L1, "jumprelu_l0": COEF_L0,
                                          "jumprelu_bandwidth": BANDWIDTH, "jumprelu_threshold": THETA}},
            "rows": results}


def _progress(row) -> str:
    head = f"{row['B']},{row['D']},{row['F']},{row['k']} {row['variant']:10s} {row['impl']:12s}"
    if "skipped" in row:
        return f"{head} skipped: {row['skipped']}"
    err = row.get("grad_rel_error")
    return (f"{head} {row['median_ms']:9.1f} ms  x{row['ratio_to_ours']:.2f}  "
            f"peak {row.get('peak_mb', float('nan')):8.1f} MB  grad err {err if err is None else f'{err:.2e}'}")


def main(argv=None, prog=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(prog).parse_args(argv)
    cuda = args.device.startswith("cuda")
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    if args._memory_row:
        import torch
        set_threads(args.threads)
        impl, variant, spec = args._memory_row
        print(memory_row(impl, variant, parse_shape(spec), torch.device(args.device), getattr(torch, args.dtype)))
        return 0
    if args.steps < 1 or args.warmup < 0 or args.grad_batch < 2:
        raise SystemExit("--steps must be >= 1, --warmup >= 0 and --grad-batch >= 2")
    args.shapes = args.shapes or [parse_shape(s) for s in (GPU_SHAPES if cuda else CPU_SHAPES)]
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"suite_{args.device.split(':')[0]}.json"
    partial = path.with_suffix(".partial.json")
    result = run(args, "python bench/suite.py " + shlex.join(argv),
                 save=lambda res: partial.write_text(json.dumps(res, indent=2) + "\n"))
    path.write_text(json.dumps(result, indent=2) + "\n")
    partial.unlink(missing_ok=True)
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
