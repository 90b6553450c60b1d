"""The kernel benchmark on one GPU (issues 4 and 5): each fast op against the PyTorch it
replaces, measured side by side in one run, bf16, B = 4096.

- encode (Triton) vs ``torch.mm`` on the same GEMM: TFLOP/s and % of mm (target >= 85%);
- sparse decode forward and backward vs ``F.embedding_bag`` (forward; autograd backward);
- the full training step (forward, backward, Adam): plain Top-k, Top-k with both paper
  penalties, the trainer's default configuration (fp32 master weights, bf16 autocast, fused
  Adam), and the dense-autograd implementation of bench/dense_topk.py: time and peak
  memory (``torch.cuda.max_memory_allocated`` growth over setup). Targets: regularized <= 1.25x
  plain; >= 3x faster than dense; <= 0.5x dense memory;
- select (the CUDA op) vs ``torch.topk`` plus the passes it replaces (bitmap, fired counts, row
  norms over the batch-active set) at F in {32768, 131072, 1048576}: target >= 2x.

Each measured stage is printed next to its floor from bench/roofline.py (a model).

Timing: CUDA events, warm-up, median of repetitions. Shapes: D in {1024, 4096}, F in {32768,
131072}, k in {32, 128}. Each pair is first checked for agreement. Writes JSON to the given
directory and prints a table last.

    python bench/gpu_suite.py bench/results             # one H200: under 8 minutes
    python bench/gpu_suite.py /tmp/b --dry-run          # CPU, tiny shapes, correctness only
"""
from __future__ import annotations

import argparse
import itertools
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as Fn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dense_topk import DenseTopKSAE  # noqa: E402
from roofline import stage_floors, step_floors  # noqa: E402

import sparse_sae as S  # noqa: E402
from sparse_sae import ops  # noqa: E402
from sparse_sae.ops._registry import backend_for  # noqa: E402
from sparse_sae.ops.select import _select_reference as select_reference  # noqa: E402

COEF_OFF, COEF_RATIO = 0.02, 0.01
TARGETS = {"encode_pct_of_mm": 85.0, "reg_over_plain": 1.25, "dense_over_reg": 3.0,
           "reg_mem_over_dense": 0.5, "select_speedup": 2.0}


# ----------------------------------------------------------------------------- timing
class Timer:
    """Median time (ms) of ``fn()``: CUDA events on a GPU, wall clock on the CPU (dry run)."""

    def __init__(self, device, warmup: int, reps: int):
        self.cuda = device.type == "cuda"
        self.warmup, self.reps = warmup, reps

    def __call__(self, fn) -> float:
        for _ in range(self.warmup):
            fn()
        times = []
        for _ in range(self.reps):
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t) * 1e3)
        return statistics.median(times)


def close(a, b, name, tol):
    torch.testing.assert_close(a.float(), b.float(), **tol, msg=lambda m: f"{name}: {m}")


# ----------------------------------------------------------------------------- encode
def bench_encode(B, D, F, dev, dtype, timer, tol):
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(B, D, device=dev, dtype=dtype, generator=g)
    W = torch.randn(F, D, device=dev, dtype=dtype, generator=g) / D ** 0.5
    b_enc = torch.randn(F, device=dev, dtype=dtype, generator=g) * 0.1
    b_dec = torch.randn(D, device=dev, dtype=dtype, generator=g) * 0.1
    xc = x - b_dec
    close(ops.encode(x, W, b_enc, b_dec), torch.relu(torch.addmm(b_enc, xc, W.T)), "encode", tol)
    t_ours = timer(lambda: ops.encode(x, W, b_enc, b_dec))
    t_mm = timer(lambda: torch.mm(xc, W.T))
    flops = 2 * B * D * F
    return dict(op="encode", B=B, D=D, F=F, backend=backend_for("encode", x.device), ms=t_ours, mm_ms=t_mm,
                floor_ms=stage_floors(B, D, F, 1)["encode"],
                tflops=flops / t_ours / 1e9, mm_tflops=flops / t_mm / 1e9, pct_of_mm=100 * t_mm / t_ours)


# ----------------------------------------------------------------------------- sparse decode
def bench_decode(B, D, F, k, dev, dtype, timer, tol):
    g = torch.Generator(device=dev).manual_seed(1)
    W = (torch.randn(F, D, device=dev, dtype=dtype, generator=g) / D ** 0.5).requires_grad_()
    b = torch.zeros(D, device=dev, dtype=dtype)
    idx = torch.rand(B, F, device=dev, generator=g).topk(k, dim=1).indices   # distinct latents per row
    vals = torch.rand(B, k, device=dev, dtype=dtype, generator=g).requires_grad_()
    grad = torch.randn(B, D, device=dev, dtype=dtype, generator=g)

    def bag():
        return Fn.embedding_bag(idx, W, per_sample_weights=vals, mode="sum") + b

    close(ops.sparse_decode(vals, idx, W, b), bag(), "sparse_decode", tol)
    dv, dW = ops.sparse_decode_backward(grad, vals.detach(), idx, W.detach())
    out = bag()
    want_dv, want_dW = torch.autograd.grad(out, (vals, W), grad)
    close(dv, want_dv, "d_values", tol)
    close(dW, want_dW, "dW_dec", tol)
    with torch.no_grad():
        t_fwd = timer(lambda: ops.sparse_decode(vals, idx, W, b))
        t_bag = timer(bag)
    t_bwd = timer(lambda: ops.sparse_decode_backward(grad, vals.detach(), idx, W.detach()))
    out = bag()
    t_bag_bwd = timer(lambda: torch.autograd.grad(out, (vals, W), grad, retain_graph=True))
    return dict(op="sparse_decode", B=B, D=D, F=F, k=k, backend=backend_for("sparse_decode", W.device),
                fwd_ms=t_fwd, bag_fwd_ms=t_bag, bwd_ms=t_bwd, bag_bwd_ms=t_bag_bwd,
                fwd_speedup=t_bag / t_fwd, bwd_speedup=t_bag_bwd / t_bwd)


# ----------------------------------------------------------------------------- training step
def make_step(variant, B, D, F, k, dev, dtype):
    """One training step of ``variant``. ``trainer_default`` is what ``sparse-sae train`` runs by
    default: both penalties, float32 parameters and Adam state, bf16 autocast on the GPU (the
    other variants hold their parameters in ``dtype``)."""
    torch.manual_seed(0)
    autocast = variant == "trainer_default" and dev.type == "cuda"
    if variant == "trainer_default":
        model = S.TopKSAE(D, F, k, [S.OffSupportL1(COEF_OFF), S.L1L2Ratio(COEF_RATIO)], device=dev)
        loss_of = lambda x: model(x).loss  # noqa: E731
        dtype = torch.float32
    elif variant == "dense_regularized":
        model = DenseTopKSAE(D, F, k, COEF_OFF, COEF_RATIO, dtype=dtype, device=dev)
        loss_of = lambda x: model(x)[0]  # noqa: E731
    else:
        pens = [] if variant == "ours_topk" else [S.OffSupportL1(COEF_OFF), S.L1L2Ratio(COEF_RATIO)]
        model = S.TopKSAE(D, F, k, pens, dtype=dtype, device=dev)
        loss_of = lambda x: model(x).loss  # noqa: E731
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, fused=dev.type == "cuda" or None)
    x = torch.randn(B, D, device=dev, dtype=dtype, generator=torch.Generator(device=dev).manual_seed(2))

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=autocast):
            loss = loss_of(x)
        loss.backward()
        opt.step()
        return loss

    return step


def bench_step(B, D, F, k, dev, dtype, timer):
    row = dict(op="train_step", B=B, D=D, F=F, k=k)
    for variant in ("ours_topk", "ours_regularized", "trainer_default", "dense_regularized"):
        if dev.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.synchronize()
        base = torch.cuda.memory_allocated() if dev.type == "cuda" else 0
        step = make_step(variant, B, D, F, k, dev, dtype)
        loss = step()
        assert torch.isfinite(loss), f"{variant}: loss {loss}"
        if dev.type == "cuda":
            torch.cuda.synchronize()
            setup = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            step()
            torch.cuda.synchronize()
            row[f"{variant}_peak_mb"] = (torch.cuda.max_memory_allocated() - setup) / 2 ** 20
            row[f"{variant}_state_mb"] = (setup - base) / 2 ** 20
        row[f"{variant}_ms"] = timer(step)
        del step
    row["reg_over_plain"] = row["ours_regularized_ms"] / row["ours_topk_ms"]
    row["trainer_default_over_reg"] = row["trainer_default_ms"] / row["ours_regularized_ms"]
    row["plain_floor_ms"], row["reg_floor_ms"] = step_floors(stage_floors(B, D, F, k))
    row["dense_over_reg"] = row["dense_regularized_ms"] / row["ours_regularized_ms"]
    if dev.type == "cuda":
        row["reg_mem_over_dense"] = row["ours_regularized_peak_mb"] / row["dense_regularized_peak_mb"]
    return row


# ----------------------------------------------------------------------------- select
def topk_sequence(h, k):
    """What select replaces: torch.topk, then the batch-active bitmap, the fired counts and the
    row norms over the batch-active set, each a separate pass."""
    values, indices = torch.topk(h, k, dim=1)
    fired = torch.zeros(h.shape[1], dtype=torch.int64, device=h.device)
    fired.index_add_(0, indices.reshape(-1), (values > 0).reshape(-1).to(torch.int64))
    active = fired > 0
    hA = h.float() * active
    return values, indices, active, fired, hA.sum(1), hA.square().sum(1).sqrt()


def bench_select(B, F, k, dev, dtype, timer, tol):
    g = torch.Generator(device=dev).manual_seed(3)
    h = torch.relu(torch.randn(B, F, device=dev, dtype=dtype, generator=g))
    # agreement with the reference on a slice of rows (bf16 has many ties, which torch.topk
    # breaks its own way, and the reference's B x F masks would not fit at F = 2^20)
    sub = h[:256]
    got = ops.select(sub, k)
    want = select_reference(sub, k, "topk", 0, None, None, 0)
    for name in ("values", "indices", "active", "fired"):
        assert torch.equal(getattr(got, name), want[got._fields.index(name)]), f"select {name} differs"
    close(got.n1, want[5], "select n1", dict(rtol=1e-3, atol=1e-2))
    topk_sequence(h, k)
    t_sel = timer(lambda: ops.select(h, k))
    t_seq = timer(lambda: topk_sequence(h, k))
    return dict(op="select", B=B, F=F, k=k, backend=backend_for("select", h.device), ms=t_sel, topk_seq_ms=t_seq,
                floor_ms=stage_floors(B, 1, F, k)["select"],
                speedup=t_seq / t_sel)


# ----------------------------------------------------------------------------- report
def environment(dev, dtype, dry_run):
    import triton
    env = dict(torch=torch.__version__, cuda=torch.version.cuda, triton=triton.__version__,
               python=platform.python_version(), device=str(dev), dtype=str(dtype).replace("torch.", ""),
               dry_run=dry_run)
    if dev.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(dev)
    return env


def table(rows, dry_run) -> str:
    def verdict(value, target, higher):
        if dry_run:
            return "dry run (not a measurement)"
        ok = value >= target if higher else value <= target
        return f"{value:.2f} ({'meets' if ok else 'MISSES'} {'>=' if higher else '<='} {target})"

    def floor(r):   # bench/roofline.py's floor for the stage, next to the measured time
        return "" if dry_run else f"; {r['ms']:.3f} ms, floor {r['floor_ms']:.3f} ms (a model)"

    lines = [f"{'row':<44} result vs target"]
    for r in rows:
        if r["op"] == "encode":
            name = f"encode D={r['D']} F={r['F']} (% of mm)"
            lines.append(f"{name:<44} {verdict(r['pct_of_mm'], TARGETS['encode_pct_of_mm'], True)}{floor(r)}")
        elif r["op"] == "sparse_decode":
            name = f"decode D={r['D']} F={r['F']} k={r['k']} fwd/bwd x"
            lines.append(f"{name:<44} " + ("dry run (not a measurement)" if dry_run else
                                          f"{r['fwd_speedup']:.2f}x / {r['bwd_speedup']:.2f}x faster than embedding_bag"))
        elif r["op"] == "train_step":
            s = f"D={r['D']} F={r['F']} k={r['k']}"
            lines.append(f"{'step ' + s + ' reg/plain':<44} {verdict(r['reg_over_plain'], TARGETS['reg_over_plain'], False)}")
            lines.append(f"{'step ' + s + ' dense/reg':<44} {verdict(r['dense_over_reg'], TARGETS['dense_over_reg'], True)}")
            if not dry_run:
                lines.append(f"{'step ' + s + ' ms vs floor':<44} plain {r['ours_topk_ms']:.2f} (floor "
                             f"{r['plain_floor_ms']:.2f}), regularized {r['ours_regularized_ms']:.2f} (floor "
                             f"{r['reg_floor_ms']:.2f}), trainer default {r['trainer_default_ms']:.2f}")
            if "reg_mem_over_dense" in r:
                lines.append(f"{'step ' + s + ' mem reg/dense':<44} "
                             f"{verdict(r['reg_mem_over_dense'], TARGETS['reg_mem_over_dense'], False)}")
        elif r["op"] == "select":
            name = f"select F={r['F']} k={r['k']} (topk seq / select)"
            lines.append(f"{name:<44} {verdict(r['speedup'], TARGETS['select_speedup'], True)}{floor(r)}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path, help="directory for gpu_suite.json")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, fp32: correctness only, no timings")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    args = p.parse_args(argv)
    if args.dry_run:
        dev, dtype, B = torch.device("cpu"), torch.float32, 48
        Ds, Fs, ks, select_Fs = (24,), (96,), (4, 9), (96, 130)
        timer = Timer(dev, 0, 1)
        tol = dict(rtol=1e-4, atol=1e-4)
    else:
        if not torch.cuda.is_available():
            p.error("no GPU visible; use --dry-run on the CPU")
        dev, dtype, B = torch.device("cuda"), torch.bfloat16, 4096
        Ds, Fs, ks, select_Fs = (1024, 4096), (32768, 131072), (32, 128), (32768, 131072, 1048576)
        timer = Timer(dev, args.warmup, args.reps)
        tol = dict(rtol=2e-2, atol=2e-2)
    t0 = time.time()
    rows = []
    for D, F in itertools.product(Ds, Fs):
        rows.append(bench_encode(B, D, F, dev, dtype, timer, tol))
    for D, F, k in itertools.product(Ds, Fs, ks):
        rows.append(bench_decode(B, D, F, k, dev, dtype, timer, tol))
    for D, F, k in itertools.product(Ds, Fs, ks):
        rows.append(bench_step(B, D, F, k, dev, dtype, timer))
    for F, k in itertools.product(select_Fs, ks):
        rows.append(bench_select(B, F, k, dev, dtype, timer, tol))
    result = dict(environment=environment(dev, dtype, args.dry_run), targets=TARGETS, seconds=time.time() - t0,
                  rows=rows)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_suite.json").write_text(json.dumps(result, indent=1))
    print(f"{result['environment']}  ({result['seconds']:.0f} s; JSON: {args.out / 'gpu_suite.json'})")
    print(table(rows, args.dry_run))
    return 0


if __name__ == "__main__":
    sys.exit(main())
