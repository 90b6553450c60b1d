// CPU threshold code (ReLU: z > 0; JumpReLU: z > theta_j) of sparse_sae::threshold_code, and
// the backward of its dense regime.
//
// Forward, on the pre-activations z (B x F) that the encoder GEMM wrote:
//   sparse regime: one pass per row collects the active entries (z_ij > theta_j), sorts them by
//     descending value (ties: lower index) and packs them into `width` columns, padded with
//     value 0 at the row's lowest inactive indices (the packing of ops.select's threshold mode);
//     for JumpReLU the same pass lists the row's inactive band entries
//     (theta_j - bandwidth/2 < z_ij <= theta_j), whose straight-through gradient moves theta_j;
//   dense regime: the B x F code z * [z > theta] (init: about half the entries are active, where
//     a sorted packing and a gather decoder would cost more than the dense GEMMs).
//   The regime follows the density of active entries sampled on every 8th row (or is forced).
// Dense backward: dz = g * [z > theta] masked chunk by chunk into single-threaded GEMMs over the
//   whole batch (fixed chunks of latents for dW_enc, of rows for dx), and the band sums of the
//   threshold gradient per latent, rows in order.
// Every output is the same bits for any thread count: per-row work, fixed chunks, integer counts.
#include <algorithm>
#include <cmath>
#include <utility>
#include <vector>

#include "checks.h"
#include "kernels.h"
#include "gemm_task.h"
#include "vec.h"

namespace sparse_sae {
namespace {

// Density of active entries (over B x F) below which the sparse regime is chosen. On a 2-core
// AMD EPYC at B=2048, D=512, F=8192 (one step, both regimes forced, load ~4: noisy), sparse over
// dense: ReLU 0.43x at 1.8% active, 0.45x at 3.6%, 0.73x at 6.7%, 0.86x at 11.5%; JumpReLU 0.53x,
// 0.66x, 0.79x, 1.10x. The crossover is near 10%; 5% keeps a margin. At init (~50%) dense wins.
constexpr double kSparseDensity = 0.05;

template <typename T>
inline T threshold_of(const T* th, int64_t j) {
  return th == nullptr ? T(0) : th[j];
}

// The rectangle kernel's support, |z - theta| / bandwidth < 1/2, written as the reference
// (reference.rectangle) computes it, so that both agree on every entry.
template <typename T>
inline bool in_band(T v, T t, T bw) {
  return std::abs((v - t) / bw) < T(0.5);
}

// Active entries of one row, (value, index), and its inactive band entries.
template <typename T>
void scan_row(const T* zr, const T* th, T bw, int64_t F, std::vector<std::pair<T, int64_t>>& act,
              std::vector<int64_t>& band) {
  constexpr int64_t kChunk = 32;  // a vector test per chunk; sparse rows skip most chunks whole
  act.clear();
  band.clear();
  for (int64_t c0 = 0; c0 < F; c0 += kChunk) {
    const int64_t end = std::min(F, c0 + kChunk);
    int any = 0;
    if (th == nullptr) {
#pragma omp simd reduction(| : any)
      for (int64_t j = c0; j < end; ++j) any |= zr[j] > T(0);
    } else {
#pragma omp simd reduction(| : any)
      for (int64_t j = c0; j < end; ++j) any |= zr[j] > th[j] - bw;  // a superset of active and band
    }
    if (!any) continue;
    for (int64_t j = c0; j < end; ++j) {
      const T v = zr[j], t = threshold_of(th, j);
      if (v > t)
        act.emplace_back(v, j);
      else if (th != nullptr && in_band(v, t, bw))
        band.push_back(j);
    }
  }
  std::sort(act.begin(), act.end(), [](const auto& a, const auto& b) {
    return a.first > b.first || (a.first == b.first && a.second < b.second);
  });
}

template <typename T>
std::vector<torch::Tensor> threshold_code_impl(const torch::Tensor& z, const T* th, T bw, int64_t width,
                                               int64_t regime) {
  const int64_t B = z.size(0), F = z.size(1);
  const T* zp = z.data_ptr<T>();
  auto i64 = z.options().dtype(torch::kInt64);
  auto fired = torch::zeros({F}, i64);
  int64_t* firedp = fired.data_ptr<int64_t>();

  bool dense = regime == 1;
  if (regime == 0) {
    int64_t sampled = 0, active = 0;
#pragma omp parallel for schedule(static) reduction(+ : sampled, active)
    for (int64_t i = 0; i < B; i += 8) {
      const T* zr = zp + i * F;
      int64_t c = 0;
#pragma omp simd reduction(+ : c)
      for (int64_t j = 0; j < F; ++j) c += zr[j] > threshold_of(th, j);
      active += c;
      sampled += F;
    }
    dense = double(active) >= kSparseDensity * double(sampled);
  }

  if (dense) {
    auto code = torch::empty({B, F}, z.options());
    T* cp = code.data_ptr<T>();
#pragma omp parallel
    {
      std::vector<int64_t> local(F, 0);
#pragma omp for schedule(static)
      for (int64_t i = 0; i < B; ++i) {
        const T* zr = zp + i * F;
        T* cr = cp + i * F;
#pragma omp simd
        for (int64_t j = 0; j < F; ++j) {
          const bool on = zr[j] > threshold_of(th, j);
          cr[j] = on ? zr[j] : T(0);
          local[j] += on;
        }
      }
#pragma omp critical
      for (int64_t j = 0; j < F; ++j) firedp[j] += local[j];  // integer sums: any order, same result
    }
    // distinct empty tensors: a custom op's outputs may not alias each other
    return {torch::empty({B, 0}, z.options()), torch::empty({B, 0}, i64), torch::empty({B, 0}, i64),
            torch::zeros({B}, i64), code, fired};
  }

  std::vector<std::vector<std::pair<T, int64_t>>> act(B);
  std::vector<std::vector<int64_t>> band(B);
#pragma omp parallel for schedule(dynamic, 16)
  for (int64_t i = 0; i < B; ++i) scan_row<T>(zp + i * F, th, bw, F, act[i], band[i]);
  int64_t w = width, wb = 0;
  if (w <= 0) {
    w = 1;
    for (int64_t i = 0; i < B; ++i) w = std::max<int64_t>(w, act[i].size());
  }
  w = std::min(w, F);
  for (int64_t i = 0; i < B; ++i) wb = std::max<int64_t>(wb, band[i].size());

  auto values = torch::empty({B, w}, z.options());
  auto indices = torch::empty({B, w}, i64);
  auto band_idx = torch::zeros({B, wb}, i64);
  auto n_band = torch::empty({B}, i64);
  T* vp = values.data_ptr<T>();
  int64_t* ip = indices.data_ptr<int64_t>();
  int64_t* bp = band_idx.data_ptr<int64_t>();
  int64_t* nbp = n_band.data_ptr<int64_t>();
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < B; ++i) {
    const auto& a = act[i];
    const int64_t n = std::min<int64_t>(w, a.size());
    for (int64_t c = 0; c < n; ++c) {
      vp[i * w + c] = a[c].first;
      ip[i * w + c] = a[c].second;
    }
    if (n < w) {  // padding: value 0 at the lowest indices that are not active
      std::vector<int64_t> on(a.size());
      for (size_t c = 0; c < a.size(); ++c) on[c] = a[c].second;
      std::sort(on.begin(), on.end());
      int64_t c = n, j = 0;
      size_t p = 0;
      for (; c < w; ++j) {
        while (p < on.size() && on[p] < j) ++p;
        if (p < on.size() && on[p] == j) continue;
        vp[i * w + c] = T(0);
        ip[i * w + c] = j;
        ++c;
      }
    }
    std::copy(band[i].begin(), band[i].end(), bp + i * wb);
    nbp[i] = static_cast<int64_t>(band[i].size());
  }
  for (int64_t e = 0; e < B * w; ++e)  // fired: the packed active entries (value above 0 < theta)
    if (vp[e] != T(0)) ++firedp[ip[e]];
  return {values, indices, band_idx, n_band, torch::empty({B, 0}, z.options()), fired};
}

// ---------------------------------------------------------------------------- dense backward
// The outputs are cut into fixed chunks, each written by one task: 128 latents of dW_enc (with
// db_enc and the band sums of those latents) or 64 rows of dx. A task masks its slice of
// dz = g [z > theta] into a small buffer (B x 128 or 64 x F) and runs one single-threaded GEMM
// over the whole batch (K = B, not a block of rows: the GEMMs stay efficient and dW_enc is
// written once). Column sums run over rows in order. So every output is the same bits for any
// thread count, and no B x F buffer is allocated.
template <typename T>
std::vector<torch::Tensor> dense_backward_impl(const torch::Tensor& x, const torch::Tensor& W_enc,
                                               const torch::Tensor& b_dec, const torch::Tensor& z, const T* th,
                                               T bw, const torch::Tensor& g, bool need_dx) {
  at::NoGradGuard no_grad;
  constexpr int64_t kLatents = 128, kRows = 64;
  const int64_t B = x.size(0), D = x.size(1), F = W_enc.size(0);
  auto xt = (x - b_dec).contiguous();
  auto dW = torch::empty({F, D}, W_enc.options());
  auto db = torch::zeros({F}, W_enc.options());
  auto dx = need_dx ? torch::empty({B, D}, x.options()) : torch::empty({0}, x.options());
  auto band_g = torch::zeros({F}, W_enc.options());  // sum over band rows of g_ij
  auto band_n = torch::zeros({F}, W_enc.options());  // band rows per latent
  const T* zp = z.data_ptr<T>();
  const T* gp = g.data_ptr<T>();
  T* dbp = db.data_ptr<T>();
  T* bgp = band_g.data_ptr<T>();
  T* bnp = band_n.data_ptr<T>();
  const int64_t n_lat = (F + kLatents - 1) / kLatents;
  const int64_t n_row = need_dx ? (B + kRows - 1) / kRows : 0;
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t t = 0; t < n_lat + n_row; ++t) {
    GemmTaskGuard task;  // no autograd, one MKL thread: see gemm_task.h
    if (t < n_lat) {
      const int64_t c0 = t * kLatents, nc = std::min(kLatents, F - c0);
      auto Gc = torch::empty({B, nc}, x.options());
      T* gc = Gc.data_ptr<T>();
      T* dbc = dbp + c0;
      T* bgc = bgp + c0;
      T* bnc = bnp + c0;
      for (int64_t i = 0; i < B; ++i) {  // rows in order; branch-free, vectorised over columns
        const T* zr = zp + i * F + c0;
        const T* gr = gp + i * F + c0;
        T* out = gc + i * nc;
        if (th == nullptr) {
#pragma omp simd
          for (int64_t c = 0; c < nc; ++c) {
            const T o = zr[c] > T(0) ? gr[c] : T(0);
            out[c] = o;
            dbc[c] += o;
          }
        } else {
          const T* tc = th + c0;
#pragma omp simd
          for (int64_t c = 0; c < nc; ++c) {
            const T v = zr[c], gv = gr[c];
            const T o = v > tc[c] ? gv : T(0);
            const bool band = in_band(v, tc[c], bw);
            out[c] = o;
            dbc[c] += o;
            bgc[c] += band ? gv : T(0);
            bnc[c] += band ? T(1) : T(0);
          }
        }
      }
      auto dW_c = dW.narrow(0, c0, nc);
      at::mm_out(dW_c, Gc.t(), xt);
    } else {
      const int64_t r0 = (t - n_lat) * kRows, nr = std::min(kRows, B - r0);
      auto Gr = torch::empty({nr, F}, x.options());
      T* gr_out = Gr.data_ptr<T>();
      for (int64_t r = 0; r < nr; ++r) {
        const T* zr = zp + (r0 + r) * F;
        const T* gr = gp + (r0 + r) * F;
        T* out = gr_out + r * F;
#pragma omp simd
        for (int64_t j = 0; j < F; ++j) out[j] = zr[j] > threshold_of(th, j) ? gr[j] : T(0);
      }
      auto dx_r = dx.narrow(0, r0, nr);
      at::mm_out(dx_r, Gr, W_enc);
    }
  }
  // the encoder's part of db_dec, -db @ W_enc, each output summed over latents in order
  auto db_dec = torch::zeros({D}, W_enc.options());
  const T* wp = W_enc.data_ptr<T>();
  T* op = db_dec.data_ptr<T>();
  constexpr int64_t kD = 64;
#pragma omp parallel for schedule(static)
  for (int64_t d0 = 0; d0 < D; d0 += kD) {
    const int64_t n = std::min(kD, D - d0);
    for (int64_t j = 0; j < F; ++j)
      if (dbp[j] != T(0)) vec::axpy(op + d0, -dbp[j], wp + j * D + d0, n);
  }
  return {dW, db, db_dec, dx, band_g, band_n};
}

void check_z_theta(const torch::Tensor& z, const std::optional<torch::Tensor>& theta, const char* op) {
  SAE_CHECK_CPU(z);
  SAE_CHECK_CONTIG(z);
  SAE_CHECK_DIM(z, 2);
  TORCH_CHECK(z.scalar_type() == torch::kFloat || z.scalar_type() == torch::kDouble, op,
              ": z must be float32 or float64, got ", z.scalar_type());
  if (theta.has_value()) {
    SAE_CHECK_CPU(*theta);
    SAE_CHECK_CONTIG(*theta);
    TORCH_CHECK(theta->dim() == 1 && theta->size(0) == z.size(1), op, ": theta must have F = ", z.size(1),
                " entries, got shape ", theta->sizes());
    TORCH_CHECK(theta->scalar_type() == z.scalar_type(), op, ": theta must have z's dtype");
  }
}

}  // namespace

std::vector<torch::Tensor> threshold_code_cpu(const torch::Tensor& z, const std::optional<torch::Tensor>& theta,
                                              double bandwidth, int64_t width, int64_t regime) {
  check_z_theta(z, theta, "threshold_code_cpu");
  TORCH_CHECK(regime >= 0 && regime <= 2, "threshold_code_cpu: regime must be 0 (auto), 1 (dense) or 2 (sparse)");
  TORCH_CHECK(bandwidth > 0, "threshold_code_cpu: bandwidth must be positive, got ", bandwidth);
  std::vector<torch::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "threshold_code_cpu", [&] {
    const scalar_t* th = theta.has_value() ? theta->data_ptr<scalar_t>() : nullptr;
    out = threshold_code_impl<scalar_t>(z, th, static_cast<scalar_t>(bandwidth), width, regime);
  });
  return out;
}

std::vector<torch::Tensor> threshold_dense_backward_cpu(const torch::Tensor& x, const torch::Tensor& W_enc,
                                                        const torch::Tensor& b_dec, const torch::Tensor& z,
                                                        const std::optional<torch::Tensor>& theta,
                                                        double bandwidth, const torch::Tensor& grad, bool need_dx) {
  check_z_theta(z, theta, "threshold_dense_backward_cpu");
  for (const auto* t : {&x, &W_enc, &b_dec, &grad}) {
    TORCH_CHECK(t->device().is_cpu() && t->is_contiguous(),
                "threshold_dense_backward_cpu: x, W_enc, b_dec and grad must be contiguous CPU tensors");
    TORCH_CHECK(t->scalar_type() == z.scalar_type(), "threshold_dense_backward_cpu: x, W_enc, b_dec and grad "
                "must have z's dtype");
  }
  SAE_CHECK_DIM(x, 2); SAE_CHECK_DIM(W_enc, 2);
  TORCH_CHECK(x.size(1) == W_enc.size(1) && b_dec.numel() == x.size(1), "x, W_enc and b_dec must share D");
  TORCH_CHECK(z.size(0) == x.size(0) && z.size(1) == W_enc.size(0) && grad.sizes() == z.sizes(),
              "z and grad must be B x F");
  std::vector<torch::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "threshold_dense_backward_cpu", [&] {
    const scalar_t* th = theta.has_value() ? theta->data_ptr<scalar_t>() : nullptr;
    out = dense_backward_impl<scalar_t>(x, W_enc, b_dec, z, th, static_cast<scalar_t>(bandwidth), grad,
                                        need_dx);
  });
  return out;
}

}  // namespace sparse_sae
