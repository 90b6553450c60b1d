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
