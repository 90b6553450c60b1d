"""Regenerates the README's benchmark table, between ``<!-- bench:start -->`` and
``<!-- bench:end -->``, from the JSON that bench/suite.py writes, with the machine, versions and
command. Devices without a JSON file get a line saying they were not measured.

    python bench/report.py bench/results/suite_cpu.json               # rewrites README.md
    python bench/report.py bench/results/suite_cpu.json --print       # prints the section only
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

START, END = "<!-- bench:start -->", "<!-- bench:end -->"
README = Path(__file__).resolve().parents[1] / "README.md"
sys.path.insert(0, str(Path(__file__).resolve().parent))
from peers.common import VARIANT_TITLES as TITLES  # noqa: E402  (the suite's own names)

IMPL_TITLES = {"ours": "**sparse_sae**", "dense": "dense PyTorch", "sparsify": "sparsify",
               "overcomplete": "overcomplete", "saelens": "SAELens"}


def section(results: list[dict]) -> str:
    devices = {r["env"]["device"].split(":")[0] for r in results}
    parts = []
    for res in results:
        parts.append(device_section(res))
    if "cuda" not in devices:
        parts.append("### GPU\n\nNot measured: no GPU run of `bench/gpu_suite.py` or `bench/gpu_peers.py` has been recorded yet "
                     "(every GPU cell is \"not measured\").")
    return "\n\n".join(parts)


def device_section(res: dict) -> str:
    env, s = res["env"], res["settings"]
    dev = env["device"]
    machine = env.get("gpu") if dev.startswith("cuda") else env["cpu"]
    versions = ", ".join(f"{k} {v}" if v else f"{k} not installed" for k, v in env["versions"].items())
    load = env.get("loadavg_start")
    load_txt = f"; load average {load[0]:.1f} at start, {env['loadavg_end'][0]:.1f} at end" if load else ""
    lines = [f"### {'GPU' if dev.startswith('cuda') else 'CPU'}",
             "",
             f"Machine: {machine} ({env['cores']} cores), {env['torch_threads']} thread{'s' if env['torch_threads'] != 1 else ''} for every row "
             f"(OMP_NUM_THREADS={env.get('omp_num_threads')}){load_txt}; {env['dtype']}; {env['date']}.  ",
             f"Versions: {versions}; Python {env['python']}.  ",
             f"Command: `{res['command']}`, then `python bench/report.py`.  ",
             f"Step: {s['step']}. Median of {s['steps']} interleaved steps after {s['warmup']} warm-up; "
             f"\"vs ours\" is the row's time over ours for the same variant (above 1: slower than ours). "
             f"Peak memory: {s['memory']}. Gradient check: {s['grad_check']} (grad_batch = {s['grad_batch']}).",
             ""]
    shapes = []
    for r in res["rows"]:
        key = (r["B"], r["D"], r["F"], r["k"])
        if key not in shapes:
            shapes.append(key)
    for B, D, F, k in shapes:
        lines += [f"B = {B}, D = {D}, F = {F}, k = {k}:", "",
                  "| variant | implementation | step (ms) | vs ours | peak memory (MB) | W_enc grad rel. error | note |",
                  "|---|---|---|---|---|---|---|"]
        for r in res["rows"]:
            if (r["B"], r["D"], r["F"], r["k"]) != (B, D, F, k):
                continue
            name = IMPL_TITLES.get(r["impl"], r["impl"])
            title = TITLES.get(r["variant"], r["variant"])
            if "skipped" in r:
                lines.append(f"| {title} | {name} | skipped | | | | {r['skipped']} |")
                continue
            mem = f"{r['peak_mb']:.0f}" if "peak_mb" in r else "not measured"
            err = f"{r['grad_rel_error']:.1e}" if "grad_rel_error" in r else "not measured"
            ratio = f"{r['ratio_to_ours']:.2f}" if r.get("ratio_to_ours") is not None else ""
            lines.append(f"| {title} | {name} | {r['median_ms']:.1f} | {ratio} | {mem} | {err} | {r.get('note', '')} |")
        lines += ["", *summary([r for r in res["rows"] if (r["B"], r["D"], r["F"], r["k"]) == (B, D, F, k)]), ""]
    return "\n".join(lines).rstrip()


def summary(rows) -> list[str]:
    """One line per comparison the project targets, computed from the rows of one shape."""
    t = {(r["variant"], r["impl"]): r["median_ms"] for r in rows if "median_ms" in r}
    out = []
    vs_dense = [f"{TITLES[v]} {t[v, 'dense'] / t[v, 'ours']:.2f}x" for v in TITLES if (v, "ours") in t and (v, "dense") in t]
    if vs_dense:
        out.append("Dense PyTorch time over ours: " + ", ".join(vs_dense) + ".")
    peers = [f"{IMPL_TITLES[i]} {t['topk', i] / t['topk', 'ours']:.2f}x" for i in ("sparsify", "overcomplete", "saelens")
             if ("topk", i) in t and ("topk", "ours") in t]
    if peers:
        out.append("Plain Top-k, peer time over ours: " + ", ".join(peers) + ".")
    off = [f"{IMPL_TITLES[r['impl']]} {TITLES[r['variant']]} ({r['grad_rel_error']:.3g})" for r in rows
           if r.get("grad_rel_error", 0) > 1e-6]
    if off:
        out.append("W_enc gradient off the reference (relative error above 1e-6): " + "; ".join(off) + ".")
    return [line + "  " for line in out[:-1]] + out[-1:]


def replace_between(text: str, body: str) -> str:
    if text.count(START) != 1 or text.count(END) != 1 or text.index(START) > text.index(END):
        raise ValueError(f"the README needs exactly one {START} followed by one {END}")
    head, rest = text.split(START)
    _, tail = rest.split(END)
    return f"{head}{START}\n{body}\n{END}{tail}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="+", type=Path, help="suite_*.json files from bench/suite.py")
    p.add_argument("--readme", type=Path, default=README, help="file to update (default: the repository README)")
    p.add_argument("--print", action="store_true", help="print the section instead of writing the README")
    args = p.parse_args(argv)
    results = []
    for path in args.results:
        try:
            results.append(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError) as exc:
            print(f"report: cannot read {path}: {exc}", file=sys.stderr)
            return 1
    body = section(results)
    if args.print:
        print(body)
        return 0
    try:
        args.readme.write_text(replace_between(args.readme.read_text(), body))
    except (OSError, ValueError) as exc:
        print(f"report: {args.readme}: {exc}", file=sys.stderr)
        return 1
    print(f"updated {args.readme}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
