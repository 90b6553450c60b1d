"""sparse_sae: fast sparse autoencoders with fused sparsity regularizers.

Top-k, BatchTopK, ReLU and JumpReLU SAEs as drop-in ``torch.nn`` modules, with the
off-support l1 and l1/l2-ratio penalties of "Beyond the Hard Budget" (arXiv:2606.27321)
computed by fused kernels. See README.md and DESIGN.md.
"""
from sparse_sae import ops
from sparse_sae.backends import show_build
from sparse_sae.modules import (ARCHITECTURES, BatchTopKSAE, JumpReLUSAE, ReLUSAE, SAEOutput, SparseAutoencoder,
                                TopKSAE)
from sparse_sae.penalties import L0, AuxK, DecoderNormL1, L1L2Ratio, OffSupportL1, Penalty
from sparse_sae.serialization import load, save

__version__ = "0.1.0"

__all__ = ["TopKSAE", "BatchTopKSAE", "ReLUSAE", "JumpReLUSAE", "SparseAutoencoder", "SAEOutput",
           "OffSupportL1", "L1L2Ratio", "DecoderNormL1", "L0", "AuxK", "Penalty", "save", "load",
           "show_build", "ops", "ARCHITECTURES", "__version__"]
