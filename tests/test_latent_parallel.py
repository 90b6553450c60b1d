"""Latent parallelism (sparse_sae.saes.sharded) against one process: P gloo processes on the CPU
each hold a slice of the latents; the selected indices must equal one process's, the losses and
every gradient (the whole-F gradients gathered from the slices, and dL/dx) must agree to 1e-12
relative in float64 and to float32 rounding in float32. Shapes whose F is not a multiple of P."""
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import sparse_sae as S
from sparse_sae import reference as R
from sparse_sae.saes.sharded import ShardedTopKSAE, shard_bounds

D, F, K, B = 13, 103, 5, 37


def _whole(case: str, dtype):
    g = torch.Generator().manual_seed(7)
    pens = [S.OffSupportL1(0.2), S.L1L2Ratio(0.05)]
    if case == "topk":
        sae = S.TopKSAE(D, F, K, pens, auxk=S.AuxK(0.5, k_aux=7, dead_after_tokens=40), dtype=dtype)
    else:      # "batchtopk", or "batchtopk_w": at most WIDTH entries a row (some rows select more)
        sae = S.BatchTopKSAE(D, F, K, pens[:1], dtype=dtype, max_k_per_row=WIDTH if case == "batchtopk_w" else None)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=dtype) * 0.4)
        sae.tokens_since_fired.copy_(torch.randint(0, 80, (F,), generator=g))   # some latents dead
    x = torch.randn(B, D, generator=g, dtype=dtype)
    return sae, x


def _grads(module, x, full=None):
    xr = x.clone().requires_grad_()
    out = module(xr)
    out.loss.backward()
    grads = {n: (full(p.grad) if full and n != "b_dec" else p.grad) for n, p in module.named_parameters()}
    return out, grads, xr.grad


CASES = [("topk", "float64"), ("batchtopk", "float64"), ("batchtopk_w", "float64"), ("topk", "float32")]
WIDTH = 7


def _worker(rank, world, path):
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        for case, dtype_name in CASES:      # one process group for every case: spawning costs seconds
            _check(rank, world, case, getattr(torch, dtype_name))
    finally:
        dist.destroy_process_group()


def _check(rank, world, case, dtype):
    tol = {"rtol": 1e-12, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 2e-5, "atol": 2e-6}
    whole, x = _whole(case, dtype)
    sharded = ShardedTopKSAE.from_full(whole, group=None)
    assert (sharded.lo, sharded.hi) == shard_bounds(F, world, rank)
    want, want_g, want_dx = _grads(whole, x)
    got, got_g, got_dx = _grads(sharded, x, sharded.gather_full)
    if case == "topk":
        assert torch.equal(got.indices, want.indices)
    else:   # the global selection as (row, latent) pairs
        mine = {(i, int(j)) for i in range(B) for j, v in zip(got.indices[i], got.values[i]) if v > 0}
        parts = [None] * world
        dist.all_gather_object(parts, mine)
        want_set = {(i, int(j)) for i in range(B) for j, v in zip(want.indices[i], want.values[i]) if v > 0}
        assert set().union(*parts) == want_set
        assert torch.equal(sharded.threshold, whole.threshold)
        if case == "batchtopk_w":    # the width cuts rows: the case tests the cut
            h = torch.relu((x - whole.b_dec) @ whole.W_enc.T + whole.b_enc)
            assert int((R.batchtopk_select_ref(h.detach(), K)[0] > 0).sum(1).max()) > WIDTH
            assert max(len([v for v in row if v > 0]) for row in want.values) == WIDTH
    assert set(got.losses) == set(want.losses)
    for name in want.losses:
        torch.testing.assert_close(got.losses[name], want.losses[name], **tol, msg=name)
    torch.testing.assert_close(got.loss, want.loss, **tol)
    torch.testing.assert_close(got.recon, want.recon, **tol)
    for name, g in want_g.items():
        torch.testing.assert_close(got_g[name], g, **tol, msg=name)
    torch.testing.assert_close(got_dx, want_dx, **tol)
    state = sharded.full_state_dict()
    for name, t in whole.state_dict().items():
        assert torch.equal(state[name], t), name           # firing counters updated alike
    back = sharded.to_full()
    assert type(back) is type(whole) and back.config() == whole.config()
    # one optimizer step on each side: the decoder constraint and Adam on the slices
    for module in (whole, sharded):
        module.remove_parallel_grad_()
        torch.optim.Adam(module.parameters(), lr=1e-2).step()
        module.normalize_decoder_()
    stepped = sharded.full_state_dict()
    for name, t in whole.state_dict().items():
        torch.testing.assert_close(stepped[name], t, **tol, msg=f"{name} after a step")
    if case.startswith("batchtopk"):                         # eval: the learned threshold
        whole.eval()
        sharded.eval()
        torch.testing.assert_close(sharded(x).loss, whole(x).loss, **tol)


@pytest.mark.parametrize("world", [2, 4])
def test_latent_parallel_equals_one_process(world):
    """Top-k with both paper penalties and AuxK (live: some latents dead), BatchTopK in training
    (its threshold estimate too) and in eval, float64 and float32."""
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(world, os.path.join(tmp, "store")), nprocs=world, join=True)


def test_shard_bounds_cover_the_latents():
    for n, p in [(103, 4), (8, 8), (10, 3)]:
        bounds = [shard_bounds(n, p, r) for r in range(p)]
        assert bounds[0][0] == 0 and bounds[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
        assert max(b - a for a, b in bounds) - min(b - a for a, b in bounds) <= 1


def test_needs_a_process_group():
    with pytest.raises(RuntimeError, match="process group"):
        ShardedTopKSAE(D, F, K)


# ---------------------------------------------------------------------------------------- the trainer
def _train_cfg(out_dir, **kw):
    from sparse_sae.training import TrainConfig
    base = dict(steps=4, batch_size=48, n_latents=F, k=K, warmup_steps=1, checkpoint_every=2, log_every=1,
                out_dir=str(out_dir), progress=False, off_support_l1=0.1, l1_l2_ratio=0.02, auxk=0.1,
                dead_after_tokens=60, dtype="float64", lr=1e-2, seed=3, memory_budget_mb=0.05)
    base.update(kw)
    return TrainConfig(**base)


def _data():
    return torch.randn(400, D, generator=torch.Generator().manual_seed(11), dtype=torch.float64)


def _train_worker(rank, world, path, cfg, resume, result, exit_at):
    from sparse_sae.saes import base
    from sparse_sae.training import Trainer
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        built = []           # the rows of every initialisation this process draws
        init_rows = base.init_decoder_rows

        def recording(seed, lo, hi, d_in, dtype=None, device=None):
            if torch.device(device or "cpu").type != "meta":    # (a meta SAE gives a saved config)
                built.append(hi - lo)
            return init_rows(seed, lo, hi, d_in, dtype, device)
        base.init_decoder_rows = recording
        import sparse_sae.saes.sharded as sharded
        sharded.init_decoder_rows = recording
        # the whole run killed at once (every process) after step exit_at
        on_step = (lambda t: os._exit(9) if t.step == exit_at else None) if exit_at else None
        trainer = Trainer(cfg, _data(), resume=resume, on_step=on_step)
        trainer.fit()
        during_fit = list(built)
        state = trainer.whole_sae().state_dict()
        if rank == 0:
            torch.save({"state": {k: v.clone() for k, v in state.items()}, "built": during_fit}, result)
    finally:
        dist.destroy_process_group()


def _run(world, cfg, resume=None, exit_at=None, built=None):
    with tempfile.TemporaryDirectory() as tmp:
        result = os.path.join(tmp, "state.pt")
        mp.spawn(_train_worker, args=(world, os.path.join(tmp, "store"), cfg, resume, result, exit_at), nprocs=world)
        saved = torch.load(result)
        if built is not None:
            built.extend(saved["built"])
        return saved["state"]


def _assert_same_state(got, want):
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-9, atol=1e-12, msg=name)


@pytest.mark.parametrize("arch,extra", [("topk", {}), ("batchtopk", {}), ("batchtopk", {"max_k_per_row": 7})])
def test_trainer_latent_parallel_equals_one_process_and_reshards_on_resume(tmp_path, arch, extra):
    """4 steps with 4 latent shards equal 4 steps in one process (input scale, b_dec init, penalty
    and learning-rate schedules, AuxK, gradient clipping); a run checkpointed at step 2 by 4 shards
    resumes with 2 shards to the same weights, and the final SAE and checkpoints are whole SAEs."""
    from sparse_sae.training import Trainer
    one = Trainer(_train_cfg(tmp_path / "one", architecture=arch, **extra), _data())
    one.fit()
    want = one.sae.state_dict()
    built = []
    _assert_same_state(_run(4, _train_cfg(tmp_path / "p4", architecture=arch, **extra, latent_parallel=4), built=built),
                       want)
    assert built and max(built) == shard_bounds(F, 4, 0)[1], built    # rank 0 drew its slice, never all F rows
    _run(4, _train_cfg(tmp_path / "r", architecture=arch, **extra, latent_parallel=4, steps=2))
    _assert_sharded_checkpoint(tmp_path / "r" / "checkpoints" / "step_00000002", 4)
    got = _run(2, _train_cfg(tmp_path / "r", architecture=arch, **extra, latent_parallel=2), resume=str(tmp_path / "r"))
    _assert_same_state(got, want)
    _assert_sharded_checkpoint(tmp_path / "r" / "checkpoints" / "step_00000004", 2)
    final = S.load(tmp_path / "r" / "final")
    assert type(final) is type(one.sae) and final.n_latents == F
    whole_final = one.sae.__class__.load(tmp_path / "one" / "final")
    for name, t in whole_final.state_dict().items():     # written by shard, read back whole, scale folded alike
        torch.testing.assert_close(final.state_dict()[name], t, rtol=1e-9, atol=1e-12, msg=name)


def _assert_sharded_checkpoint(ckpt, shards):
    """Each shard's files are there and no whole weights file; the checkpoint loads whole in one
    process, and the manifest covers the shard files."""
    import json
    from sparse_sae.training.checkpoint import read_checkpoint
    names = {p.name for p in ckpt.iterdir()}
    for i in range(shards):
        assert f"sae_weights-{i:05d}-of-{shards:05d}.safetensors" in names
        assert f"optimizer-{i:05d}-of-{shards:05d}.safetensors" in names
    assert "sae_weights.safetensors" not in names
    manifest = json.loads((ckpt / "manifest.json").read_text())["files"]
    assert f"optimizer-{shards - 1:05d}-of-{shards:05d}.safetensors" in manifest
    sae = read_checkpoint(ckpt).sae
    assert sae.n_latents == F and sae.W_dec.shape == (F, D)


def test_sharded_checkpoint_resumes_in_one_process_and_after_a_kill(tmp_path):
    """A run killed (every process at once) after step 3, with a 2-shard checkpoint at step 2,
    resumes in one process (--latent-parallel 1) to the uninterrupted weights; a whole
    checkpoint resumes with 2 shards. A damaged optimizer shard is reported by the manifest and
    the previous checkpoint used."""
    from sparse_sae.training import Trainer
    from sparse_sae.training.checkpoint import read_checkpoint
    one = Trainer(_train_cfg(tmp_path / "one"), _data())
    one.fit()
    want = one.sae.state_dict()
    with pytest.raises(mp.ProcessExitedException):
        _run(2, _train_cfg(tmp_path / "k", latent_parallel=2), exit_at=3)
    assert not (tmp_path / "k" / "final").exists()
    resumed = Trainer(_train_cfg(tmp_path / "k"), _data(), resume=str(tmp_path / "k"))
    assert resumed.step == 2
    resumed.fit()
    _assert_same_state(resumed.sae.state_dict(), want)

    Trainer(_train_cfg(tmp_path / "w", steps=2), _data()).fit()        # whole checkpoint -> 2 shards
    _assert_same_state(_run(2, _train_cfg(tmp_path / "w", latent_parallel=2), resume=str(tmp_path / "w")), want)

    ckpt = tmp_path / "w" / "checkpoints" / "step_00000004"
    shard = ckpt / "optimizer-00001-of-00002.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="optimizer-00001-of-00002.safetensors does not match its sha256"):
        assert read_checkpoint(tmp_path / "w").path.name == "step_00000002"
    # 2 processes, each hashing half the files (rank 0 this one), both fall back to step 2
    _assert_same_state(_run(2, _train_cfg(tmp_path / "w", latent_parallel=2), resume=str(tmp_path / "w")), want)


def test_trainer_data_by_latent_mesh_equals_data_parallel(tmp_path):
    """2 data replicas x 2 latent shards (4 processes) equal 2 data-parallel processes."""
    dp = _run(2, _train_cfg(tmp_path / "dp", steps=3))
    mesh = _run(4, _train_cfg(tmp_path / "mesh", steps=3, latent_parallel=2))
    _assert_same_state(mesh, dp)


def test_data_parallel_takes_a_over_the_global_batch(tmp_path):
    """2 data-parallel processes with both paper penalties and AuxK equal one process on the global
    batch: the batch-active set A is the union over the processes, and AuxK's normaliser (the
    residual's variance) the global batch's."""
    from sparse_sae.training import Trainer
    one = Trainer(_train_cfg(tmp_path / "one", steps=4), _data())
    one.fit()
    assert one.metrics["auxk"] > 0           # latents went dead: AuxK ran
    _assert_same_state(_run(2, _train_cfg(tmp_path / "dp", steps=4)), one.sae.state_dict())


def test_sharded_save_reads_back_whole_and_by_rows(tmp_path):
    """The shard layout, written file by file as the ranks write it: read whole it equals the
    whole SAE; any row range, read from the shards or from a whole save, equals the rows of the
    whole tensors; uncovered bounds and a missing shard are refused with the file named."""
    import json
    from sparse_sae.saes import serialization
    from sparse_sae.saes.sharded import SLICED
    whole, _ = _whole("topk", torch.float64)
    whole.save(tmp_path / "whole", fold_input_scale=False)
    state = whole.state_dict()
    bounds = [shard_bounds(F, 3, r) for r in range(3)]
    for i, (a, b) in enumerate(bounds):
        serialization.write_shard(tmp_path / "sh", i, 3, {k: (v[a:b] if k in SLICED else v) for k, v in state.items()})
    serialization.write(tmp_path / "sh", class_name="TopKSAE", dtype=torch.float64, config=whole.config(),
                        tensors=None, shards={"count": 3, "bounds": bounds, "sliced": list(SLICED)})
    assert not (tmp_path / "sh" / "sae_weights.safetensors").exists()
    back = S.load(tmp_path / "sh")
    for name, t in state.items():
        assert torch.equal(back.state_dict()[name], t), name
    for rows in [(0, 1), (33, 36), (34, 35), (5, 103), (0, 103)]:
        for where in ("sh", "whole"):
            _, got, _ = serialization.read(tmp_path / where, rows=rows, sliced=SLICED)
            for name, t in state.items():
                assert torch.equal(got[name], t[rows[0]:rows[1]] if name in SLICED else t), (where, rows, name)
    meta = json.loads((tmp_path / "sh" / "config.json").read_text())
    meta["shards"]["bounds"][1][1] += 1
    (tmp_path / "sh" / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="do not cover"):
        S.load(tmp_path / "sh")
    meta["shards"]["bounds"][1][1] -= 1
    (tmp_path / "sh" / "config.json").write_text(json.dumps(meta))
    (tmp_path / "sh" / "sae_weights-00002-of-00003.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="sae_weights-00002-of-00003.safetensors"):
        S.load(tmp_path / "sh")


def test_sharded_plain_topk_keeps_no_batch_by_latent_tensor(tmp_path):
    """On one gloo process: the backward of a sharded plain Top-k saves nothing B x F (the fused
    penalty kernel needs h only for the penalties, and then it is saved once)."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        x = torch.randn(B, D, generator=torch.Generator().manual_seed(3))
        for penalties, want in (((), 0), ((S.OffSupportL1(0.1), S.L1L2Ratio(0.1)), 1)):
            sae = ShardedTopKSAE(D, F, K, penalties)
            saved = []
            with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
                out = sae(x)
            out.loss.backward()
            assert sum(shape == (B, F) for shape in saved) == want, saved
            assert sae.W_enc.grad is not None and sae.W_enc.grad.abs().sum() > 0
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------------- BatchTopK over the data replicas
CUT_ROWS = [7, 1, 12]                        # unequal replicas (skip_nonfinite can drop rows)
CUT_CASES = [("float64", 5, False), ("float32", 4, True), ("bfloat16", 3, False), ("float16", 6, True),
             ("float32", 29, True)]          # k = F: every entry; with zeros, fewer positives than k x rows


def _cut_batch(dtype_name, zeros):
    g = torch.Generator().manual_seed(5)
    h = torch.rand(sum(CUT_ROWS), 29, generator=g, dtype=torch.float64)
    h = (h * 8).round() / 8 + (0 if zeros else 0.125)     # coarse: ties at every cut
    if zeros:
        h = h * (torch.rand(h.shape, generator=g) < 0.3)
    return h.to(getattr(torch, dtype_name))


def _cut_worker(rank, world, path, result):
    from sparse_sae.training import distributed
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=world)
    try:
        ctx = distributed.Context(rank=rank, world_size=world)
        lo = sum(CUT_ROWS[:rank])
        found = []
        for dtype_name, k, zeros in CUT_CASES:
            mine = _cut_batch(dtype_name, zeros)[lo:lo + CUT_ROWS[rank]]
            cut = distributed.global_batch_cut(mine, k, ctx)
            sel = S.ops.select(mine, k, "batchtopk", cut=cut)
            pairs = {(lo + i, int(j)) for i in range(mine.shape[0]) for j, v in zip(sel.indices[i], sel.values[i])
                     if v > 0}
            parts = [None] * world
            dist.all_gather_object(parts, (cut.tolist(), pairs))
            found.append(parts)
        if rank == 0:
            torch.save(found, result)
    finally:
        dist.destroy_process_group()


def _mesh_cut_worker(rank, world, path, result):
    from sparse_sae.training import distributed
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=world)
    try:
        ctx = distributed._mesh(distributed.Context(rank=rank, world_size=world), 2)
        rows = MESH_ROWS[ctx.data_rank]
        lo_row = sum(MESH_ROWS[:ctx.data_rank])
        lo, hi = shard_bounds(29, 2, rank % 2)
        found = []
        for dtype_name, k, zeros in CUT_CASES:
            mine = _cut_batch(dtype_name, zeros)[lo_row:lo_row + rows, lo:hi]
            value, takes = distributed.global_batch_cut(mine, k, ctx, by_row=True)
            tied = mine == value
            mask = (mine > value) | (tied & (tied.cumsum(1) <= takes[:, None]))
            found.append({(lo_row + int(i), lo + int(j)) for i, j in mask.nonzero().tolist()})
        parts = [None] * world
        dist.all_gather_object(parts, found)
        if rank == 0:
            torch.save(parts, result)
    finally:
        dist.destroy_process_group()


MESH_ROWS = [7, 13]        # 2 data replicas (unequal rows) x 2 latent slices of F = 29


def test_global_batch_cut_by_row_on_a_data_by_latent_mesh():
    """On 2 data replicas x 2 latent slices, the cut with each row's ties selects together exactly
    BatchTopK's selection of the whole batch (every selected entry, zeros included), ties to the
    lower global flat index: across replicas, rows and the slices of a row."""
    with tempfile.TemporaryDirectory() as tmp:
        result = os.path.join(tmp, "found.pt")
        mp.spawn(_mesh_cut_worker, args=(4, os.path.join(tmp, "store"), result), nprocs=4, join=True)
        parts = torch.load(result)
    for c, (dtype_name, k, zeros) in enumerate(CUT_CASES):
        h = _cut_batch(dtype_name, zeros)[:sum(MESH_ROWS)]
        n = h.shape[0] * k
        flat = h.reshape(-1)
        tau = torch.topk(flat, n).values[-1]
        tied = flat == tau
        want = (flat > tau) | (tied & (tied.cumsum(0) <= n - (flat > tau).sum()))
        want = {(e // 29, e % 29) for e in want.nonzero().squeeze(1).tolist()}
        got = set().union(*(p[c] for p in parts))
        assert sum(len(p[c]) for p in parts) == n and got == want, dtype_name


def test_global_batch_cut_equals_batchtopk_on_the_whole_batch():
    """3 replicas with unequal rows, in four dtypes, with ties at the cut and with fewer positive
    entries than the budget: each replica's share of the cut (a radix select over summed
    histograms) selects, together, exactly BatchTopK's selection on the concatenated batch (the
    reference: torch.topk on the whole batch), ties to the lower global index."""
    world = len(CUT_ROWS)
    with tempfile.TemporaryDirectory() as tmp:
        result = os.path.join(tmp, "found.pt")
        mp.spawn(_cut_worker, args=(world, os.path.join(tmp, "store"), result), nprocs=world, join=True)
        found = torch.load(result)
    split = []
    for (dtype_name, k, zeros), parts in zip(CUT_CASES, found):
        h = _cut_batch(dtype_name, zeros)
        values, indices = R.batchtopk_select_ref(h, k)
        want = {(i, int(j)) for i in range(h.shape[0]) for j, v in zip(indices[i], values[i]) if v > 0}
        flat = h.reshape(-1)
        tau = torch.topk(flat, h.shape[0] * k).values[-1]
        cuts = [c for c, _ in parts]
        assert all(c[0] == float(tau) for c in cuts), (dtype_name, cuts)
        assert sum(c[1] for c in cuts) == h.shape[0] * k - int((flat > tau).sum()), (dtype_name, cuts)
        assert set().union(*(p for _, p in parts)) == want, dtype_name
        split.append(0 < sum(c[1] for c in cuts) < int((flat == tau).sum()))
    assert any(split), "some case should split the ties at the cut"


@pytest.mark.parametrize("extra", [{}, {"max_k_per_row": 7}])
def test_data_parallel_batchtopk_selects_over_the_global_batch(tmp_path, extra):
    """2 data-parallel BatchTopK processes equal one process on the global batch: the selection is
    the global batch's, and the learned threshold follows its smallest selected value."""
    from sparse_sae.training import Trainer
    cfg = dict(architecture="batchtopk", steps=4, **extra)
    one = Trainer(_train_cfg(tmp_path / "one", **cfg), _data())
    one.fit()
    assert float(one.sae.threshold) > 0
    _assert_same_state(_run(2, _train_cfg(tmp_path / "dp", **cfg)), one.sae.state_dict())


@pytest.mark.parametrize("extra", [{}, {"max_k_per_row": 7}])
def test_data_by_latent_mesh_batchtopk_equals_one_process(tmp_path, extra):
    """2 data replicas x 2 latent shards of a BatchTopK SAE equal one process on the global batch:
    the cut over every process, each row's ties handed across the slices in latent order."""
    from sparse_sae.training import Trainer
    cfg = dict(architecture="batchtopk", steps=3, **extra)
    one = Trainer(_train_cfg(tmp_path / "one", **cfg), _data())
    one.fit()
    _assert_same_state(_run(4, _train_cfg(tmp_path / "mesh", latent_parallel=2, **cfg)), one.sae.state_dict())


@pytest.mark.parametrize("dtype_name", ["float64", "float32", "bfloat16"])
def test_global_batch_cut_in_one_process_is_the_batch_own(dtype_name):
    """With one process the cut is the batch's own BatchTopK cut, by 16-bit and by 8-bit digits;
    a digit width that does not divide the key is refused."""
    from sparse_sae.training import distributed
    h = _cut_batch(dtype_name, zeros=False)
    flat, n = h.reshape(-1), h.shape[0] * 4
    tau = torch.topk(flat, n).values[-1]
    want = [float(tau), float(n - int((flat > tau).sum()))]
    for bits in (16, 8):
        assert distributed.global_batch_cut(h, 4, distributed.Context(), digit_bits=bits).tolist() == want
    with pytest.raises(ValueError, match="digit_bits must divide"):
        distributed.global_batch_cut(h, 4, distributed.Context(), digit_bits=12)


def _freed_worker(rank, world, path, result):
    import gc
    import weakref
    from sparse_sae.training import distributed
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=world)
    group = weakref.ref(dist.group.WORLD)
    ctx = distributed.Context(rank=rank, world_size=world)
    sae, x = _whole("batchtopk", torch.float32)
    out = sae(x)                       # the first custom-op call imports torch._dynamo
    out.loss.backward()
    distributed.all_reduce_gradients(list(sae.parameters()), ctx)
    distributed.shutdown(ctx)
    gc.collect()
    torch.save(group() is None, f"{result}.{rank}")


def test_destroy_process_group_frees_the_group_after_our_ops():
    """After our ops ran (their first call imports torch._dynamo and, through it,
    torch.distributed.nn.functional), shutdown frees the default process group: its gloo threads do
    not outlive the program into interpreter shutdown, where one releasing a collective's tensors
    aborts the process (CI saw "terminate called without an active exception", SIGABRT)."""
    with tempfile.TemporaryDirectory() as tmp:
        result = os.path.join(tmp, "freed")
        mp.spawn(_freed_worker, args=(2, os.path.join(tmp, "store"), result), nprocs=2, join=True)
        assert [torch.load(f"{result}.{r}") for r in range(2)] == [True, True]


def test_importing_after_init_process_group_warns(tmp_path):
    """Imported after a process group exists, sparse_sae says so (the group could outlive
    destroy_process_group); imported before, it says nothing."""
    import subprocess
    import sys
    init = (f"import torch.distributed as dist; dist.init_process_group('gloo', "
            f"init_method='file://{tmp_path / 'store'}', rank=0, world_size=1)")
    for code, warns in [(f"{init}; import sparse_sae", True), (f"import sparse_sae; {init}", False)]:
        run = subprocess.run([sys.executable, "-c", code + "; dist.destroy_process_group()"],
                             capture_output=True, text=True)
        assert run.returncode == 0, run.stderr[-2000:]
        assert ("imported after torch.distributed.init_process_group" in run.stderr) == warns, run.stderr[-2000:]
        (tmp_path / "store").unlink(missing_ok=True)
