"""CUDA selection and index building against the reference (skipped without a GPU), and
the CUDA build itself (runs without one)."""
import pytest
import torch

from sparse_sae.backends import _C
from sparse_sae.ops.group_by_latent import group_by_latent, group_by_latent_ref
from sparse_sae.ops.select import _select_reference
from conftest import rand

gpu = pytest.mark.skipif(not torch.cuda.is_available() or _C is None or not _C.with_cuda,
                         reason="needs a GPU and the CUDA part of the extension")
FIELDS = ("values", "indices", "threshold", "active", "fired", "n1", "n2", "aux_values", "aux_indices")


def test_cuda_part_is_built_when_torch_has_cuda():
    if _C is None:
        pytest.skip("extension not built")
    if torch.version.cuda is None:
        pytest.skip("CPU build of torch")
    assert _C.with_cuda, "torch has CUDA and nvcc exists, yet the CUDA part was not built"
    info = _C.build_info()
    assert "archs" in info and "9.0" in info


def test_group_by_latent_reference(gen):
    idx = torch.randint(0, 11, (7, 3), generator=gen)
    start, entries = group_by_latent_ref(idx, 13)
    flat = idx.reshape(-1)
    assert start[0] == 0 and start[-1] == flat.numel() and start.shape == (14,)
    for lat in range(13):
        group = entries[start[lat]:start[lat + 1]]
        assert bool((flat[group] == lat).all())
        assert torch.equal(group, group.sort().values)   # row-major within a latent


def _check_select(h, k, mode="topk", width=0, threshold=None, dead=None, k_aux=0):
    got = _C.select_cuda(h, k, mode, width, threshold, dead, k_aux)
    want = _select_reference(h.cpu(), k, mode, width, None if threshold is None else threshold.cpu(),
                             None if dead is None else dead.cpu(), k_aux)
    for name, g, w in zip(FIELDS, got, want):
        g = g.cpu()
        if name in ("n1", "n2"):
            torch.testing.assert_close(g, w.float(), rtol=1e-3 if h.dtype != torch.float32 else 1e-5, atol=1e-4)
        else:
            assert g.shape == w.shape, (name, g.shape, w.shape)
            assert torch.equal(g, w.to(g.dtype)), f"{name} differs"


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B,F,k", [(1, 1, 1), (3, 37, 5), (9, 13, 13), (40, 1001, 1), (17, 3000, 128),
                                   (5, 70000, 32)])
@pytest.mark.parametrize("ties", [False, True])
def test_select_cuda_topk(gen, dtype, B, F, k, ties):
    h = torch.relu(rand(gen, B, F, dtype=torch.float32))
    if ties:
        h = (h * 4).round() / 4
    h = h.to(dtype).cuda()
    dead = (torch.rand(F, generator=gen) < 0.3).cuda()
    _check_select(h, k, dead=dead, k_aux=min(F, 6))


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,F,k,width", [(5, 23, 2, 0), (16, 611, 9, 0), (16, 611, 9, 4), (64, 4099, 16, 0)])
def test_select_cuda_batchtopk(gen, dtype, B, F, k, width):
    h = ((torch.relu(rand(gen, B, F, dtype=torch.float32)) * 8).round() / 8).to(dtype).cuda()
    _check_select(h, k, "batchtopk", width)


@gpu
def test_select_cuda_threshold_and_few_positives(gen):
    h = torch.relu(rand(gen, 21, 777, dtype=torch.float32) - 1.5).cuda()
    thr = torch.rand(777, generator=gen).cuda() * 0.5
    _check_select(h, 0, "threshold", 0, thr)
    _check_select(h, 40)   # rows with fewer than k positives


@gpu
def test_group_by_latent_cuda_matches_reference(gen):
    idx = torch.randint(0, 1000, (513, 17), generator=gen)
    got = group_by_latent(idx.cuda(), 1003)
    want = group_by_latent_ref(idx, 1003)
    for g, w in zip(got, want):
        assert torch.equal(g.cpu(), w)
