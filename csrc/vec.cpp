// Multi-versioned vector loops (see vec.h). GCC's target_clones builds one copy per listed
// target and an ifunc resolver that picks the best for the running CPU.
#include "vec.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define SAE_MULTIVERSION __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define SAE_MULTIVERSION
#endif

namespace sparse_sae {
namespace vec {

template <typename T>
static inline void axpy_t(T* __restrict out, T a, const T* __restrict x, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] += a * x[i];
}

template <typename T>
static inline T dot_t(const T* __restrict a, const T* __restrict b, int64_t n) {
  T s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

template <typename T>
static inline void penalty_row_t(T* __restrict g, const T* __restrict h, T alpha, T beta, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) g[i] = h[i] > T(0) ? alpha + beta * h[i] : T(0);
}

template <typename T>
static inline void row_sums_t(const T* __restrict h, int64_t n, double* sum, double* sq) {
  double s = 0, q = 0;
#pragma omp simd reduction(+ : s, q)
  for (int64_t i = 0; i < n; ++i) {
    const double v = h[i];
    s += v;
    q += v * v;
  }
  *sum += s;
  *sq += q;
}

SAE_MULTIVERSION void axpy(float* out, float a, const float* x, int64_t n) { axpy_t(out, a, x, n); }
SAE_MULTIVERSION void axpy(double* out, double a, const double* x, int64_t n) { axpy_t(out, a, x, n); }
SAE_MULTIVERSION float dot(const float* a, const float* b, int64_t n) { return dot_t(a, b, n); }
SAE_MULTIVERSION double dot(const double* a, const double* b, int64_t n) { return dot_t(a, b, n); }
SAE_MULTIVERSION void penalty_row(float* g, const float* h, float alpha, float beta, int64_t n) {
  penalty_row_t(g, h, alpha, beta, n);
}
SAE_MULTIVERSION void penalty_row(double* g, const double* h, double alpha, double beta, int64_t n) {
  penalty_row_t(g, h, alpha, beta, n);
}
SAE_MULTIVERSION void row_sums(const float* h, int64_t n, double* sum, double* sq) { row_sums_t(h, n, sum, sq); }
SAE_MULTIVERSION void row_sums(const double* h, int64_t n, double* sum, double* sq) { row_sums_t(h, n, sum, sq); }

}  // namespace vec
}  // namespace sparse_sae
