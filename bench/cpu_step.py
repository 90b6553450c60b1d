"""One full training step (forward, backward, Adam) on the CPU: sparse_sae's CPU backend for
plain Top-k and for Top-k with both paper penalties, against a dense-autograd PyTorch
implementation of the same regularized loss (bench/dense_topk.py).

Each shape is timed from the random initialisation, where about half of the batch-active
pre-activations are positive and the penalty gradient is dense; from the same weights with b_enc
lowered (``--b-enc-shift``), a stand-in for a trained regularized SAE, whose off-support penalty
pushes most pre-activations below zero (1-2% stay positive on the demo after 200 steps); and,
with ``--train-steps N``, from weights trained N steps (ours, both penalties) on synthetic data.
All variants start from the same weights and see the same batch.

Times are medians of interleaved steps (the variants take turns, so machine noise hits them
alike); peak memory is the growth of the resident set's high-water mark during two steps
over the state after setup (parameters and batch; Adam's state is allocated in the first
step, so it is counted, alike for all), in a fresh process per variant. Writes JSON and a
Markdown table.

    python bench/cpu_step.py --out bench/results            # the shapes of bench/RESULTS.md
    python bench/cpu_step.py --shapes 256,64,512,8 --steps 2 --train-steps 5  # a quick smoke run
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dense_threshold import DenseGatedSAE, DenseMatryoshkaSAE, DenseThresholdSAE  # noqa: E402
from dense_topk import DenseTopKSAE  # noqa: E402

import sparse_sae as S  # noqa: E402
from sparse_sae.eval.synthetic import make_synthetic  # noqa: E402

COEF_OFF, COEF_RATIO = 0.02, 0.01
# ours_regularized_bf16: the same step under torch.autocast("cpu", dtype=torch.bfloat16)
# (ATen's bf16 GEMMs; the C++ kernels compute in float32 on the bf16 values; fp32 weights)
VARIANTS = ("ours_topk", "ours_regularized", "ours_regularized_bf16", "dense_regularized")
# The soft-penalty SAEs (--soft): ReLU + decoder-norm l1 and JumpReLU + L0 on the fused threshold
# code, against the dense-autograd versions of the same losses (bench/dense_threshold.py).
SOFT_VARIANTS = ("ours_relu", "dense_relu", "ours_jumprelu", "dense_jumprelu")
# The rest of the family (--family): the Gated SAE (DecoderNormL1 on the gate) and Matryoshka
# Top-k (prefixes F/8, F/2, F), against dense-autograd versions of the same losses.
FAMILY_VARIANTS = ("ours_gated", "dense_gated", "ours_matryoshka", "dense_matryoshka")


def matryoshka_sizes(F: int) -> list:
    return [max(1, F // 8), max(2, F // 2), F]
COEF_L1, COEF_L0 = 1e-3, 1e-3
DEFAULT_SHAPES = ["2048,512,8192,32", "4096,512,16384,64"]


PARAMS = ("W_enc", "b_enc", "W_dec", "b_dec")


def synthetic_for(D: int, F: int):
    """Synthetic activations of width D with a known dictionary of F // 4 features."""
    return make_synthetic(n_features=max(16, F // 4), d=D)


def train_state(B: int, D: int, F: int, k: int, steps: int, lr: float = 4e-3, seed: int = 0):
    """Weights of our regularized SAE after ``steps`` Adam steps on synthetic batches, a fixed
    timing batch from the same data, and the fraction of positive batch-active pre-activations
    on it (what decides how dense the penalty gradient is)."""
    syn, gen = synthetic_for(D, F), torch.Generator().manual_seed(seed + 2)
    torch.manual_seed(seed)
    sae = S.TopKSAE(D, F, k, [S.OffSupportL1(COEF_OFF), S.L1L2Ratio(COEF_RATIO)], check_inputs=False)
    opt = torch.optim.Adam(sae.parameters(), lr=lr)
    for _ in range(steps):
        out = sae(syn.sample(B, gen))
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        sae.remove_parallel_grad_()
        opt.step()
        sae.normalize_decoder_()
    x = syn.sample(B, gen)
    return {n: getattr(sae, n).detach().clone() for n in PARAMS}, x, positive_active_density(sae, x)


@torch.no_grad()
def positive_active_density(sae, x) -> float:
    h = torch.relu((x - sae.b_dec) @ sae.W_enc.T + sae.b_enc)
    out = sae(x)
    active = torch.zeros(h.shape[1], dtype=torch.bool)
    active[out.indices[out.values > 0]] = True
    return float((h[:, active] > 0).float().mean()) if active.any() else 0.0


def make(variant: str, B: int, D: int, F: int, k: int, seed: int = 0, state=None):
    """One training step of ``variant`` as a closure; ``state`` = (weights, batch) from
    :func:`train_state`, else the random initialisation and a Gaussian batch."""
    torch.manual_seed(seed)
    if variant == "ours_topk":
        model = S.TopKSAE(D, F, k, check_inputs=False)
    elif variant in ("ours_regularized", "ours_regularized_bf16"):
        model = S.TopKSAE(D, F, k, [S.OffSupportL1(COEF_OFF), S.L1L2Ratio(COEF_RATIO)], check_inputs=False)
    elif variant == "dense_regularized":
        model = DenseTopKSAE(D, F, k, COEF_OFF, COEF_RATIO)
    elif variant == "ours_relu":
        model = S.ReLUSAE(D, F, [S.DecoderNormL1(COEF_L1)], check_inputs=False)
    elif variant == "dense_relu":
        model = DenseThresholdSAE(D, F, jump=False, coef_l1=COEF_L1)
    elif variant == "ours_jumprelu":
        model = S.JumpReLUSAE(D, F, [S.L0(COEF_L0)], check_inputs=False)
    elif variant == "dense_jumprelu":
        model = DenseThresholdSAE(D, F, jump=True, coef_l0=COEF_L0)
    elif variant == "ours_gated":
        model = S.GatedSAE(D, F, [S.DecoderNormL1(COEF_L1)], check_inputs=False)
    elif variant == "dense_gated":
        model = DenseGatedSAE(D, F, COEF_L1)
    elif variant == "ours_matryoshka":
        model = S.MatryoshkaTopKSAE(D, F, k, matryoshka_sizes(F), check_inputs=False)
    elif variant == "dense_matryoshka":
        model = DenseMatryoshkaSAE(D, F, k, matryoshka_sizes(F))
    else:
        raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS + SOFT_VARIANTS + FAMILY_VARIANTS}")
    if state is not None:
        with torch.no_grad():
            for name in PARAMS:
                getattr(model, name).copy_(state[0][name])
        x = state[1]
    else:
        x = torch.randn(B, D, generator=torch.Generator().manual_seed(seed + 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)

    bf16 = variant == "ours_regularized_bf16"

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(x)
        loss = out.loss if isinstance(out, S.SAEOutput) else out[0]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def time_interleaved(shape, steps: int, warmup: int, state=None, variants=VARIANTS) -> dict:
    fns = {v: make(v, *shape, state=state) for v in variants}
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {v: [] for v in variants}
    for _ in range(steps):
        for v, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[v].append(time.perf_counter() - t0)
    return times


def init_state(shape, shift: float = 0.0):
    """The initialisation ``make`` gives our Top-k SAE (the same scheme for every architecture) and
    its Gaussian batch, with ``b_enc`` lowered by ``shift``: (weights, batch)."""
    torch.manual_seed(0)
    sae = S.TopKSAE(shape[1], shape[2], shape[3], check_inputs=False)
    x0 = torch.randn(shape[0], shape[1], generator=torch.Generator().manual_seed(1))
    weights = {n: getattr(sae, n).detach().clone() for n in PARAMS}
    weights["b_enc"] = weights["b_enc"] - shift
    return weights, x0


def peak_memory_mb(variant: str, shape, steps: int = 2, shift: float | None = None) -> float:
    """Growth of the resident set's high-water mark (MB) over a setup-only baseline, in a fresh
    process. VmHWM, not ru_maxrss: the latter carries the parent's peak across exec. ``shift``:
    from :func:`init_state` with that shift (else ``make``'s own initialisation)."""
    state = "None" if shift is None else f"cpu_step.init_state({tuple(shape)!r}, {shift!r})"
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})\n"
            "import cpu_step\n"
            f"fn = cpu_step.make({variant!r}, *{tuple(shape)!r}, state={state})\n"
            "base = cpu_step.vm_hwm_kb()\n"
            f"for _ in range({steps}): fn()\n"
            "print(cpu_step.vm_hwm_kb() - base)\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(res.stdout.strip().splitlines()[-1]) / 1024.0


def vm_hwm_kb() -> int:
    """This process's peak resident set (kB) from /proc/self/status."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))


def environment() -> dict:
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if "model name" in line)
    except (OSError, StopIteration):
        cpu = platform.processor()
    from sparse_sae.ops._registry import backend_for
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__, "sparse_sae": S.__version__,
            "backend": {op: backend_for(op, torch.device("cpu")) for op in
                        ("encode", "select", "penalty_backward", "sparse_decode")},
            "dtype": "float32", "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES, help="B,D,F,k (default: %(default)s)")
    p.add_argument("--steps", type=int, default=7, help="measured steps per variant")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--train-steps", type=int, default=0,
                   help="steps of training before the 'trained' timing (0: time from the initialisation only)")
    p.add_argument("--b-enc-shift", type=float, nargs="*", default=[2.5],
                   help="also time from the initialisation with b_enc lowered by each value: a cheap stand-in for "
                        "the low density of positive pre-activations that training with the penalties reaches "
                        "(the measured density is in the table)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--soft", action="store_true",
                   help="time the soft-penalty SAEs (ReLU + l1, JumpReLU + L0) beside our Top-k step instead of the "
                        "regularized Top-k rows")
    p.add_argument("--family", action="store_true",
                   help="like --soft, for the Gated SAE and Matryoshka Top-k (writes cpu_step_family.*)")
    p.add_argument("--soft-shift", type=float, nargs="*", default=[2.65],
                   help="with --soft: also time from the initialisation with b_enc lowered by each value (2.65: about "
                        "k = 32 active latents per row of F = 8192, a trained-like L0)")
    p.add_argument("--out", type=Path, default=None, help="directory for cpu_step.json and cpu_step.md")
    args = p.parse_args(argv)
    if args.soft or args.family:
        return soft_main(args)
    rows = []
    for spec in args.shapes:
        shape = tuple(int(v) for v in spec.split(","))
        torch.manual_seed(0)  # the initialisation make() gives ours, and its Gaussian batch
        init_sae = S.TopKSAE(shape[1], shape[2], shape[3], check_inputs=False)
        x0 = torch.randn(shape[0], shape[1], generator=torch.Generator().manual_seed(1))
        states = [("init", None, positive_active_density(init_sae, x0))]
        init_weights = {n: getattr(init_sae, n).detach().clone() for n in PARAMS}
        for shift in args.b_enc_shift:  # each shift from the initialisation, not from the previous shift
            weights = {**init_weights, "b_enc": init_weights["b_enc"] - shift}
            with torch.no_grad():
                init_sae.b_enc.copy_(weights["b_enc"])
            states.append((f"init, b_enc - {shift:g}", (weights, x0), positive_active_density(init_sae, x0)))
        if args.train_steps > 0:
            weights, x, density = train_state(*shape, args.train_steps)
            states.append((f"trained {args.train_steps} steps", (weights, x), density))
        for label, state, density in states:
            times = time_interleaved(shape, args.steps, args.warmup, state)
            row = {"B": shape[0], "D": shape[1], "F": shape[2], "k": shape[3], "state": label,
                   "positive_active_density": density}
            for v in VARIANTS:
                ts = sorted(times[v])
                row[v] = {"median_ms": 1e3 * statistics.median(ts), "p20_ms": 1e3 * ts[len(ts) // 5],
                          "p80_ms": 1e3 * ts[min(len(ts) - 1, (4 * len(ts)) // 5)]}
                if not args.no_memory and state is None:  # memory at the initialisation (the dense worst case)
                    row[v]["peak_mb"] = peak_memory_mb(v, shape)
            rows.append(row)
            print(f"done {spec} ({label})", file=sys.stderr)
    env = environment()
    table = markdown(rows, env, args)
    print(table)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "cpu_step.json").write_text(json.dumps({"env": env, "rows": rows}, indent=2) + "\n")
        (args.out / "cpu_step.md").write_text(table + "\n")
    return 0


def markdown(rows, env, args) -> str:
    lines = [f"CPU: {env['cpu']} ({env['cores']} cores, {env['torch_threads']} torch threads); torch {env['torch']}; "
             f"float32; {args.steps} interleaved steps after {args.warmup} warm-up; "
             f"coefficients off={COEF_OFF}, ratio={COEF_RATIO}",
             "",
             "| B | D | F | k | state | h>0 density on A | ours Top-k (ms) | ours regularized (ms) | "
             "ours regularized, bf16 autocast (ms) | dense regularized (ms) | "
             "regularized / Top-k | bf16 / fp32 regularized | dense / ours regularized | peak MB ours reg. | "
             "peak MB dense | memory ratio |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        t = {v: r[v]["median_ms"] for v in VARIANTS}
        mem = [r[v].get("peak_mb") for v in ("ours_regularized", "dense_regularized")]
        mem_cells = [f"{m:.0f}" if m is not None else "not measured" for m in mem]
        ratio = f"{mem[0] / mem[1]:.2f}" if None not in mem and mem[1] > 0 else "not measured"
        dens = f"{r['positive_active_density']:.3f}"
        lines.append(f"| {r['B']} | {r['D']} | {r['F']} | {r['k']} | {r['state']} | {dens} | {t['ours_topk']:.1f} | "
                     f"{t['ours_regularized']:.1f} | {t['ours_regularized_bf16']:.1f} | {t['dense_regularized']:.1f} | "
                     f"{t['ours_regularized'] / t['ours_topk']:.2f}x | "
                     f"{t['ours_regularized_bf16'] / t['ours_regularized']:.2f}x | "
                     f"{t['dense_regularized'] / t['ours_regularized']:.2f}x | "
                     f"{mem_cells[0]} | {mem_cells[1]} | {ratio} |")
    return "\n".join(lines)


def soft_main(args) -> int:
    """The soft-penalty rows: our Top-k step, ReLU + l1 and JumpReLU + L0 (ours and dense), all from
    the same weights and batch, at the initialisation and with b_enc lowered."""
    archs = ("gated", "matryoshka") if args.family else ("relu", "jumprelu")
    variants = ("ours_topk",) + (FAMILY_VARIANTS if args.family else SOFT_VARIANTS)
    rows = []
    for spec in args.shapes:
        shape = tuple(int(v) for v in spec.split(","))
        for shift in [0.0] + list(args.soft_shift):
            state = init_state(shape, shift)
            with torch.no_grad():
                z = (state[1] - state[0]["b_dec"]) @ state[0]["W_enc"].T + state[0]["b_enc"]
                l0 = float((z > 0).sum(1).double().mean())
            label = "init" if shift == 0 else f"init, b_enc - {shift:g}"
            times = time_interleaved(shape, args.steps, args.warmup, state, variants)
            row = {"B": shape[0], "D": shape[1], "F": shape[2], "k": shape[3], "state": label, "relu_l0": l0}
            for v in variants:
                ts = sorted(times[v])
                row[v] = {"median_ms": 1e3 * statistics.median(ts), "p20_ms": 1e3 * ts[len(ts) // 5],
                          "p80_ms": 1e3 * ts[min(len(ts) - 1, (4 * len(ts)) // 5)]}
                if not args.no_memory and v != "ours_topk":
                    row[v]["peak_mb"] = peak_memory_mb(v, shape, shift=shift)
            rows.append(row)
            print(f"done {spec} ({label})", file=sys.stderr)
    env = environment()
    lines = [f"CPU: {env['cpu']} ({env['cores']} cores, {env['torch_threads']} torch threads); torch {env['torch']}; "
             f"float32; {args.steps} interleaved steps after {args.warmup} warm-up; "
             + (f"DecoderNormL1({COEF_L1}) on the Gated SAE's gate (gate_aux weight 1); Matryoshka Top-k with prefixes "
                f"F/8, F/2, F and the state's k" if args.family else
                f"DecoderNormL1({COEF_L1}) for ReLU, L0({COEF_L0}) for JumpReLU (bandwidth 1e-3, thresholds 1e-3)"),
             "",
             "| B | D | F | state | ReLU L0 / row | ours Top-k k=%s (ms) | arch | ours (ms) | dense (ms) | ours / Top-k | "
             "dense / ours | peak MB ours | peak MB dense | memory ratio |" % rows[0]["k"] if rows else "",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for arch in archs:
            o, d, t = r[f"ours_{arch}"], r[f"dense_{arch}"], r["ours_topk"]["median_ms"]
            mo, md = o.get("peak_mb"), d.get("peak_mb")
            mem = (f"{mo:.0f} | {md:.0f} | {mo / md:.2f}" if mo is not None and md else
                   "not measured | not measured | not measured")
            lines.append(f"| {r['B']} | {r['D']} | {r['F']} | {r['state']} | {r['relu_l0']:.1f} | {t:.1f} | {arch} | "
                         f"{o['median_ms']:.1f} | {d['median_ms']:.1f} | {o['median_ms'] / t:.2f}x | "
                         f"{d['median_ms'] / o['median_ms']:.2f}x | {mem} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        name = "cpu_step_family" if args.family else "cpu_step_soft"
        (args.out / f"{name}.json").write_text(json.dumps({"env": env, "rows": rows}, indent=2) + "\n")
        (args.out / f"{name}.md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
