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

template <typename T>
static inline int64_t count_positive_t(const T* __restrict h, const bool* __restrict mask, int64_t n) {
  int64_t c = 0;
  if (mask == nullptr) {
#pragma omp simd reduction(+ : c)
    for (int64_t i = 0; i < n; ++i) c += h[i] > T(0);
  } else {
#pragma omp simd reduction(+ : c)
    for (int64_t i = 0; i < n; ++i) c += (h[i] > T(0)) & mask[i];
  }
  return c;
}

template <typename T>
static inline int64_t positive_columns_t(const T* __restrict h, const bool* __restrict mask, int64_t n,
                                         int64_t* __restrict cols) {
  constexpr int64_t kChunk = 32;  // a vector test per chunk; sparse rows skip most chunks whole
  int64_t m = 0;
  for (int64_t c0 = 0; c0 < n; c0 += kChunk) {
    const int64_t end = c0 + kChunk < n ? c0 + kChunk : n;
    int any = 0;
#pragma omp simd reduction(| : any)
    for (int64_t i = c0; i < end; ++i) any |= h[i] > T(0);
    if (!any) continue;
    for (int64_t i = c0; i < end; ++i)
      if (h[i] > T(0) && (mask == nullptr || mask[i])) cols[m++] = i;
  }
  return m;
}

SAE_MULTIVERSION int64_t count_positive(const float* h, const bool* mask, int64_t n) {
  return count_positive_t(h, mask, n);
}
SAE_MULTIVERSION int64_t count_positive(const double* h, const bool* mask, int64_t n) {
  return count_positive_t(h, mask, n);
}
SAE_MULTIVERSION int64_t positive_columns(const float* h, const bool* mask, int64_t n, int64_t* cols) {
  return positive_columns_t(h, mask, n, cols);
}
SAE_MULTIVERSION int64_t positive_columns(const double* h, const bool* mask, int64_t n, int64_t* cols) {
  return positive_columns_t(h, mask, n, cols);
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
