"""Floor times of a training step, stage by stage: a model on paper, not a measurement.

Each stage's floor is ``max(FLOPs / peak FLOP/s, bytes / HBM bandwidth)``, counting the bytes a
stage must move at least once (its inputs read once, its outputs written once; no cache reuse
beyond that, no kernel-launch or synchronisation cost). Stages of a step (DESIGN.md 3):

- encode: ``h = relu((x - b_dec) W_enc^T + b_enc)``: ``2 B D F`` FLOPs; reads x and W_enc, writes h;
- select: one pass over ``h`` (the kernel's radix passes and norms make several);
- decode: gathers ``B k`` decoder rows, writes ``x_hat``;
- decoder backward: ``d_values`` (gathers the rows again) and ``dW_dec`` (``B k`` rows of grad,
  written into a dense ``F x D`` gradient);
- encoder backward, plain Top-k: the sparse ``G^T (x - b_dec)`` (``2 B k D``), a dense ``F x D`` gradient;
- penalty GEMM (regularized only, dense regime): ``2 B D F`` FLOPs; reads ``h`` and ``x``;
- optimizer: Adam on fp32 master weights (read p, g, m, v; write p, m, v: 28 bytes a parameter).

    python bench/roofline.py                                   # the H200 table of bench/RESULTS.md
    python bench/roofline.py --B 4096 --D 768 --F 24576 --k 32 --tflops 989 --tbps 4.8
"""
from __future__ import annotations

import argparse
import itertools

BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
H200 = dict(tflops=989.0, tbps=4.8)   # dense bf16 tensor-core peak; HBM3e bandwidth
STAGES = ("encode", "select", "decode", "decode_bwd", "encode_bwd", "penalty_gemm", "adam")


def stage_floors(B: int, D: int, F: int, k: int, dtype: str = "bf16", tflops: float = H200["tflops"],
                 tbps: float = H200["tbps"]) -> dict[str, float]:
    """Floor time of each stage in milliseconds."""
    s = BYTES[dtype]
    flops_per_ms, bytes_per_ms = tflops * 1e9, tbps * 1e9
    idx = 8   # int64 indices

    def floor(flops: float, nbytes: float) -> float:
        return max(flops / flops_per_ms, nbytes / bytes_per_ms)

    params = 2 * F * D + F + D
    return {
        "encode": floor(2 * B * D * F, (B * D + F * D + B * F) * s),
        "select": floor(0, B * F * s + B * k * (s + idx)),
        "decode": floor(2 * B * k * D, B * k * (D * s + s + idx) + B * D * s),
        "decode_bwd": floor(4 * B * k * D, 2 * B * k * D * s + 2 * B * D * s + F * D * s),
        "encode_bwd": floor(2 * B * k * D, B * k * D * s + B * D * s + F * D * s),
        "penalty_gemm": floor(2 * B * D * F, (B * F + B * D + F * D) * s),
        "adam": floor(0, params * 28),
    }


def step_floors(floors: dict[str, float]) -> tuple[float, float]:
    """(plain Top-k, regularized) step floors in ms: the regularized step adds the penalty GEMM."""
    plain = sum(v for k, v in floors.items() if k != "penalty_gemm")
    return plain, plain + floors["penalty_gemm"]


def table(shapes, dtype: str, tflops: float, tbps: float) -> str:
    head = ("| B | D | F | k | " + " | ".join(f"{s} ms" for s in STAGES) +
            " | plain step ms | regularized step ms | reg / plain |")
    lines = [head, "|" + "---|" * (4 + len(STAGES) + 3)]
    for B, D, F, k in shapes:
        f = stage_floors(B, D, F, k, dtype, tflops, tbps)
        plain, reg = step_floors(f)
        lines.append(f"| {B} | {D} | {F} | {k} | " + " | ".join(f"{f[s]:.3f}" for s in STAGES) +
                     f" | {plain:.3f} | {reg:.3f} | {reg / plain:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--B", type=int, nargs="+", default=[4096])
    p.add_argument("--D", type=int, nargs="+", default=[1024, 4096])
    p.add_argument("--F", type=int, nargs="+", default=[32768, 131072])
    p.add_argument("--k", type=int, nargs="+", default=[32, 128])
    p.add_argument("--dtype", choices=sorted(BYTES), default="bf16")
    p.add_argument("--tflops", type=float, default=H200["tflops"], help="peak dense FLOP/s of the dtype, in TFLOP/s")
    p.add_argument("--tbps", type=float, default=H200["tbps"], help="memory bandwidth in TB/s")
    args = p.parse_args(argv)
    print(f"Floors (a model, not a measurement): {args.dtype}, {args.tflops:g} TFLOP/s, {args.tbps:g} TB/s\n")
    print(table(itertools.product(args.B, args.D, args.F, args.k), args.dtype, args.tflops, args.tbps))


if __name__ == "__main__":
    main()
