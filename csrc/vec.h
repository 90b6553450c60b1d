// Small vector loops of the CPU kernels. They are compiled for several instruction sets
// (AVX-512, AVX2, baseline) and picked at load time (vec.cpp), so a portable build still
// runs wide vectors. Reductions are in a fixed order for a given machine.
#pragma once
#include <cstdint>

namespace sparse_sae {
namespace vec {

void axpy(float* out, float a, const float* x, int64_t n);    // out += a * x
void axpy(double* out, double a, const double* x, int64_t n);
float dot(const float* a, const float* b, int64_t n);
double dot(const double* a, const double* b, int64_t n);
// g[c] = h[c] > 0 ? alpha + beta * h[c] : 0  (one row of the rebuilt penalty gradient)
void penalty_row(float* g, const float* h, float alpha, float beta, int64_t n);
void penalty_row(double* g, const double* h, double alpha, double beta, int64_t n);
// how many c have h[c] > 0 and mask[c] (a null mask admits every c)
int64_t count_positive(const float* h, const bool* mask, int64_t n);
int64_t count_positive(const double* h, const bool* mask, int64_t n);
// writes, in order, every c with h[c] > 0 and mask[c] to cols; returns how many
int64_t positive_columns(const float* h, const bool* mask, int64_t n, int64_t* cols);
int64_t positive_columns(const double* h, const bool* mask, int64_t n, int64_t* cols);
// *sum += sum(h), *sq += sum(h^2), accumulated in double
void row_sums(const float* h, int64_t n, double* sum, double* sq);
void row_sums(const double* h, int64_t n, double* sum, double* sq);

}  // namespace vec
}  // namespace sparse_sae
