"""The C++/OpenMP CPU kernels against the reference, in float32 and float64, on awkward
shapes; determinism across thread counts; the host-side selection logic."""
import struct

import pytest
import torch
from conftest import assert_module_backend_matches_reference, rand

import sparse_sae as S
from sparse_sae import reference as R
from sparse_sae.ops._registry import _C

pytestmark = pytest.mark.skipif(_C is None, reason="extension not built")
DTYPES = [torch.float32, torch.float64]
SEL_FIELDS = ("values", "indices", "threshold", "active", "fired", "n1", "n2", "aux_values", "aux_indices")


def _h(gen, B, F, dtype, ties=False, positive_frac=0.5):
    h = torch.relu(rand(gen, B, F, dtype=dtype) + (positive_frac - 0.5) * 2)
    if ties:
        h = (h * 4).round() / 4   # many exact ties
    return h


def _ref_select(h, k, mode="topk", width=0, threshold=None, dead=None, k_aux=0):
    from sparse_sae.ops.select import _select_reference
    return _select_reference(h, k, mode, width, threshold, dead, k_aux)


def _cpu_select(h, k, mode="topk", width=0, threshold=None, dead=None, k_aux=0):
    if threshold is not None:
        threshold = threshold.to(h.dtype).expand(h.shape[1]).contiguous()
    return _C.select_cpu(h, k, mode, width, threshold, dead, k_aux)


def _assert_select_equal(got, want):
    for name, g, w in zip(SEL_FIELDS, got, want):
        if name in ("n1", "n2"):
            torch.testing.assert_close(g, w, msg=lambda m: f"{name}: {m}")
        else:
            assert g.dtype == w.dtype and g.shape == w.shape, (name, g.dtype, w.dtype, g.shape, w.shape)
            assert torch.equal(g, w), f"{name} differs"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,F,k", [(1, 1, 1), (1, 37, 5), (9, 13, 13), (40, 101, 1), (65, 300, 17), (7, 50, 49)])
@pytest.mark.parametrize("ties", [False, True])
def test_topk_select_matches_reference(gen, dtype, B, F, k, ties):
    h = _h(gen, B, F, dtype, ties)
    dead = torch.rand(F, generator=gen) < 0.3
    k_aux = min(F, 6)
    _assert_select_equal(_cpu_select(h, k, dead=dead, k_aux=k_aux), _ref_select(h, k, dead=dead, k_aux=k_aux))


@pytest.mark.parametrize("dtype", DTYPES)
def test_topk_rows_with_fewer_than_k_positives(gen, dtype):
    h = _h(gen, 12, 40, dtype, positive_frac=0.05)
    assert ((h > 0).sum(1) < 8).any()
    _assert_select_equal(_cpu_select(h, 8), _ref_select(h, 8))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,F,k,width", [(5, 23, 2, 0), (16, 61, 9, 0), (16, 61, 9, 4), (3, 7, 7, 0), (1, 9, 3, 0)])
@pytest.mark.parametrize("ties", [False, True])
def test_batchtopk_select_matches_reference(gen, dtype, B, F, k, width, ties):
    h = _h(gen, B, F, dtype, ties)
    _assert_select_equal(_cpu_select(h, k, "batchtopk", width), _ref_select(h, k, "batchtopk", width))


@pytest.mark.parametrize("dtype", DTYPES)
def test_threshold_select_matches_reference(gen, dtype):
    h = _h(gen, 21, 77, dtype)
    thr = torch.rand(77, generator=gen, dtype=dtype)
    dead = torch.arange(77) % 5 == 0
    for width in (0, 3):
        _assert_select_equal(_cpu_select(h, 0, "threshold", width, thr, dead, 4),
                             _ref_select(h, 0, "threshold", width, thr, dead, 4))


def test_aux_with_fewer_dead_latents_than_k_aux(gen):
    h = _h(gen, 6, 20, torch.float32)
    dead = torch.zeros(20, dtype=torch.bool)
    dead[[3, 11]] = True
    _assert_select_equal(_cpu_select(h, 4, dead=dead, k_aux=5), _ref_select(h, 4, dead=dead, k_aux=5))


def _pb_inputs(gen, B, D, F, k, dtype, n_aux=0, b_enc_shift=0.0):
    x = rand(gen, B, D, dtype=dtype)
    W_enc = rand(gen, F, D, dtype=dtype) / D ** 0.5
    b_enc = rand(gen, F, dtype=dtype, scale=0.3) - b_enc_shift
    b_dec = rand(gen, D, dtype=dtype, scale=0.1)
    h = R.encode_ref(x, W_enc, b_enc, b_dec)
    dead = torch.rand(F, generator=gen) < 0.5
    sel = _ref_select(h, k, dead=dead if n_aux else None, k_aux=n_aux)
    values, indices, _, active, _, n1, n2, aux_values, aux_indices = sel
    sp_indices = torch.cat([indices, aux_indices], 1)
    sp_grad = rand(gen, *sp_indices.shape, dtype=dtype) * (torch.cat([values, aux_values], 1) > 0)
    return x, W_enc, b_dec, h, active, n1, n2, sp_indices, sp_grad


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,D,F,k,n_aux", [(1, 5, 9, 1, 0), (37, 19, 97, 5, 3), (300, 13, 41, 4, 0),
                                           (6, 11, 500, 3, 4)])
@pytest.mark.parametrize("coefs", [(None, None), (0.3, None), (None, 0.7), (0.2, 0.05)])
@pytest.mark.parametrize("need_dx", [False, True])
def test_penalty_backward_matches_reference(gen, dtype, B, D, F, k, n_aux, coefs, need_dx):
    args = _pb_inputs(gen, B, D, F, k, dtype, n_aux)
    c = [None if v is None else torch.tensor(v / B, dtype=dtype) for v in coefs]
    got = _C.penalty_backward_cpu(*args, c[0], c[1], 1e-6, need_dx)
    want = R.penalty_backward_ref(*args, c[0], c[1], 1e-6, need_dx)
    tol = {} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-5}
    for g, w in zip(got[:3], want[:3]):
        torch.testing.assert_close(g, w, **tol)
    if need_dx:
        torch.testing.assert_close(got[3], want[3], **tol)
    else:
        assert got[3].numel() == 0


def _positive_active_density(h, active):
    return float((h[:, active] > 0).double().mean()) if active.any() else 0.0


# The kernel accumulates G_pen by dense GEMM blocks or, below 4% positive batch-active entries
# (a trained regularized SAE), as a sparse matrix by latent; the inputs pick the path.
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("path,shift", [("dense", 0.0), ("sparse", 3.5)])
@pytest.mark.parametrize("B,D,F,k", [(203, 37, 611, 3), (64, 19, 97, 1), (97, 21, 257, 12)])
@pytest.mark.parametrize("coefs", [(0.3, None), (None, 0.7), (0.2, 0.05)])
def test_penalty_backward_dense_and_sparse_paths(gen, dtype, path, shift, B, D, F, k, coefs):
    args = _pb_inputs(gen, B, D, F, k, dtype, n_aux=2, b_enc_shift=shift)
    density = _positive_active_density(args[3], args[4])
    assert (density < 0.03) if path == "sparse" else (density > 0.05), density
    c = [None if v is None else torch.tensor(v / B, dtype=dtype) for v in coefs]
    got = _C.penalty_backward_cpu(*args, c[0], c[1], 1e-6, True)
    want = R.penalty_backward_ref(*args, c[0], c[1], 1e-6, True)
    tol = {} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-5}
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,F,D,k", [(1, 5, 3, 1), (37, 101, 29, 7), (16, 9, 65, 9)])
def test_sparse_decode_backward_matches_reference(gen, dtype, B, F, D, k):
    values = rand(gen, B, k, dtype=dtype)
    values[0, 0] = 0.0
    indices = torch.stack([torch.randperm(F, generator=gen)[:k] for _ in range(B)])
    W_dec, grad = rand(gen, F, D, dtype=dtype), rand(gen, B, D, dtype=dtype)
    got = _C.sparse_decode_backward_cpu(grad, values, indices, W_dec)
    want = R.sparse_decode_backward_ref(grad, values, indices, W_dec)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_same_bits_for_any_thread_count(gen):
    B, D, F, k = 257, 33, 129, 7
    values = rand(gen, B, k, dtype=torch.float32)
    indices = torch.randint(0, F, (B, k), generator=gen)
    W_dec, grad = rand(gen, F, D, dtype=torch.float32), rand(gen, B, D, dtype=torch.float32)
    pb = _pb_inputs(gen, B, D, F, k, torch.float32, n_aux=3)
    pb_sparse = _pb_inputs(gen, B, D, F, k, torch.float32, n_aux=3, b_enc_shift=3.5)
    coefs = (torch.tensor(0.1 / B), torch.tensor(0.05 / B))
    h = _h(gen, B, F, torch.float32, ties=True)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append([*_C.sparse_decode_backward_cpu(grad, values, indices, W_dec),
                            *_C.penalty_backward_cpu(*pb, None, None, 1e-6, True),
                            *_C.penalty_backward_cpu(*pb, *coefs, 1e-6, True),
                            *_C.penalty_backward_cpu(*pb, coefs[0], None, 1e-6, True),
                            *_C.penalty_backward_cpu(*pb, None, coefs[1], 1e-6, True),
                            *_C.penalty_backward_cpu(*pb_sparse, *coefs, 1e-6, True),
                            *_C.select_cpu(h, k, "topk", 0, None, None, 0),
                            *_C.select_cpu(h, k, "batchtopk", 0, None, None, 0)])
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


# The dense penalty path cuts B into blocks of about 2M entries of G (511 rows at 4099 batch-
# active columns) and each block's outputs into fixed chunks of latents and rows: here B is not
# a multiple of the block, and neither count of columns nor rows of a block fills its last chunk.
@pytest.mark.parametrize("coefs", [(0.1, None), (None, 0.05), (0.1, 0.05)])
def test_dense_penalty_path_same_bits_for_any_thread_count(gen, coefs):
    B, D, F, k = 1100, 67, 4099, 5
    pb = _pb_inputs(gen, B, D, F, k, torch.float32, n_aux=2)
    assert _positive_active_density(pb[3], pb[4]) > 0.05  # the dense path
    c = [None if v is None else torch.tensor(v / B) for v in coefs]
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(_C.penalty_backward_cpu(*pb, *c, 1e-6, True))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)
    # against float64 (sums of 1100 float32 terms differ from any float32 order by ~1e-5)
    want = R.penalty_backward_ref(*(t.double() if t.is_floating_point() else t for t in pb),
                                  *(None if v is None else v.double() for v in c), 1e-6, True)
    for g, w in zip(results[0], want):
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-5 * float(w.abs().max()))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("make", [
    lambda dt: S.TopKSAE(29, 131, 7, [S.OffSupportL1(0.3), S.L1L2Ratio(0.1)], auxk=S.AuxK(k_aux=5,
                                                                                         dead_after_tokens=1),
                         dtype=dt),
    lambda dt: S.TopKSAE(29, 131, 131, [S.L1L2Ratio(0.1)], dtype=dt),
    lambda dt: S.BatchTopKSAE(29, 131, 4, [S.OffSupportL1(0.3), S.DecoderNormL1(0.1)], dtype=dt),
    lambda dt: S.ReLUSAE(29, 131, [S.DecoderNormL1(0.1)], dtype=dt),
    lambda dt: S.JumpReLUSAE(29, 131, [S.L0(0.1)], bandwidth=0.1, init_threshold=0.05, dtype=dt),
])
def test_module_cpu_backend_equals_reference_backend(gen, monkeypatch, dtype, make):
    sae = make(dtype)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(rand(gen, *p.shape, dtype=dtype) * 0.3)
        sae.tokens_since_fired.copy_(torch.arange(131) % 2)
    x = rand(gen, 45, 29, dtype=dtype)
    tol = {} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-5}
    assert_module_backend_matches_reference(sae, x, "cpu", monkeypatch, **tol)


# ----------------------------------------------------------------------------- host-side logic
def test_ordered_keys_preserve_order_and_merge_signed_zeros(gen):
    vals = sorted({0.0, -0.0, 1e-45, -1e-45, 1.0, -1.0, 3.5, -3.5, float("inf"), float("-inf"), 1e38, -1e38,
                   *rand(gen, 200, dtype=torch.float32).tolist()})
    f32 = [struct.unpack("f", struct.pack("f", v))[0] for v in vals]
    keys = [_C.ordered_key_f32(v) for v in f32]
    for (a, ka), (b, kb) in zip(zip(f32, keys), zip(f32[1:], keys[1:])):
        assert (a < b) == (ka < kb) and (a == b) == (ka == kb)
    assert _C.ordered_key_f32(-0.0) == _C.ordered_key_f32(0.0)
    assert _C.ordered_key_f64(-0.0) == _C.ordered_key_f64(0.0)
    keys64 = [_C.ordered_key_f64(v) for v in vals]
    assert keys64 == sorted(keys64)
    for v in f32:
        if v == v and v != 0.0:
            assert _C.float_from_key(_C.ordered_key_f32(v)) == v


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_ordered_keys_for_16_bit_floats(gen, dtype):
    v = torch.cat([rand(gen, 300, dtype=torch.float32).to(dtype), torch.tensor([0.0, -0.0, float("inf"),
                                                                                float("-inf")], dtype=dtype)])
    bits = v.view(torch.int16).to(torch.int32) & 0xFFFF
    keys = torch.tensor([_C.ordered_key_16(int(b)) for b in bits])
    order_v = v.float()
    for i in range(0, len(v) - 1):
        a, b = order_v[i], order_v[i + 1]
        assert bool(a < b) == bool(keys[i] < keys[i + 1]) and bool(a == b) == bool(keys[i] == keys[i + 1])


def _given_cut_oracle(h, value, ties):
    """The (row, index) pairs a given cut selects, by a plain walk over h in flat order."""
    B, F = h.shape
    flat, picked, left = h.double().reshape(-1).tolist(), set(), ties
    for e, v in enumerate(flat):
        if v > value or (v == value and left > 0):
            left -= v == value
            picked.add((e // F, e % F))
    return picked


@pytest.mark.parametrize("dtype", DTYPES + [torch.bfloat16])
@pytest.mark.parametrize("B,F,k", [(1, 37, 5), (13, 29, 3), (40, 101, 7)])
def test_batchtopk_given_cut_selects_above_then_the_first_ties(gen, dtype, B, F, k):
    """A given cut (value, ties) selects every entry above value and the first `ties` equal ones in
    flat order, on the CPU kernel and the reference; the batch's own cut gives BatchTopK itself."""
    from sparse_sae.ops.select import _select_cpu, _select_reference
    h = _h(gen, B, F, torch.float64, ties=True).to(dtype) + 0.25    # positive, with many exact ties
    distinct = h.unique()
    for value in (distinct[len(distinct) // 2], distinct[-2], distinct[0]):
        eq = int((h == value).sum())
        for ties in sorted({0, 1, eq // 2, eq}):
            cut = torch.tensor([float(value), float(ties)], dtype=torch.float64)
            want = _given_cut_oracle(h, float(value), ties)
            for impl in (_select_cpu, _select_reference):
                values, indices = impl(h, k, "batchtopk", 0, None, None, 0, True, cut)[:2]
                got = {(i, int(j)) for i in range(B) for j, v in zip(indices[i], values[i]) if v > 0}
                assert got == want, (impl.__name__, float(value), ties)
    flat = h.reshape(-1)
    tau = torch.topk(flat, B * k).values[-1]
    own = torch.tensor([float(tau), float(B * k - (flat > tau).sum())], dtype=torch.float64)
    _assert_select_equal(_select_cpu(h, k, "batchtopk", 0, None, None, 0, True, own),
                         _select_cpu(h, k, "batchtopk", 0, None, None, 0, True))


def test_select_refuses_a_bad_cut(gen):
    h = _h(gen, 4, 9, torch.float32)
    good = torch.tensor([0.5, 1.0], dtype=torch.float64)
    with pytest.raises(ValueError, match="cut is BatchTopK's"):
        S.ops.select(h, 2, "topk", cut=good)
    for bad in (good.float(), good[:1], torch.zeros(2, 2, dtype=torch.float64)):
        with pytest.raises(ValueError, match="cut must be a float64 tensor"):
            S.ops.select(h, 2, "batchtopk", cut=bad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_key_histogram_matches_counting_by_hand(gen, dtype):
    """The CPU kernel's digit histogram of the selection keys, and the PyTorch one, against counts
    taken from the C++ keys one by one (signed values, -0, ties), for every pass of a 16-bit and of an
    8-bit radix select, with the high part taken from an entry (so that the filter matches some)."""
    from sparse_sae.ops.select import KEY_BITS, key_histogram, key_histogram_ref
    h = ((rand(gen, 11, 23, dtype=torch.float64) * 4).round() / 4).to(dtype)
    h[0, :3] = torch.tensor([-0.0, 0.0, -0.0], dtype=dtype)
    flat = h.reshape(-1)
    bits_total = KEY_BITS[dtype]
    if bits_total == 16:
        keys = [_C.ordered_key_16(int(b) & 0xFFFF) for b in flat.view(torch.int16)]
    else:
        keys = [(_C.ordered_key_f32 if bits_total == 32 else _C.ordered_key_f64)(float(v)) for v in flat]
    for digit_bits in (16, 8):
        for shift in range(bits_total - digit_bits, -1, -digit_bits):
            high_value = keys[37] >> (shift + digit_bits) if shift + digit_bits < bits_total else 0
            want = [0] * (1 << digit_bits)
            for key in keys:
                if shift + digit_bits >= bits_total or key >> (shift + digit_bits) == high_value:
                    want[(key >> shift) & ((1 << digit_bits) - 1)] += 1
            high = torch.tensor([high_value - (1 << 64) if high_value >= 1 << 63 else high_value])
            for impl in (key_histogram, key_histogram_ref):
                got = impl(h, high, shift, digit_bits)
                assert got.tolist() == want, (impl.__name__, digit_bits, shift)
    assert sum(want) >= 1
