"""The module paths of releases before the package was split into layers, kept importable.

``import sparse_sae.train`` or ``from sparse_sae.modules import TopKSAE`` still work: each old
name is an alias of the module that now holds the code (the same module object, so patching
one patches the other). New code should import from the new paths (docs/architecture.md).
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

OLD_PATHS = {
    "sparse_sae.modules": "sparse_sae.saes",
    "sparse_sae.serialization": "sparse_sae.saes",
    "sparse_sae.config": "sparse_sae.training.config",
    "sparse_sae.train": "sparse_sae.training.trainer",
    "sparse_sae.checkpoint": "sparse_sae.training.checkpoint",
    "sparse_sae.data": "sparse_sae.training.data",
    "sparse_sae.prefetch": "sparse_sae.training.prefetch",
    "sparse_sae.distributed": "sparse_sae.training.distributed",
    "sparse_sae.metrics_log": "sparse_sae.training.metrics_log",
    "sparse_sae.run_lock": "sparse_sae.training.run_lock",
    "sparse_sae.extract": "sparse_sae.io.extract",
    "sparse_sae.interop": "sparse_sae.io.interop",
    "sparse_sae.features.sidecar": "sparse_sae.io.sidecar",
    "sparse_sae.synthetic": "sparse_sae.eval.synthetic",
    "sparse_sae.demo": "sparse_sae.eval.demo",
    "sparse_sae.backends": "sparse_sae.ops._registry",
    "sparse_sae.ops.triton_backend": "sparse_sae.ops._triton",
    "sparse_sae.bench": "sparse_sae.cli",
    "sparse_sae.bench.cli": "sparse_sae.cli.bench",
    "sparse_sae.eval.cli": "sparse_sae.cli.eval",
    "sparse_sae.features.cli": "sparse_sae.cli.features",
}


class _AliasLoader(importlib.abc.Loader):
    def __init__(self, target: str):
        self.target = target

    def create_module(self, spec):
        module = importlib.import_module(self.target)
        self.real_spec = module.__spec__
        return module

    def exec_module(self, module):
        # the import system has set the alias's spec on the real module: give it its own back
        module.__spec__ = self.real_spec


class _AliasFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        new = OLD_PATHS.get(fullname)
        if new is None:
            return None
        return importlib.util.spec_from_loader(fullname, _AliasLoader(new))


def install() -> None:
    """Puts the alias finder on ``sys.meta_path`` (once)."""
    if not any(isinstance(f, _AliasFinder) for f in sys.meta_path):
        sys.meta_path.append(_AliasFinder())
