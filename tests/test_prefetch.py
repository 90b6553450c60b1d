"""The prefetching loader: the plain loader's batches in the plain loader's order, a position that
resumes exactly, errors at the batch where they happen, and a bounded number of batches ahead."""
import time

import numpy as np
import pytest
import torch

from sparse_sae.training.data import ActivationLoader, NonFiniteDataError, open_source
from sparse_sae.training.prefetch import PrefetchingLoader


@pytest.fixture
def source(tmp_path, gen):
    rows = torch.randn(1037, 13, generator=gen).numpy()
    np.save(tmp_path / "a.npy", rows[:600])
    np.save(tmp_path / "b.npy", rows[600:])
    return open_source(tmp_path)


def _loader(source, **kw):
    return ActivationLoader(source, 96, seed=5, memory_budget_mb=0.02, **kw)


def test_same_batches_and_positions_as_the_plain_loader(source):
    plain, ahead = _loader(source), PrefetchingLoader(_loader(source), torch.device("cpu"), torch.float64, depth=3)
    try:
        for _ in range(25):   # more than two epochs
            want = plain.next_batch()
            got = ahead.next_batch()
            assert got.dtype == torch.float64 and torch.equal(got, want.double())
            assert ahead.state_dict() == plain.state_dict()   # the batches taken, not those prepared
    finally:
        ahead.close()


def test_resume_from_a_taken_position_is_exact(source):
    ahead = PrefetchingLoader(_loader(source), torch.device("cpu"), torch.float32)
    first = [ahead.next_batch() for _ in range(7)]
    state = ahead.state_dict()
    rest = [ahead.next_batch() for _ in range(9)]
    ahead.close()
    again = PrefetchingLoader(_loader(source), torch.device("cpu"), torch.float32)
    again.load_state_dict(state)
    try:
        assert all(torch.equal(a, b) for a, b in zip(rest, (again.next_batch() for _ in range(9))))
    finally:
        again.close()
    assert len(first) == 7


def test_error_arrives_at_its_batch_and_a_bound_on_batches_ahead(tmp_path, gen):
    rows = torch.randn(800, 6, generator=gen).numpy()
    rows[650, 2] = np.nan
    np.save(tmp_path / "x.npy", rows)
    src = open_source(tmp_path / "x.npy")
    plain = ActivationLoader(src, 100, shuffle=False, memory_budget_mb=0.001)
    n_ok = 0
    with pytest.raises(NonFiniteDataError):
        while True:
            plain.next_batch()
            n_ok += 1
    inner = ActivationLoader(src, 100, shuffle=False, memory_budget_mb=0.001)
    ahead = PrefetchingLoader(inner, torch.device("cpu"), torch.float32, depth=2)
    ahead.next_batch()
    time.sleep(0.3)   # let the thread fill its queue
    assert inner.position <= 100 * (1 + 2 + 1)   # taken + depth waiting + one in hand
    for _ in range(n_ok - 1):
        ahead.next_batch()
    with pytest.raises(NonFiniteDataError):
        ahead.next_batch()
    assert ahead.state_dict()["position"] == 100 * n_ok   # the position of the last good batch
    ahead.close()
