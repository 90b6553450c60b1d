"""``sparse-sae features``: the feature browser's command line (registered by :mod:`sparse_sae.cli`)."""
from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    p = sub.add_parser(
        "features", help="write a static site of each latent's top-activating examples (a feature browser)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="One streaming pass over DATA_DIR with the SAE of RUN_DIR keeps, for each latent, its top "
                    "activations, a random sample of the rest, a histogram and its density (memory bounded by "
                    "latents x examples, not by the data). Then it writes a static site to --out that opens from "
                    "disk: index.html (sortable, filterable table of latents) and one page per latent (top examples "
                    "with each token shaded by the activation, or the image with its patch heatmap; random examples "
                    "from lower quantiles; histogram; nearest latents by decoder cosine). Text and images need the "
                    "examples sidecar that `sparse-sae extract` writes next to the shards.",
        epilog="examples:\n"
               "  sparse-sae features runs/gpt2-6 acts/gpt2-6 --out site/gpt2-6 --latents 500\n"
               "  sparse-sae features runs/dino9 acts/dino9 --out site/dino9 --embeddings clip_emb.npy\n"
               "  sparse-sae features runs/topk acts/x --out site/cmp --compare runs/topk-offl1   # side by side")
    p.add_argument("run_dir", help="run directory (its final/ or latest checkpoint) or saved SAE directory")
    p.add_argument("data_dir", help="the activations (shard directory from `sparse-sae extract`, or .npy)")
    p.add_argument("--out", required=True, help="directory to write the site to (open OUT/index.html)")
    p.add_argument("--latents", type=int, default=None,
                   help="show a reproducible random sample of this many latents (default: all)")
    p.add_argument("--examples", type=int, default=20, help="top examples per latent (default 20)")
    p.add_argument("--embeddings", help="N x E embeddings of the same inputs by an independent encoder (.npy or "
                                        "shards): adds each latent's monosemanticity score")
    p.add_argument("--compare", metavar="RUN_DIR2",
                   help="a second run on the same data: its matched latents under OUT/b and OUT/compare.html")
    p.add_argument("--batch-size", type=int, default=4096, help="rows per forward pass (default 4096)")
    p.add_argument("--seed", type=int, default=0, help="seed of the latent sample and random examples (default 0)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    from sparse_sae.features.build import build_features

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    summary = build_features(args.run_dir, args.data_dir, args.out, latents=args.latents, examples=args.examples,
                             embeddings=args.embeddings, compare=args.compare, batch_size=args.batch_size,
                             seed=args.seed, device=device, progress=not args.no_progress)
    if summary["reason"]:
        print(f"note: {summary['reason']}")
    print(f"{summary['latents']} latents over {summary['rows']} rows ({summary['pass_s']:.1f} s pass); "
          f"open {summary['out']}/index.html" + (f" and {summary['out']}/compare.html" if args.compare else ""))
    return 0
