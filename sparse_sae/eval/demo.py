"""The built-in demo: plain Top-k vs Top-k with each paper penalty on synthetic activations with
known ground-truth features (:mod:`sparse_sae.eval.synthetic`), trained with the same budget; prints a
table and writes a PNG plot."""
from __future__ import annotations

import time

import torch

from sparse_sae import reference
from sparse_sae.eval.recovery import feature_recovery
from sparse_sae.eval.robustness import forward_at_k
from sparse_sae.eval.synthetic import make_synthetic
from sparse_sae.penalties import L1L2Ratio, OffSupportL1
from sparse_sae.saes import TopKSAE
from sparse_sae.training.config import TrainConfig
from sparse_sae.training.data import TensorSource
from sparse_sae.training.trainer import Trainer, input_scale_for

VARIANTS = {
    "top-k": [],
    "top-k + off-support l1": [OffSupportL1(0.02)],
    "top-k + l1/l2 ratio": [L1L2Ratio(0.01)],
}

COLUMNS = [("fvu", "FVU"), ("l0", "L0"), ("dead", "dead"), ("recovered", "recov>0.9"),
           ("mean_max_cos", "mean max cos"), ("fvu_k/2", "FVU@k/2"), ("fvu_2k", "FVU@2k"),
           ("rows_per_s", "rows/s")]


@torch.no_grad()
def evaluate(sae, x, k: int) -> dict:
    """FVU and L0 of ``sae`` on ``x``, and FVU when run at inference k/2 and 2k."""
    row = {}
    for name, kk in (("fvu", k), ("fvu_k/2", max(1, k // 2)), ("fvu_2k", min(sae.n_latents, 2 * k))):
        out = forward_at_k(sae, x, kk)
        row[name] = float(reference.fvu_ref(x, out.recon))
        if kk == k:
            row["l0"] = float(out.l0())
    return row


def format_table(results: dict) -> str:
    """The results as a Markdown table."""
    lines = [f"| {'variant':<24} | " + " | ".join(f"{c:>12}" for _, c in COLUMNS) + " |",
             f"|{'-' * 26}|" + "|".join("-" * 14 for _ in COLUMNS) + "|"]
    for name, row in results.items():
        cells = [f"{row[key]:>12.0f}" if key == "rows_per_s" else f"{row[key]:>12.4f}" for key, _ in COLUMNS]
        lines.append(f"| {name:<24} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: dict, curves: dict, k: int, path) -> None:
    """A PNG with the training FVU curves, FVU against the inference k, and recovery/dead bars."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for name in names:
        steps, fvus = zip(*curves[name]) if curves[name] else ((), ())
        axes[0].plot(steps, fvus, label=name)
        r = results[name]
        axes[1].plot([max(1, k // 2), k, 2 * k], [r["fvu_k/2"], r["fvu"], r["fvu_2k"]], marker="o", label=name)
    axes[0].set(xlabel="step", ylabel="training FVU", yscale="log", title="training")
    axes[1].set(xlabel="inference k", ylabel="held-out FVU", yscale="log", title=f"robustness to k (trained at {k})")
    width = 0.8 / len(names)
    metrics = [("recovered", "recovered (cos>0.9)"), ("mean_max_cos", "mean max cos"), ("dead", "dead fraction")]
    for i, name in enumerate(names):
        axes[2].bar([m + i * width for m in range(len(metrics))], [results[name][key] for key, _ in metrics],
                    width, label=name)
    axes[2].set_xticks([m + width * (len(names) - 1) / 2 for m in range(len(metrics))], [t for _, t in metrics])
    axes[2].set(ylim=(0, 1), title="ground-truth features")
    for ax in axes:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_demo(steps: int = 1000, batch_size: int = 128, n_latents: int = 2048, k: int = 8, seed: int = 0,
             n_features: int = 2048, d: int = 192, lr: float = 8e-3, plot_path: str | None = "sparse_sae_demo.png",
             progress: bool = True, print_fn=print) -> dict:
    """Trains the three variants with the same budget, prints a table, writes the plot; returns the rows."""
    t0 = time.perf_counter()
    data = make_synthetic(n_features=n_features, d=d, seed=seed)
    pool = data.sample(steps * batch_size, torch.Generator().manual_seed(seed + 1))   # each row seen once
    held_out = data.sample(4096, torch.Generator().manual_seed(seed + 2))
    scale = input_scale_for(pool[:8192])
    cfg = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, warmup_steps=max(1, steps // 20),
                      decay_start=0.7, grad_clip=1.0, seed=seed, dead_after_tokens=min(50_000, pool.shape[0]),
                      out_dir=None, log_every=max(1, steps // 50), progress=progress, device="cpu",
                      memory_budget_mb=4096)
    print_fn(f"sparse_sae demo: {data.n_features} ground-truth features in d={data.d} "
             f"(power-law frequencies, correlated groups of {data.group_size}); SAE with {n_latents} latents, "
             f"k={k}; {steps} steps of {batch_size} rows per variant")
    results, curves = {}, {}
    for name, penalties in VARIANTS.items():
        torch.manual_seed(seed)
        sae = TopKSAE(data.d, n_latents, k, penalties, input_scale=scale)
        sae.init_b_dec_(pool[:4096])
        curve = []

        def record(trainer, curve=curve):
            if trainer.step % cfg.log_every == 0:
                curve.append((trainer.step, trainer.metrics["fvu"]))

        stats = Trainer(cfg, TensorSource(pool), sae=sae, on_step=record, desc=name).fit()
        row = evaluate(sae, held_out, k)
        recovery = feature_recovery(sae.W_dec, data.dictionary, matching=False)
        row.update(recovered=recovery["recovered"], mean_max_cos=recovery["mean_max_cos"])
        row["dead"] = stats["dead"]
        row["rows_per_s"] = stats["rows_per_s"]
        results[name], curves[name] = row, curve
        print_fn(f"  {name}: done ({stats['rows_per_s']:.0f} rows/s)")
    print_fn("")
    print_fn(format_table(results))
    print_fn(f"\nFVU and L0 on 4096 held-out rows; dead: latents silent for the last {cfg.dead_after_tokens} "
             f"training rows; recov>0.9: fraction of true features whose best latent has cosine > 0.9; "
             f"FVU@k/2, FVU@2k: the same SAE run at inference k={max(1, k // 2)} and {2 * k}.")
    if plot_path:
        try:
            plot(results, curves, k, plot_path)
            print_fn(f"plot written to {plot_path}")
        except ImportError:
            print_fn("plot skipped: matplotlib is not installed (pip install matplotlib, or rerun `make setup`)")
    print_fn(f"total time {time.perf_counter() - t0:.0f} s")
    return results
