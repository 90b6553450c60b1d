"""``sparse-sae bench``: the benchmark suite against the peers. The suite and its peer adapters
live in ``bench/`` of a source checkout (they are not installed), so this command works from an
editable install of a checkout and says so otherwise. Arguments pass through to
``bench/suite.py`` (``sparse-sae bench --help`` lists them); ``--report`` then rewrites the
README table with ``bench/report.py``."""
from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parents[2] / "bench"


def _load(name: str):
    path = BENCH_DIR / f"{name}.py"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the benchmark suite lives in bench/ of a source checkout; "
                                "install sparse_sae from a checkout (make setup) to run it")
    if str(BENCH_DIR) not in sys.path:
        sys.path.insert(0, str(BENCH_DIR))     # the suite imports its siblings (peers, cpu_step)
    spec = importlib.util.spec_from_file_location(f"_sparse_sae_bench_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(args) -> int:
    rest = list(args.rest)
    report = "--report" in rest
    if report:
        rest.remove("--report")
    if "-h" in rest or "--help" in rest:
        return _load("suite").main(["--help"], prog="sparse-sae bench")
    suite = _load("suite")
    rc = suite.main(rest, prog="sparse-sae bench")
    if rc or not report:
        return rc
    opts = suite.build_parser().parse_args(rest)  # the suite's own reading of --out and --device
    out = Path(opts.out)
    device = str(opts.device).split(":")[0]
    return _load("report").main([str(out / f"suite_{device}.json")])


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="benchmark against dense PyTorch, sparsify, overcomplete and SAELens "
                                     "(bench/suite.py of a checkout; --report rewrites the README table)",
                       add_help=False, prefix_chars="+")
    p.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    p.set_defaults(func=_run)
