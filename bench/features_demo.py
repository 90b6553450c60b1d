"""The feature browser on the demo's data: the README's screenshot and the pass measurements.

Trains plain Top-k and Top-k + off-support l1 exactly as ``sparse-sae demo`` does (its synthetic
data, 2048 latents, k=8, 1000 steps of 128 rows, lr 8e-3), writes held-out rows as shards with a
``label`` examples sidecar (each row's true features, largest first) and their true sparse codes
as embeddings (the independent encoder for the monosemanticity score, as in
``bench/reproduce_paper.py``), then runs ``sparse-sae features`` on them with the plain run as
the comparison, and screenshots one latent page with headless Chromium.

    .venv/bin/python bench/features_demo.py --out /tmp/features_demo --screenshot docs/features_demo.png
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sparse_sae.eval.demo import VARIANTS  # noqa: E402
from sparse_sae.eval.synthetic import make_synthetic  # noqa: E402
from sparse_sae.io.extract import ShardWriter  # noqa: E402
from sparse_sae.io.sidecar import SidecarWriter  # noqa: E402
from sparse_sae.saes import TopKSAE  # noqa: E402
from sparse_sae.training.config import TrainConfig  # noqa: E402
from sparse_sae.training.data import TensorSource  # noqa: E402
from sparse_sae.training.trainer import Trainer, input_scale_for  # noqa: E402

RUNS = {"topk-offl1": "top-k + off-support l1", "topk": "top-k"}


def train_runs(data, out: Path, steps: int, batch_size: int = 128, n_latents: int = 2048, k: int = 8,
               seed: int = 0, lr: float = 8e-3) -> None:
    """The demo's training (sparse_sae.eval.demo.run_demo) for two of its variants, each saved to out/NAME/final."""
    pool = data.sample(steps * batch_size, torch.Generator().manual_seed(seed + 1))
    scale = input_scale_for(pool[:8192])
    cfg = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, warmup_steps=max(1, steps // 20),
                      decay_start=0.7, grad_clip=1.0, seed=seed, dead_after_tokens=min(50_000, pool.shape[0]),
                      out_dir=None, log_every=max(1, steps // 50), progress=False, device="cpu",
                      memory_budget_mb=4096)
    for name, variant in RUNS.items():
        torch.manual_seed(seed)
        sae = TopKSAE(data.d, n_latents, k, VARIANTS[variant], input_scale=scale)
        sae.init_b_dec_(pool[:4096])
        Trainer(cfg, TensorSource(pool), sae=sae, desc=name).fit()
        sae.save(out / name / "final")


def write_data(data, out: Path, rows: int, seed: int = 0) -> None:
    """Held-out rows as shards + a label sidecar, and their true codes as embeddings.npy."""
    gen = torch.Generator().manual_seed(seed + 2)
    state = gen.get_state()
    r, f, m = data.sample_codes(rows, gen)        # the codes sample() draws with this generator state
    gen.set_state(state)
    x = data.sample(rows, gen)
    codes = torch.zeros(rows, data.n_features)
    codes.index_put_((r, f), m, accumulate=True)
    writer = ShardWriter(out / "acts", shard_rows=4096, metadata={"source": "sparse_sae.eval.synthetic (demo data)"})
    sidecar = SidecarWriter(out / "acts", "label")
    writer.add(x)
    labels = []
    for i in range(rows):
        nz = torch.nonzero(codes[i]).flatten()
        order = nz[torch.argsort(codes[i, nz], descending=True, stable=True)]
        labels.append(" ".join(f"f{int(j)}×{float(codes[i, j]):.2f}" for j in order) or "(no feature)")
    sidecar.add(np.arange(rows)[:, None])
    sidecar.close(labels=labels)
    writer.close()
    np.save(out / "embeddings.npy", codes.numpy())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("/tmp/features_demo"))
    p.add_argument("--rows", type=int, default=8192, help="held-out rows browsed (default 8192)")
    p.add_argument("--steps", type=int, default=1000, help="training steps per run (default 1000, the demo's)")
    p.add_argument("--latents", type=int, default=None, help="latents shown (default all 2048)")
    p.add_argument("--screenshot", type=Path, help="PNG of one latent page (needs chromium)")
    args = p.parse_args()
    data = make_synthetic(n_features=2048, d=192, seed=0)         # the demo's data
    if args.out.exists():
        shutil.rmtree(args.out)
    t0 = time.perf_counter()
    train_runs(data, args.out, args.steps)
    write_data(data, args.out, args.rows)
    print(f"trained and wrote the data in {time.perf_counter() - t0:.0f} s")
    cmd = [sys.executable, "-m", "sparse_sae", "features", str(args.out / "topk-offl1"), str(args.out / "acts"),
           "--out", str(args.out / "site"), "--embeddings", str(args.out / "embeddings.npy"),
           "--compare", str(args.out / "topk"), "--no-progress"]
    if args.latents:
        cmd += ["--latents", str(args.latents)]
    time_bin = shutil.which("time") or "/usr/bin/time"
    if Path(time_bin).exists():
        cmd = [time_bin, "-f", "wall %e s, max RSS %M KiB"] + cmd
    print(" ".join(cmd))
    subprocess.run(cmd, check=True)
    if args.screenshot:
        shoot(args.out / "site", args.screenshot, args.out / "profile")
    return 0


def shoot(site: Path, png: Path, profile: Path) -> None:
    """A screenshot of the latent page whose top examples share a true feature most clearly."""
    page = pick_page(site)
    subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={profile}", "--hide-scrollbars", "--window-size=900,620",
                    f"--screenshot={png.resolve()}", page.as_uri()], check=True, capture_output=True)
    from PIL import Image

    with Image.open(png) as im:            # a 64-colour palette keeps the committed PNG small
        small = im.convert("RGB").quantize(colors=64, method=Image.Quantize.MEDIANCUT)
    small.save(png, optimize=True)
    print(f"screenshot of {page.name} written to {png}")


def pick_page(site: Path) -> Path:
    """A latent page with many firings and examples (the densest latent among those in the upper
    half by monosemanticity): a typical good latent, not a cherry-picked rare one."""
    import html.parser

    class Rows(html.parser.HTMLParser):
        def __init__(self):
            super().__init__()
            self.rows, self.cur = [], None

        def handle_starttag(self, tag, attrs):
            a = dict(attrs)
            if tag == "tr" and "data-dead" in a:
                self.cur = []
                self.rows.append(self.cur)
            elif tag == "td" and self.cur is not None and "data-v" in a:
                self.cur.append(a["data-v"])

    r = Rows()
    r.feed((site / "index.html").read_text())
    rows = [(int(c[0]), float(c[1]), float(c[4])) for c in r.rows if c[4] != "nan"]
    ms_median = sorted(m for _, _, m in rows)[len(rows) // 2]
    latent = max((d, -lat) for lat, d, m in rows if m >= ms_median)[1] * -1
    return site / "latents" / f"{latent}.html"


if __name__ == "__main__":
    sys.exit(main())
