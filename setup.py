"""Build sparse_sae and its extension sparse_sae._C.

Build switches (environment variables):
  SPARSE_SAE_FORCE_CPU=1    build only the C++ CPU part, even when CUDA is available.
  SPARSE_SAE_FORCE_CUDA=1   fail unless the CUDA part is built.
  SPARSE_SAE_SKIP_EXT=1     build no extension at all (the package runs on the reference).
  TORCH_CUDA_ARCH_LIST      CUDA architectures, default "8.0;9.0" (never "what is visible":
                            builders usually have no GPU, pytorch/pytorch#137261).
  NVCC_THREADS              nvcc --threads, default 2.
  DEBUG=1                   -O0 -g.
  CUDA_HOME                 the CUDA toolkit; set to /usr/local/cuda when unset and present
                            (a `nvcc` wrapper on PATH misleads torch's detection).
"""
import glob
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
FORCE_CPU = os.environ.get("SPARSE_SAE_FORCE_CPU", "0") == "1"
FORCE_CUDA = os.environ.get("SPARSE_SAE_FORCE_CUDA", "0") == "1"
SKIP_EXT = os.environ.get("SPARSE_SAE_SKIP_EXT", "0") == "1"
DEBUG = os.environ.get("DEBUG", "0") == "1"
NVCC_THREADS = os.environ.get("NVCC_THREADS", "2")

if "CUDA_HOME" not in os.environ and os.path.exists("/usr/local/cuda/bin/nvcc"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")


def _log(msg):
    print(f"sparse_sae setup: {msg}", file=sys.stderr)


def _extensions():
    if SKIP_EXT:
        _log("SPARSE_SAE_SKIP_EXT=1: building no extension")
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    cpp_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cu_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    opt = ["-O0", "-g"] if DEBUG else ["-O3"]
    # No -std flag: torch picks the standard its headers need (C++17 up to 2.13, C++20 from 2.14).
    cxx = opt + ["-fopenmp"]
    link = ["-fopenmp"]
    include = [os.path.join(ROOT, "csrc")]

    reason = None
    if FORCE_CPU:
        reason = "SPARSE_SAE_FORCE_CPU=1"
    elif torch.version.cuda is None:
        reason = f"torch {torch.__version__} is a CPU build"
    elif CUDA_HOME is None:
        reason = "no CUDA toolkit found (set CUDA_HOME)"
    elif not cu_sources:
        reason = "no CUDA sources"
    if reason is not None and FORCE_CUDA:
        raise RuntimeError(f"SPARSE_SAE_FORCE_CUDA=1 but the CUDA part cannot be built: {reason}")

    if reason is None:
        _log(f"building CPU + CUDA (CUDA_HOME={CUDA_HOME}, archs {os.environ['TORCH_CUDA_ARCH_LIST']})")
        nvcc = opt + ["--threads", NVCC_THREADS, "-lineinfo",
                      f"-DSPARSE_SAE_CUDA_ARCHS=\"{os.environ['TORCH_CUDA_ARCH_LIST']}\""]
        ext = CUDAExtension(
            "sparse_sae._C", cpp_sources + cu_sources, include_dirs=include,
            define_macros=[("SPARSE_SAE_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": nvcc}, extra_link_args=link)
    else:
        _log(f"building the CPU part only: {reason}")
        ext = CppExtension("sparse_sae._C", cpp_sources, include_dirs=include,
                           extra_compile_args={"cxx": cxx}, extra_link_args=link)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(
    packages=["sparse_sae", "sparse_sae.ops", "sparse_sae.saes", "sparse_sae.training", "sparse_sae.io",
              "sparse_sae.eval", "sparse_sae.features", "sparse_sae.cli", "sparse_sae.triton_kernels"],
    package_dir={"sparse_sae.triton_kernels": "triton_kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
