// Torch side of the CUDA selection kernels: checks, output allocation and the launch on the
// current stream. Compiled into CUDA builds only.
#ifdef SPARSE_SAE_WITH_CUDA
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include "checks.h"
#include "cuda/select.h"
#include "kernels.h"

namespace sparse_sae {

static SelectDtype select_dtype(const torch::Tensor& h) {
  switch (h.scalar_type()) {
    case torch::kFloat32: return SelectDtype::kFloat32;
    case torch::kFloat16: return SelectDtype::kFloat16;
    case torch::kBFloat16: return SelectDtype::kBFloat16;
    default: TORCH_CHECK(false, "select_cuda: h must be float32, float16 or bfloat16, got ", h.scalar_type());
  }
  return SelectDtype::kFloat32;
}

#define SAE_CUDA_OK(expr)                                                         \
  do {                                                                            \
    cudaError_t err_ = (expr);                                                    \
    TORCH_CHECK(err_ == cudaSuccess, "CUDA error: ", cudaGetErrorString(err_));   \
  } while (0)

// Returns select_cpu's nine outputs, or none when the exact packed width (width <= 0) would
// exceed kMaxSelect entries in some row.
std::vector<torch::Tensor> select_cuda(const torch::Tensor& h, int64_t k, const std::string& mode, int64_t width,
                                       const std::optional<torch::Tensor>& threshold,
                                       const std::optional<torch::Tensor>& dead, int64_t k_aux, bool norms,
                                       const std::optional<torch::Tensor>& cut) {
  TORCH_CHECK(h.is_cuda(), "h must be a CUDA tensor");
  SAE_CHECK_DIM(h, 2);
  SAE_CHECK_CONTIG(h);
  const int64_t B = h.size(0), F = h.size(1);
  TORCH_CHECK(B > 0, "select: h is an empty batch (0 rows)");
  TORCH_CHECK(F < (int64_t(1) << 31), "select_cuda: F must be below 2^31");
  c10::cuda::CUDAGuard guard(h.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  SelectArgs a{};
  a.dtype = select_dtype(h);
  a.h = h.data_ptr();
  a.B = B;
  a.F = F;
  a.k = k;
  auto opts = h.options();
  auto i64 = opts.dtype(torch::kInt64);
  torch::Tensor thr, workspace, count, count_eq, take_eq;
  if (mode == "topk") {
    TORCH_CHECK(k >= 1 && k <= F && k <= kMaxSelect, "select_cuda: k must be in [1, min(F, ", kMaxSelect, ")]");
    a.mode = SelectMode::kTopK;
    width = k;
  } else {
    TORCH_CHECK(mode == "batchtopk" || mode == "threshold", "mode must be topk, batchtopk or threshold");
    a.mode = mode == "batchtopk" ? SelectMode::kBatchTopK : SelectMode::kThreshold;
    if (a.mode == SelectMode::kThreshold) {
      TORCH_CHECK(threshold.has_value() && threshold->numel() == F && threshold->is_cuda(),
                  "threshold must be F entries on h's device");
      thr = threshold->to(h.scalar_type()).contiguous();
      a.threshold = thr.data_ptr();
    } else {
      TORCH_CHECK(k >= 1 && k <= F, "k must be in [1, F]");
      if (cut.has_value()) {  // read on the device: no synchronisation
        TORCH_CHECK(cut->device() == h.device() && cut->scalar_type() == torch::kFloat64 && cut->dim() == 1 &&
                        cut->size(0) == 2 && cut->is_contiguous(),
                    "cut must be a contiguous float64 tensor (value, ties) on h's device");
        a.cut = cut->data_ptr<double>();
      }
    }
    workspace = torch::zeros({static_cast<int64_t>(select_workspace_bytes())}, opts.dtype(torch::kUInt8));
    count = torch::zeros({B}, i64);
    count_eq = torch::zeros({B}, i64);
    take_eq = torch::zeros({B}, i64);
    a.workspace = workspace.data_ptr();
    a.count = count.data_ptr<int64_t>();
    a.count_eq = count_eq.data_ptr<int64_t>();
    a.take_eq = take_eq.data_ptr<int64_t>();
    a.phase = SelectPhase::kCount;
    SAE_CUDA_OK(select_cuda_launch(a, stream));
    if (width <= 0) {  // the exact width needs the counts on the host: one synchronisation
      const int64_t most = count.max().item<int64_t>();
      // A row wider than the candidate buffer cannot be packed whole: the empty result tells
      // the caller (sparse_sae/ops/select.py) to use the reference for this call.
      if (most > kMaxSelect) return {};
      width = std::max<int64_t>(most, 1);
    }
    width = std::min(width, F);
    TORCH_CHECK(width <= kMaxSelect, "select_cuda: width must be at most ", kMaxSelect);
    a.width = width;
    a.phase = SelectPhase::kPack;
  }
  auto values = torch::empty({B, width}, opts);
  auto indices = torch::empty({B, width}, i64);
  a.values = values.data_ptr();
  a.indices = indices.data_ptr<int64_t>();
  a.out_width = width;
  torch::Tensor aux_values, aux_indices, any_dead;
  if (dead.has_value() && k_aux > 0) {
    TORCH_CHECK(dead->scalar_type() == torch::kBool && dead->numel() == F && dead->is_cuda(),
                "dead must be F bools on h's device");
    k_aux = std::min(k_aux, F);
    TORCH_CHECK(k_aux <= kMaxSelect, "select_cuda: k_aux must be at most ", kMaxSelect);
    aux_values = torch::empty({B, k_aux}, opts);
    aux_indices = torch::empty({B, k_aux}, i64);
    a.dead = dead->data_ptr<bool>();
    a.k_aux = k_aux;
    a.aux_values = aux_values.data_ptr();
    a.aux_indices = aux_indices.data_ptr<int64_t>();
    any_dead = torch::zeros({1}, opts.dtype(torch::kInt32));
    a.any_dead = reinterpret_cast<unsigned int*>(any_dead.data_ptr<int32_t>());
  } else {
    aux_values = torch::zeros({B, 0}, opts);
    aux_indices = torch::zeros({B, 0}, i64);
  }
  auto bitmap = torch::zeros({(F + 31) / 32}, opts.dtype(torch::kInt32));
  auto fired = torch::zeros({F}, i64);
  auto acc = opts.dtype(torch::kFloat32);
  auto n1 = norms ? torch::empty({B}, acc) : torch::zeros({B}, acc);
  auto n2 = norms ? torch::empty({B}, acc) : torch::zeros({B}, acc);
  a.bitmap = reinterpret_cast<unsigned int*>(bitmap.data_ptr<int32_t>());
  a.fired = reinterpret_cast<unsigned long long*>(fired.data_ptr<int64_t>());
  a.n1 = norms ? n1.data_ptr<float>() : nullptr;  // null: no norms pass (plain Top-k)
  a.n2 = norms ? n2.data_ptr<float>() : nullptr;
  SAE_CUDA_OK(select_cuda_launch(a, stream));
  auto row_threshold = std::get<0>(values.min(1)).clamp_min(0);
  return {values, indices, row_threshold, fired.gt(0), fired, n1, n2, aux_values, aux_indices};
}

std::vector<torch::Tensor> group_by_latent_cuda(const torch::Tensor& indices, int64_t F) {
  TORCH_CHECK(indices.is_cuda() && indices.scalar_type() == torch::kInt64, "indices must be int64 on a GPU");
  c10::cuda::CUDAGuard guard(indices.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  auto flat = indices.reshape({-1});
  const int64_t n = flat.numel();
  auto latents = flat.to(torch::kInt32);
  auto ids = torch::arange(n, flat.options());
  auto sorted_latents = torch::empty_like(latents);
  auto sorted_entries = torch::empty_like(ids);
  auto start = torch::empty({F + 1}, flat.options());
  if (n == 0) return {start.zero_(), sorted_entries};
  const size_t bytes = group_workspace_bytes(n);
  auto workspace = torch::empty({static_cast<int64_t>(bytes)}, flat.options().dtype(torch::kUInt8));
  SAE_CUDA_OK(group_by_latent_launch(latents.data_ptr<int32_t>(), ids.data_ptr<int64_t>(), n, F,
                                     sorted_latents.data_ptr<int32_t>(), sorted_entries.data_ptr<int64_t>(),
                                     start.data_ptr<int64_t>(), workspace.data_ptr(), bytes, stream));
  return {start, sorted_entries};
}

}  // namespace sparse_sae
#endif  // SPARSE_SAE_WITH_CUDA
