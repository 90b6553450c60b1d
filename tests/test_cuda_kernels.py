"""CUDA selection and index building against the reference (skipped without a GPU), and
the CUDA build itself (runs without one)."""
import pytest
import torch
from conftest import rand

from sparse_sae.ops._registry import _C
from sparse_sae.ops.group_by_latent import group_by_latent, group_by_latent_ref
from sparse_sae.ops.select import _select_reference

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


def _check_select(h, k, mode="topk", width=0, threshold=None, dead=None, k_aux=0, cut=None):
    got = _C.select_cuda(h, k, mode, width, threshold, dead, k_aux, True, cut)
    want = _select_reference(h.cpu(), k, mode, width, None if threshold is None else threshold.cpu(),
                             None if dead is None else dead.cpu(), k_aux, True, None if cut is None else cut.cpu())
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
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_select_cuda_batchtopk_given_cut(gen, dtype):
    """A data-parallel process's share of the cut (value, ties), read on the device: cuts inside a
    run of ties, at none of them and at all of them, packed exactly and at a width."""
    h = ((torch.relu(rand(gen, 33, 517, dtype=torch.float32)) * 8).round() / 8).to(dtype).cuda()
    for value in (0.125, 0.5, 1.0):
        eq = int((h == value).sum())
        for ties in sorted({0, 1, eq // 3, eq}):
            cut = torch.tensor([value, float(ties)], dtype=torch.float64, device="cuda")
            for width in (0, 9):
                _check_select(h, 4, "batchtopk", width, cut=cut)


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


def test_group_by_latent_leaves_out_entries_not_kept(gen):
    """Entries with keep=False join no group: they sort after the last latent, past start[F]."""
    idx = torch.randint(0, 16, (9, 5), generator=gen)   # F = 16: the left-out id 16 needs one more bit
    keep = torch.rand(9, 5, generator=gen) < 0.6
    start, entries = group_by_latent(idx, 16, keep=keep)
    flat, kept = idx.reshape(-1), keep.reshape(-1)
    assert start.shape == (17,) and start[-1] == int(kept.sum())
    for lat in range(16):
        group = entries[start[lat]:start[lat + 1]]
        assert torch.equal(group, torch.nonzero(kept & (flat == lat)).reshape(-1))
    assert not bool(kept[entries[start[-1]:]].any())


@gpu
def test_group_by_latent_cuda_leaves_out_entries_not_kept(gen):
    idx = torch.randint(0, 1024, (300, 9), generator=gen)
    keep = torch.rand(300, 9, generator=gen) < 0.5
    (start, entries), (want_start, want_entries) = group_by_latent(idx.cuda(), 1024, keep=keep.cuda()), \
        group_by_latent(idx, 1024, keep=keep)
    n = int(want_start[-1])   # past it, the left-out entries in any order
    assert torch.equal(start.cpu(), want_start) and torch.equal(entries.cpu()[:n], want_entries[:n])


def _outlier_batch(gen, B, F, dtype, hot_rows=(1,)):
    """h whose rows in ``hot_rows`` are large everywhere: they take most of a BatchTopK budget, and
    hold more positive entries than the kernel's candidate buffer."""
    h = torch.relu(rand(gen, B, F, dtype=torch.float32) - 1.0)
    for r in hot_rows:
        h[r] = torch.rand(F, generator=gen) + 3.0
    return ((h * 64).round() / 64).to(dtype)   # ties too


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_select_cuda_rows_above_the_buffer_are_exact(gen, dtype):
    """A row selecting more than max_select entries: BatchTopK and threshold packing at a fixed
    width keep that row's `width` largest (as the reference), not the first ones found."""
    F = _C.max_select + 1500
    h = _outlier_batch(gen, 6, F, dtype).cuda()
    _check_select(h, _C.max_select // 2, "batchtopk", 64)
    thr = (torch.rand(F, generator=gen) * 0.5).to(dtype).cuda()
    _check_select(h, 0, "threshold", 64, thr)


@gpu
def test_select_cuda_exact_width_above_the_buffer_falls_back_with_a_warning(gen):
    from sparse_sae.ops.select import select
    F = _C.max_select + 700
    h = _outlier_batch(gen, 4, F, torch.float32).cuda()
    assert _C.select_cuda(h, 0, "threshold", 0, torch.zeros(F, device="cuda"), None, 0) == []
    with pytest.warns(RuntimeWarning, match="more than"):
        got = select(h, mode="threshold", threshold=torch.zeros(F, device="cuda"))
    want = _select_reference(h.cpu(), 0, "threshold", 0, torch.zeros(F), None, 0)
    assert torch.equal(got.indices.cpu(), want[1]) and torch.equal(got.values.cpu(), want[0])


@gpu
def test_select_cuda_auxk_with_nothing_dead_matches_the_reference(gen):
    h = torch.relu(rand(gen, 9, 501, dtype=torch.float32)).cuda()
    _check_select(h, 7, dead=torch.zeros(501, dtype=torch.bool, device="cuda"), k_aux=13)


@gpu
def test_select_cuda_large_k_aux_keeps_the_main_selection_on_the_kernel(gen):
    from sparse_sae.ops.select import select
    F = _C.max_select + 300
    h = torch.relu(rand(gen, 3, F, dtype=torch.float32)).cuda()
    dead = (torch.rand(F, generator=gen) < 0.5).cuda()
    with pytest.warns(RuntimeWarning, match="AuxK candidates use the reference"):
        got = select(h, 16, dead=dead, k_aux=_C.max_select + 1)
    want = _select_reference(h.cpu(), 16, "topk", 0, None, dead.cpu(), _C.max_select + 1)
    for name, g, w in zip(FIELDS, got, want):
        if name not in ("n1", "n2"):
            assert torch.equal(g.cpu(), w.to(g.dtype)), name


@gpu
def test_training_step_makes_no_host_sync_on_the_gpu(gen, tmp_path):
    """After warm-up, a regularized Top-k step with AuxK (and BatchTopK at a fixed width) runs
    under torch.cuda.set_sync_debug_mode("error"): any synchronising call raises."""
    from sparse_sae.training.config import TrainConfig
    from sparse_sae.training.trainer import Trainer
    for arch, extra in (("topk", dict(off_support_l1=0.1, l1_l2_ratio=0.01, auxk=0.05)),
                        ("batchtopk", dict(off_support_l1=0.1, max_k_per_row=12))):
        cfg = TrainConfig(architecture=arch, steps=50, batch_size=256, n_latents=1024, k=8, log_every=50,
                          checkpoint_every=0, dead_after_tokens=512, out_dir=str(tmp_path / arch), progress=False,
                          device="cuda", **extra)
        trainer = Trainer(cfg, rand(gen, 4000, 64, dtype=torch.float32))
        batches = [trainer.loader.next_batch() for _ in range(5)]
        for x in batches[:2]:
            trainer.train_step(x)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for x in batches[2:]:
                trainer.train_step(x)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        trainer.check_finite_steps()
        trainer.release()
