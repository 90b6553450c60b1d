"""The Gated SAE and the Matryoshka Top-k SAE against float64 references written from their
defining formulas (reference.gated_sae_loss_ref, reference.matryoshka_topk_loss_ref, which
decodes each prefix separately): every loss term and every parameter's gradient."""
import json

import pytest
import torch
from conftest import assert_grads_close, rand

import sparse_sae as S
from sparse_sae import reference as R

B, D, F, K = 37, 23, 151, 6


def _randomise(sae, gen, gate_shift=0.0):
    with torch.no_grad():
        for name, p in sae.named_parameters():
            p.copy_(rand(gen, *p.shape, dtype=p.dtype) * 0.3)
        sae.b_enc.add_(gate_shift)


def _grads(loss, params):
    return torch.autograd.grad(loss, params, allow_unused=True)


@pytest.mark.parametrize("regime,gate_shift", [("dense", 0.3), ("sparse", -0.4), ("auto", -0.4)])
@pytest.mark.parametrize("lam,aux_coef,recon_loss", [(0.0, 1.0, "fvu"), (0.2, 1.0, "fvu"), (0.1, 0.3, "mse")])
def test_gated_matches_float64_formula(gen, regime, gate_shift, lam, aux_coef, recon_loss):
    pens = [S.DecoderNormL1(lam)] if lam else []
    sae = S.GatedSAE(D, F, pens, aux_coef=aux_coef, recon_loss=recon_loss, dtype=torch.float64)
    sae.code_regime = regime
    _randomise(sae, gen, gate_shift)
    x = rand(gen, B, D)
    out = sae(x)
    params = [sae.W_enc, sae.b_enc, sae.r_mag, sae.b_mag, sae.W_dec, sae.b_dec]
    want_loss, want_terms, f = R.gated_sae_loss_ref(x, *params, coef_sparsity=lam, coef_aux=aux_coef,
                                                    recon_loss=recon_loss)
    torch.testing.assert_close(out.loss, want_loss, rtol=1e-12, atol=1e-12)
    for name in out.losses:
        torch.testing.assert_close(out.losses[name], want_terms[name], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.dense_code(), f.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.recon, f @ sae.W_dec + sae.b_dec, rtol=1e-12, atol=1e-12)
    assert 0 < float((f > 0).double().mean()) < 1
    got = _grads(out.loss, params)
    want = _grads(want_loss, params)
    assert all(w is not None and torch.count_nonzero(w) > 0 for w in want)   # r_mag, b_gate, b_mag included
    assert_grads_close(got, want, rtol=1e-10, atol=1e-12)


def test_gated_input_gradient_and_code(gen):
    sae = S.GatedSAE(D, F, [S.DecoderNormL1(0.1)], dtype=torch.float64)
    sae.code_regime = "sparse"
    _randomise(sae, gen, -0.3)
    x = rand(gen, B, D).requires_grad_()
    out = sae(x)
    (gx,) = torch.autograd.grad(out.loss, x)
    x2 = x.detach().clone().requires_grad_()
    want_loss, _, f = R.gated_sae_loss_ref(x2, sae.W_enc, sae.b_enc, sae.r_mag, sae.b_mag, sae.W_dec, sae.b_dec,
                                          coef_sparsity=0.1)
    (wx,) = torch.autograd.grad(want_loss, x2)
    torch.testing.assert_close(gx, wx, rtol=1e-10, atol=1e-12)
    values, indices = sae.encode(x.detach())
    assert (values[:, :-1] >= values[:, 1:]).all()                          # descending
    torch.testing.assert_close(sae.dense_code(values, indices), f.detach(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("sizes", [[20], [5, 60, 100], [1, 150], [151]])
@pytest.mark.parametrize("pens", [(), ("off", "ratio")])
def test_matryoshka_matches_float64_prefix_decodes(gen, sizes, pens):
    coef = {"off": 0.2, "ratio": 0.05}
    make = {"off": S.OffSupportL1, "ratio": S.L1L2Ratio}
    sae = S.MatryoshkaTopKSAE(D, F, K, sizes, [make[p](coef[p]) for p in pens], dtype=torch.float64)
    _randomise(sae, gen)
    x = rand(gen, B, D)
    out = sae(x)
    params = [sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec]
    full_sizes = sorted(set(sizes) | {F})
    want, recons = R.matryoshka_topk_loss_ref(x, *params, K, full_sizes)
    _, pen_terms, *_ = R.topk_sae_loss_ref(x, *params, K, coef_off=coef.get("off", 0) if "off" in pens else 0,
                                           coef_ratio=coef["ratio"] if "ratio" in pens else 0)
    for p in pens:
        want = want + coef[p] * pen_terms[{"off": "off_support_l1", "ratio": "l1_l2_ratio"}[p]]
    torch.testing.assert_close(out.loss, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.losses["recon"], R.fvu_ref(x, recons[-1]), rtol=1e-12, atol=1e-12)
    if len(full_sizes) > 1:
        torch.testing.assert_close(out.losses["matryoshka"], sum(R.fvu_ref(x, r) for r in recons[:-1]),
                                   rtol=1e-12, atol=1e-12)
        got_recons = sae.prefix_recons(out.values, out.indices, sae.W_dec, sae.b_dec)
        for g, w in zip(got_recons, recons[:-1]):
            torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
    else:
        assert "matryoshka" not in out.losses
    assert_grads_close(_grads(out.loss, params), _grads(want, params), rtol=1e-10, atol=1e-12)


def test_matryoshka_prefixes_change_the_gradient(gen):
    """The prefix terms are live: the first latents' decoder rows get a different gradient than
    under plain Top-k with the same weights."""
    mat = S.MatryoshkaTopKSAE(D, F, K, [30], dtype=torch.float64)
    _randomise(mat, gen)
    top = S.TopKSAE(D, F, K, dtype=torch.float64)
    top.load_state_dict(mat.state_dict())
    x = rand(gen, B, D)
    g_mat, = _grads(mat(x).loss, [mat.W_dec])
    g_top, = _grads(top(x).loss, [top.W_dec])
    assert not torch.allclose(g_mat[:30], g_top[:30])


@pytest.mark.parametrize("sizes,match", [([40, 20], "strictly increasing"), ([0, 10], "must be"),
                                         ([10, 10], "strictly increasing"), ([], "at least one"),
                                         ("10,20", "sequence"), ([F + 1], "must be")])
def test_matryoshka_bad_sizes(sizes, match):
    with pytest.raises((ValueError, TypeError), match=match):
        S.MatryoshkaTopKSAE(D, F, K, sizes)


def test_gated_bad_config():
    with pytest.raises(ValueError, match="aux_coef"):
        S.GatedSAE(D, F, aux_coef=-1.0)
    with pytest.raises(ValueError, match="does not take"):
        S.GatedSAE(D, F, [S.OffSupportL1(0.1)])


@pytest.mark.parametrize("arch,flags", [("matryoshka", ["--matryoshka-sizes", "12,48", "--k", "4"]),
                                        ("gated", ["--decoder-norm-l1", "0.001"])])
def test_cli_trains_resumes_and_exports(tmp_path, gen, arch, flags):
    import numpy as np

    from sparse_sae.cli import main
    np.save(tmp_path / "acts.npy", rand(gen, 600, 24, dtype=torch.float32).numpy())
    run = tmp_path / "run"
    base = ["train", "--data", str(tmp_path / "acts.npy"), "--architecture", arch, "--n-latents", "96",
            "--batch-size", "64", "--checkpoint-every", "2", "--no-progress", "--out-dir", str(run)]
    assert main(base + flags + ["--steps", "2"]) == 0
    assert main(["train", "--resume", str(run), "--steps", "4", "--no-progress"]) == 0
    sae = S.load(run / "final")
    assert type(sae) is {"matryoshka": S.MatryoshkaTopKSAE, "gated": S.GatedSAE}[arch]
    if arch == "matryoshka":
        assert sae.matryoshka_sizes == (12, 48, 96)
    assert main(["export", str(run), "saelens", str(tmp_path / "lens")]) == 0
    lens = json.loads((tmp_path / "lens" / "cfg.json").read_text())
    assert lens["architecture"] == {"matryoshka": "topk", "gated": "gated"}[arch]
    from sparse_sae.io import from_saelens
    back = from_saelens(tmp_path / "lens")
    x = rand(gen, 9, 24, dtype=torch.float32)
    torch.testing.assert_close(back.eval()(x).dense_code(), sae.eval()(x).dense_code())
