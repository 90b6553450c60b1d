"""pytest-benchmark timings of one training step per implementation, at a small CPU shape:
``pytest bench/test_bench_suite.py --benchmark-enable`` (the test run disables benchmarks, then
each runs once). Missing peers are skipped. Ratios side by side: bench/suite.py."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import suite  # noqa: E402
from peers import ADAPTERS  # noqa: E402
from peers.common import VARIANTS, Unavailable, make_step  # noqa: E402

SHAPE = (512, 256, 2048, 32)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("impl", ADAPTERS)
def test_step(benchmark, impl, variant):
    import torch
    try:
        runner, _, x = suite.setup(impl, variant, SHAPE, torch.device("cpu"), torch.float32)
    except Unavailable as exc:
        pytest.skip(str(exc))
    benchmark.extra_info.update(dict(zip("BDFk", SHAPE)), variant=variant, impl=impl)
    benchmark(make_step(runner, x))
