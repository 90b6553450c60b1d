// The one binding file of sparse_sae._C. Kernels are plain functions bound with pybind11;
// the Python ops in sparse_sae/ops choose them by device (see backends.py).
#include <omp.h>
#include <torch/extension.h>

#include "kernels.h"
#ifdef SPARSE_SAE_WITH_CUDA
#include "cuda/build_info.h"
#endif

static std::string build_info() {
  std::string s = "cpu (openmp, max threads " + std::to_string(omp_get_max_threads()) + ")";
#ifdef SPARSE_SAE_WITH_CUDA
  s += "; " + sparse_sae::cuda_build_info();
#else
  s += "; cuda not built";
#endif
  return s;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "sparse_sae compiled kernels";
  m.def("build_info", &build_info, "What this extension was built with");
#ifdef SPARSE_SAE_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
  m.def("sparse_decode_cpu", &sparse_sae::sparse_decode_cpu, "recon = b_dec + sum_j values[:, j] * W_dec[indices[:, j]]",
        py::arg("values"), py::arg("indices"), py::arg("W_dec"), py::arg("b_dec"));
}
