"""Triton GPU kernels of sparse_sae (installed as ``sparse_sae.triton_kernels``).

Kernels and their launchers only (``encode``, ``penalty_backward``, ``sparse_decode``); the
ops in ``sparse_sae.ops`` choose them (``sparse_sae/ops/triton_backend.py``).
"""
