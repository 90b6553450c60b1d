"""``sparse-sae eval``: evaluate a saved SAE on a data source and write the report.

Registered by :mod:`sparse_sae.cli` through :func:`add_parser`.
"""
from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    p = sub.add_parser(
        "eval", help="evaluate a saved SAE on a data source; writes a JSON/Markdown report and plots",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Evaluate a saved SAE on activations (.npy file(s) or safetensors shards): FVU, explained "
                    "variance, MSE, cosine, L0, effective active units, dead fraction, density histogram, and "
                    "FVU/L0 at inference k' in {k/4, k/2, k, 2k, 4k}. With --embeddings (the same inputs "
                    "embedded by an independent encoder): monosemanticity scores. With --labels: small-budget "
                    "probing. With --dictionary (true features): ground-truth recovery. Writes report.json, "
                    "report.md, per-latent .npy arrays and PNG plots to OUT_DIR.",
        epilog="examples:\n"
               "  sparse-sae eval runs/dino9 acts/dino9-val --out-dir eval/dino9\n"
               "  sparse-sae eval runs/dino9/final acts/val --embeddings clip_emb.npy --labels labels.npy "
               "--out-dir eval/a")
    p.add_argument("sae", help="saved SAE directory, run directory (uses final/ or the latest checkpoint) or checkpoint")
    p.add_argument("data", help=".npy file, directory of .npy files, or directory of safetensors shards")
    p.add_argument("--out-dir", required=True, help="where to write the report")
    p.add_argument("--embeddings", help="N x E embeddings of the same inputs by an independent encoder "
                                        "(.npy or shard directory), for the monosemanticity score")
    p.add_argument("--labels", help="N integer labels (.npy), for probing")
    p.add_argument("--dictionary", help="n_features x d_in ground-truth features (.npy/.safetensors/.pt)")
    p.add_argument("--threshold", type=float, default=0.9, help="cosine above which a feature counts as recovered "
                                                                 "(default 0.9)")
    p.add_argument("--batch-size", type=int, default=4096, help="rows per forward pass (default 4096)")
    p.add_argument("--max-rows", type=int, default=None, help="evaluate at most this many rows (default all)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument("--no-plots", action="store_true", help="write no PNG plots")
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    from sparse_sae.eval.evaluate import evaluate
    from sparse_sae.eval.report import markdown, write_report
    from sparse_sae.saes import load
    from sparse_sae.training.checkpoint import resolve_sae_path

    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be positive, got {args.batch_size}")
    if args.max_rows is not None and args.max_rows < 2:
        raise ValueError(f"--max-rows must be at least 2, got {args.max_rows}")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    path = resolve_sae_path(args.sae)
    sae = load(path, device=device)
    report = evaluate(sae, args.data, embeddings=args.embeddings, labels=args.labels, dictionary=args.dictionary,
                      batch_size=args.batch_size, max_rows=args.max_rows, device=device,
                      recovery_threshold=args.threshold)
    report["sae"]["path"] = str(path)
    out = write_report(report, args.out_dir, plots=not args.no_plots)
    print(markdown({k: v for k, v in report.items() if k != "_arrays"}), end="")
    print(f"report written to {out}/report.json and {out}/report.md")
    return 0
