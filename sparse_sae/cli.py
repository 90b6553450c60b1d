"""The ``sparse-sae`` command line."""
from __future__ import annotations

import argparse
import sys


def _demo(args) -> int:
    from sparse_sae.demo import run_demo
    run_demo(steps=args.steps, batch_size=args.batch_size, n_latents=args.latents, k=args.k, seed=args.seed,
             progress=not args.no_progress)
    return 0


def _info(args) -> int:
    from sparse_sae.backends import show_build
    show_build()
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="sparse-sae",
        description="Train sparse autoencoders with fused sparsity regularizers. "
                    "Start with `sparse-sae demo`.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train plain Top-k and the two regularized variants on synthetic data "
                                       "with known features, and print a comparison table")
    demo.add_argument("--steps", type=int, default=600, help="training steps per variant (default 600)")
    demo.add_argument("--batch-size", type=int, default=1024, help="rows per step (default 1024)")
    demo.add_argument("--latents", type=int, default=2048, help="SAE latents (default 2048)")
    demo.add_argument("--k", type=int, default=16, help="active latents per row (default 16)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    demo.set_defaults(func=_demo)
    info = sub.add_parser("info", help="print what was built and which backend each op uses")
    info.set_defaults(func=_info)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
