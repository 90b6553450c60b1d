// The one binding file of sparse_sae._C. Kernels are plain functions bound with pybind11;
// the Python ops in sparse_sae/ops choose them by device (see backends.py).
#include <omp.h>
#include <torch/extension.h>

#include "kernels.h"
#include "select_common.h"
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
  m.attr("max_select") = sparse_sae::kMaxSelect;
  m.def("select_capacity", [](int64_t n) { return sparse_sae::select_capacity(n); },
        "Candidate-buffer size of the CUDA selection for n entries of a row");
  m.def("sparse_decode_cpu", &sparse_sae::sparse_decode_cpu, "recon = b_dec + sum_j values[:, j] * W_dec[indices[:, j]]",
        py::arg("values"), py::arg("indices"), py::arg("W_dec"), py::arg("b_dec"));
  m.def("sparse_decode_backward_cpu", &sparse_sae::sparse_decode_backward_cpu,
        "(d_values, dW_dec) of sparse_decode_cpu, grouped by latent", py::arg("grad"), py::arg("values"),
        py::arg("indices"), py::arg("W_dec"));
  m.def("select_cpu", &sparse_sae::select_cpu,
        "Top-k / BatchTopK / threshold selection with its statistics (see sparse_sae/ops/select.py)",
        py::arg("h"), py::arg("k"), py::arg("mode"), py::arg("width"), py::arg("threshold"), py::arg("dead"),
        py::arg("k_aux"), py::arg("norms") = true, py::arg("cut") = py::none());
  m.def("key_histogram_cpu", &sparse_sae::key_histogram_cpu,
        "Digit histogram of h's ordered keys under a fixed high part (a radix select pass)", py::arg("h"),
        py::arg("high"), py::arg("shift"), py::arg("bits"));
  m.def("penalty_backward_cpu", &sparse_sae::penalty_backward_cpu,
        "Encoder gradients from the rebuilt penalty gradient plus a sparse gradient",
        py::arg("x"), py::arg("W_enc"), py::arg("b_dec"), py::arg("h"), py::arg("active"), py::arg("n1"),
        py::arg("n2"), py::arg("sp_indices"), py::arg("sp_grad"), py::arg("coef_off"), py::arg("coef_ratio"),
        py::arg("eps"), py::arg("need_dx"));
  m.def("threshold_code_cpu", &sparse_sae::threshold_code_cpu,
        "Threshold code of z (ReLU or JumpReLU) packed or dense by density (see sparse_sae/ops/threshold_code.py)",
        py::arg("z"), py::arg("theta"), py::arg("bandwidth"), py::arg("width"), py::arg("regime"));
  m.def("threshold_dense_backward_cpu", &sparse_sae::threshold_dense_backward_cpu,
        "Encoder and threshold gradients of the dense threshold code", py::arg("x"), py::arg("W_enc"),
        py::arg("b_dec"), py::arg("z"), py::arg("theta"), py::arg("bandwidth"), py::arg("grad"), py::arg("need_dx"));
#ifdef SPARSE_SAE_WITH_CUDA
  m.def("select_cuda", &sparse_sae::select_cuda, "select_cpu's contract on CUDA tensors", py::arg("h"),
        py::arg("k"), py::arg("mode"), py::arg("width"), py::arg("threshold"), py::arg("dead"), py::arg("k_aux"),
        py::arg("norms") = true, py::arg("cut") = py::none());
  m.def("group_by_latent_cuda", &sparse_sae::group_by_latent_cuda,
        "Entries grouped by latent: (start[F + 1], entry ids)", py::arg("indices"), py::arg("n_latents"));
#endif
  // Host-side selection logic, exposed for its unit tests.
  m.def("ordered_key_f32", [](float v) { return sparse_sae::ordered_key(v); });
  m.def("ordered_key_f64", [](double v) { return sparse_sae::ordered_key(v); });
  m.def("ordered_key_16", [](uint16_t bits) { return sparse_sae::ordered_key_16(bits); });
  m.def("float_from_key", [](uint32_t key) { return sparse_sae::float_from_key(key); });
}
