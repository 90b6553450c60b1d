"""The CUDA path's host-side logic, checked without a GPU: what the CUDA select does with rows
and k_aux above its buffer, the device guard around every Triton launch, the current device of a
data-parallel rank, and a training log step that never packs a dense code.

The CUDA select is stood in for by the CPU kernel (same contract, same outputs) with a small
buffer, so the Python decisions around it run for real; the kernels themselves are checked on
a GPU by tests/test_cuda_kernels.py."""
import importlib
import inspect

import pytest
import torch
from conftest import rand

import sparse_sae as S
from sparse_sae.ops._registry import _C, _IMPLS
from sparse_sae.ops.select import _select_reference
from sparse_sae.training import distributed

select_mod = importlib.import_module("sparse_sae.ops.select")   # the module (sparse_sae.ops.select is the op)

needs_ext = pytest.mark.skipif(_C is None, reason="extension not built")
FIELDS = ("values", "indices", "threshold", "active", "fired", "n1", "n2", "aux_values", "aux_indices")


@needs_ext
def test_limits_come_from_the_extension():
    assert _C.max_select == 8192 and select_mod.cuda_max_select() == _C.max_select
    assert [_C.select_capacity(n) for n in (0, 1, 2, 3, 32, 33, 8192, 8193, 10 ** 6)] == \
        [1, 1, 2, 4, 32, 64, 8192, 8192, 8192]


class _FakeCudaSelect:
    """``_C`` with ``select_cuda`` played by the CPU kernel and a buffer of ``cap`` entries: rows
    wider than it in exact-width packing return nothing, as select_cuda.cpp does."""

    def __init__(self, cap):
        self.max_select, self.calls = cap, []

    def select_cuda(self, h, k, mode, width, threshold, dead, k_aux, norms, cut=None):
        self.calls.append(dict(mode=mode, k=k, width=width, dead=dead, k_aux=k_aux))
        if mode == "threshold" and width <= 0 and int((h > threshold[None, :]).sum(1).max()) > self.max_select:
            return []
        return list(_C.select_cpu(h, k, mode, width, threshold, dead, k_aux, norms, cut))


@pytest.fixture
def fake_select(monkeypatch):
    """Installs a _FakeCudaSelect with a buffer of ``cap`` entries as select.py's ``_C``."""
    def install(cap):
        fake = _FakeCudaSelect(cap)
        monkeypatch.setattr(select_mod, "_C", fake)
        return fake
    return install


def _assert_same(got, want, skip=()):
    for name, g, w in zip(FIELDS, got, want):
        if name in skip:
            continue
        if name in ("n1", "n2"):
            torch.testing.assert_close(g, w)
        else:
            assert torch.equal(g, w), name


@needs_ext
def test_large_k_aux_keeps_the_main_selection_on_the_kernel(gen, fake_select):
    fake = fake_select(16)
    h = torch.relu(rand(gen, 7, 90, dtype=torch.float32))
    dead = torch.rand(90, generator=gen) < 0.5
    with pytest.warns(RuntimeWarning, match="AuxK candidates use the reference"):
        got = select_mod._select_cuda(h, 5, "topk", 0, None, dead, 20)
    assert fake.calls == [dict(mode="topk", k=5, width=0, dead=None, k_aux=0)]   # main selection: kernel
    _assert_same(got, _select_reference(h, 5, "topk", 0, None, dead, 20))


@needs_ext
def test_exact_width_above_the_buffer_falls_back_for_that_call(gen, fake_select):
    fake = fake_select(16)
    h = torch.relu(rand(gen, 6, 70, dtype=torch.float32))
    h[2] += 3.0   # one row far above the buffer
    thr = torch.zeros(70)
    with pytest.warns(RuntimeWarning, match="more than 16 entries"):
        got = select_mod._select_cuda(h, 0, "threshold", 0, thr, None, 0)
    _assert_same(got, _select_reference(h, 0, "threshold", 0, thr, None, 0))
    fake.calls.clear()
    got = select_mod._select_cuda(h, 0, "threshold", 12, thr, None, 0)   # a width within the buffer
    assert len(fake.calls) == 1
    _assert_same(got, _select_reference(h, 0, "threshold", 12, thr, None, 0))


@needs_ext
def test_k_above_the_buffer_uses_the_reference_with_a_warning(gen, fake_select):
    fake = fake_select(8)
    h = torch.relu(rand(gen, 3, 40, dtype=torch.float32))
    with pytest.warns(RuntimeWarning, match="above the CUDA selection's 8"):
        got = select_mod._select_cuda(h, 9, "topk", 0, None, None, 0)
    assert fake.calls == []
    _assert_same(got, _select_reference(h, 9, "topk", 0, None, None, 0))


# ----------------------------------------------------------------------------- devices
def test_every_triton_launcher_enters_a_device_guard(monkeypatch):
    pytest.importorskip("triton")
    from sparse_sae.ops import triton_backend

    class Entered(Exception):
        pass

    class Guard:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            raise Entered(self.device)

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(triton_backend, "device_guard", Guard)
    registered = {op: impls["triton"] for op, impls in _IMPLS.items() if "triton" in impls}
    assert registered == triton_backend.LAUNCHERS
    meta = torch.empty(2, 3, device="meta")   # never reaches a kernel: the guard is entered first
    for op, launcher in registered.items():
        n_args = len(inspect.signature(launcher.__wrapped__).parameters)
        with pytest.raises(Entered) as err:
            launcher(*[meta] * n_args)
        assert err.value.args[0] == meta.device, op


def test_device_guard_selects_the_tensors_gpu():
    pytest.importorskip("triton")
    from sparse_sae.ops._triton import device_guard
    guard = device_guard(torch.device("cuda", 3))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 3
    with device_guard(torch.device("cpu")):   # the interpreter's CPU tensors: nothing to select
        pass


def test_a_cuda_rank_makes_its_gpu_current(monkeypatch):
    current = []
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    ctx = distributed.init(torch.device("cuda", 1))
    assert current == [torch.device("cuda", 1)] and not ctx.enabled
    distributed.init(torch.device("cpu"))
    assert current == [torch.device("cuda", 1)]


# ----------------------------------------------------------------------------- dense codes
@pytest.mark.parametrize("make", [lambda: S.ReLUSAE(12, 300, [S.DecoderNormL1(0.01)]),
                                  lambda: S.JumpReLUSAE(12, 300, [S.L0(0.01)], init_threshold=0.01)])
def test_training_log_never_packs_a_dense_code(gen, monkeypatch, tmp_path, make):
    """On a GPU, packing a dense code at init (half of F per row) leaves the kernels (it used to
    raise): l0 for the log comes from the dense code itself."""
    from sparse_sae.training.config import TrainConfig
    from sparse_sae.training.metrics_log import read_metrics
    from sparse_sae.training.trainer import Trainer
    sae = make()
    x = rand(gen, 40, 12, dtype=torch.float32)
    out = sae(x)
    code = out.dense_code()
    monkeypatch.setattr(S.ops, "select", lambda *a, **k: pytest.fail("packed a dense code"))
    assert float(out.l0()) == pytest.approx(float((code > 0).sum(1).double().mean()), rel=1e-6)
    arch = "relu" if type(sae) is S.ReLUSAE else "jumprelu"
    cfg = TrainConfig(architecture=arch, steps=3, batch_size=32, n_latents=300, log_every=1, out_dir=str(tmp_path),
                      progress=False)
    Trainer(cfg, rand(gen, 200, 12, dtype=torch.float32)).fit()
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert len(rows) == 3 and all(r["l0"] > 0 for r in rows)


@needs_ext
def test_width_and_k_aux_are_clamped_to_F_before_the_buffer_limit(gen, fake_select):
    """A width or k_aux above F is F (every backend clamps it): it stays on the kernel when F fits."""
    fake = fake_select(16)
    h = torch.relu(rand(gen, 5, 12, dtype=torch.float32))
    dead = torch.rand(12, generator=gen) < 0.5
    got = select_mod._select_cuda(h, 3, "batchtopk", 100, None, dead, 100)
    assert len(fake.calls) == 1 and fake.calls[0]["k_aux"] == 100 and fake.calls[0]["dead"] is not None
    _assert_same(got, _select_reference(h, 3, "batchtopk", 100, None, dead, 100))
