"""The custom ops of sparse_sae, each registered once with ``torch.library``.

Kernel ops (DESIGN.md section 3): ``encode``, ``select``, ``penalty_backward`` and
``sparse_decode`` (with ``sparse_decode_backward``). ``topk_code`` composes encode and
select into one autograd node whose backward is ``penalty_backward``, so the dense penalty
gradient of a (Batch)Top-k SAE is never materialised by autograd; ``threshold_code`` does the
same for the ReLU and JumpReLU SAEs (threshold select, sparse or dense by density).
"""
import sys
import warnings

import torch.distributed

# The first call of a torch.library custom op imports torch._dynamo, which imports
# torch.distributed.nn.functional, whose functions take ``group=group.WORLD`` as a default
# argument evaluated at import. Imported after init_process_group, those defaults hold the default
# process group for ever: destroy_process_group can no longer free it, its gloo threads outlive
# the program into interpreter shutdown, and one that releases a finished collective's tensors
# there (it needs the GIL) aborts the process ("terminate called without an active exception").
# Imported here, with ``import sparse_sae``, before a process group exists, the defaults are None.
if torch.distributed.is_available():
    if torch.distributed.is_initialized() and "torch.distributed.nn.functional" not in sys.modules:
        warnings.warn("sparse_sae was imported after torch.distributed.init_process_group: import it "
                      "first, or the default process group outlives destroy_process_group and a gloo "
                      "process can abort at exit (README, Scaling out)", RuntimeWarning, stacklevel=2)
    import torch.distributed.nn.functional  # noqa: F401

from sparse_sae.ops._registry import (batch_active, batch_cut, batch_smallest, reduce_batch_active,
                                      reduce_batch_selection, show_build)
from sparse_sae.ops.encode import encode
from sparse_sae.ops.penalty_backward import penalty_backward
from sparse_sae.ops.select import SelectResult, select
from sparse_sae.ops.sparse_decode import sparse_decode, sparse_decode_backward
from sparse_sae.ops.threshold_code import ThresholdCode, threshold_code
from sparse_sae.ops.topk_code import TopKCode, topk_code

try:  # the triton backend is optional: without Triton, GPU ops use cuda/reference
    from sparse_sae.ops import _triton  # noqa: F401
except ImportError as _exc:  # pragma: no cover - depends on the environment
    from sparse_sae.ops import _registry
    _registry.record_triton_error(f"{type(_exc).__name__}: {_exc}")

__all__ = ["show_build", "reduce_batch_active", "batch_active", "reduce_batch_selection", "batch_cut", "batch_smallest", "encode", "select", "SelectResult", "penalty_backward", "sparse_decode",
           "sparse_decode_backward", "topk_code", "TopKCode", "threshold_code", "ThresholdCode"]
