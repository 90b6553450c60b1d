// CPU sparse decoder: recon[i] = b_dec + sum_j values[i, j] * W_dec[indices[i, j]].
// A gather-matmul over the k selected decoder rows; parallel over batch rows, so each
// output row is written by one thread and the result does not depend on the thread count.
#include "checks.h"
#include "group_by_latent.h"
#include "kernels.h"
#include "vec.h"

namespace sparse_sae {

template <typename scalar_t>
static void sparse_decode_rows(const scalar_t* values, const int64_t* indices, const scalar_t* w_dec,
                               const scalar_t* b_dec, scalar_t* out, int64_t B, int64_t K, int64_t D) {
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < B; ++i) {
    scalar_t* o = out + i * D;
    for (int64_t d = 0; d < D; ++d) o[d] = b_dec[d];
    for (int64_t j = 0; j < K; ++j) {
      const scalar_t v = values[i * K + j];
      if (v == scalar_t(0)) continue;  // an unselected or zero entry carries nothing
      vec::axpy(o, v, w_dec + indices[i * K + j] * D, D);
    }
  }
}

torch::Tensor sparse_decode_cpu(const torch::Tensor& values, const torch::Tensor& indices,
                                const torch::Tensor& W_dec, const torch::Tensor& b_dec) {
  SAE_CHECK_CPU(values); SAE_CHECK_CPU(indices); SAE_CHECK_CPU(W_dec); SAE_CHECK_CPU(b_dec);
  SAE_CHECK_DIM(values, 2); SAE_CHECK_DIM(indices, 2); SAE_CHECK_DIM(W_dec, 2); SAE_CHECK_DIM(b_dec, 1);
  TORCH_CHECK(values.sizes() == indices.sizes(), "values and indices must have the same shape, got ",
              values.sizes(), " and ", indices.sizes());
  TORCH_CHECK(indices.scalar_type() == torch::kInt64, "indices must be int64, got ", indices.scalar_type());
  TORCH_CHECK(values.scalar_type() == W_dec.scalar_type() && b_dec.scalar_type() == W_dec.scalar_type(),
              "values, W_dec and b_dec must share a dtype");
  TORCH_CHECK(b_dec.size(0) == W_dec.size(1), "b_dec must have W_dec.size(1) = ", W_dec.size(1), " entries");
  auto v = values.contiguous(), idx = indices.contiguous(), w = W_dec.contiguous(), b = b_dec.contiguous();
  const int64_t B = v.size(0), K = v.size(1), D = w.size(1);
  auto out = torch::empty({B, D}, w.options());
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "sparse_decode_cpu", [&] {
    sparse_decode_rows<scalar_t>(v.data_ptr<scalar_t>(), idx.data_ptr<int64_t>(), w.data_ptr<scalar_t>(),
                                 b.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), B, K, D);
  });
  return out;
}

}  // namespace sparse_sae

namespace sparse_sae {

// Backward: d_values[i, j] = grad_i . W_dec[indices[i, j]] (parallel over rows) and
// dW_dec[l] = sum over entries on latent l of values * grad_row (grouped by latent, parallel
// over latents, rows in a fixed order): no B x k x D intermediate, the same bits for any
// thread count.
template <typename scalar_t>
static void sparse_decode_backward_impl(const scalar_t* grad, const scalar_t* values, const int64_t* indices,
                                        const scalar_t* w_dec, scalar_t* d_values, scalar_t* dw, int64_t B,
                                        int64_t K, int64_t F, int64_t D) {
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < B; ++i) {
    const scalar_t* g = grad + i * D;
    for (int64_t j = 0; j < K; ++j) {
      d_values[i * K + j] = vec::dot(g, w_dec + indices[i * K + j] * D, D);
    }
  }
  LatentGroups groups = group_by_latent(indices, B * K, F, [&](int64_t e) { return values[e] != scalar_t(0); });
#pragma omp parallel for schedule(dynamic, 64)
  for (int64_t l = 0; l < F; ++l) {
    scalar_t* out = dw + l * D;
    for (int64_t p = groups.start[l]; p < groups.start[l + 1]; ++p) {
      const int64_t e = groups.entry[p];
      vec::axpy(out, values[e], grad + (e / K) * D, D);
    }
  }
}

std::vector<torch::Tensor> sparse_decode_backward_cpu(const torch::Tensor& grad, const torch::Tensor& values,
                                                      const torch::Tensor& indices, const torch::Tensor& W_dec) {
  SAE_CHECK_CPU(grad); SAE_CHECK_CPU(values); SAE_CHECK_CPU(indices); SAE_CHECK_CPU(W_dec);
  SAE_CHECK_DIM(grad, 2); SAE_CHECK_DIM(values, 2); SAE_CHECK_DIM(W_dec, 2);
  TORCH_CHECK(values.sizes() == indices.sizes(), "values and indices must have the same shape");
  TORCH_CHECK(indices.scalar_type() == torch::kInt64, "indices must be int64, got ", indices.scalar_type());
  TORCH_CHECK(grad.size(0) == values.size(0) && grad.size(1) == W_dec.size(1), "grad must be B x D");
  TORCH_CHECK(grad.scalar_type() == W_dec.scalar_type() && values.scalar_type() == W_dec.scalar_type(),
              "grad, values and W_dec must share a dtype");
  auto g = grad.contiguous(), v = values.contiguous(), idx = indices.contiguous(), w = W_dec.contiguous();
  const int64_t B = v.size(0), K = v.size(1), F = w.size(0), D = w.size(1);
  auto d_values = torch::empty({B, K}, v.options());
  auto dW = torch::zeros({F, D}, w.options());
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "sparse_decode_backward_cpu", [&] {
    sparse_decode_backward_impl<scalar_t>(g.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), idx.data_ptr<int64_t>(),
                                          w.data_ptr<scalar_t>(), d_values.data_ptr<scalar_t>(),
                                          dW.data_ptr<scalar_t>(), B, K, F, D);
  });
  return {d_values, dW};
}

}  // namespace sparse_sae
