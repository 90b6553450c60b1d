"""sparse_sae: fast sparse autoencoders with fused sparsity regularizers.

Top-k, BatchTopK, Matryoshka Top-k, ReLU, JumpReLU and Gated SAEs as drop-in ``torch.nn``
modules, with the off-support l1 and l1/l2-ratio penalties of "Beyond the Hard Budget" (arXiv:2606.27321)
computed by fused kernels. See README.md, DESIGN.md and docs/architecture.md (the layers).
"""
from sparse_sae import _compat, ops
from sparse_sae._version import __version__
from sparse_sae.ops import show_build
from sparse_sae.penalties import L0, AuxK, DecoderNormL1, L1L2Ratio, OffSupportL1, Penalty
from sparse_sae.saes import (
    ARCHITECTURES,
    BatchTopKSAE,
    GatedSAE,
    JumpReLUSAE,
    MatryoshkaTopKSAE,
    ReLUSAE,
    SAEOutput,
    ShardedTopKSAE,
    SparseAutoencoder,
    TopKSAE,
    load,
    save,
)

_compat.install()   # the module paths of earlier releases (sparse_sae.train, sparse_sae.modules, ...)


def __getattr__(name):
    """``sparse_sae.train``, ``sparse_sae.serialization``, ...: the modules of earlier releases,
    imported on first access like any submodule."""
    if f"sparse_sae.{name}" in _compat.OLD_PATHS:
        import importlib
        return importlib.import_module(f"sparse_sae.{name}")
    raise AttributeError(f"module 'sparse_sae' has no attribute {name!r}")

__all__ = ["TopKSAE", "BatchTopKSAE", "MatryoshkaTopKSAE", "ReLUSAE", "JumpReLUSAE", "GatedSAE", "ShardedTopKSAE", "SparseAutoencoder", "SAEOutput",
           "OffSupportL1", "L1L2Ratio", "DecoderNormL1", "L0", "AuxK", "Penalty", "save", "load",
           "show_build", "ops", "ARCHITECTURES", "__version__"]
