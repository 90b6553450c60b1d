"""``sparse_sae::threshold_code`` (ReLU and JumpReLU codes) against the reference, and the ReLU
and JumpReLU modules on it against the old dense-autograd path, gradients included."""
import math

import pytest
import torch
from conftest import assert_grads_close, assert_module_backend_matches_reference, rand

import sparse_sae as S
from sparse_sae import reference as R
from sparse_sae.ops.threshold_code import _threshold_code_reference, threshold_code

REGIMES = ["dense", "sparse"]


def _inputs(gen, B, D, F, dtype=torch.float64, shift=0.0, jump=True, bandwidth=0.2):
    x = rand(gen, B, D, dtype=dtype)
    W_enc = rand(gen, F, D, dtype=dtype) / D ** 0.5
    b_enc = rand(gen, F, dtype=dtype, scale=0.3) - shift
    b_dec = rand(gen, D, dtype=dtype, scale=0.1)
    theta = (rand(gen, F, dtype=dtype, scale=0.5).exp() * 0.3) if jump else None   # positive, spread
    return x, W_enc, b_enc, b_dec, theta, bandwidth


# ----------------------------------------------------------------------------- the op, forward
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("jump", [False, True])
@pytest.mark.parametrize("regime", REGIMES)
@pytest.mark.parametrize("B,D,F,shift", [(1, 5, 3, 0.0), (7, 29, 131, 0.0), (45, 13, 1000, 1.5), (300, 33, 70, 0.5)])
def test_cpu_forward_equals_reference(gen, dtype, jump, regime, B, D, F, shift):
    args = _inputs(gen, B, D, F, dtype, shift, jump)
    got = threshold_code(*args, regime=regime)
    want = _threshold_code_reference(*args, regime)
    # the reference's z comes from its own GEMM: compare the selections on the kernel's z
    z = got.z
    torch.testing.assert_close(z, want[8])
    want = _threshold_code_reference(*args[:4], args[4], args[5], regime) if dtype == torch.float64 else want
    from sparse_sae.ops.threshold_code import _code_from_z
    want = _code_from_z(z, args[4], args[5], regime, lambda z, thr, on: R.pack_selected_ref(z, on, 0))
    names = ["values", "indices", "band_values", "band_indices", "n_band", "dense", "l0", "fired"]
    for name, g, w in zip(names, got, want):
        assert torch.equal(g, w), name
    assert got.is_dense == (regime == "dense")
    thr = args[4] if jump else torch.zeros(F, dtype=dtype)
    on = z > thr
    assert torch.equal(got.fired, on.sum(0))
    if regime == "sparse":   # the code is exactly the threshold rule
        assert torch.equal(R.dense_code_ref(got.values, got.indices, F), torch.where(on, z, 0))
        assert got.values.shape[1] == max(int(on.sum(1).max()), 1)


@pytest.mark.parametrize("jump", [False, True])
@pytest.mark.parametrize("regime", REGIMES)
def test_opcheck(gen, jump, regime):
    from sparse_sae.ops.threshold_code import _threshold_code
    x, W_enc, b_enc, b_dec, theta, bw = _inputs(gen, 7, 5, 11, jump=jump)
    W_enc.requires_grad_()
    if theta is not None:
        theta.requires_grad_()
    torch.library.opcheck(_threshold_code, (x, W_enc, b_enc, b_dec, theta, bw, regime),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_auto_regime_follows_density(gen):
    x, W_enc, b_enc, b_dec, theta, bw = _inputs(gen, 64, 16, 300)
    assert threshold_code(x, W_enc, b_enc, b_dec, None).is_dense                  # about half active
    assert not threshold_code(x, W_enc, b_enc - 3.0, b_dec, None).is_dense        # a few percent


@pytest.mark.parametrize("bad,match", [
    (dict(theta=torch.ones(4, dtype=torch.float64)), r"theta must have shape \(9,\)"),
    (dict(bandwidth=0.0), "bandwidth must be a finite positive"),
    (dict(regime="fast"), "regime must be one of"),
    (dict(b_enc=torch.zeros(9)), "must share a dtype"),
    (dict(x=torch.zeros(3, 4, dtype=torch.float64)), r"x must have shape \(\*, 5\)"),
])
def test_bad_input_is_a_clear_error(gen, bad, match):
    x, W_enc, b_enc, b_dec, theta, bw = _inputs(gen, 3, 5, 9)
    kw = dict(x=x, W_enc=W_enc, b_enc=b_enc, b_dec=b_dec, theta=theta, bandwidth=bw, regime="auto")
    kw.update(bad)
    with pytest.raises((ValueError, TypeError), match=match):
        threshold_code(**kw)


# ----------------------------------------------------------------------------- the modules, old vs new
def _old_loss(sae, x, params, log_t, coef_dec, coef_l0):
    """The dense autograd path the modules ran before the fused op (unchanged math)."""
    W_enc, b_enc, W_dec, b_dec = params
    if log_t is None:
        a = R.encode_ref(x, W_enc, b_enc, b_dec)
    else:
        z = R.encode_ref(x, W_enc, b_enc, b_dec, relu=False)
        theta = log_t.exp()
        a = R.jumprelu_ref(z, theta, sae.bandwidth)
    loss = R.fvu_ref(x, a @ W_dec + b_dec)
    if coef_dec:
        loss = loss + coef_dec * (a * W_dec.norm(dim=1)).sum() / x.shape[0]
    if coef_l0:
        loss = loss + coef_l0 * R.l0_ref(z, theta, sae.bandwidth)
    return loss, a


@pytest.mark.parametrize("regime", ["auto", "dense", "sparse"])
@pytest.mark.parametrize("shift", [0.0, 1.2])
@pytest.mark.parametrize("arch", ["relu", "jumprelu"])
@pytest.mark.parametrize("need_dx", [False, True])
def test_module_equals_old_dense_path(gen, regime, shift, arch, need_dx):
    B, D, F = 53, 19, 211
    coef_dec, coef_l0 = 0.1, (0.05 if arch == "jumprelu" else 0.0)
    if arch == "relu":
        sae = S.ReLUSAE(D, F, [S.DecoderNormL1(coef_dec)], dtype=torch.float64)
    else:
        sae = S.JumpReLUSAE(D, F, [S.L0(coef_l0), S.DecoderNormL1(coef_dec)], bandwidth=0.3, dtype=torch.float64)
    sae.code_regime = regime
    with torch.no_grad():
        sae.W_enc.copy_(rand(gen, F, D) / D ** 0.5)
        sae.b_enc.copy_(rand(gen, F, scale=0.3) - shift)
        sae.W_dec.copy_(rand(gen, F, D) / D ** 0.5)
        sae.b_dec.copy_(rand(gen, D, scale=0.1))
        if arch == "jumprelu":
            sae.log_threshold.copy_(rand(gen, F, scale=0.5) + math.log(0.3))
    x = rand(gen, B, D).requires_grad_(need_dx)
    out = sae(x)
    if regime == "sparse":
        assert out._code is None and out._values is not None   # the packed code, no dense code
    out.loss.backward()
    params = [getattr(sae, n).detach().clone().requires_grad_() for n in ("W_enc", "b_enc", "W_dec", "b_dec")]
    log_t = sae.log_threshold.detach().clone().requires_grad_() if arch == "jumprelu" else None
    x2 = x.detach().clone().requires_grad_(need_dx)
    want, a = _old_loss(sae, x2, params, log_t, coef_dec, coef_l0)
    torch.testing.assert_close(out.loss, want)
    wrt = params + ([log_t] if log_t is not None else []) + ([x2] if need_dx else [])
    grads = torch.autograd.grad(want, wrt)
    got = [sae.W_enc.grad, sae.b_enc.grad, sae.W_dec.grad, sae.b_dec.grad]
    got += [sae.log_threshold.grad] if log_t is not None else []
    got += [x.grad] if need_dx else []
    if log_t is not None:
        assert grads[4].abs().sum() > 0   # the band is populated: the threshold gradient is tested
    assert_grads_close(got, grads)
    # the public code: exactly the threshold rule, packed as ops.select packs it
    torch.testing.assert_close(out.dense_code(), a.detach())
    sel = S.ops.select(a.detach(), mode="threshold", threshold=torch.zeros(F, dtype=torch.float64))
    assert torch.equal(out.indices, sel.indices)
    torch.testing.assert_close(out.values, sel.values)   # z from addmm vs matmul + add: rounding
    assert torch.equal(out.fired, (a > 0).sum(0))


@pytest.mark.parametrize("regime", ["dense", "sparse"])
@pytest.mark.parametrize("make", [
    lambda dt: S.ReLUSAE(29, 131, [S.DecoderNormL1(0.1)], dtype=dt),
    lambda dt: S.JumpReLUSAE(29, 131, [S.L0(0.1), S.DecoderNormL1(0.1)], bandwidth=0.3, init_threshold=0.05, dtype=dt),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_module_cpu_backend_equals_reference_backend_in_each_regime(gen, monkeypatch, regime, make, dtype):
    sae = make(dtype)
    sae.code_regime = regime
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(rand(gen, *p.shape, dtype=dtype) * 0.3)
    x = rand(gen, 45, 29, dtype=dtype)
    tol = {} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-5}
    assert_module_backend_matches_reference(sae, x, "cpu", monkeypatch, **tol)


def _on_each_thread_count(fn):
    """``fn()`` run on 1, 2 and 3 threads."""
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(fn())
        return results
    finally:
        torch.set_num_threads(threads)


def test_sparse_step_same_bits_for_any_thread_count(gen):
    """Every gradient of a step in the sparse regime, the threshold's included, is the same bits
    on 1, 2 and 3 threads (fixed chunking, by-latent accumulation in entry order, integer counts)."""
    B, D, F = 301, 67, 1100   # several row blocks, latent chunks and dx row chunks
    sae = S.JumpReLUSAE(D, F, [S.L0(0.1), S.DecoderNormL1(0.1)], bandwidth=0.3, dtype=torch.float32)
    sae.code_regime = "sparse"
    with torch.no_grad():
        sae.W_enc.copy_(rand(gen, F, D, dtype=torch.float32) / D ** 0.5)
        sae.b_enc.copy_(rand(gen, F, dtype=torch.float32, scale=0.3) - 1.0)
        sae.log_threshold.copy_(rand(gen, F, dtype=torch.float32, scale=0.5) + math.log(0.3))
    x = rand(gen, B, D, dtype=torch.float32)

    def step():
        xr = x.clone().requires_grad_()
        sae.zero_grad()
        out = sae(xr)
        out.loss.backward()
        return [out.loss.detach(), xr.grad] + [p.grad.clone() for p in sae.parameters()]

    results = _on_each_thread_count(step)
    names = ["loss", "dx"] + [n for n, _ in sae.named_parameters()]
    for other in results[1:]:
        for name, a, b in zip(names, results[0], other):
            assert torch.equal(a, b), name


@pytest.mark.parametrize("jump", [False, True])
def test_dense_backward_kernel_same_bits_for_any_thread_count(gen, jump):
    """The dense regime's encoder backward (the C++ kernel) is the same bits on 1, 2 and 3
    threads. (The dense regime's decode, ``a @ W_dec``, is ATen's GEMM, whose bits may change
    with the thread count on some BLAS, MKL on Intel among them: README, "Determinism".)"""
    _C = pytest.importorskip("sparse_sae._C")
    B, D, F = 301, 67, 1100
    f32 = {"dtype": torch.float32}
    x, W, b_dec = rand(gen, B, D, **f32), rand(gen, F, D, **f32) / D ** 0.5, rand(gen, D, scale=0.1, **f32)
    z = R.encode_ref(x, W, rand(gen, F, scale=0.3, **f32), b_dec, relu=False)
    theta = (rand(gen, F, scale=0.5, **f32) + math.log(0.3)).exp() if jump else None
    g = rand(gen, B, F, **f32)
    assert (z > 0).double().mean() > 0.3    # a dense code
    results = _on_each_thread_count(lambda: _C.threshold_dense_backward_cpu(x, W, b_dec, z, theta, 0.3, g, True))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


# ----------------------------------------------------------------------------- adaptive sparsity
def _trained_topk_on_demo_data(steps=60, D=32, F=256, k=6):
    from sparse_sae.eval.synthetic import make_synthetic
    data = make_synthetic(n_features=96, d=D, seed=3)
    torch.manual_seed(0)
    sae = S.TopKSAE(D, F, k)
    opt = torch.optim.Adam(sae.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(5)
    for _ in range(steps):
        out = sae(data.sample(256, g))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        sae.normalize_decoder_()
    return sae, data


@pytest.mark.parametrize("target", [None, 3.5, 12])
@pytest.mark.parametrize("batchtopk", [False, True])
def test_to_jumprelu_keeps_mean_l0_on_held_out_demo_rows(target, batchtopk):
    sae, data = _trained_topk_on_demo_data()
    if batchtopk:
        trained = sae
        sae = S.BatchTopKSAE(trained.d_in, trained.n_latents, trained.k)
        sae.load_state_dict(trained.state_dict(), strict=False)
    calib = data.sample(8192, torch.Generator().manual_seed(11))
    held = data.sample(4096, torch.Generator().manual_seed(12))
    jr = sae.to_jumprelu(calib, target)
    assert isinstance(jr, S.JumpReLUSAE) and not jr.training
    want = sae.k if target is None else target
    with torch.no_grad():
        out = jr(held)
        l0 = (out.values > 0).sum(1).double()
        assert abs(float(l0.mean()) - want) <= 0.05 * want
        assert float(l0.std()) > 0      # the number of active latents varies per input
        # every row's code is exactly the threshold rule on the encoder's pre-activations
        code = threshold_code(held, jr.W_enc, jr.b_enc, jr.b_dec, jr.log_threshold.exp(), regime="sparse")
        theta = jr.log_threshold.exp()
        assert torch.equal(out.dense_code(), torch.where(code.z > theta, code.z, 0))
        z64 = R.encode_ref(held.double(), *(t.double() for t in (jr.W_enc, jr.b_enc, jr.b_dec)), relu=False)
        agree = ((z64 > theta.double()) == (out.dense_code() > 0)).double().mean()
        assert agree > 0.9999   # and the same rule on float64 pre-activations, but for rounding at theta


def test_to_jumprelu_rejects_bad_input():
    sae = S.TopKSAE(8, 20, 3)
    with pytest.raises(ValueError, match="data must be a N x 8"):
        sae.to_jumprelu(torch.randn(5, 7))
    with pytest.raises(ValueError, match="target_l0 must be in"):
        sae.to_jumprelu(torch.randn(50, 8), target_l0=0)


def test_eval_reports_adaptive_sparsity():
    from sparse_sae.eval.evaluate import evaluate
    from sparse_sae.eval.report import markdown
    sae, data = _trained_topk_on_demo_data(steps=20)
    rep = evaluate(sae, data.sample(2000, torch.Generator().manual_seed(4)))
    ad = rep["adaptive_sparsity"]
    assert ad["topk"]["l0_spread"] == pytest.approx(0.0, abs=1e-9)   # Top-k: k per row
    assert ad["thresholded"]["l0_spread"] > 0
    assert abs(ad["thresholded"]["l0"] - sae.k) <= 0.1 * sae.k
    assert "Adaptive sparsity" in markdown(rep)
