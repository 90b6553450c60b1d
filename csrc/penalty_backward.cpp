// CPU penalty backward: encoder gradients from G = G_pen + G_sparse without ever holding G
// as a whole B x F tensor.
//
// G_pen_ij = [h_ij > 0][j in A] (alpha_i + beta_i h_ij), with alpha_i = coef_off +
// coef_ratio / (n2_i + eps) and beta_i = -coef_ratio n1_i / (n2_i (n2_i + eps)^2), is rebuilt
// one block of rows at a time over the batch-active columns only, the block's sparse entries
// are added in place, and one BLAS GEMM per block accumulates dW_enc (and dx). When few
// entries of h are positive on the batch-active columns (a trained regularized SAE: the
// off-support l1 pushes off-support pre-activations below zero), G_pen is gathered as a sparse
// matrix and accumulated by latent instead of by dense GEMMs. Without a penalty only the
// sparse part exists. Sparse accumulation is by latent (CSC), deterministic.
#include <algorithm>
#include <vector>

#include "checks.h"
#include "group_by_latent.h"
#include "kernels.h"
#include "gemm_task.h"
#include "vec.h"

namespace sparse_sae {
namespace {

// Density of positive batch-active entries of h (over B x |A|) below which G_pen is
// accumulated sparsely. At init about 40% of them are positive; after a few hundred steps of
// the demo with either paper penalty, 1-2%. On a 2-core Sapphire Rapids at B=2048, D=512,
// F=8192 the dense path took 180-190 ms whatever the density, the sparse one 245 ms at 6.7%,
// 106 ms at 2.3% and 50 ms at 0.6%.
constexpr double kSparseDensity = 0.04;

// dW_enc[j] += sum_e val[e] xt[row(e)] and db_enc[j] += sum_e val[e] over latent j's entries of
// g, in entry order (the same bits for any thread count), parallel over latents.
template <typename T, typename RowOf>
void accumulate_by_latent(const LatentGroups& g, const T* val, RowOf row_of, const torch::Tensor& xt,
                          torch::Tensor& dW, torch::Tensor& db) {
  const int64_t D = xt.size(1), F = dW.size(0);
  const T* xp = xt.data_ptr<T>();
  T* dWp = dW.data_ptr<T>();
  T* dbp = db.data_ptr<T>();
#pragma omp parallel for schedule(dynamic, 64)
  for (int64_t j = 0; j < F; ++j) {
    if (g.start[j] == g.start[j + 1]) continue;
    T* out = dWp + j * D;
    T bsum = 0;
    for (int64_t p = g.start[j]; p < g.start[j + 1]; ++p) {
      const int64_t e = g.entry[p];
      vec::axpy(out, val[e], xp + row_of(e) * D, D);
      bsum += val[e];
    }
    dbp[j] += bsum;
  }
}

// G_pen over the positive batch-active entries of h as a sparse matrix, accumulated by latent:
// dW_enc[j] += sum_i G_ij xt_i, db_enc[j] += sum_i G_ij (and dx_i += sum_j G_ij W_enc[j]).
// One pass over h gathers the entries, a fixed number of rows per task (so the layout, and
// every sum, is the same for any thread count).
template <typename T>
void sparse_penalty(const T* hp, const bool* mask, const std::vector<T>& alpha, const std::vector<T>& beta,
                    const torch::Tensor& xt, const torch::Tensor& W_enc, int64_t B, int64_t F,
                    torch::Tensor& dW, torch::Tensor& db, torch::Tensor& dx) {
  constexpr int64_t kRows = 16;
  const int64_t D = xt.size(1), n_tasks = (B + kRows - 1) / kRows;
  std::vector<std::vector<int64_t>> task_cols(n_tasks);
  std::vector<int64_t> rstart(B + 1, 0);
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t t = 0; t < n_tasks; ++t) {
    std::vector<int64_t> buf(F);
    auto& out = task_cols[t];
    for (int64_t i = t * kRows; i < std::min(B, (t + 1) * kRows); ++i) {
      const int64_t n = vec::positive_columns(hp + i * F, mask, F, buf.data());
      out.insert(out.end(), buf.begin(), buf.begin() + n);
      rstart[i + 1] = n;
    }
  }
  for (int64_t i = 0; i < B; ++i) rstart[i + 1] += rstart[i];
  const int64_t nnz = rstart[B];
  std::vector<int64_t> col(nnz), row(nnz);
  std::vector<T> val(nnz);
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < n_tasks; ++t) {
    const int64_t i0 = t * kRows;
    std::copy(task_cols[t].begin(), task_cols[t].end(), col.begin() + rstart[i0]);
    for (int64_t i = i0; i < std::min(B, i0 + kRows); ++i)
      for (int64_t e = rstart[i]; e < rstart[i + 1]; ++e) {
        row[e] = i;
        val[e] = alpha[i] + beta[i] * hp[i * F + col[e]];
      }
  }
  LatentGroups g = group_by_latent(col.data(), nnz, F, [](int64_t) { return true; });
  accumulate_by_latent<T>(g, val.data(), [&](int64_t e) { return row[e]; }, xt, dW, db);
  if (dx.numel() == 0) return;
  const T* wp = W_enc.data_ptr<T>();
  T* dxp = dx.data_ptr<T>();
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < B; ++i)
    for (int64_t e = rstart[i]; e < rstart[i + 1]; ++e) vec::axpy(dxp + i * D, val[e], wp + col[e] * D, D);
}

// One block of rows of G (nb x Fa) into the gradients: dW_A += Gb^T xt_b, db_A += colsum(Gb),
// dx_b += Gb W_A. The outputs are cut into fixed chunks (latents for dW_A and db_A, rows for
// dx_b) and each chunk is one single-threaded GEMM inside our own parallel loop: a
// multi-threaded BLAS call splits its sums by the thread count on some CPUs (seen on AMD
// EPYC), and these chunks make every sum the same for any thread count.
template <typename T>
void dense_block_gemms(const torch::Tensor& Gb, const torch::Tensor& xt_b, const torch::Tensor& W_A,
                       torch::Tensor& dW_A, torch::Tensor& db_A, const torch::Tensor& dx_b) {
  constexpr int64_t kLatents = 128, kRows = 64;
  const int64_t nb = Gb.size(0), Fa = Gb.size(1);
  const int64_t n_lat = (Fa + kLatents - 1) / kLatents;
  const int64_t n_row = dx_b.defined() ? (nb + kRows - 1) / kRows : 0;
  const T* gp = Gb.data_ptr<T>();
  T* dbp = db_A.data_ptr<T>();
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t t = 0; t < n_lat + n_row; ++t) {
    GemmTaskGuard task;  // no autograd, one MKL thread: see gemm_task.h
    if (t < n_lat) {
      const int64_t c0 = t * kLatents, nc = std::min(kLatents, Fa - c0);
      auto Gc = Gb.narrow(1, c0, nc);
      dW_A.narrow(0, c0, nc).addmm_(Gc.t(), xt_b);
      for (int64_t r = 0; r < nb; ++r)  // rows in order: a fixed sum
        for (int64_t c = c0; c < c0 + nc; ++c) dbp[c] += gp[r * Fa + c];
    } else {
      const int64_t r0 = (t - n_lat) * kRows, nr = std::min(kRows, nb - r0);
      auto dx_r = dx_b.narrow(0, r0, nr);
      dx_r.addmm_(Gb.narrow(0, r0, nr), W_A);
    }
  }
}

template <typename T>
void sparse_part(const torch::Tensor& xt, const torch::Tensor& W_enc, const int64_t* sp_idx, const T* sp_g,
                 int64_t B, int64_t m, int64_t F, const std::vector<int64_t>& pos, torch::Tensor& dW,
                 torch::Tensor& db, torch::Tensor& dx) {
  const int64_t D = xt.size(1);
  // entries on columns outside the dense blocks (all of them without a penalty)
  auto keep = [&](int64_t e) { return sp_g[e] != T(0) && (pos.empty() || pos[sp_idx[e]] < 0); };
  LatentGroups g = group_by_latent(sp_idx, B * m, F, keep);
  accumulate_by_latent<T>(g, sp_g, [m](int64_t e) { return e / m; }, xt, dW, db);
  if (dx.numel() == 0) return;
  const T* wp = W_enc.data_ptr<T>();
  T* dxp = dx.data_ptr<T>();
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < B; ++i) {
    T* out = dxp + i * D;
    for (int64_t c = 0; c < m; ++c) {
      const int64_t e = i * m + c;
      if (!keep(e)) continue;
      vec::axpy(out, sp_g[e], wp + sp_idx[e] * D, D);
    }
  }
}

// The encoder's part of db_dec, -db @ W_enc, with each output summed over latents in order
// (parallel over fixed chunks of D): the same bits for any thread count, as torch::mv is not.
template <typename T>
torch::Tensor minus_db_times_W(const torch::Tensor& db, const torch::Tensor& W_enc) {
  constexpr int64_t kCols = 64;
  const int64_t F = W_enc.size(0), D = W_enc.size(1);
  auto out = torch::zeros({D}, W_enc.options());
  const T* dbp = db.data_ptr<T>();
  const T* wp = W_enc.data_ptr<T>();
  T* op = out.data_ptr<T>();
#pragma omp parallel for schedule(static)
  for (int64_t d0 = 0; d0 < D; d0 += kCols) {
    const int64_t n = std::min(kCols, D - d0);
    for (int64_t j = 0; j < F; ++j)
      if (dbp[j] != T(0)) vec::axpy(op + d0, -dbp[j], wp + j * D + d0, n);
  }
  return out;
}

template <typename T>
std::vector<torch::Tensor> penalty_backward_impl(const torch::Tensor& x, const torch::Tensor& W_enc,
                                                 const torch::Tensor& b_dec, const torch::Tensor& h,
                                                 const torch::Tensor& active, const torch::Tensor& n1,
                                                 const torch::Tensor& n2, const torch::Tensor& sp_indices,
                                                 const torch::Tensor& sp_grad, const std::optional<torch::Tensor>& coef_off,
                                                 const std::optional<torch::Tensor>& coef_ratio, double eps,
                                                 bool need_dx) {
  const int64_t B = x.size(0), D = x.size(1), F = W_enc.size(0), m = sp_indices.size(1);
  auto xt = (x - b_dec).contiguous();
  auto dW = torch::zeros({F, D}, W_enc.options());
  auto db = torch::zeros({F}, W_enc.options());
  auto dx = need_dx ? torch::zeros({B, D}, x.options()) : torch::empty({0}, x.options());
  const int64_t* sp_idx = sp_indices.data_ptr<int64_t>();
  const T* sp_g = sp_grad.data_ptr<T>();
  std::vector<int64_t> pos;  // column j's place among the dense columns, or -1

  if (coef_off.has_value() || coef_ratio.has_value()) {
    const double c_off = coef_off.has_value() ? coef_off->item<double>() : 0.0;
    const double c_ratio = coef_ratio.has_value() ? coef_ratio->item<double>() : 0.0;
    const T* n1p = n1.data_ptr<T>();
    const T* n2p = n2.data_ptr<T>();
    std::vector<T> alpha(B), beta(B);
    for (int64_t i = 0; i < B; ++i) {
      const double a = n2p[i] > 0 ? 1.0 / (double(n2p[i]) + eps) : 0.0;
      const double s = n2p[i] > 0 ? double(n1p[i]) / (double(n2p[i]) * (double(n2p[i]) + eps) * (double(n2p[i]) + eps)) : 0.0;
      alpha[i] = static_cast<T>(c_off + c_ratio * a);
      beta[i] = static_cast<T>(-c_ratio * s);
    }
    const bool* ap = active.data_ptr<bool>();
    std::vector<int64_t> cols;
    pos.assign(F, -1);
    for (int64_t j = 0; j < F; ++j)
      if (ap[j]) {
        pos[j] = static_cast<int64_t>(cols.size());
        cols.push_back(j);
      }
    const int64_t Fa = static_cast<int64_t>(cols.size());
    const T* hp = h.data_ptr<T>();
    const bool* mask = Fa == F ? nullptr : ap;  // null: every column is batch active
    // the density of G_pen, estimated on every 8th row: it only picks the faster path
    int64_t sampled = 0, positive = 0;
    if (Fa > 0) {
#pragma omp parallel for schedule(static) reduction(+ : sampled, positive)
      for (int64_t i = 0; i < B; i += 8) {
        positive += vec::count_positive(hp + i * F, mask, F);
        sampled += Fa;
      }
    }
    if (Fa > 0 && double(positive) < kSparseDensity * double(sampled)) {
      sparse_penalty<T>(hp, mask, alpha, beta, xt, W_enc, B, F, dW, db, dx);
      pos.clear();  // the sparse part then takes every sparse entry
    } else if (Fa > 0) {
      const bool all = Fa == F;
      auto cols_t = torch::from_blob(cols.data(), {Fa}, torch::kInt64).clone();
      auto dW_A = all ? dW : torch::zeros({Fa, D}, W_enc.options());
      auto db_A = all ? db : torch::zeros({Fa}, W_enc.options());
      auto W_A = need_dx ? (all ? W_enc : W_enc.index_select(0, cols_t)) : torch::Tensor();
      // rows per block: about 2M entries of G (8 MB in float32)
      const int64_t bb = std::clamp<int64_t>((int64_t(1) << 21) / Fa, 16, 1024);
      auto G = torch::empty({std::min(bb, B), Fa}, x.options());
      for (int64_t r0 = 0; r0 < B; r0 += bb) {
        const int64_t nb = std::min(bb, B - r0);
        auto Gb = G.narrow(0, 0, nb);
        T* gp = Gb.data_ptr<T>();
#pragma omp parallel for schedule(static)
        for (int64_t r = 0; r < nb; ++r) {
          const int64_t i = r0 + r;
          const T* hr = hp + i * F;
          T* gr = gp + r * Fa;
          const T a = alpha[i], b = beta[i];
          if (all) {
            vec::penalty_row(gr, hr, a, b, Fa);
          } else {
            for (int64_t c = 0; c < Fa; ++c) {
              const T v = hr[cols[c]];
              gr[c] = v > T(0) ? a + b * v : T(0);
            }
          }
          for (int64_t c = 0; c < m; ++c) {  // the row's sparse entries on dense columns
            const int64_t e = i * m + c;
            const int64_t p = pos[sp_idx[e]];
            if (p >= 0) gr[p] += sp_g[e];
          }
        }
        dense_block_gemms<T>(Gb, xt.narrow(0, r0, nb), W_A, dW_A, db_A,
                             need_dx ? dx.narrow(0, r0, nb) : torch::Tensor());
      }
      if (!all) {
        dW.index_copy_(0, cols_t, dW_A);
        db.index_copy_(0, cols_t, db_A);
      }
    }
  }
  sparse_part<T>(xt, W_enc, sp_idx, sp_g, B, m, F, pos, dW, db, dx);
  return {dW, db, minus_db_times_W<T>(db, W_enc), dx};
}

}  // namespace

std::vector<torch::Tensor> penalty_backward_cpu(const torch::Tensor& x, const torch::Tensor& W_enc,
                                                const torch::Tensor& b_dec, const torch::Tensor& h,
                                                const torch::Tensor& active, const torch::Tensor& n1,
                                                const torch::Tensor& n2, const torch::Tensor& sp_indices,
                                                const torch::Tensor& sp_grad,
                                                const std::optional<torch::Tensor>& coef_off,
                                                const std::optional<torch::Tensor>& coef_ratio, double eps,
                                                bool need_dx) {
  for (const auto* t : {&x, &W_enc, &b_dec, &h, &active, &n1, &n2, &sp_indices, &sp_grad}) {
    TORCH_CHECK(t->device().is_cpu(), "penalty_backward_cpu: every input must be on the CPU");
    TORCH_CHECK(t->is_contiguous(), "penalty_backward_cpu: every input must be contiguous");
  }
  SAE_CHECK_DIM(x, 2); SAE_CHECK_DIM(W_enc, 2); SAE_CHECK_DIM(h, 2); SAE_CHECK_DIM(sp_indices, 2);
  const auto dt = x.scalar_type();
  TORCH_CHECK(W_enc.scalar_type() == dt && b_dec.scalar_type() == dt && h.scalar_type() == dt &&
                  n1.scalar_type() == dt && n2.scalar_type() == dt && sp_grad.scalar_type() == dt,
              "x, W_enc, b_dec, h, n1, n2 and sp_grad must share a dtype");
  TORCH_CHECK(x.size(1) == W_enc.size(1), "x and W_enc must have the same width D");
  // h is read only for the penalty terms: plain Top-k passes an empty one (it never keeps h)
  TORCH_CHECK((h.size(0) == x.size(0) && h.size(1) == W_enc.size(0)) ||
                  (h.numel() == 0 && !coef_off.has_value() && !coef_ratio.has_value()),
              "h must be B x F (it may be empty only without penalty terms)");
  TORCH_CHECK(active.scalar_type() == torch::kBool && active.numel() == W_enc.size(0), "active must be F bools");
  TORCH_CHECK(sp_indices.scalar_type() == torch::kInt64, "sp_indices must be int64");
  TORCH_CHECK(sp_indices.sizes() == sp_grad.sizes() && sp_indices.size(0) == x.size(0),
              "sp_indices and sp_grad must both be B x m");
  std::vector<torch::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES(dt, "penalty_backward_cpu", [&] {
    out = penalty_backward_impl<scalar_t>(x, W_enc, b_dec, h, active, n1, n2, sp_indices, sp_grad, coef_off,
                                          coef_ratio, eps, need_dx);
  });
  return out;
}

}  // namespace sparse_sae
