"""Autocast reaches the kernels: under ``torch.autocast`` the modules hand the ops bf16 inputs
(autocast itself does not cast a custom op's inputs), the kernels accumulate in fp32, the
parameters and their gradients stay float32, and the step matches the float32 step within
bf16 tolerances. On the CPU here; the same test runs on CUDA tensors when a GPU is there."""
import pytest
import torch
from conftest import rand

import sparse_sae as S

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _step(sae, x, autocast_dtype=None):
    sae.zero_grad()
    with torch.autocast(x.device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
        out = sae(x)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in sae.named_parameters()}


B, D, F, K = 130, 96, 90, 12


def _separated_case(gen, sae):
    """Weights and a batch whose selection bf16 cannot change: orthonormal encoder rows, and each
    row's pre-activations 1.5-3.5 on its K chosen latents and 0.2-0.5 in magnitude elsewhere (bf16
    rounds them by less than 0.02). With near ties, rounding h to bf16 flips selections and moves the
    gradient by far more than bf16's precision in any implementation."""
    q, _ = torch.linalg.qr(rand(gen, D, F, dtype=torch.float64))
    with torch.no_grad():
        sae.W_enc.copy_(q.T.float())
        sae.W_dec.copy_(rand(gen, F, D, dtype=torch.float32) / D ** 0.5)
        sae.b_enc.zero_()
        sae.b_dec.copy_(rand(gen, D, dtype=torch.float32, scale=0.1))
        sae.tokens_since_fired.copy_(torch.arange(F) % 2)
    # off the support, away from 0 too: h = 0 is where the penalties' gradient jumps
    sign = torch.where(torch.rand(B, F, generator=gen) < 0.5, -1.0, 1.0).double()
    a = sign * (0.2 + 0.3 * torch.rand(B, F, generator=gen, dtype=torch.float64))
    chosen = torch.rand(B, F, generator=gen).argsort(1)[:, :K]
    a.scatter_(1, chosen, 1.5 + 2 * torch.rand(B, K, generator=gen, dtype=torch.float64))
    return (a @ q.T).float() + sae.b_dec.detach()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("make", [
    lambda: S.TopKSAE(D, F, K, [S.OffSupportL1(0.3), S.L1L2Ratio(0.1)], auxk=S.AuxK(k_aux=48, dead_after_tokens=1)),
    lambda: S.TopKSAE(D, F, K),
    lambda: S.BatchTopKSAE(D, F, K, [S.OffSupportL1(0.3)]),
    lambda: S.ReLUSAE(D, F, [S.DecoderNormL1(0.05)]),
])
def test_bf16_autocast_step_matches_float32(gen, device, make):
    sae = make()
    x = _separated_case(gen, sae).to(device)
    sae = sae.to(device)
    state = {k: v.clone() for k, v in sae.state_dict().items()}
    want, want_grads = _step(sae, x)
    sae.load_state_dict(state)
    got, got_grads = _step(sae, x, torch.bfloat16)
    # the kernels ran in bf16: the code and the reconstruction come out in bf16
    if isinstance(sae, S.ReLUSAE):
        assert got.dense_code().dtype == torch.bfloat16
    else:
        assert got.recon.dtype == torch.bfloat16
        assert got.values.dtype == torch.bfloat16
        assert torch.equal(got.indices.sort(1).values, want.indices.sort(1).values)   # the same support
    # master weights and their gradients stay float32
    assert all(p.dtype == torch.float32 for p in sae.parameters())
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in got_grads.values())
    torch.testing.assert_close(got.loss.float(), want.loss.float(), rtol=2e-2, atol=2e-3)
    for name, w in want_grads.items():
        err = (got_grads[name] - w).norm() / w.norm().clamp_min(1e-12)
        assert err < 2e-2, (name, float(err))


def test_fp16_autocast_dtype_is_followed(gen):
    """The cast follows the autocast dtype in force, not a fixed one."""
    sae = S.TopKSAE(40, 200, 5, [S.L1L2Ratio(0.1)])
    x = rand(gen, 30, 40, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.float16):
        out = sae(x)
    assert out.values.dtype == torch.float16 and out.recon.dtype == torch.float16
    out.loss.backward()
    assert sae.W_enc.grad.dtype == torch.float32 and torch.isfinite(sae.W_enc.grad).all()
