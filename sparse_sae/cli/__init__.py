"""The ``sparse-sae`` command line (also ``python -m sparse_sae``).

Subcommands: ``demo``, ``extract``, ``train``, ``export``, ``import``, ``eval``, ``features``, ``bench``, ``info``.
``eval`` and ``bench`` come from :mod:`sparse_sae.cli.eval` and :mod:`sparse_sae.cli.bench`
(each providing ``add_parser(subparsers)``) when those are installed; until then the
subcommand says it is not available and exits with status 2.

Errors in what the user gave or in the environment (paths, settings, data, a damaged file, a
full disk, a permission) print one line, ``sparse-sae COMMAND: error: ...``, and exit with
status 1; ``--debug`` (or ``SPARSE_SAE_DEBUG=1``) shows the traceback instead. Anything else is a
bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import typing
import warnings

EPILOG = """\
A first session:
  sparse-sae demo                                   # synthetic benchmark, about a minute on 2 CPU cores
  sparse-sae extract facebook/dinov2-small images/ acts/ --layer 9 --tokens patch
  sparse-sae train --data acts/ --k 32 --expansion-factor 16 --steps 20000 --out-dir runs/dino
  sparse-sae train --resume runs/dino               # continue an interrupted run
  sparse-sae export runs/dino/final saelens out/    # or sparsify
  sparse-sae import saelens lens_sae/ my_sae/       # or sparsify: back to sparse_sae
  sparse-sae features runs/dino acts/ --out site/dino --latents 500   # browse each latent's top examples
  torchrun --nproc-per-node 8 -m sparse_sae train --config run.json   # data-parallel

Run `sparse-sae COMMAND --help` for each command's options.
"""


# ---------------------------------------------------------------------------------------- demo / info
def _demo(args) -> int:
    from sparse_sae.eval.demo import run_demo

    run_demo(steps=args.steps, batch_size=args.batch_size, n_latents=args.latents, k=args.k, seed=args.seed,
             plot_path=None if args.no_plot else args.plot, progress=not args.no_progress)
    return 0


def _info(args) -> int:
    from sparse_sae.ops import show_build

    show_build()
    return 0


# ---------------------------------------------------------------------------------------- train
def _flag_type(name: str, default):
    if name == "betas":
        return {"type": float, "nargs": 2, "metavar": ("BETA1", "BETA2")}
    if isinstance(default, bool):
        return {"action": argparse.BooleanOptionalAction}
    if isinstance(default, int):
        return {"type": int}
    if isinstance(default, float):
        return {"type": float}
    if name == "n_latents":
        return {"type": int}
    return {"type": str}


def _add_train_parser(sub) -> None:
    from sparse_sae.training.config import FIELD_DEFAULTS, FIELD_DOCS

    p = sub.add_parser(
        "train", help="train an SAE on activations (a config file and/or flags)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train an SAE on activations from .npy files or safetensors shards.\n\n"
                    "Settings come from --config (JSON or TOML with the option names below, underscores "
                    "instead of dashes), then flags override them. Checkpoints go to OUT_DIR/checkpoints, "
                    "metrics to OUT_DIR/metrics.jsonl, the final SAE to OUT_DIR/final (load it with "
                    "sparse_sae.load). Launch with torchrun for data parallelism.",
        epilog="examples:\n"
               "  sparse-sae train --data acts/ --k 32 --n-latents 16384 --off-support-l1 0.02 --out-dir runs/a\n"
               "  sparse-sae train --config run.toml --steps 50000\n"
               "  sparse-sae train --resume runs/a")
    p.add_argument("--config", help="JSON or TOML file of settings")
    p.add_argument("--resume", metavar="RUN_DIR",
                   help="continue the run in RUN_DIR (or a checkpoint directory) from its last checkpoint; its "
                        "saved settings are used (or --config's, which must agree), and flags may change only "
                        "steps, data location, device and output/logging options")
    groups = {"data": "data", "architecture": "model", "steps": "optimisation", "latent_parallel": "device",
              "out_dir": "output"}
    group = p
    for name, default in FIELD_DEFAULTS.items():
        if name in groups:
            group = p.add_argument_group(groups[name])
        help_text = FIELD_DOCS.get(name, "")
        if "default" not in help_text:
            help_text += f" (default: {'none' if default is None else default})"
        group.add_argument("--" + name.replace("_", "-"), dest=name, default=argparse.SUPPRESS,
                           help=help_text.strip(), **_flag_type(name, default))
    p.set_defaults(func=_train)


def _train(args) -> int:
    from sparse_sae.training.checkpoint import read_checkpoint
    from sparse_sae.training.config import TrainConfig
    from sparse_sae.training.trainer import NonFiniteLossError, Trainer, run_dir_of

    overrides = {k: v for k, v in vars(args).items()
                 if k not in ("config", "resume", "func", "command", "debug")}
    if "betas" in overrides:
        overrides["betas"] = tuple(overrides["betas"])
    resume = args.resume
    if resume:
        ckpt = read_checkpoint(resume)          # the newest intact checkpoint, warning about damaged ones
        resume = ckpt.path
        run_dir = run_dir_of(ckpt.path)
        if run_dir is not None:                 # a resumed run writes into its own directory, wherever it now is
            overrides.setdefault("out_dir", str(run_dir))
    if args.resume and not args.config:
        cfg = TrainConfig.from_dict({**ckpt.train_config, **overrides}, source=f"checkpoint {args.resume}")
    elif args.config:
        cfg = TrainConfig.from_file(args.config, **overrides)
    else:
        cfg = TrainConfig.from_dict(overrides, source="flags")
    if cfg.data is None:
        raise ValueError("no training data: give --data PATH or data in the config file")
    trainer = Trainer(cfg, resume=resume)
    try:
        metrics = trainer.fit()
    except NonFiniteLossError as exc:
        print(f"sparse-sae train: error: {exc}", file=sys.stderr)
        return 1
    finally:
        from sparse_sae.training import distributed
        distributed.shutdown(trainer.ctx)
    if trainer.ctx.is_main:
        summary = ", ".join(f"{k}={metrics[k]:.4g}" for k in ("fvu", "l0", "dead", "rows_per_s") if k in metrics)
        print(f"trained {trainer.step} steps: {summary}")
        if cfg.out_dir is not None:
            print(f"final SAE: {cfg.out_dir}/final  (sparse_sae.load('{cfg.out_dir}/final'))")
    return 0


# ---------------------------------------------------------------------------------------- extract
def _add_extract_parser(sub) -> None:
    p = sub.add_parser(
        "extract", help="save a transformers model's activations at a layer as shards for training",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run a Hugging Face transformers model over a folder of images (DINOv2, CLIP, SigLIP image "
                    "encoders) or a text file (language models, one document per line) and write the "
                    "activations at one layer to safetensors shards in OUT_DIR, ready for `sparse-sae train "
                    "--data OUT_DIR`. Models load from a local directory or the local Hugging Face cache only.",
        epilog="examples:\n"
               "  sparse-sae extract facebook/dinov2-small photos/ acts/dino9 --layer 9 --tokens patch\n"
               "  sparse-sae extract openai/clip-vit-base-patch32 photos/ acts/clip --layer -2 --tokens cls\n"
               "  sparse-sae extract ./my-gpt2 corpus.txt acts/gpt2-6 --layer 6")
    p.add_argument("model", help="model directory or Hugging Face name already in the local cache")
    p.add_argument("inputs", help="image folder (vision) or text file (language)")
    p.add_argument("out_dir", help="output directory for the shards (must hold no shards yet)")
    p.add_argument("--layer", required=True,
                   help="hidden-state index (0 = embeddings, i = residual stream after block i, -1 = last) or a "
                        "module name such as encoder.layer.5.mlp")
    p.add_argument("--tokens", default="all", choices=["all", "cls", "patch"],
                   help="vision models: which tokens to keep (default all); language models keep every token")
    p.add_argument("--batch-size", type=int, default=16, help="inputs per forward pass (default 16)")
    p.add_argument("--shard-rows", type=int, default=65536, help="rows per shard file (default 65536)")
    p.add_argument("--max-length", type=int, default=256, help="language models: tokens per document (default 256)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="model dtype (default float32)")
    p.add_argument("--save-dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="dtype of the saved activations (default float32)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_extract)


def _extract(args) -> int:
    from sparse_sae.io.extract import extract

    meta = extract(args.model, args.inputs, args.out_dir, args.layer, tokens=args.tokens, batch_size=args.batch_size,
                   shard_rows=args.shard_rows, max_length=args.max_length, device=args.device, dtype=args.dtype,
                   save_dtype=args.save_dtype, progress=not args.no_progress)
    print(f"wrote {meta['n_rows']} rows of width {meta['d']} in {meta['n_shards']} shard(s) to {args.out_dir}")
    return 0


# ---------------------------------------------------------------------------------------- export / import
def _add_export_parser(sub) -> None:
    p = sub.add_parser("export", help="write a saved SAE in the SAELens or EleutherAI sparsify format",
                       description="Convert an SAE saved by sparse_sae (e.g. RUN_DIR/final) to another tool's "
                                   "on-disk format, and print what the conversion drops or changes. The input "
                                   "scale is folded into the weights. OUT_DIR must not hold another SAE.")
    p.add_argument("sae", help="directory of a saved sparse_sae SAE (config.json + sae_weights.safetensors), or "
                               "a run directory (its final SAE)")
    p.add_argument("format", choices=["saelens", "sparsify"])
    p.add_argument("out_dir")
    p.add_argument("--hook-name", help="saelens: metadata hook_name (default: the layer that `extract` recorded "
                                       "for the training data, or the one an import kept)")
    p.add_argument("--model-name", help="saelens: metadata model_name (default: the model that `extract` "
                                        "recorded for the training data, or the one an import kept)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier export of the same format in OUT_DIR")
    p.set_defaults(func=_export)


def _export(args) -> int:
    from pathlib import Path

    from sparse_sae.io import interop
    from sparse_sae.saes import CONFIG_FILE, load, saved_activations

    path = Path(args.sae)
    if not (path / CONFIG_FILE).exists() and (path / "final" / CONFIG_FILE).exists():
        path = path / "final"            # a run directory: its final SAE
    sae = load(path)
    lines = []
    if args.format == "saelens":
        names = interop.saelens_names(saved_activations(path))
        if args.hook_name is not None:
            names["hook_name"] = args.hook_name
        if args.model_name is not None:
            names["model_name"] = args.model_name
        interop.to_saelens(sae, args.out_dir, overwrite=args.overwrite, **names)
        for key in ("model_name", "hook_name"):
            value = names[key]
            if value is None:
                lines.append(f"metadata {key}: none recorded for this SAE's data; pass --{key.replace('_', '-')}")
            else:
                where = "given" if getattr(args, key) is not None else "recorded with the SAE"
                lines.append(f"metadata {key}: {value!r} ({where})")
        if args.hook_name is None and str(names["hook_name"]).startswith("hidden_states."):
            lines.append("  (the transformers hidden-state index; pass --hook-name for the hook your SAELens code "
                         "uses, e.g. blocks.8.hook_resid_post)")
    else:
        if args.hook_name is not None or args.model_name is not None:
            raise ValueError("--hook-name and --model-name apply to saelens; sparsify's format has no place for them")
        interop.to_sparsify(sae, args.out_dir, overwrite=args.overwrite)
    print(f"wrote {type(sae).__name__} ({sae.d_in} -> {sae.n_latents}) in {args.format} format to {args.out_dir}")
    for line in lines + interop.export_notes(sae, args.format):
        print(f"  {line}")
    return 0


def _add_import_parser(sub) -> None:
    p = sub.add_parser("import", help="read a SAELens or EleutherAI sparsify SAE and save it as a sparse_sae SAE",
                       description="Convert an SAE saved by SAELens (save_model / save_inference_model) or by "
                                   "sparsify (save_to_disk) to sparse_sae's format (load it with sparse_sae.load), "
                                   "and print what the conversion drops or changes. A config key that might change "
                                   "what the SAE computes and that sparse_sae does not understand is an error.")
    p.add_argument("format", choices=["saelens", "sparsify"])
    p.add_argument("path", help="the SAELens or sparsify SAE directory (cfg.json + weights)")
    p.add_argument("out_dir", help="where to save the sparse_sae SAE (must not hold another SAE)")
    p.add_argument("--overwrite", action="store_true", help="replace a sparse_sae SAE already in OUT_DIR")
    p.set_defaults(func=_import_sae)


def _import_sae(args) -> int:
    from sparse_sae.io import interop

    interop.check_target(args.out_dir, "sparse_sae", args.overwrite)
    imported = (interop.read_saelens if args.format == "saelens" else interop.read_sparsify)(args.path)
    sae = imported.sae
    sae.save(args.out_dir, activations=imported.activations)
    print(f"imported {args.format} SAE as {type(sae).__name__} ({sae.d_in} -> {sae.n_latents}) to {args.out_dir}")
    kept = ", ".join(f"{k}={v!r}" for k, v in imported.activations.items())
    for line in ([f"kept {kept}"] if kept else []) + imported.notes:
        print(f"  {line}")
    return 0


# ---------------------------------------------------------------------------------------- features
def _add_features_parser(sub) -> None:
    from sparse_sae.cli.features import add_parser

    add_parser(sub)


# ---------------------------------------------------------------------------------------- eval / bench
def _unavailable(name: str, reason: str):
    def run(_args) -> int:
        print(f"sparse-sae {name}: not available yet ({reason})", file=sys.stderr)
        return 2
    return run


def _add_optional_parser(sub, name: str, module: str, help_text: str) -> None:
    """Registers ``name`` from ``module.add_parser(subparsers)``, or a stub that explains why not."""
    try:
        mod = importlib.import_module(module)
        add = getattr(mod, "add_parser")
    except ModuleNotFoundError as exc:
        if exc.name is None or not module.startswith(exc.name):
            reason = f"{module} needs {exc.name}: {exc}"
        else:
            reason = f"{module} is not part of this installation"
    except Exception as exc:  # noqa: BLE001 - a broken optional module must not break the other commands
        reason = f"{module} failed to import: {type(exc).__name__}: {exc}"
    else:
        add(sub)
        return
    p = sub.add_parser(name, help=f"{help_text} (not available yet)", add_help=True)
    p.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    p.set_defaults(func=_unavailable(name, reason))


# ---------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sparse-sae", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train sparse autoencoders (Top-k, BatchTopK, ReLU, JumpReLU) with the fused sparsity "
                    "regularizers of arXiv:2606.27321. Start with `sparse-sae demo`.",
        epilog=EPILOG)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = sub.add_parser("demo", help="train plain Top-k and the two regularized variants on synthetic data with "
                                       "known features; print a comparison table and write a plot")
    demo.add_argument("--steps", type=int, default=1000, help="training steps per variant (default 1000)")
    demo.add_argument("--batch-size", type=int, default=128, help="rows per step (default 128)")
    demo.add_argument("--latents", type=int, default=2048, help="SAE latents (default 2048)")
    demo.add_argument("--k", type=int, default=8, help="active latents per row (default 8)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    demo.add_argument("--plot", default="sparse_sae_demo.png", help="PNG to write (default sparse_sae_demo.png)")
    demo.add_argument("--no-plot", action="store_true", help="do not write the plot")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    demo.set_defaults(func=_demo)
    _add_extract_parser(sub)
    _add_train_parser(sub)
    _add_export_parser(sub)
    _add_import_parser(sub)
    _add_optional_parser(sub, "eval", "sparse_sae.cli.eval", "evaluate a saved SAE on a data source")
    _add_features_parser(sub)
    _add_optional_parser(sub, "bench", "sparse_sae.cli.bench", "benchmark the kernels against the peers")
    info = sub.add_parser("info", help="print what was built and which backend each op uses")
    info.set_defaults(func=_info)
    debug_help = "show the full traceback of an error instead of one line"
    parser.add_argument("--debug", action="store_true", help=debug_help)
    for command in sub.choices.values():        # also after the command: sparse-sae train ... --debug
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=debug_help)
    return parser


# Errors of the user's input or of the environment: one line. Everything else is a bug: a traceback.
USER_ERRORS = (ValueError, TypeError, OSError, ImportError)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def main(argv: typing.Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    debug = args.debug or bool(os.environ.get("SPARSE_SAE_DEBUG"))
    with warnings.catch_warnings():
        if not debug:                            # a warning is one line too
            warnings.showwarning = lambda message, *_a, **_k: print(
                f"sparse-sae {args.command}: warning: {_one_line(str(message))}", file=sys.stderr)
        try:
            return args.func(args)
        except USER_ERRORS as exc:
            if debug:
                raise
            print(f"sparse-sae {args.command}: error: {_one_line(str(exc))}", file=sys.stderr)
            return 1


if __name__ == "__main__":
    sys.exit(main())
