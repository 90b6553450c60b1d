"""The public SAE modules against the dense-autograd oracle, and their API contract."""
import math

import pytest
import torch
from conftest import assert_grads_close, rand

import sparse_sae as S
from sparse_sae import reference as R

D, F, K, B = 19, 97, 5, 33


def _copy_params(sae):
    return [p.detach().clone().requires_grad_() for p in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec)]


def _randomise(sae, gen):
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(rand(gen, *p.shape, dtype=p.dtype) * 0.3)


@pytest.mark.parametrize("cls", [S.TopKSAE, S.BatchTopKSAE])
@pytest.mark.parametrize("pens", [(), ("off",), ("ratio",), ("off", "ratio", "dec")])
def test_topk_family_matches_dense_oracle(gen, cls, pens):
    coefs = {"off": 0.3, "ratio": 0.05, "dec": 0.02}
    make = {"off": S.OffSupportL1, "ratio": S.L1L2Ratio, "dec": S.DecoderNormL1}
    sae = cls(D, F, K, [make[p](coefs[p]) for p in pens], dtype=torch.float64)
    _randomise(sae, gen)
    x = rand(gen, B, D)
    out = sae(x)
    out.loss.backward()
    params = _copy_params(sae)
    want, losses, recon, values, indices = R.topk_sae_loss_ref(
        x, *params, K, mode=sae.mode, coef_off=coefs["off"] * ("off" in pens),
        coef_ratio=coefs["ratio"] * ("ratio" in pens), coef_decnorm=coefs["dec"] * ("dec" in pens))
    torch.testing.assert_close(out.loss, want)
    assert set(out.losses) == set(losses)
    for key in losses:
        torch.testing.assert_close(out.losses[key], losses[key].to(out.losses[key].dtype))
    torch.testing.assert_close(out.recon, recon)
    assert torch.equal(out.indices, indices)
    assert_grads_close([sae.W_enc.grad, sae.b_enc.grad, sae.W_dec.grad, sae.b_dec.grad],
                       torch.autograd.grad(want, params))


def test_penalty_gradient_reaches_encoder(gen):
    """The trap of fast Top-k code: dropping the dense pre-activation gradient."""
    x = rand(gen, B, D, dtype=torch.float32)
    plain = S.TopKSAE(D, F, K)
    reg = S.TopKSAE(D, F, K, [S.OffSupportL1(1.0)])
    reg.load_state_dict(plain.state_dict())
    plain(x).loss.backward()
    reg(x).loss.backward()
    diff_w = (reg.W_enc.grad - plain.W_enc.grad)
    diff_b = (reg.b_enc.grad - plain.b_enc.grad)
    # rows of latents that are batch active but off the support of some row must move
    h = R.encode_ref(x, reg.W_enc, reg.b_enc, reg.b_dec).detach()
    v, i = R.topk_select_ref(h, K)
    active = R.batch_active_ref(v, i, F)
    off = (active & ~R.support_mask_ref(i, F) & (h > 0)).sum(0)
    expected_b = off.to(torch.float32) / B          # d R_off / d b_enc_j = (#rows off-support, positive) / B
    torch.testing.assert_close(diff_b, expected_b, rtol=1e-4, atol=1e-6)
    assert diff_w[off > 0].abs().sum(1).min() > 0
    assert diff_w[~active].abs().max() == 0


def test_auxk_module_matches_oracle(gen):
    sae = S.TopKSAE(D, F, K, [S.L1L2Ratio(0.1)], auxk=S.AuxK(coef=0.5, k_aux=7, dead_after_tokens=1),
                    dtype=torch.float64)
    _randomise(sae, gen)
    with torch.no_grad():
        sae.tokens_since_fired.copy_(torch.arange(F) % 3)   # latents with 1 or 2 are dead
    dead = sae.dead_mask(1).clone()
    x = rand(gen, B, D)
    out = sae(x)
    out.loss.backward()
    params = _copy_params(sae)
    want, losses, *_ = R.topk_sae_loss_ref(x, *params, K, coef_ratio=0.1, dead=dead, k_aux=7, coef_auxk=0.5)
    torch.testing.assert_close(out.losses["auxk"], losses["auxk"])
    assert_grads_close([sae.W_enc.grad, sae.b_enc.grad, sae.W_dec.grad, sae.b_dec.grad],
                       torch.autograd.grad(want, params))
    # firing was tracked: latents that fired in this batch are reset
    assert torch.equal(sae.tokens_since_fired == 0, out.fired > 0)


def test_relu_sae_with_decoder_norm_l1(gen):
    sae = S.ReLUSAE(D, F, [S.DecoderNormL1(0.1)], dtype=torch.float64)
    _randomise(sae, gen)
    x = rand(gen, B, D)
    out = sae(x)
    out.loss.backward()
    W_enc, b_enc, W_dec, b_dec = params = _copy_params(sae)
    a = R.encode_ref(x, W_enc, b_enc, b_dec)
    recon = a @ W_dec + b_dec
    want = R.fvu_ref(x, recon) + 0.1 * (a * W_dec.norm(dim=1)).sum() / B
    torch.testing.assert_close(out.loss, want)
    assert_grads_close([sae.W_enc.grad, sae.b_enc.grad, sae.W_dec.grad, sae.b_dec.grad],
                       torch.autograd.grad(want, params))
    torch.testing.assert_close(sae.dense_code(out.values, out.indices), a.detach())


def test_jumprelu_sae_with_l0(gen):
    sae = S.JumpReLUSAE(D, F, [S.L0(0.01)], bandwidth=0.05, init_threshold=0.1, dtype=torch.float64)
    _randomise(sae, gen)
    with torch.no_grad():
        sae.log_threshold.fill_(math.log(0.1))
    x = rand(gen, B, D)
    out = sae(x)
    out.loss.backward()
    params = _copy_params(sae)
    log_t = sae.log_threshold.detach().clone().requires_grad_()
    z = R.encode_ref(x, *params[:2], params[3], relu=False)
    theta = log_t.exp()
    a = R.jumprelu_ref(z, theta, 0.05)
    want = R.fvu_ref(x, a @ params[2] + params[3]) + 0.01 * R.l0_ref(z, theta, 0.05)
    torch.testing.assert_close(out.loss, want)
    grads = torch.autograd.grad(want, params + [log_t])
    assert grads[-1].abs().sum() > 0
    assert_grads_close([sae.W_enc.grad, sae.b_enc.grad, sae.W_dec.grad, sae.b_dec.grad, sae.log_threshold.grad],
                       grads)


def test_batchtopk_eval_uses_learned_threshold(gen):
    sae = S.BatchTopKSAE(D, F, K)
    x = rand(gen, 64, D, dtype=torch.float32)
    train_out = sae(x)
    thr = float(sae.threshold)
    assert thr == pytest.approx(float(train_out.values.detach()[train_out.values > 0].min()))
    sae.eval()
    out = sae(x[:5])
    a = sae.dense_code(out.values, out.indices)
    h = R.encode_ref(x[:5], sae.W_enc, sae.b_enc, sae.b_dec).detach()
    torch.testing.assert_close(a, h * (h > thr))


def test_encode_decode_and_dense_code(gen):
    sae = S.TopKSAE(D, F, K)
    x = rand(gen, B, D, dtype=torch.float32)
    values, indices = sae.encode(x)
    assert values.shape == (B, K) and indices.shape == (B, K)
    assert (values[:, :-1] >= values[:, 1:]).all()
    recon = sae.decode(values, indices)
    torch.testing.assert_close(recon, sae(x).recon)
    dense = sae.dense_code(values, indices)
    torch.testing.assert_close(dense @ sae.W_dec + sae.b_dec, recon)


def test_decoder_constraint(gen):
    sae = S.TopKSAE(D, F, K)
    with torch.no_grad():
        sae.W_dec.mul_(rand(gen, F, 1, dtype=torch.float32).abs() + 0.5)
    sae.normalize_decoder_()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(F))
    sae(rand(gen, B, D, dtype=torch.float32)).loss.backward()
    sae.remove_parallel_grad_()
    parallel = (sae.W_dec.grad * sae.W_dec).sum(1)
    assert parallel.abs().max() < 1e-6


def test_init_b_dec_geometric_median(gen):
    from sparse_sae.geometric_median import geometric_median
    sae = S.TopKSAE(D, F, K)
    x = rand(gen, 200, D, dtype=torch.float32)
    sae.init_b_dec_(x)
    torch.testing.assert_close(sae.b_dec.detach(), geometric_median(x))


def test_input_scale_is_transparent_and_folded_at_save(gen, tmp_path):
    sae = S.TopKSAE(D, F, K, [S.OffSupportL1(0.1)], input_scale=3.0, dtype=torch.float64)
    _randomise(sae, gen)
    x = rand(gen, B, D)
    out = sae(x)
    sae.save(tmp_path)
    loaded = S.load(tmp_path)
    assert loaded.input_scale is None
    out2 = loaded(x)
    torch.testing.assert_close(out2.recon, out.recon)
    assert torch.equal(out2.indices, out.indices)


@pytest.mark.parametrize("make", [
    lambda: S.TopKSAE(D, F, K, [S.OffSupportL1(0.1), S.L1L2Ratio(0.2, eps=1e-5)], auxk=S.AuxK(k_aux=4)),
    lambda: S.BatchTopKSAE(D, F, K, [S.DecoderNormL1(0.3)], max_k_per_row=9),
    lambda: S.ReLUSAE(D, F, [S.DecoderNormL1(0.3)], recon_loss="mse"),
    lambda: S.JumpReLUSAE(D, F, [S.L0(0.01)], bandwidth=0.01),
    lambda: S.MatryoshkaTopKSAE(D, F, K, [11, 40], [S.OffSupportL1(0.1)], auxk=S.AuxK(k_aux=4)),
    lambda: S.GatedSAE(D, F, [S.DecoderNormL1(0.3)], aux_coef=0.5),
])
def test_save_load_round_trip_exact(gen, tmp_path, make):
    sae = make()
    _randomise(sae, gen)
    x = rand(gen, B, D, dtype=torch.float32)
    sae(x)                      # moves buffers (firing counts, BatchTopK threshold)
    sae.eval()
    sae.save(tmp_path)
    loaded = S.load(tmp_path).eval()
    assert type(loaded) is type(sae) and loaded.config() == sae.config()
    for (n1, t1), (n2, t2) in zip(sae.state_dict().items(), loaded.state_dict().items()):
        assert n1 == n2 and torch.equal(t1, t2), n1
    torch.testing.assert_close(loaded(x).loss, sae(x).loss, rtol=0, atol=0)
    with pytest.raises(TypeError, match="holds a"):
        (S.ReLUSAE if not isinstance(sae, S.ReLUSAE) else S.TopKSAE).load(tmp_path)


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a saved"):
        S.load(tmp_path)


def test_torch_compile_forward_and_backward(gen):
    torch._dynamo.reset()
    sae = S.TopKSAE(D, F, K, [S.OffSupportL1(0.1), S.L1L2Ratio(0.05)])
    x = rand(gen, B, D, dtype=torch.float32)

    def step(x):
        out = sae(x)
        return out.loss, out.recon

    eager_loss, eager_recon = step(x)
    eager_loss.backward()
    eager_grads = [p.grad.clone() for p in sae.parameters()]
    sae.zero_grad()
    compiled = torch.compile(step, fullgraph=True)
    loss, recon = compiled(x)
    loss.backward()
    torch.testing.assert_close(loss, eager_loss)
    torch.testing.assert_close(recon, eager_recon)
    for g, e in zip([p.grad for p in sae.parameters()], eager_grads):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------------- bad input
def _bad_calls():
    x = torch.randn(8, D)
    yield "2-D", lambda s: s(torch.randn(8, 2, D))
    yield "width", lambda s: s(torch.randn(8, D + 1))
    yield "empty batch", lambda s: s(torch.randn(0, D))
    yield "floating", lambda s: s(torch.randint(0, 3, (8, D)))
    yield "dtype", lambda s: s(x.double())
    yield "NaN or Inf", lambda s: s(torch.where(torch.arange(D) == 3, float("nan"), x))
    yield "NaN or Inf", lambda s: s(torch.where(torch.arange(D) == 3, float("inf"), x))
    yield "torch.Tensor", lambda s: s(x.numpy())
    yield "at least 2 rows", lambda s: s(x[:1])
    yield "on meta", lambda s: s(x.to("meta"))


@pytest.mark.parametrize("match,call", list(_bad_calls()), ids=[m for m, _ in _bad_calls()])
def test_bad_input_is_rejected_before_any_change(match, call):
    sae = S.TopKSAE(D, F, K, [S.OffSupportL1(0.1)], auxk=S.AuxK())
    before = {k: v.clone() for k, v in sae.state_dict().items()}
    with pytest.raises((ValueError, TypeError), match=match):
        call(sae)
    for k, v in sae.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("make,match", [
    (lambda: S.TopKSAE(D, F, 0), "k must be in"),
    (lambda: S.TopKSAE(D, F, F + 1), "k must be in"),
    (lambda: S.TopKSAE(D, F, 2.5), "k must be an int"),
    (lambda: S.TopKSAE(0, F, 1), "d_in"),
    (lambda: S.OffSupportL1(-0.1), "non-negative"),
    (lambda: S.L1L2Ratio(float("nan")), "finite"),
    (lambda: S.DecoderNormL1(float("inf")), "finite"),
    (lambda: S.L0("1"), "real number"),
    (lambda: S.AuxK(coef=-1.0), "non-negative"),
    (lambda: S.TopKSAE(D, F, K, [S.L0(0.1)]), "does not take L0"),
    (lambda: S.ReLUSAE(D, F, [S.OffSupportL1(0.1)]), "does not take OffSupportL1"),
    (lambda: S.TopKSAE(D, F, K, [S.OffSupportL1(0.1), S.OffSupportL1(0.2)]), "twice"),
    (lambda: S.TopKSAE(D, F, K, ["l1"]), "Penalty objects"),
    (lambda: S.TopKSAE(D, F, K, recon_loss="l2"), "recon_loss"),
    (lambda: S.TopKSAE(D, F, K, input_scale=-1.0), "input_scale"),
])
def test_bad_configuration_is_rejected(make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make()


def test_bad_code_in_decode():
    sae = S.TopKSAE(D, F, K)
    v, i = torch.rand(4, K), torch.randint(0, F, (4, K))
    with pytest.raises(ValueError, match="indices must lie"):
        sae.decode(v, i + F)
    with pytest.raises(TypeError, match="int64"):
        sae.decode(v, i.int())
    with pytest.raises(ValueError, match="matching"):
        sae.decode(v, i[:, :2])


def test_package_works_without_extension_and_says_so_once(tmp_path):
    import subprocess
    import sys
    code = (
        "import sys, warnings; sys.modules['sparse_sae._C'] = None\n"
        "warnings.simplefilter('always')\n"
        "import torch, sparse_sae as S\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    sae = S.TopKSAE(8, 30, 3, [S.OffSupportL1(0.1)])\n"
        "    for _ in range(3): sae(torch.randn(5, 8)).loss.backward()\n"
        "msgs = [str(m.message) for m in w if 'extension' in str(m.message)]\n"
        "assert len(msgs) == 1, msgs\n"
        "from sparse_sae.ops._registry import backend_for\n"
        "assert backend_for('sparse_decode', torch.device('cpu')) == 'reference'\n"
        "print('ok')\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr


def test_forced_backend_errors_clearly(monkeypatch):
    from sparse_sae.ops._registry import backend_for
    monkeypatch.setenv("SPARSE_SAE_BACKEND", "triton")
    with pytest.raises(RuntimeError, match="no triton implementation"):
        backend_for("encode", torch.device("cpu"))
    monkeypatch.setenv("SPARSE_SAE_BACKEND", "fast")
    with pytest.raises(ValueError, match="not a backend"):
        backend_for("encode", torch.device("cpu"))
    monkeypatch.setenv("SPARSE_SAE_BACKEND", "reference")
    assert backend_for("sparse_decode", torch.device("cpu")) == "reference"


ALL_ARCHITECTURES = [
    lambda: S.TopKSAE(D, F, K, [S.OffSupportL1(0.1), S.L1L2Ratio(0.05)], auxk=S.AuxK(0.5, dead_after_tokens=1),
                      dtype=torch.float64),
    lambda: S.BatchTopKSAE(D, F, K, [S.OffSupportL1(0.1)], dtype=torch.float64),
    lambda: S.ReLUSAE(D, F, [S.DecoderNormL1(0.1)], dtype=torch.float64),
    lambda: S.JumpReLUSAE(D, F, [S.L0(0.1), S.DecoderNormL1(0.1)], dtype=torch.float64),
    lambda: S.MatryoshkaTopKSAE(D, F, K, [7, 50], [S.L1L2Ratio(0.05)], dtype=torch.float64),
    lambda: S.GatedSAE(D, F, [S.DecoderNormL1(0.1)], dtype=torch.float64),
]


@pytest.mark.parametrize("make", ALL_ARCHITECTURES)
def test_encode_has_no_side_effect_and_takes_one_row(gen, make):
    """``encode`` in training mode changes no buffer (firing statistics, BatchTopK's threshold),
    gives the code ``forward`` gives, and works on a single row (which FVU cannot take)."""
    sae = make()
    _randomise(sae, gen)
    sae.tokens_since_fired.fill_(7)
    x = rand(gen, B, D)
    before = {k: v.clone() for k, v in sae.state_dict().items()}
    values, indices = sae.encode(x)
    for k, v in sae.state_dict().items():
        assert torch.equal(v, before[k]), k
    out = sae(x)
    torch.testing.assert_close(sae.dense_code(values, indices), out.dense_code(), rtol=0, atol=0)
    assert not torch.equal(sae.tokens_since_fired, before["tokens_since_fired"])   # forward does update them
    v1, i1 = sae.encode(x[:1])
    assert v1.shape[0] == i1.shape[0] == 1
    with pytest.raises(ValueError, match="at least 2 rows"):
        sae(x[:1])


@pytest.mark.parametrize("make", ALL_ARCHITECTURES)
def test_loss_weights_the_terms_once(gen, make):
    """``out.loss`` is ``sae.loss(out)``, and ``sae.loss`` is recon + sum of coef * term (+ AuxK),
    written out here from the coefficients; ``penalty_scale`` and ``recon_scale`` scale their parts."""
    sae = make()
    _randomise(sae, gen)
    sae.tokens_since_fired.fill_(5)     # every latent dead for AuxK (dead after 1 row)
    out = sae(rand(gen, B, D))
    terms = out.losses
    rec = terms["recon"] + sum(w * terms[name] for name, w in sae.recon_terms().items())
    pen = sum(p.coef * terms[p.name] for p in sae.penalties)
    aux = sae.auxk.coef * terms["auxk"] if "auxk" in terms else 0.0
    assert set(terms) == ({"recon"} | set(sae.recon_terms()) | {p.name for p in sae.penalties}
                          | ({"auxk"} if "auxk" in terms else set()))
    torch.testing.assert_close(out.loss, rec + pen + aux)
    torch.testing.assert_close(sae.loss(out), out.loss)
    torch.testing.assert_close(sae.loss(out, penalty_scale=0.25, recon_scale=3.0), 3.0 * rec + 0.25 * pen + aux)
    if isinstance(sae, S.TopKSAE) and sae.auxk is not None:
        assert float(terms["auxk"].detach()) > 0    # the AuxK term is live
