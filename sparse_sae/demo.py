"""The built-in demo: plain Top-k vs Top-k with each paper penalty on synthetic activations
with known ground-truth features, trained with the same budget; prints a table."""
from __future__ import annotations

import torch

from sparse_sae import reference
from sparse_sae.modules import TopKSAE
from sparse_sae.penalties import L1L2Ratio, OffSupportL1
from sparse_sae.synthetic import feature_recovery, make_synthetic
from sparse_sae.train import TrainConfig, train

VARIANTS = {
    "top-k": [],
    "top-k + off-support l1": [OffSupportL1(0.02)],
    "top-k + l1/l2 ratio": [L1L2Ratio(0.01)],
}


@torch.no_grad()
def _evaluate(sae, x, k: int) -> dict:
    sae.eval()
    out = sae(x)
    row = {"fvu": float(out.losses["recon"]), "l0": float((out.values > 0).sum(1).float().mean())}
    for name, kk in (("fvu_k/2", max(1, k // 2)), ("fvu_2k", min(sae.n_latents, 2 * k))):
        k0, sae.k = sae.k, kk
        row[name] = float(reference.fvu_ref(x, sae(x).recon))
        sae.k = k0
    sae.train()
    return row


def run_demo(steps: int = 600, batch_size: int = 1024, n_latents: int = 2048, k: int = 16, seed: int = 0,
             progress: bool = True, print_fn=print) -> dict:
    """Trains the three variants and prints a table; returns the rows."""
    torch.manual_seed(seed)
    data = make_synthetic(n_features=1024, d=128, mean_active=10.0, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    pool = data.sample(steps * batch_size // 4 + batch_size, gen)   # each row seen about 4 times
    scale = float(1.0 / pool.norm(dim=1).mean())                    # unit average norm
    held_out = data.sample(4096, torch.Generator().manual_seed(seed + 2))
    cfg = TrainConfig(steps=steps, lr=2e-3, warmup_steps=min(50, steps // 10 + 1), progress=progress)
    print_fn(f"sparse_sae demo: {data.dictionary.shape[0]} true features in d={data.d}, "
             f"SAE with {n_latents} latents, k={k}, {steps} steps of {batch_size} rows")
    results = {}
    for name, penalties in VARIANTS.items():
        torch.manual_seed(seed)
        sae = TopKSAE(data.d, n_latents, k, penalties, input_scale=scale)
        sae.init_b_dec_(pool[:4096])
        order = torch.Generator().manual_seed(seed + 3)

        def batch(step, n=pool.shape[0]):
            return pool[torch.randint(0, n, (batch_size,), generator=order)]

        stats = train(sae, batch, cfg, desc=name)
        row = _evaluate(sae, held_out, k)
        row.update(feature_recovery(sae.W_dec, data.dictionary))
        row["dead"] = stats["dead"]
        row["rows_per_s"] = stats["rows_per_s"]
        results[name] = row
        print_fn(f"  {name}: done ({stats['rows_per_s']:.0f} rows/s)")
    cols = [("fvu", "FVU"), ("l0", "L0"), ("dead", "dead"), ("recovered", "recovered>0.9"),
            ("mean_max_cos", "mean max cos"), ("fvu_k/2", "FVU@k/2"), ("fvu_2k", "FVU@2k"),
            ("rows_per_s", "rows/s")]
    print_fn("")
    print_fn(f"| {'variant':<24} | " + " | ".join(f"{c:>13}" for _, c in cols) + " |")
    print_fn(f"|{'-' * 26}|" + "|".join("-" * 15 for _ in cols) + "|")
    for name, row in results.items():
        cells = [f"{row[key]:>13.0f}" if key == "rows_per_s" else f"{row[key]:>13.4f}" for key, _ in cols]
        print_fn(f"| {name:<24} | " + " | ".join(cells) + " |")
    print_fn("\nFVU on 4096 held-out rows; recovered: fraction of true features whose best latent has "
             "cosine > 0.9; FVU@k/2 and FVU@2k: the same SAE run at another inference k.")
    return results
