"""Which implementation each op runs: the backend registry and the build report.

Backends: ``reference`` (pure PyTorch, any device), ``cpu`` (C++/OpenMP in ``sparse_sae._C``),
``triton`` and ``cuda`` (GPU). An op picks, from the tensor's device, the fast backend that
is built for it and falls back to the reference, saying so once. ``SPARSE_SAE_BACKEND``
forces one backend for every op; forcing one that is not available is an error that says why.
"""
from __future__ import annotations

import contextlib
import os
import warnings
from typing import Callable

import torch

BACKENDS = ("reference", "cpu", "triton", "cuda")
# The fast backend of each op on each device class, in order of preference (DESIGN.md 4).
_PREFERENCE = {"cpu": ("cpu",), "cuda": ("cuda", "triton")}

try:  # the compiled extension is optional: the package works on the reference without it
    from sparse_sae import _C  # noqa: F401
    _C_ERROR = None
except ImportError as exc:  # pragma: no cover - depends on the build
    _C = None
    _C_ERROR = f"{type(exc).__name__}: {exc}"

_IMPLS: dict[str, dict[str, Callable]] = {}
_WARNED: set = set()
_TRITON_ERROR: str | None = None   # why the triton backend did not register


_BATCH_ACTIVE_REDUCER: Callable | None = None    # see reduce_batch_active


@contextlib.contextmanager
def reduce_batch_active(reducer: Callable):
    """Inside the block, the paper's batch-active set ``A`` (an ``F`` bool mask) that the (Batch)Top-k
    ops take from the batch becomes ``reducer(A)``, and the row norms are taken over it. Data
    parallelism passes the union over the processes, so that ``A`` is the whole global batch's."""
    global _BATCH_ACTIVE_REDUCER
    previous, _BATCH_ACTIVE_REDUCER = _BATCH_ACTIVE_REDUCER, reducer
    try:
        yield
    finally:
        _BATCH_ACTIVE_REDUCER = previous


def reduces_batch_active() -> bool:
    return _BATCH_ACTIVE_REDUCER is not None


def batch_active(active: torch.Tensor) -> torch.Tensor:
    """``active`` through the reducer of :func:`reduce_batch_active`, or as it is outside one."""
    return active if _BATCH_ACTIVE_REDUCER is None else _BATCH_ACTIVE_REDUCER(active)


_BATCH_SELECTION: tuple | None = None    # see reduce_batch_selection


@contextlib.contextmanager
def reduce_batch_selection(cut: Callable, smallest: Callable):
    """Inside the block, BatchTopK selects over the global batch of a data-parallel run:
    ``cut(h, k)`` gives this process's share of the global batch's selection, as ``select``'s
    ``cut`` (a float64 ``(value, ties)``), ``cut(h, k, by_row=True)`` as ``(value, ties of each
    row)`` (a latent slice's), and ``smallest(t)`` the minimum of a 0-d tensor over the data
    replicas (the selection's smallest value, which BatchTopK's learned threshold follows)."""
    global _BATCH_SELECTION
    previous, _BATCH_SELECTION = _BATCH_SELECTION, (cut, smallest)
    try:
        yield
    finally:
        _BATCH_SELECTION = previous


def batch_cut(h: torch.Tensor, k: int, by_row: bool = False):
    """BatchTopK's cut from the reducer of :func:`reduce_batch_selection`, or None outside one
    (the batch's own)."""
    if _BATCH_SELECTION is None:
        return None
    return _BATCH_SELECTION[0](h, k, by_row=True) if by_row else _BATCH_SELECTION[0](h, k)


def batch_smallest(t: torch.Tensor) -> torch.Tensor:
    """``t`` through the minimum of :func:`reduce_batch_selection`, or as it is outside one."""
    return t if _BATCH_SELECTION is None else _BATCH_SELECTION[1](t)


def record_triton_error(reason: str) -> None:
    """Records why the Triton backend could not be imported, for ``show_build`` and errors."""
    global _TRITON_ERROR
    _TRITON_ERROR = reason


def runs_on(backend: str, device: torch.device) -> bool:
    """Whether ``backend``'s kernels take tensors on ``device``: Triton kernels take CUDA
    tensors, and CPU tensors only in Triton's interpreter (``TRITON_INTERPRET=1``)."""
    if backend == "triton":
        return device.type == "cuda" or (device.type == "cpu" and
                                         os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"))
    return True


def register_impl(op: str, backend: str, fn: Callable) -> None:
    """Records ``fn`` as ``op``'s implementation on ``backend``."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    _IMPLS.setdefault(op, {})[backend] = fn


def _warn_once(key: str, message: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def fallback_warning(op: str, reason: str) -> None:
    """Warns once per op and reason that a fast kernel handed this call to the reference."""
    _warn_once(f"fallback:{op}:{reason}", f"sparse_sae: {op} runs on the reference backend for this input: "
                                          f"{reason}")


def forced_backend() -> str | None:
    """The backend named by ``SPARSE_SAE_BACKEND``, or None."""
    name = os.environ.get("SPARSE_SAE_BACKEND", "").strip().lower()
    if not name:
        return None
    if name not in BACKENDS:
        raise ValueError(f"SPARSE_SAE_BACKEND={name!r} is not a backend; expected one of {BACKENDS}")
    return name


def backend_for(op: str, device: torch.device) -> str:
    """The backend ``op`` runs on for tensors on ``device``."""
    impls = _IMPLS.get(op, {})
    forced = forced_backend()
    if forced is not None:
        if forced in impls and runs_on(forced, device):
            return forced
        # Triton covers the GEMM- and gather-shaped ops only (DESIGN.md 4): forced, it leaves
        # an op it has no kernel for (selection) to the device's usual backend.
        triton_leaves_op = (forced == "triton" and forced not in impls
                            and any("triton" in i for i in _IMPLS.values()))
        if not triton_leaves_op:
            where = "" if forced not in impls else f" for {device.type} tensors"
            raise RuntimeError(f"SPARSE_SAE_BACKEND={forced} but op {op!r} has no {forced} "
                               f"implementation{where} ({unavailable_reason(forced, device)})")
    for backend in _PREFERENCE.get(device.type, ()):
        if backend in impls and runs_on(backend, device):
            return backend
    if _C is None and device.type == "cpu":
        _warn_once("no_ext", f"sparse_sae: the compiled extension is not available ({_C_ERROR}); "
                             "every op runs on the pure-PyTorch reference backend")
    elif device.type != "cpu":
        _warn_once(f"ref:{op}:{device.type}", f"sparse_sae: no fast {device.type} kernel for {op!r} is built; "
                                              "it runs on the reference backend")
    return "reference"


def dispatch(op: str, device: torch.device) -> Callable:
    """The implementation of ``op`` for ``device``."""
    return _IMPLS[op][backend_for(op, device)]


def unavailable_reason(backend: str, device: torch.device | None = None) -> str:
    if backend == "cpu":
        return "the extension is built" if _C is not None else f"extension not built: {_C_ERROR}"
    if backend == "cuda":
        if _C is None:
            return f"extension not built: {_C_ERROR}"
        return "the CUDA part is built" if _C.with_cuda else "the extension was built without CUDA"
    if backend == "triton":
        if _TRITON_ERROR is not None:
            return f"triton backend not available: {_TRITON_ERROR}"
        if device is not None and not runs_on("triton", device):
            return "Triton kernels run on CUDA tensors, or on CPU tensors with TRITON_INTERPRET=1"
        return "no Triton kernel for this op"
    return "always available"


def show_build(file=None) -> None:
    """Prints what was built and which backend each op uses on CPU and CUDA tensors (of the ops
    registered so far: call it as ``sparse_sae.ops.show_build``, which has registered them all)."""
    def line(s=""):
        print(s, file=file)

    line(f"sparse_sae extension: {_C.build_info() if _C is not None else 'not built (' + str(_C_ERROR) + ')'}")
    try:
        import triton
        line(f"triton: {triton.__version__}")
    except ImportError:
        line("triton: not installed")
    line(f"torch: {torch.__version__} (cuda {torch.version.cuda}, GPU visible: {torch.cuda.is_available()})")
    forced = forced_backend()
    if forced:
        line(f"SPARSE_SAE_BACKEND={forced}")
    if _C is not None and _C.with_cuda:
        line(f"limits: the CUDA select keeps at most {_C.max_select} entries per row (k, k_aux, packed width); "
             "beyond that, and for float64 or dx in the Triton kernels, an op runs on the reference (warned once)")
    width = max(map(len, _IMPLS), default=2) + 2
    line(f"{'op':<{width}}{'cpu tensors':<14}{'cuda tensors':<14}implementations")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for op in sorted(_IMPLS):
            cpu = backend_for(op, torch.device("cpu"))
            cuda = backend_for(op, torch.device("cuda"))
            line(f"{op:<{width}}{cpu:<14}{cuda:<14}{', '.join(sorted(_IMPLS[op]))}")
