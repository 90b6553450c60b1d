"""What a training step keeps and waits for: plain Top-k saves no ``B x F`` tensor for its
backward, and a step of the trainer makes no host synchronisation outside its log steps."""
import sys

import pytest
import torch
from conftest import rand

import sparse_sae as S


def _saved_shapes(sae, x):
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = sae(x)
    return out, shapes


@pytest.mark.parametrize("make,keeps_h", [
    (lambda: S.TopKSAE(40, 333, 7), False),
    (lambda: S.TopKSAE(40, 333, 7, auxk=S.AuxK(k_aux=9, dead_after_tokens=1)), False),
    (lambda: S.BatchTopKSAE(40, 333, 7), False),
    (lambda: S.TopKSAE(40, 333, 7, [S.OffSupportL1(0.1)]), True),   # the penalty's backward reads h
])
def test_plain_topk_saves_no_batch_by_latent_tensor(gen, make, keeps_h):
    sae = make()
    x = rand(gen, 61, 40, dtype=torch.float32)
    out, shapes = _saved_shapes(sae, x)
    assert ((61, 333) in shapes) == keeps_h, shapes
    out.loss.backward()   # and the backward still works from what was kept
    assert torch.isfinite(sae.W_enc.grad).all() and sae.W_enc.grad.abs().sum() > 0


def test_plain_topk_gradient_unchanged_without_norms(gen, monkeypatch):
    """The plain path (no norms, no h kept) gives the reference backend's gradients."""
    from conftest import assert_module_backend_matches_reference
    sae = S.TopKSAE(29, 131, 7, auxk=S.AuxK(k_aux=5, dead_after_tokens=1), dtype=torch.float64)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(rand(gen, *p.shape) * 0.3)
        sae.tokens_since_fired.copy_(torch.arange(131) % 2)
    assert_module_backend_matches_reference(sae, rand(gen, 45, 29), "cpu", monkeypatch)


def test_unpenalized_code_has_constant_zero_penalties(gen):
    """penalized=False: no norms, penalty outputs are constant zeros (their gradient is zero)."""
    from sparse_sae import ops
    x = rand(gen, 9, 12, dtype=torch.float32)
    W = rand(gen, 30, 12, dtype=torch.float32).requires_grad_()
    code = ops.topk_code(x, W, torch.zeros(30), torch.zeros(12), 3, penalized=False)
    assert float(code.n1.abs().sum()) == 0 and float(code.off_support_l1.detach()) == 0 \
        and float(code.l1_l2_ratio.detach()) == 0
    code.values.sum().backward()
    g_values = W.grad.clone()
    W.grad = None
    code = ops.topk_code(x, W, torch.zeros(30), torch.zeros(12), 3, penalized=False)
    (code.values.sum() + 5 * code.off_support_l1).backward()
    assert torch.equal(W.grad, g_values)


SYNCING = ("item", "tolist", "cpu", "__bool__", "__float__", "__int__")


@pytest.mark.parametrize("arch,extra", [("topk", dict(off_support_l1=0.1, l1_l2_ratio=0.01, auxk=0.05)),
                                        ("topk", dict(auxk=0.0)),
                                        ("batchtopk", dict(off_support_l1=0.1, max_k_per_row=12))])
def test_training_steps_make_no_host_sync_outside_log_steps(gen, tmp_path, monkeypatch, arch, extra):
    """After warm-up, a training step calls none of the Tensor methods that wait for the device
    (item, tolist, cpu, bool, float, int); the checks that need the host run on log steps. On a
    GPU the same holds under torch.cuda.set_sync_debug_mode("error") (tests/test_cuda_kernels.py).
    Not yet ReLU/JumpReLU: their threshold code picks its regime (and JumpReLU its band width) on
    the host, once a step."""
    from sparse_sae.training.config import TrainConfig
    from sparse_sae.training.trainer import Trainer
    cfg = TrainConfig(architecture=arch, steps=50, batch_size=64, n_latents=96, k=4, log_every=50,
                      checkpoint_every=0, dead_after_tokens=128, out_dir=str(tmp_path), progress=False, **extra)
    trainer = Trainer(cfg, rand(gen, 700, 24, dtype=torch.float32))
    batches = [trainer.loader.next_batch() for _ in range(5)]
    for x in batches[:2]:
        trainer.train_step(x)   # warm-up (lazy state, Adam's first step)
    calls = []

    def counting(name, original):
        def method(self, *args, **kwargs):
            caller = sys._getframe(1)
            calls.append((name, caller.f_code.co_filename, caller.f_code.co_name, caller.f_lineno))
            return original(self, *args, **kwargs)
        return method

    for name in SYNCING:
        monkeypatch.setattr(torch.Tensor, name, counting(name, getattr(torch.Tensor, name)))
    for x in batches[2:]:
        trainer.train_step(x)
    monkeypatch.undo()
    # the op checks' index range test on CPU tensors (on CUDA tensors: torch._assert_async)
    syncs = [c for c in calls if not (c[1].endswith("_checks.py") and c[2] == "check_op_args")]
    assert syncs == [], syncs
    trainer.check_finite_steps()   # the deferred check, as a log step runs it
