"""Every CUDA and Triton kernel once, on small shapes, for compute-sanitizer (memcheck, racecheck)
on a GPU machine; bench/gpu_check.sh runs it. Each launch is checked against the reference, so
a kernel that writes the wrong place fails here too, not only under the sanitizer.

    compute-sanitizer --tool memcheck --error-exitcode 1 python bench/sanitize_kernels.py
    python bench/sanitize_kernels.py --two-gpus OUT   # 2-process NCCL training equals 1 process
"""
from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

import sparse_sae as S
from sparse_sae.ops._registry import _C
from sparse_sae.ops.group_by_latent import group_by_latent

select_mod = importlib.import_module("sparse_sae.ops.select")


def check_select(h, k, mode="topk", width=0, threshold=None, dead=None, k_aux=0):
    got = select_mod._select_cuda(h, k, mode, width, threshold, dead, k_aux)
    want = select_mod._select_reference(h.cpu(), k, mode, width, None if threshold is None else threshold.cpu(),
                                        None if dead is None else dead.cpu(), k_aux)
    for i in (0, 1, 4, 7, 8):   # values, indices, fired, aux values and indices
        assert torch.equal(got[i].cpu(), want[i].to(got[i].dtype)), (mode, width, k_aux, i)


def selections(gen):
    F = _C.max_select + 100   # one row above the candidate buffer
    h = torch.relu(torch.randn(6, F, generator=gen) - 1.0)
    h[1] = torch.rand(F, generator=gen) + 3.0
    h = ((h * 64).round() / 64).cuda()
    dead = (torch.rand(F, generator=gen) < 0.3).cuda()
    check_select(h, 32, dead=dead, k_aux=48)
    check_select(h, 32, dead=torch.zeros_like(dead), k_aux=48)   # AuxK skipped: nothing dead
    check_select(h.bfloat16(), 17, "batchtopk", 40)
    check_select(h, 0, "threshold", 0, torch.full((F,), 0.5, device="cuda"))
    check_select(h[[0, 2, 3]].contiguous(), 0, "threshold", 0, torch.full((F,), 0.5, device="cuda"))
    idx = torch.randint(0, 1000, (64, 9), generator=gen).cuda()
    start, entries = group_by_latent(idx, 1000, keep=(idx % 3) > 0)
    assert int(start[-1]) == int(((idx % 3) > 0).sum())


def triton_kernels(gen):
    """A Top-k SAE step with both penalties and AuxK (half of the latents dead) on the Triton
    kernels, in bf16 and fp16, against the reference backend on the same weights."""
    for dtype in (torch.bfloat16, torch.float16):
        sae = S.TopKSAE(192, 3000, 24, [S.OffSupportL1(0.02), S.L1L2Ratio(0.01)],
                        auxk=S.AuxK(k_aux=64, dead_after_tokens=1), dtype=dtype, device="cuda")
        sae.tokens_since_fired.copy_((torch.arange(3000, device="cuda") % 2) * 10)
        x = torch.randn(300, 192, generator=gen).to("cuda", dtype)
        state = {k: v.clone() for k, v in sae.state_dict().items()}
        results = []
        for backend in ("reference", "triton"):
            os.environ["SPARSE_SAE_BACKEND"] = backend
            sae.load_state_dict(state)
            sae.zero_grad()
            out = sae(x)
            out.loss.backward()
            results.append((out.loss.float(), sae.W_enc.grad.float().clone()))
        os.environ.pop("SPARSE_SAE_BACKEND")
        (ref_loss, ref_grad), (loss, grad) = results
        torch.testing.assert_close(loss, ref_loss, rtol=2e-2, atol=2e-2)
        assert (grad - ref_grad).norm() <= 5e-2 * ref_grad.norm(), dtype


def two_gpus(out: Path):
    """The trainer on 2 GPUs (torchrun, NCCL) against 1 process on the same global batch."""
    out.mkdir(parents=True, exist_ok=True)
    data = out / "acts.npy"
    np.save(data, np.random.default_rng(0).standard_normal((4096, 64)).astype(np.float32))
    flags = [f"--data={data}", "--n-latents=512", "--k=8", "--batch-size=512", "--steps=20", "--warmup-steps=2",
             "--no-progress", "--device=cuda", "--no-autocast"]
    one = subprocess.run([sys.executable, "-m", "sparse_sae", "train", *flags, f"--out-dir={out / 'one'}"])
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "sparse_sae", "train", *flags, f"--out-dir={out / 'two'}"])
    assert one.returncode == 0 and two.returncode == 0
    a, b = S.load(out / "one" / "final"), S.load(out / "two" / "final")
    for name, t in a.state_dict().items():
        torch.testing.assert_close(b.state_dict()[name], t, rtol=1e-4, atol=1e-5, msg=name)
    print("2 GPUs (NCCL) = 1 GPU: ok")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--two-gpus", type=Path, default=None, metavar="OUT")
    args = p.parse_args()
    if args.two_gpus is not None:
        two_gpus(args.two_gpus)
        return
    assert torch.cuda.is_available() and _C is not None and _C.with_cuda, "needs a GPU and the CUDA build"
    gen = torch.Generator().manual_seed(0)
    selections(gen)
    triton_kernels(gen)
    torch.cuda.synchronize()
    print("every kernel ran and matched the reference")


if __name__ == "__main__":
    main()
