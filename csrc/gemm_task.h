#pragma once
// What an ATen GEMM called inside one of our OpenMP tasks needs (the chunked GEMMs of the
// dense penalty and threshold backwards), held for the task's life:
// - no autograd recording: grad mode is thread-local and on in OpenMP's worker threads, and an
//   in-place GEMM into a view of our outputs with W_enc (a parameter) would try to record history;
// - one MKL thread. MKL, the BLAS of torch's x86 builds, picks how it splits a GEMM's sums from
//   its thread setting even inside our task, where it runs on one thread: the same fixed chunk
//   then summed in another order for another torch.set_num_threads (seen on an Intel Xeon with
//   MKL 2024.2). Pinned to one thread, each chunk is the same bits for any thread count. The
//   symbol is weak: with another BLAS (OpenBLAS on aarch64) it is absent and this does nothing.
//   (MKL's C name; the lower-case mkl_set_num_threads_local is its Fortran entry, taking int*.)
#include <c10/core/GradMode.h>

extern "C" int MKL_Set_Num_Threads_Local(int) __attribute__((weak));

namespace sparse_sae {

class GemmTaskGuard {
 public:
  GemmTaskGuard() : previous_(MKL_Set_Num_Threads_Local ? MKL_Set_Num_Threads_Local(1) : 0) {}
  ~GemmTaskGuard() {
    if (MKL_Set_Num_Threads_Local) MKL_Set_Num_Threads_Local(previous_);  // 0: back to the global setting
  }
  GemmTaskGuard(const GemmTaskGuard&) = delete;
  GemmTaskGuard& operator=(const GemmTaskGuard&) = delete;

 private:
  c10::NoGradGuard no_grad_;
  int previous_;
};

}  // namespace sparse_sae
