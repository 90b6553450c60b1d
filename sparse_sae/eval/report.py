"""Writes an evaluation report: ``report.json`` (everything), ``report.md`` (a short table),
per-latent arrays as ``.npy`` (firing frequency, monosemanticity) and PNG plots (k-robustness
curve, MS histogram, latent density histogram). Plots need matplotlib; without it they are
skipped with a message."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from sparse_sae.eval.evaluate import finite_or_none


def _fmt(v, digits=4):
    return "n/a" if v is None else (f"{v:.{digits}g}" if isinstance(v, float) else str(v))


def markdown(report: dict) -> str:
    """A short Markdown summary of ``report``."""
    sae, rec = report["sae"], report["reconstruction"]
    k = f", k={sae['k']}" if "k" in sae else ""
    pens = ", ".join(f"{p['type']}({p['coef']:g})" for p in sae["penalties"]) or "none"
    lines = [f"# SAE evaluation: {sae['class']} ({sae['d_in']} -> {sae['n_latents']}{k}; penalties: {pens})", "",
             f"{report['data']['rows']} rows evaluated.", "",
             "| metric | value |", "|---|---|"]
    for key, label in (("fvu", "FVU"), ("explained_variance", "explained variance (vs per-dim mean)"),
                       ("mse", "MSE"), ("cosine_similarity", "cosine(x, x_hat)"), ("l0", "L0"),
                       ("effective_active_units", "effective active units (l1/l2)^2"),
                       ("dead_fraction", f"dead fraction (over {rec['dead_window_rows']} rows)")):
        lines.append(f"| {label} | {_fmt(rec.get(key))} |")
    ms = report.get("monosemanticity")
    if ms:
        lines.append(f"| monosemanticity: mean / median over {ms['scored']} scored latents | "
                     f"{_fmt(ms.get('mean'))} / {_fmt(ms.get('median'))} |")
        lines.append(f"| latents without MS (never fired: {ms.get('never_fired', 'n/a')}) | {ms['undefined']} |")
    gt = report.get("recovery")
    if gt:
        lines.append(f"| recovery: mean max cos | {_fmt(gt['mean_max_cos'])} |")
        lines.append(f"| recovery: fraction > {gt['threshold']} | {_fmt(gt['recovered'])} |")
        if "matching_score" in gt:
            lines.append(f"| recovery: one-to-one matching score | {_fmt(gt['matching_score'])} |")
    kr = report.get("k_robustness", {})
    if "curve" in kr:
        lines += ["", f"Inference k (trained at {kr['trained_k']}, {kr['rule']} rule):", "",
                  "| k' | FVU | L0 |", "|---|---|---|"]
        lines += [f"| {r['k']} | {_fmt(r['fvu'])} | {_fmt(r['l0'])} |" for r in kr["curve"]]
    ad = report.get("adaptive_sparsity")
    if ad:
        lines += ["", f"Adaptive sparsity: the Top-k encoder and its thresholded form (per-latent thresholds for a mean "
                      f"L0 of {ad['target_l0']} calibrated on {ad['calibration_rows']} rows; {ad['held_out_rows']} "
                      "other rows):", "", "| encoder | FVU | L0 | L0 spread (std / mean) |", "|---|---|---|---|"]
        lines += [f"| {name} | {_fmt(ad[key]['fvu'])} | {_fmt(ad[key]['l0'])} | {_fmt(ad[key]['l0_spread'])} |"
                  for key, name in (("topk", "Top-k"), ("thresholded", "thresholded (JumpReLU)"))]
    pr = report.get("probing")
    if pr:
        lines += ["", f"Probing ({pr['n_classes']} classes, {pr['train_rows']} train / {pr['test_rows']} test rows):",
                  "", "| m latents per class | accuracy (multinomial) | balanced accuracy (one vs rest) |",
                  "|---|---|---|"]
        lines += [f"| {b['m']} | {_fmt(b['accuracy'])} | {_fmt(b['balanced_accuracy_ovr'])} |" for b in pr["budgets"]]
    return "\n".join(lines) + "\n"


def _save(fig, path, dpi) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def plot(report: dict, out_dir: Path) -> list:
    """Writes the PNGs; returns their paths. Raises ImportError without matplotlib."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    kr = report.get("k_robustness", {})
    if "curve" in kr:
        fig, ax = plt.subplots(figsize=(5, 3.6))
        ks = [r["k"] for r in kr["curve"]]
        ax.plot(ks, [r["fvu"] for r in kr["curve"]], marker="o")
        ax.axvline(kr["trained_k"], color="gray", ls=":", label=f"trained k={kr['trained_k']}")
        ax.set(xscale="log", yscale="log", xlabel="inference k", ylabel="FVU", title="robustness to k")
        ax.legend()
        _save(fig, out_dir / "k_robustness.png", 110)
        paths.append(out_dir / "k_robustness.png")
    ms = report.get("_arrays", {}).get("monosemanticity")
    if ms is not None and np.isfinite(ms).any():
        fig, ax = plt.subplots(figsize=(5, 3.6))
        ax.hist(ms[np.isfinite(ms)], bins=50)
        ax.set(xlabel="monosemanticity score", ylabel="latents",
               title=f"MS ({int(np.isnan(ms).sum())} latents without a score)")
        _save(fig, out_dir / "ms_histogram.png", 110)
        paths.append(out_dir / "ms_histogram.png")
    dens = report["reconstruction"]["density"]
    if dens["counts"]:
        fig, ax = plt.subplots(figsize=(5, 3.6))
        e = dens["log10_edges"]
        ax.stairs(dens["counts"], e, fill=True)
        ax.set(xlabel="log10 firing frequency", ylabel="latents",
               title=f"latent density ({dens['never_fired']} never fired)")
        _save(fig, out_dir / "density_histogram.png", 110)
        paths.append(out_dir / "density_histogram.png")
    return paths


def write_report(report: dict, out_dir, plots: bool = True, print_fn=print) -> Path:
    """Writes ``report`` to ``out_dir`` (created); returns the directory."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    arrays = report.get("_arrays", {})
    body = {k: v for k, v in report.items() if k != "_arrays"}
    (out / "report.json").write_text(json.dumps(finite_or_none(body), indent=2) + "\n")
    (out / "report.md").write_text(markdown(finite_or_none(body)))
    for name, arr in arrays.items():
        np.save(out / f"{name}.npy", np.asarray(arr))
    if plots:
        try:
            plot(report, out)
        except ImportError:
            print_fn("plots skipped: matplotlib is not installed (pip install matplotlib)")
    return out
