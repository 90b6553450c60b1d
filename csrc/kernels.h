// Declarations of the CPU kernels bound in bindings.cpp.
#pragma once
#include <optional>
#include <string>
#include <vector>

#include <torch/extension.h>

namespace sparse_sae {

torch::Tensor sparse_decode_cpu(const torch::Tensor& values, const torch::Tensor& indices,
                                const torch::Tensor& W_dec, const torch::Tensor& b_dec);

std::vector<torch::Tensor> sparse_decode_backward_cpu(const torch::Tensor& grad, const torch::Tensor& values,
                                                      const torch::Tensor& indices, const torch::Tensor& W_dec);

// Returns {values, indices, threshold, active, fired, n1, n2, aux_values, aux_indices}.
// Without `norms`, n1 and n2 are zeros and no pass over h computes them (plain Top-k).
// `cut` (BatchTopK; float64 (value, ties) on h's device) replaces the batch's own cut: entries
// above value and the first `ties` entries equal to it in flat order are selected.
std::vector<torch::Tensor> select_cpu(const torch::Tensor& h, int64_t k, const std::string& mode, int64_t width,
                                      const std::optional<torch::Tensor>& threshold,
                                      const std::optional<torch::Tensor>& dead, int64_t k_aux, bool norms,
                                      const std::optional<torch::Tensor>& cut);

// Histogram (2^bits counts) of the digits (key >> shift) of h's ordered keys over the entries whose
// key bits from shift + bits up equal `high` (one int64): a pass of a radix select over the
// global batch of a data-parallel run (sparse_sae/training/distributed.py).
torch::Tensor key_histogram_cpu(const torch::Tensor& h, const torch::Tensor& high, int64_t shift, int64_t bits);

// Returns {dW_enc, db_enc, db_dec, dx}; dx is empty unless need_dx.
std::vector<torch::Tensor> penalty_backward_cpu(const torch::Tensor& x, const torch::Tensor& W_enc,
                                                const torch::Tensor& b_dec, const torch::Tensor& h,
                                                const torch::Tensor& active, const torch::Tensor& n1,
                                                const torch::Tensor& n2, const torch::Tensor& sp_indices,
                                                const torch::Tensor& sp_grad,
                                                const std::optional<torch::Tensor>& coef_off,
                                                const std::optional<torch::Tensor>& coef_ratio, double eps,
                                                bool need_dx);

// Threshold code (threshold_code.cpp). regime: 0 auto (sampled density), 1 dense, 2 sparse.
// Returns {values, indices, band_indices, n_band, dense_code, fired}: the packed code and the
// inactive band entries (sparse regime; B x 0 otherwise) or the B x F code (dense regime).
std::vector<torch::Tensor> threshold_code_cpu(const torch::Tensor& z, const std::optional<torch::Tensor>& theta,
                                              double bandwidth, int64_t width, int64_t regime);
// Backward of the dense regime. Returns {dW_enc, db_enc, db_dec, dx, band_grad, band_count}.
std::vector<torch::Tensor> threshold_dense_backward_cpu(const torch::Tensor& x, const torch::Tensor& W_enc,
                                                        const torch::Tensor& b_dec, const torch::Tensor& z,
                                                        const std::optional<torch::Tensor>& theta,
                                                        double bandwidth, const torch::Tensor& grad, bool need_dx);

#ifdef SPARSE_SAE_WITH_CUDA
// CUDA selection (select_cuda.cpp); same outputs as select_cpu, with float32 norms.
std::vector<torch::Tensor> select_cuda(const torch::Tensor& h, int64_t k, const std::string& mode, int64_t width,
                                       const std::optional<torch::Tensor>& threshold,
                                       const std::optional<torch::Tensor>& dead, int64_t k_aux, bool norms,
                                       const std::optional<torch::Tensor>& cut);
// Entries of `indices` grouped by latent: {start (F + 1), entry ids (row-major within a latent)}.
std::vector<torch::Tensor> group_by_latent_cuda(const torch::Tensor& indices, int64_t F);
#endif

}  // namespace sparse_sae
