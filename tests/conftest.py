import os
import zlib

import pytest
import torch


@pytest.fixture
def gen(request):
    """A generator seeded from the test's id: fresh data per test, reproducible per test."""
    seed = zlib.crc32(request.node.nodeid.encode()) ^ int(os.environ.get("SPARSE_SAE_TEST_SEED", "0"))
    return torch.Generator().manual_seed(seed)


def rand(gen, *shape, dtype=torch.float64, scale=1.0):
    return torch.randn(*shape, generator=gen, dtype=dtype) * scale


def sae_params(gen, D, F, dtype=torch.float64, requires_grad=True):
    """Random SAE parameters with a spread of positive and negative pre-activations."""
    W_enc = rand(gen, F, D, dtype=dtype) / D ** 0.5
    b_enc = rand(gen, F, dtype=dtype, scale=0.3)
    W_dec = rand(gen, F, D, dtype=dtype) / D ** 0.5
    b_dec = rand(gen, D, dtype=dtype, scale=0.1)
    params = [W_enc, b_enc, W_dec, b_dec]
    for p in params:
        p.requires_grad_(requires_grad)
    return params


def assert_grads_close(got, want, **tol):
    for i, (g, w) in enumerate(zip(got, want)):
        if w is None:
            assert g is None or torch.count_nonzero(g) == 0, f"gradient {i}: expected none"
            continue
        assert g is not None, f"gradient {i} is missing"
        torch.testing.assert_close(g, w, msg=lambda m: f"gradient {i}: {m}", **tol)


def assert_module_backend_matches_reference(sae, x, backend: str, monkeypatch, **tol):
    """One forward and backward of ``sae`` on ``x`` under ``SPARSE_SAE_BACKEND=reference`` and under
    ``backend``, from the same state: loss, loss terms, reconstruction, support and every
    parameter gradient must agree."""
    from sparse_sae.ops._registry import backend_for
    outs = []
    for name in ("reference", backend):
        monkeypatch.setenv("SPARSE_SAE_BACKEND", name)
        assert backend_for("penalty_backward", x.device) == name
        state = {k: v.clone() for k, v in sae.state_dict().items()}
        out = sae(x)
        sae.zero_grad()
        out.loss.backward()
        outs.append((out, [p.grad.clone() for p in sae.parameters()]))
        sae.load_state_dict(state)
    (ref, ref_grads), (got, got_grads) = outs
    torch.testing.assert_close(got.loss, ref.loss, **tol)
    for key in ref.losses:
        torch.testing.assert_close(got.losses[key], ref.losses[key], **tol)
    torch.testing.assert_close(got.recon, ref.recon, **tol)
    assert torch.equal(got.indices, ref.indices)
    assert_grads_close(got_grads, ref_grads, **tol)
