"""Reproduce the paper's claims (arXiv:2606.27321) on the demo's synthetic benchmark.

Plain Top-k against Top-k + off-support l1 and Top-k + l1/l2 ratio, at several k and a small
sweep of each coefficient, every run with the demo's data and training budget
(:func:`sparse_sae.eval.demo.run_demo`: 2048 true features in d=192, power-law frequencies,
correlated groups; SAE with 2048 latents; 1000 steps of 128 rows, lr 8e-3). Each trained SAE is
evaluated with :func:`sparse_sae.eval.evaluate` on 4096 held-out rows:

- FVU and L0 at the trained k, and FVU at k' in {k/4, k/2, 2k, 4k};
- ground-truth recovery of the true dictionary (mean max cos, fraction > 0.9, one-to-one
  Hungarian matching score);
- monosemanticity (MS) with the **true sparse code** of each held-out row as the independent
  embedding: ``cos(c_n, c_m)`` is the magnitude-weighted overlap of the true features present
  in two inputs, so a latent scores high when the inputs it fires on share true features.
  This is the ideal "independent encoder": it never sees the SAE's input space (a random
  projection of ``x`` would not be independent of the SAE's input).

A fourth variant, plain Top-k + AuxK (coefficient 1/32; dead after 25600 rows), separates the
regularizers' effect from merely reviving dead latents (the demo trains without AuxK).

Comparison at matched FVU: a regularized run counts as matched when its FVU is within 2%
(relative) of plain Top-k's at the same k and seed.

    .venv/bin/python bench/reproduce_paper.py --threads 1 --out bench/results/paper.md
    # plain Top-k at more k, for the matched-FVU frontier, merged into the same tables:
    .venv/bin/python bench/reproduce_paper.py --threads 1 --ks 5 6 10 12 20 24 --off --ratio --no-auxk \
        --json bench/results/paper_plain.json --merge bench/results/paper.json --out bench/results/paper.md
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

import sparse_sae
from sparse_sae.eval import evaluate
from sparse_sae.eval.synthetic import make_synthetic
from sparse_sae.penalties import AuxK, L1L2Ratio, OffSupportL1
from sparse_sae.saes import TopKSAE
from sparse_sae.training.config import TrainConfig
from sparse_sae.training.data import TensorSource
from sparse_sae.training.trainer import Trainer, input_scale_for

METRICS = ["fvu", "l0", "recovered", "mean_max_cos", "matching_score", "ms_mean", "ms_median",
           "fvu_k/4", "fvu_k/2", "fvu_2k", "fvu_4k", "dead"]


def sample_with_codes(data, n: int, gen: torch.Generator):
    """``n`` rows exactly as ``SyntheticData.sample`` draws them, and their true codes (``n x n_features``)."""
    rows, feats, mags = data.sample_codes(n, gen)
    x = torch.zeros(n, data.d)
    x.index_add_(0, rows, mags[:, None] * data.dictionary[feats])
    x = x + data.noise * torch.randn(n, data.d, generator=gen)
    codes = torch.zeros(n, data.n_features).index_put_((rows, feats), mags, accumulate=True)
    return x, codes


def run_one(data, pool, held, codes, k, penalties, seed, args, auxk=None):
    scale = input_scale_for(pool[:8192])
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                      warmup_steps=max(1, args.steps // 20), decay_start=0.7, grad_clip=1.0, seed=seed,
                      dead_after_tokens=min(50_000, pool.shape[0]), out_dir=None, log_every=max(1, args.steps // 50),
                      progress=False, device="cpu", memory_budget_mb=4096)
    torch.manual_seed(seed)
    sae = TopKSAE(data.d, args.latents, k, penalties, input_scale=scale, auxk=auxk)
    sae.init_b_dec_(pool[:4096])
    stats = Trainer(cfg, TensorSource(pool), sae=sae).fit()
    rep = evaluate(sae, held, embeddings=codes, dictionary=data.dictionary, batch_size=4096)
    curve = {r["k"]: r["fvu"] for r in rep["k_robustness"]["curve"]}
    rec, gt, ms = rep["reconstruction"], rep["recovery"], rep["monosemanticity"]
    row = {"fvu": rec["fvu"], "l0": rec["l0"], "recovered": gt["recovered"], "mean_max_cos": gt["mean_max_cos"],
           "matching_score": gt["matching_score"], "ms_mean": ms.get("mean"), "ms_median": ms.get("median"),
           "dead": stats["dead"], "solver": gt["matching_solver"]}
    for name, f in (("fvu_k/4", 0.25), ("fvu_k/2", 0.5), ("fvu_2k", 2), ("fvu_4k", 4)):
        row[name] = curve.get(min(args.latents, max(1, int(f * k))))
    return row


def mean_sd(vals):
    vals = [v for v in vals if v is not None]
    if not vals:
        return None, None
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ks", type=int, nargs="+", default=[4, 8, 16])
    p.add_argument("--off", type=float, nargs="*", default=[0.005, 0.02, 0.08], help="off-support l1 coefficients")
    p.add_argument("--ratio", type=float, nargs="*", default=[0.0025, 0.01, 0.04], help="l1/l2 ratio coefficients")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--latents", type=int, default=2048)
    p.add_argument("--lr", type=float, default=8e-3)
    p.add_argument("--auxk-dead-after", type=int, default=25_600,
                   help="the AuxK baseline: rows without firing after which a latent is dead (default 25600)")
    p.add_argument("--no-auxk", action="store_true", help="skip the Top-k + AuxK baseline")
    p.add_argument("--auxk-all", action="store_true", help="train every variant with AuxK (1/32)")
    p.add_argument("--merge", nargs="*", default=[], metavar="JSON",
                   help="runs of earlier invocations (their JSON) to include in the tables, e.g. plain Top-k at "
                        "more k for the matched-FVU interpolation")
    p.add_argument("--render-only", action="store_true", help="train nothing: render the --merge runs to --out")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--match", type=float, default=0.02, help="relative FVU tolerance for 'matched' (default 0.02)")
    p.add_argument("--out", default="bench/results/paper.md")
    p.add_argument("--json", default=None, help="also write every run as JSON (default: OUT with .json)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    variants = [("top-k", "none", 0.0)] + ([] if args.no_auxk else [("top-k + AuxK", "auxk", 1 / 32)]) + [("off-support l1", "off", c) for c in args.off] + \
               [("l1/l2 ratio", "ratio", c) for c in args.ratio]
    runs = []
    for seed in ([] if args.render_only else args.seeds):
        data = make_synthetic(n_features=2048, d=192, seed=seed)
        pool = data.sample(args.steps * args.batch_size, torch.Generator().manual_seed(seed + 1))
        held, codes = sample_with_codes(data, 4096, torch.Generator().manual_seed(seed + 2))
        for k in args.ks:
            for name, kind, coef in variants:
                pens = {"none": [], "auxk": [], "off": [OffSupportL1(coef)], "ratio": [L1L2Ratio(coef)]}[kind]
                auxk = (AuxK(1 / 32, dead_after_tokens=args.auxk_dead_after)
                        if kind == "auxk" or args.auxk_all else None)
                t = time.perf_counter()
                row = run_one(data, pool, held, codes, k, pens, seed, args, auxk)
                row.update(seed=seed, k=k, variant=name, coef=coef, seconds=round(time.perf_counter() - t, 1))
                runs.append(row)
                print(f"seed {seed} k {k:>2} {name:<15} {coef:<7g} fvu {row['fvu']:.4f} recov {row['recovered']:.3f} "
                      f"match {row['matching_score']:.3f} ms {row['ms_mean']:.4f} fvu@k/2 {row['fvu_k/2']:.3f} "
                      f"fvu@2k {row['fvu_2k']:.4f} ({row['seconds']} s)", flush=True)
    elapsed = time.perf_counter() - t0
    out = Path(args.out)
    if runs:
        Path(args.json or out.with_suffix(".json")).write_text(json.dumps(runs, indent=1) + "\n")
    for path in args.merge:
        runs = json.loads(Path(path).read_text()) + runs
    out.write_text(render(runs, args, elapsed))
    print(f"wrote {out} ({elapsed / 60:.1f} min)")


def render(runs, args, elapsed) -> str:
    """The Markdown results: per k, every variant averaged over seeds, with the FVU gap to plain Top-k."""
    cmd = "python bench/reproduce_paper.py " + " ".join(sys.argv[1:]) if sys.argv[1:] else \
        "python bench/reproduce_paper.py"
    lines = ["# Reproducing the paper's claims on the synthetic benchmark", "",
             f"Command: `{cmd}`  ", f"Environment: sparse_sae {sparse_sae.__version__}, torch {torch.__version__}, "
             f"Python {platform.python_version()}, CPU ({os.cpu_count()} cores, {args.threads} thread(s)), "
             f"float32; {len(runs)} runs" + (f" (this invocation: {elapsed / 60:.1f} min)" if not args.render_only
                                               else " (times per run in the JSON)") + ".  ",
             f"Setup: demo data (2048 true features in d=192), SAE with {args.latents} latents, {args.steps} steps of "
             f"{args.batch_size} rows, lr {args.lr}; seeds {sorted({r['seed'] for r in runs})} (data and init), mean over seeds "
             f"(± sd where shown). Evaluated on 4096 held-out rows. MS: true sparse codes as the independent "
             f"embedding. Matching: {runs[0]['solver']}.", "",
             "Columns: `dFVU` = relative FVU gap to plain Top-k at the same k (mean over seeds; "
             f"`*` = within {args.match:.0%}, i.e. matched FVU); `recov` = fraction of true features with a "
             "latent at cosine > 0.9; `match` = one-to-one (Hungarian) matching score; `MS` = mean "
             "monosemanticity over latents that fired; `FVU@k/4 ... @4k` = the same SAE run at another "
             "inference k; `dead` = fraction of latents silent for the last 50,000 training rows.", ""]
    head = ["variant", "coef", "FVU", "dFVU", "L0", "recov", "mean max cos", "match", "MS", "FVU@k/4", "FVU@k/2",
            "FVU@2k", "FVU@4k", "FVU@k/2 ÷ FVU", "FVU@2k ÷ FVU", "dead"]
    for k in sorted({r["k"] for r in runs}):
        lines += [f"## k = {k}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        groups = {}
        for r in runs:
            if r["k"] == k:
                groups.setdefault((r["variant"], r["coef"]), []).append(r)
        base = {r["seed"]: r["fvu"] for r in runs if r["k"] == k and r["variant"] == "top-k"}
        for (name, coef), rs in groups.items():
            cells = [name, f"{coef:g}" if name != "top-k" else "-"]
            m, sd = mean_sd([r["fvu"] for r in rs])
            cells.append(f"{m:.4f} ± {sd:.4f}")
            gap = statistics.fmean(r["fvu"] / base[r["seed"]] - 1 for r in rs)
            cells.append("-" if name == "top-k" else f"{gap:+.1%}" + ("*" if abs(gap) <= args.match else ""))
            for key in ("l0", "recovered", "mean_max_cos", "matching_score", "ms_mean"):
                m, sd = mean_sd([r[key] for r in rs])
                cells.append(f"{m:.3f}" if key == "l0" else f"{m:.4f} ± {sd:.4f}" if key in ("recovered", "matching_score", "ms_mean") else f"{m:.4f}")
            for key in ("fvu_k/4", "fvu_k/2", "fvu_2k", "fvu_4k"):
                m, _ = mean_sd([r[key] for r in rs])
                cells.append("-" if m is None else f"{m:.4f}")
            for key in ("fvu_k/2", "fvu_2k"):
                m, _ = mean_sd([r[key] / r["fvu"] if r[key] is not None else None for r in rs])
                cells.append("-" if m is None else f"{m:.3f}")
            cells.append(f"{mean_sd([r['dead'] for r in rs])[0]:.4f}")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    lines += matched_table(runs)
    return "\n".join(lines) + "\n"


def matched_table(runs) -> list:
    """Each regularized setting against plain Top-k at the same FVU: per seed, plain Top-k's metrics
    are interpolated linearly in FVU between the plain runs at neighbouring k (the plain frontier),
    then averaged over seeds. Settings outside the plain runs' FVU range are left out."""
    import numpy as np

    keys = [("recovered", "recov"), ("matching_score", "match"), ("mean_max_cos", "mean max cos"),
            ("ms_mean", "MS")]
    lines = ["## At matched FVU: regularized vs the plain Top-k frontier", "",
             "Plain Top-k trained at each k gives a frontier of (FVU, metric); it is interpolated linearly in FVU "
             "at each regularized run's FVU (same seed), so both sides have the same FVU exactly; `k plain` is "
             "the interpolated k plain Top-k needs for that FVU. Positive differences favour the regularizer.", "",
             "| variant | coef | k | FVU | k plain | " + " | ".join(f"{t} reg / plain" for _, t in keys) + " |",
             "|" + "---|" * (5 + len(keys))]
    seeds = sorted({r["seed"] for r in runs})
    frontier = {}
    for seed in seeds:
        plain = sorted((r for r in runs if r["variant"] == "top-k" and r["seed"] == seed), key=lambda r: r["fvu"])
        frontier[seed] = plain
    groups = {}
    for r in runs:
        if r["variant"] not in ("top-k",):
            groups.setdefault((r["variant"], r["coef"], r["k"]), []).append(r)
    for (name, coef, k), rs in sorted(groups.items(), key=lambda g: (g[0][2], g[0][0], g[0][1])):
        reg, pl, kp = {key: [] for key, _ in keys}, {key: [] for key, _ in keys}, []
        for r in rs:
            fr = frontier.get(r["seed"], [])
            f = [p["fvu"] for p in fr]
            if len(fr) < 2 or not f[0] <= r["fvu"] <= f[-1]:
                break
            kp.append(float(np.interp(r["fvu"], f, [p["k"] for p in fr])))
            for key, _ in keys:
                reg[key].append(r[key])
                pl[key].append(float(np.interp(r["fvu"], f, [p[key] for p in fr])))
        else:
            cells = [name, f"{coef:g}", str(k), f"{statistics.fmean(r['fvu'] for r in rs):.4f}",
                     f"{statistics.fmean(kp):.1f}"]
            for key, _ in keys:
                a, b = statistics.fmean(reg[key]), statistics.fmean(pl[key])
                cells.append(f"{a:.4f} / {b:.4f} ({a - b:+.4f})")
            lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


if __name__ == "__main__":
    main()
