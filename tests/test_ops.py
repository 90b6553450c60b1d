"""The torch.library ops: registration (opcheck), and forward and backward through the ops
equal plain autograd through the reference formulas, in float64 on awkward shapes."""
import pytest
import torch
from conftest import assert_grads_close, rand, sae_params

import sparse_sae.ops as ops
from sparse_sae import reference as R
from sparse_sae._checks import check_op_args
from sparse_sae.ops._registry import _C

SHAPES = [  # B, D, F, k: tiny, k = 1, k = F, nothing a power of two
    (1, 7, 13, 1),
    (2, 5, 9, 9),
    (7, 5, 13, 3),
    (33, 19, 97, 5),
    (50, 31, 150, 149),
]


def _ops_loss(x, W_enc, b_enc, W_dec, b_dec, k, mode, coef_off, coef_ratio, dead=None, k_aux=0, coef_auxk=0.0):
    code = ops.topk_code(x, W_enc, b_enc, b_dec, k, mode, 0, dead, k_aux)
    recon = ops.sparse_decode(code.values, code.indices, W_dec, b_dec)
    loss = R.fvu_ref(x, recon) + coef_off * code.off_support_l1 + coef_ratio * code.l1_l2_ratio
    if dead is not None:
        e_hat = ops.sparse_decode(code.aux_values, code.aux_indices, W_dec, torch.zeros_like(b_dec))
        loss = loss + coef_auxk * torch.where(dead.any(), R.fvu_ref((x - recon).detach(), e_hat), 0.0)
    return loss, code


@pytest.mark.parametrize("B,D,F,k", SHAPES)
@pytest.mark.parametrize("mode", ["topk", "batchtopk"])
@pytest.mark.parametrize("coefs", [(0.0, 0.0), (0.3, 0.0), (0.0, 0.7), (0.2, 0.05)])
def test_topk_code_matches_dense_autograd(gen, B, D, F, k, mode, coefs):
    if B == 1 or (mode == "batchtopk" and B * k > B * F):
        pytest.skip("FVU needs two rows")
    x = rand(gen, B, D)
    params = sae_params(gen, D, F)
    loss, code = _ops_loss(x, *params, k, mode, *coefs)
    want_loss, losses, recon, values, indices = R.topk_sae_loss_ref(x, *params, k, mode=mode, coef_off=coefs[0],
                                                                    coef_ratio=coefs[1])
    torch.testing.assert_close(loss, want_loss)
    torch.testing.assert_close(code.values, values.detach())
    assert torch.equal(code.indices, indices)
    assert_grads_close(torch.autograd.grad(loss, params), torch.autograd.grad(want_loss, params))


@pytest.mark.parametrize("B,D,F,k", SHAPES[1:])
def test_auxk_gradients_match_dense_autograd(gen, B, D, F, k):
    x = rand(gen, B, D)
    params = sae_params(gen, D, F)
    dead = torch.rand(F, generator=gen) < 0.4
    dead[0] = True
    k_aux = max(1, min(F, D // 2))
    loss, _ = _ops_loss(x, *params, k, "topk", 0.1, 0.1, dead, k_aux, 1 / 32)
    want, *_ = R.topk_sae_loss_ref(x, *params, k, coef_off=0.1, coef_ratio=0.1, dead=dead, k_aux=k_aux,
                                   coef_auxk=1 / 32)
    torch.testing.assert_close(loss, want)
    assert_grads_close(torch.autograd.grad(loss, params), torch.autograd.grad(want, params))


def test_input_gradient_when_x_requires_grad(gen):
    B, D, F, k = 9, 6, 17, 4
    x = rand(gen, B, D).requires_grad_()
    params = sae_params(gen, D, F)
    loss, _ = _ops_loss(x, *params, k, "topk", 0.2, 0.3)
    want, *_ = R.topk_sae_loss_ref(x, *params, k, coef_off=0.2, coef_ratio=0.3)
    assert_grads_close(torch.autograd.grad(loss, [x, *params]), torch.autograd.grad(want, [x, *params]))


def test_rows_with_fewer_than_k_positive_preactivations(gen):
    B, D, F, k = 8, 6, 20, 6
    x = rand(gen, B, D)
    W_enc, b_enc, W_dec, b_dec = sae_params(gen, D, F, requires_grad=False)
    b_enc = (b_enc - 2.5).requires_grad_()   # most pre-activations negative
    params = [W_enc.requires_grad_(), b_enc, W_dec.requires_grad_(), b_dec.requires_grad_()]
    loss, code = _ops_loss(x, *params, k, "topk", 0.2, 0.3)
    assert ((code.values > 0).sum(1) < k).any()
    want, *_ = R.topk_sae_loss_ref(x, *params, k, coef_off=0.2, coef_ratio=0.3)
    assert_grads_close(torch.autograd.grad(loss, params), torch.autograd.grad(want, params))


def test_select_statistics(gen):
    B, F, k = 10, 23, 4
    h = torch.relu(rand(gen, B, F))
    dead = torch.zeros(F, dtype=torch.bool)
    dead[5:12] = True
    s = ops.select(h, k, dead=dead, k_aux=3)
    v, i = R.topk_select_ref(h, k)
    assert torch.equal(s.values, v) and torch.equal(s.indices, i)
    a = R.dense_code_ref(v, i, F)
    assert torch.equal(s.fired, (a > 0).sum(0))
    assert torch.equal(s.active, (a > 0).any(0))
    torch.testing.assert_close(s.n1, (h * s.active).sum(1))
    torch.testing.assert_close(s.n2, (h * s.active).norm(dim=1))
    torch.testing.assert_close(s.threshold, v[:, -1])
    assert bool(dead[s.aux_indices].all())
    torch.testing.assert_close(s.aux_values, torch.topk(h[:, dead], 3).values)


def test_select_rejects_bad_arguments(gen):
    h = torch.relu(rand(gen, 3, 5))
    with pytest.raises(ValueError, match="mode"):
        ops.select(h, 2, mode="nope")
    with pytest.raises(ValueError, match="k must be"):
        ops.select(h, 6)
    with pytest.raises(ValueError, match="threshold"):
        ops.select(h, mode="threshold")
    # every mode refuses an empty batch (BatchTopK's kernel read past an empty count vector)
    for mode, kw in [("topk", {}), ("batchtopk", {}), ("threshold", {"threshold": torch.zeros(5)})]:
        with pytest.raises(ValueError, match=r"empty batch \(0 rows\)"):
            ops.select(h[:0], 2, mode, **kw)
    with pytest.raises(ValueError, match=r"h must be a 2-D floating tensor, got \(\(5,\)"):
        ops.select(h[0], 2)
    with pytest.raises(ValueError, match="h must be a 2-D floating tensor"):
        ops.select((h * 10).int(), 2)
    with pytest.raises(ValueError, match=r"threshold must have shape \(5,\), got \(4,\)"):
        ops.select(h, mode="threshold", threshold=torch.zeros(4))
    with pytest.raises(ValueError, match=r"dead must have shape \(5,\)"):
        ops.select(h, 2, dead=torch.zeros(4, dtype=torch.bool), k_aux=1)
    with pytest.raises(TypeError, match="dead must be a bool tensor"):
        ops.select(h, 2, dead=torch.zeros(5), k_aux=1)
    if _C is not None:        # the kernel checks it too, for a caller that skips the op
        with pytest.raises(RuntimeError, match="empty batch"):
            _C.select_cpu(h[:0].contiguous(), 2, "batchtopk", 0, None, None, 0, True, None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("B,F,D,k", [(1, 5, 3, 1), (37, 101, 29, 7), (16, 9, 65, 9)])
def test_sparse_decode_cpu_kernel_matches_reference(gen, dtype, B, F, D, k):
    if _C is None:
        pytest.skip("extension not built")
    values = rand(gen, B, k, dtype=dtype)
    values[0, 0] = 0.0
    indices = torch.randint(0, F, (B, k), generator=gen)
    W_dec, b_dec = rand(gen, F, D, dtype=dtype), rand(gen, D, dtype=dtype)
    got = _C.sparse_decode_cpu(values, indices, W_dec, b_dec)
    torch.testing.assert_close(got, R.sparse_decode_ref(values, indices, W_dec, b_dec))


def test_sparse_decode_cpu_kernel_checks_its_arguments(gen):
    if _C is None:
        pytest.skip("extension not built")
    W, b = rand(gen, 5, 3, dtype=torch.float32), rand(gen, 3, dtype=torch.float32)
    with pytest.raises(RuntimeError, match="indices must be int64"):
        _C.sparse_decode_cpu(rand(gen, 2, 2, dtype=torch.float32), torch.zeros(2, 2, dtype=torch.int32), W, b)
    with pytest.raises(RuntimeError, match="same shape"):
        _C.sparse_decode_cpu(rand(gen, 2, 2, dtype=torch.float32), torch.zeros(2, 3, dtype=torch.int64), W, b)


def _sample_calls(gen):
    B, D, F, k = 6, 5, 11, 3
    x = rand(gen, B, D)
    W_enc, b_enc, W_dec, b_dec = sae_params(gen, D, F)
    h = R.encode_ref(x, W_enc, b_enc, b_dec).detach()
    s = ops.select(h, k)
    dead = torch.arange(F) % 2 == 0
    yield torch.ops.sparse_sae.encode.default, (x, W_enc, b_enc, b_dec, True)
    yield torch.ops.sparse_sae.encode.default, (x, W_enc, b_enc, b_dec, False)
    yield torch.ops.sparse_sae.select.default, (h, k, "topk", 0, None, dead, 2)
    yield torch.ops.sparse_sae.select.default, (h, k, "batchtopk", 4, None, None, 0)
    yield torch.ops.sparse_sae.sparse_decode.default, (s.values.clone().requires_grad_(), s.indices, W_dec, b_dec)
    yield torch.ops.sparse_sae.sparse_decode_backward.default, (rand(gen, B, D), s.values, s.indices, W_dec.detach())
    yield torch.ops.sparse_sae.penalty_backward.default, (
        x, W_enc.detach(), b_dec.detach(), h, s.active, s.n1, s.n2, s.indices, rand(gen, B, k),
        torch.tensor(0.1, dtype=torch.float64), torch.tensor(0.2, dtype=torch.float64), 1e-6, True)
    yield torch.ops.sparse_sae.penalty_backward.default, (      # plain Top-k: no h, no penalty terms
        x, W_enc.detach(), b_dec.detach(), None, s.active, s.n1, s.n2, s.indices, rand(gen, B, k), None, None,
        1e-6, False)
    yield torch.ops.sparse_sae.select.default, (h, k, "topk", 0, None, dead, 2, False)
    yield torch.ops.sparse_sae.topk_code.default, (x, W_enc, b_enc, b_dec, k, "topk", 0, dead, 2, 1e-6, True)
    yield torch.ops.sparse_sae.topk_code.default, (x, W_enc, b_enc, b_dec, k, "topk", 0, dead, 2, 1e-6, False)


def test_opcheck_every_op(gen):
    for op, args in _sample_calls(gen):
        torch.library.opcheck(op, args)


# Bad arguments to the public ops raise before any backend runs (the Triton kernels would
# otherwise read out of bounds).
def test_ops_reject_bad_arguments(gen):
    x, W, b_enc, b_dec = (torch.randn(*s, generator=gen) for s in ((5, 7), (11, 7), (11,), (7,)))
    with pytest.raises(ValueError, match=r"encode: x must have shape \(\*, 6\), got \(5, 7\)"):
        ops.encode(x, torch.randn(11, 6, generator=gen), b_enc, b_dec)
    with pytest.raises(ValueError, match="encode: b_enc"):
        ops.encode(x, W, torch.randn(10, generator=gen), b_dec)
    with pytest.raises(ValueError, match="every tensor must be on one device"):  # (a meta input would reach the fake impl)
        check_op_args("encode", {}, {"x": x, "b_dec": b_dec.to("meta")})
    values, indices = torch.rand(5, 3, generator=gen), torch.randint(0, 11, (5, 3), generator=gen)
    for bad in (11, -1):
        idx = indices.clone()
        idx[2, 1] = bad
        with pytest.raises(ValueError, match=r"indices must lie in \[0, 11\)"):
            ops.sparse_decode(values, idx, W, b_dec)
    with pytest.raises(ValueError, match="sparse_decode: indices"):
        ops.sparse_decode(values, indices[:, :2], W, b_dec)
    with pytest.raises(ValueError, match="sparse_decode_backward: grad"):
        ops.sparse_decode_backward(torch.randn(5, 6, generator=gen), values, indices, W)
    h = torch.relu(torch.randn(5, 11, generator=gen))
    active, n = torch.ones(11, dtype=torch.bool), torch.ones(5)
    with pytest.raises(ValueError, match="penalty_backward: h"):
        ops.penalty_backward(x, W, b_dec, h[:, :10], active, n, n, indices, values, None, None, 1e-6, False)
    with pytest.raises(ValueError, match="indices must lie"):
        ops.penalty_backward(x, W, b_dec, h, active, n, n, indices + 11, values, None, None, 1e-6, False)
