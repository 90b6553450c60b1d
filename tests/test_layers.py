"""The package's layers (docs/architecture.md): imports point only down, and there is no import
cycle, counting imports inside functions too (a lazy import hides a cycle from ``import``, not
from the design). Read from the source with ``ast``, so the check needs no built extension.

Also: the module paths of earlier releases still import, as aliases of the new modules."""
import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "sparse_sae"

# Lowest first. A module may import from its own layer and the layers below it.
LAYERS = [
    {"_version", "_files", "_checks", "reference", "geometric_median", "penalties", "_C"},  # math, small pieces
    {"ops", "triton_kernels"},      # the kernels' ops and their backends
    {"saes"},                       # the SAE modules and their file format
    {"training", "io"},             # the trainer and its data; extraction and interop
    {"eval"},                       # evaluation, the synthetic benchmark, the demo run
    {"features"},                   # the feature browser
    {"cli", "__main__", "_compat"},  # commands; the aliases of old paths
    {""},                           # the package's __init__: the public API
]
LAYER_OF = {name: i for i, layer in enumerate(LAYERS) for name in layer}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _import_graph() -> dict:
    """``{module: {sparse_sae modules it imports anywhere in its source}}``."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names if a.name.split(".")[0] == "sparse_sae")
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module \
                    and node.module.split(".")[0] == "sparse_sae":
                for a in node.names:   # `from pkg import module` imports the module
                    full = f"{node.module}.{a.name}"
                    targets.add(full if full in modules or a.name == "_C" else node.module)
        graph[name] = targets - {name}
    return graph


def _layer(module: str) -> int:
    top = module.split(".")[1] if "." in module else ""
    assert top in LAYER_OF, f"{module} is in no layer of tests/test_layers.py (add it, and to docs/architecture.md)"
    return LAYER_OF[top]


def test_imports_point_down():
    upward = [f"{m} (layer {_layer(m)}) imports {t} (layer {_layer(t)})"
              for m, targets in _import_graph().items() for t in sorted(targets) if _layer(t) > _layer(m)]
    assert not upward, "imports that point up:\n" + "\n".join(upward)


def _cycles(graph: dict) -> list:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _parent_edges(graph: dict) -> dict:
    """Importing ``a.b.c`` first runs ``a.b``'s ``__init__``: the graph with those edges added
    (except a package's own edge to its children, which is how a package imports them)."""
    full = {m: set(t) for m, t in graph.items()}
    for m in graph:
        for t in graph[m]:
            parts = t.split(".")
            for i in range(2, len(parts)):
                parent = ".".join(parts[:i])
                if parent in graph and not m.startswith(parent + ".") and m != parent:
                    full[m].add(parent)
    return full


def test_no_import_cycle():
    cycles = _cycles(_parent_edges(_import_graph()))
    assert not cycles, f"import cycles: {cycles}"


def test_cycle_finder_finds_a_planted_cycle():
    """The check itself can fail: a planted cycle and an upward import are reported."""
    graph = {"sparse_sae.saes.base": {"sparse_sae.training.trainer"},
             "sparse_sae.training.trainer": {"sparse_sae.saes.base"}, "sparse_sae.ops": set()}
    assert _cycles(graph) == [["sparse_sae.saes.base", "sparse_sae.training.trainer"]]
    assert _layer("sparse_sae.training.trainer") > _layer("sparse_sae.saes.base")


@pytest.mark.parametrize("module", sorted(m for m in _import_graph()
                                          if m.count(".") <= 1 and m != "sparse_sae.__main__"))
def test_each_layer_imports_alone(module):
    """Each subpackage and top-level module imports first in a fresh interpreter (no reliance on
    something else having been imported before it)."""
    r = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]


OLD_TO_NEW = [
    ("sparse_sae.train", "Trainer", "sparse_sae.training.trainer"),
    ("sparse_sae.config", "TrainConfig", "sparse_sae.training.config"),
    ("sparse_sae.modules", "TopKSAE", "sparse_sae.saes.topk"),
    ("sparse_sae.serialization", "load", "sparse_sae.saes.base"),
    ("sparse_sae.checkpoint", "save_checkpoint", "sparse_sae.training.checkpoint"),
    ("sparse_sae.data", "ActivationLoader", "sparse_sae.training.data"),
    ("sparse_sae.extract", "extract", "sparse_sae.io.extract"),
    ("sparse_sae.interop", "to_saelens", "sparse_sae.io.interop"),
    ("sparse_sae.synthetic", "make_synthetic", "sparse_sae.eval.synthetic"),
    ("sparse_sae.backends", "backend_for", "sparse_sae.ops._registry"),
    ("sparse_sae.ops.triton_backend", "device_guard", "sparse_sae.ops._triton"),
]


@pytest.mark.parametrize("old,attr,home", OLD_TO_NEW)
def test_old_import_paths_still_work(old, attr, home):
    pytest.importorskip("triton") if old.endswith("triton_backend") else None
    importlib.import_module("sparse_sae")
    module = importlib.import_module(old)
    assert getattr(module, attr) is getattr(importlib.import_module(home), attr)
    assert importlib.import_module(home).__spec__.name == home   # the alias did not rename the module


def test_top_level_names():
    import sparse_sae as S
    from sparse_sae.saes import relu, topk
    assert S.TopKSAE is topk.TopKSAE and S.JumpReLUSAE is relu.JumpReLUSAE
    assert set(S.ARCHITECTURES) == {"TopKSAE", "BatchTopKSAE", "MatryoshkaTopKSAE", "ReLUSAE", "JumpReLUSAE",
                                    "GatedSAE"}
