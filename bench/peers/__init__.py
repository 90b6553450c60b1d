"""One adapter per implementation the benchmark compares (``ours`` first: the ratios are to it).

Each adapter module has ``NAME``, ``PACKAGE``, ``version()``, ``variants()`` and
``build(variant, weights, k) -> common.Runner``; ``build`` raises ``common.Unavailable`` for a
peer that is not installed or has no such variant, which the suite turns into a skipped row.
``ZERO_B_DEC = True`` marks a peer without a decoder bias (it gets ``b_dec = 0``)."""
from __future__ import annotations

import importlib

ADAPTERS = ("ours", "dense", "sparsify", "overcomplete", "saelens")


def load(name: str):
    if name not in ADAPTERS:
        raise ValueError(f"unknown implementation {name!r}; expected one of {ADAPTERS}")
    return importlib.import_module(f"{__name__}.{name}")
