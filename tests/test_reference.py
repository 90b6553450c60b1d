"""The reference math against direct, loop-by-loop computations of DESIGN.md section 2."""
import pytest
import torch
from conftest import rand

from sparse_sae import reference as R


def test_topk_tie_rule_goes_to_lower_index():
    h = torch.tensor([[1.0, 2.0, 2.0, 2.0, 0.5], [3.0, 3.0, 3.0, 3.0, 3.0]])
    values, indices = R.topk_select_ref(h, 2)
    assert indices.tolist() == [[1, 2], [0, 1]]
    assert values.tolist() == [[2.0, 2.0], [3.0, 3.0]]


def test_topk_order_is_descending_with_ties_by_index():
    h = torch.tensor([[0.5, 2.0, 1.0, 2.0, 1.0, 0.0]])
    values, indices = R.topk_select_ref(h, 5)
    assert values.tolist() == [[2.0, 2.0, 1.0, 1.0, 0.5]]
    assert indices.tolist() == [[1, 3, 2, 4, 0]]


def test_topk_rows_with_fewer_than_k_positives_select_lowest_zeros():
    h = torch.tensor([[0.0, 0.75, 0.0, 0.0, 0.25, 0.0]])
    values, indices = R.topk_select_ref(h, 4)
    assert indices.tolist() == [[1, 4, 0, 2]]
    assert values.tolist() == [[0.75, 0.25, 0.0, 0.0]]


@pytest.mark.parametrize("B,F,k", [(1, 1, 1), (3, 17, 1), (9, 33, 33), (40, 101, 7)])
def test_topk_matches_torch_topk_without_ties(gen, B, F, k):
    h = torch.relu(rand(gen, B, F))
    h = h + torch.arange(F) * 1e-9 * (h > 0)  # break ties among positives; zeros stay tied
    values, indices = R.topk_select_ref(h, k)
    tv, ti = torch.topk(h, k)
    torch.testing.assert_close(values, tv)
    positive = tv > 0
    assert torch.equal(indices[positive], ti[positive])


def test_batchtopk_selects_b_times_k_largest_with_lower_flat_index_ties(gen):
    h = torch.tensor([[3.0, 1.0, 1.0], [1.0, 5.0, 0.0]])
    values, indices = R.batchtopk_select_ref(h, 2)   # 4 of 6: 5, 3, then the first two 1s
    dense = R.dense_code_ref(values, indices, 3)
    assert dense.tolist() == [[3.0, 1.0, 1.0], [0.0, 5.0, 0.0]]
    assert values.shape == (2, 3) and values[1].tolist() == [5.0, 0.0, 0.0]


@pytest.mark.parametrize("B,F,k", [(5, 23, 2), (16, 61, 9)])
def test_batchtopk_matches_flat_topk(gen, B, F, k):
    h = torch.relu(rand(gen, B, F)) + 1e-3
    values, indices = R.batchtopk_select_ref(h, k)
    dense = R.dense_code_ref(values, indices, F)
    flat = torch.zeros(B * F, dtype=h.dtype)
    top = torch.topk(h.flatten(), B * k)
    flat[top.indices] = top.values
    torch.testing.assert_close(dense, flat.view(B, F))


def test_pack_width_caps_and_pads(gen):
    h = torch.tensor([[0.0, 3.0, 2.0, 1.0], [0.0, 0.0, 0.0, 4.0]])
    values, indices = R.threshold_select_ref(h, torch.tensor(0.5), width=2)
    assert values.tolist() == [[3.0, 2.0], [4.0, 0.0]]
    assert indices[0].tolist() == [1, 2] and indices[1, 0] == 3


def _direct_penalties(h, indices, eps):
    """R_off and R_ratio by loops over rows and latents, straight from DESIGN.md 2."""
    B, F = h.shape
    support = [set(indices[i].tolist()) for i in range(B)]
    a = torch.zeros_like(h)
    for i in range(B):
        for j in support[i]:
            a[i, j] = h[i, j]
    A = [j for j in range(F) if any(a[i, j] > 0 for i in range(B))]
    r_off = sum(float(h[i, j]) for i in range(B) for j in A if j not in support[i]) / B
    r_ratio = 0.0
    for i in range(B):
        l1 = sum(float(h[i, j]) for j in A)
        l2 = sum(float(h[i, j]) ** 2 for j in A) ** 0.5
        r_ratio += l1 / (l2 + eps) if l1 > 0 else 0.0
    return r_off, r_ratio / B, A


@pytest.mark.parametrize("B,F,k", [(1, 9, 1), (6, 21, 3), (11, 37, 36)])
def test_penalties_match_direct_computation(gen, B, F, k):
    h = torch.relu(rand(gen, B, F))
    values, indices = R.topk_select_ref(h, k)
    active = R.batch_active_ref(values, indices, F)
    r_off, r_ratio, A = _direct_penalties(h, indices, R.RATIO_EPS)
    assert sorted(active.nonzero().flatten().tolist()) == A
    assert float(R.off_support_l1_ref(h, R.support_mask_ref(indices, F), active)) == pytest.approx(r_off, rel=1e-12, abs=1e-12)
    assert float(R.l1_l2_ratio_ref(h, active)) == pytest.approx(r_ratio, rel=1e-12)
    n1, n2 = R.active_row_norms_ref(h, active)
    off2, ratio2 = R.penalty_values_from_norms(n1, n2, values)
    assert float(off2) == pytest.approx(r_off, rel=1e-10, abs=1e-12)
    assert float(ratio2) == pytest.approx(r_ratio, rel=1e-12)


@pytest.mark.parametrize("B,F,k", [(4, 15, 2), (13, 40, 5), (3, 8, 8)])
def test_penalty_grad_formula_matches_autograd(gen, B, F, k):
    z = rand(gen, B, F).requires_grad_()
    h = torch.relu(z)
    values, indices = R.topk_select_ref(h.detach(), k)
    active = R.batch_active_ref(values, indices, F)
    loss = 0.3 * R.off_support_l1_ref(h, R.support_mask_ref(indices, F), active) + 0.7 * R.l1_l2_ratio_ref(h, active)
    (want,) = torch.autograd.grad(loss, z)
    n1, n2 = R.active_row_norms_ref(h.detach(), active)
    G = R.penalty_grad_ref(h.detach(), active, n1, n2, torch.tensor(0.3 / B, dtype=z.dtype),
                           torch.tensor(0.7 / B, dtype=z.dtype))
    # the off-support l1 excludes the support: the caller subtracts coef_off there
    G = G.scatter_add(1, indices, -(0.3 / B) * (values > 0).to(G.dtype))
    torch.testing.assert_close(G, want)


def test_ratio_row_without_active_units_contributes_nothing():
    h = torch.tensor([[0.0, 0.0, 0.0], [1.0, 2.0, 0.0]], dtype=torch.float64, requires_grad=True)
    active = torch.tensor([True, True, False])
    r = R.l1_l2_ratio_ref(h, active)
    r.backward()
    assert float(r.detach()) == pytest.approx((3 / (5 ** 0.5 + R.RATIO_EPS)) / 2)
    assert torch.isfinite(h.grad).all() and h.grad[0].abs().sum() == 0


def test_jumprelu_and_l0_straight_through_gradients():
    z = torch.tensor([[0.10, 0.5005, 0.4999, 0.9]], dtype=torch.float64, requires_grad=True)
    theta = torch.tensor([0.5, 0.5, 0.5, 0.5], dtype=torch.float64, requires_grad=True)
    eps = 0.01
    a = R.jumprelu_ref(z, theta, eps)
    assert a.tolist() == [[0.0, 0.5005, 0.0, 0.9]]
    a.sum().backward()
    assert z.grad.tolist() == [[0.0, 1.0, 0.0, 1.0]]
    # d/dtheta = -(theta/eps) K((z - theta)/eps): only entries within eps/2 of theta
    assert theta.grad.tolist() == pytest.approx([0.0, -50.0, -50.0, 0.0])
    z.grad = None
    theta.grad = None
    R.l0_ref(z, theta, eps).backward()
    assert z.grad.abs().sum() == 0
    assert theta.grad.tolist() == pytest.approx([0.0, -100.0, -100.0, 0.0])


def test_fvu_and_mse(gen):
    x = rand(gen, 10, 6)
    assert float(R.fvu_ref(x, x)) == 0.0
    assert float(R.fvu_ref(x, x.mean(0).expand_as(x))) == pytest.approx(1.0)
    assert float(R.mse_ref(x, torch.zeros_like(x))) == pytest.approx(float((x ** 2).mean()))


def test_sparse_decode_backward_matches_autograd(gen):
    B, F, D, k = 7, 19, 11, 4
    values = rand(gen, B, k).requires_grad_()
    indices = torch.stack([torch.randperm(F, generator=gen)[:k] for _ in range(B)])
    W_dec = rand(gen, F, D).requires_grad_()
    b_dec = rand(gen, D)
    grad = rand(gen, B, D)
    out = R.sparse_decode_ref(values, indices, W_dec, b_dec)
    want = torch.autograd.grad(out, [values, W_dec], grad)
    got = R.sparse_decode_backward_ref(grad, values.detach(), indices, W_dec.detach())
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_auxk_gradient_reaches_encoder(gen):
    B, D, F, k = 12, 9, 30, 3
    x = rand(gen, B, D)
    W_enc, b_enc, W_dec, b_dec = (rand(gen, F, D).requires_grad_(), rand(gen, F).requires_grad_(),
                                  rand(gen, F, D).requires_grad_(), rand(gen, D))
    dead = torch.zeros(F, dtype=torch.bool)
    dead[::3] = True
    loss, losses, *_ = R.topk_sae_loss_ref(x, W_enc, b_enc, W_dec, b_dec, k, dead=dead, k_aux=4, coef_auxk=1.0)
    g = torch.autograd.grad(losses["auxk"], [W_enc, b_enc])
    assert g[0][dead].abs().sum() > 0 and g[1][dead].abs().sum() > 0
    assert g[0][~dead].abs().sum() == 0


def test_geometric_median_minimises_distance_sum(gen):
    from sparse_sae.geometric_median import geometric_median
    pts = rand(gen, 200, 5)
    pts[:20] += 50.0  # outliers pull the mean, not the median
    m = geometric_median(pts)

    def cost(p):
        return float((pts - p).norm(dim=1).sum())
    for _ in range(20):
        assert cost(m) <= cost(m + 0.01 * rand(gen, 5)) + 1e-9
    assert (m - pts.mean(0)).norm() > 1.0
