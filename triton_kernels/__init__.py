"""Triton GPU kernels of sparse_sae (installed as ``sparse_sae.triton_kernels``).

Kernels and their launchers only; the ops in ``sparse_sae.ops`` choose them. Empty until
the Triton kernels land: GPU tensors use the reference backend meanwhile.
"""
