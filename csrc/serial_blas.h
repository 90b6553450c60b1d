#pragma once
// MKL, the BLAS of torch's x86 builds, picks how it splits a GEMM's sums from its thread
// setting even when it is called inside one of our OpenMP tasks, where it runs on one thread:
// the same fixed chunk then sums in another order for another torch.set_num_threads (seen on
// an Intel Xeon with MKL 2024.2). Pinning MKL to one thread for the task makes each chunk's GEMM
// the same bits for any thread count. The symbol is weak: with another BLAS (OpenBLAS on
// aarch64) it is absent and the guard does nothing.
// (MKL's C name; the lower-case mkl_set_num_threads_local is its Fortran entry, taking int*.)
extern "C" int MKL_Set_Num_Threads_Local(int) __attribute__((weak));

namespace sparse_sae {

class SerialBlasGuard {
 public:
  SerialBlasGuard() : previous_(MKL_Set_Num_Threads_Local ? MKL_Set_Num_Threads_Local(1) : 0) {}
  ~SerialBlasGuard() {
    if (MKL_Set_Num_Threads_Local) MKL_Set_Num_Threads_Local(previous_);  // 0: back to the global setting
  }
  SerialBlasGuard(const SerialBlasGuard&) = delete;
  SerialBlasGuard& operator=(const SerialBlasGuard&) = delete;

 private:
  int previous_;
};

}  // namespace sparse_sae
