// GPU selection (DESIGN.md 3.2): Top-k per row by radix select, BatchTopK by a batch-wide
// radix select, threshold selection, the AuxK candidates, the batch-active bitmap, fired
// counts and the row norms over the batch-active units. One thread block per row; no host
// synchronisation (the launchers only enqueue work on the given stream).
//
// Plain CUDA C++: no torch headers (they double compile time); the torch side is
// csrc/select_cuda.cpp.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <type_traits>

#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>
#include <cub/device/device_radix_sort.cuh>

#include "../select_common.h"
#include "select.h"

namespace sparse_sae {
namespace {

constexpr int kBlock = 512;
constexpr int kRadixBits = 8;
constexpr int kBins = 1 << kRadixBits;

__device__ __forceinline__ uint32_t key_of(float v) { return ordered_key(v); }
__device__ __forceinline__ uint32_t key_of(__half v) { return ordered_key_16(__half_as_ushort(v)); }
__device__ __forceinline__ uint32_t key_of(__nv_bfloat16 v) { return ordered_key_16(__bfloat16_as_ushort(v)); }
__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

// Zero of each dtype (torch builds with __CUDA_NO_HALF_CONVERSIONS__: no implicit casts).
template <typename T>
__device__ __forceinline__ T zero_of();
template <>
__device__ __forceinline__ float zero_of<float>() { return 0.f; }
template <>
__device__ __forceinline__ __half zero_of<__half>() { return __float2half(0.f); }
template <>
__device__ __forceinline__ __nv_bfloat16 zero_of<__nv_bfloat16>() { return __float2bfloat16(0.f); }

template <typename T>
__host__ __device__ __forceinline__ T lesser(T a, T b) { return a < b ? a : b; }

template <typename T>
struct KeyBits {
  static constexpr int value = sizeof(T) * 8;
};

__device__ void block_sort(uint64_t* cand, int n, int cap);

// Key of entry j of a row for a selection restricted by `mask` (live latents for AuxK): entries
// outside it rank last (key 0, below every non-NaN value).
template <typename T>
struct MaskedKey {
  const T* row;
  const bool* mask;
  __device__ uint32_t operator()(int64_t j) const { return (mask == nullptr || mask[j]) ? key_of(row[j]) : 0u; }
};

// Key of entry j restricted to entries above their latent's threshold (threshold mode).
template <typename T>
struct AboveThresholdKey {
  const T* row;
  const T* threshold;
  __device__ uint32_t operator()(int64_t j) const {
    return to_float(row[j]) > to_float(threshold[j]) ? key_of(row[j]) : 0u;
  }
};

// Block-wide radix select over one row's keys (`key_at(j)`): returns the key of the k-th ranked
// entry and, in *ties, how many entries equal to it are selected.
template <typename T, typename KeyAt>
__device__ uint32_t row_radix_select(KeyAt key_at, int64_t F, int64_t k, int64_t* ties) {
  __shared__ unsigned int hist[kBins];
  __shared__ RadixSelectState<uint32_t> st;
  if (threadIdx.x == 0) {
    st.prefix = 0;
    st.prefix_mask = 0;
    st.remaining = k;
  }
  __syncthreads();
  for (int shift = KeyBits<T>::value - kRadixBits; shift >= 0; shift -= kRadixBits) {
    for (int b = threadIdx.x; b < kBins; b += blockDim.x) hist[b] = 0;
    __syncthreads();
    const uint32_t prefix = st.prefix, pmask = st.prefix_mask;
    for (int64_t j = threadIdx.x; j < F; j += blockDim.x) {
      const uint32_t key = key_at(j);
      if ((key & pmask) == prefix) atomicAdd(&hist[radix_digit(key, shift, kRadixBits)], 1u);
    }
    __syncthreads();
    if (threadIdx.x == 0) radix_select_step(st, hist, shift, kRadixBits);
    __syncthreads();
  }
  *ties = st.remaining;
  return st.prefix;
}

// Collects a row's selected entries as rank sort keys into `cand`: every entry above the cut
// (`above(j, key)`), `n_above` of them, plus the first `ties` entries with key == cut in index
// order, placed after them. The caller guarantees n_above + ties <= cap (it sizes `cap`, or
// cuts the row by radix select first), so nothing is dropped. Returns the number collected.
template <typename KeyAt, typename Pred>
__device__ int collect(KeyAt key_at, int64_t F, uint32_t cut, int64_t ties, int64_t n_above, Pred above,
                       uint64_t* cand, int cap) {
  using Scan = cub::BlockScan<int, kBlock>;
  __shared__ typename Scan::TempStorage scan_tmp;
  __shared__ int above_seen, ties_seen;
  if (threadIdx.x == 0) above_seen = ties_seen = 0;
  __syncthreads();
  for (int64_t base = 0; base < F; base += kBlock) {
    const int64_t j = base + threadIdx.x;
    uint32_t key = 0;
    bool is_above = false, is_tie = false;
    if (j < F) {
      key = key_at(j);
      is_above = above(j, key);
      is_tie = !is_above && ties > 0 && key == cut;
    }
    int rank, total;
    Scan(scan_tmp).ExclusiveSum(is_tie ? 1 : 0, rank, total);
    if (is_above) {
      const int p = atomicAdd(&above_seen, 1);  // order does not matter: sorted next
      if (p < cap) cand[p] = rank_sort_key(key, static_cast<uint32_t>(j));
    }
    const int64_t t = ties_seen + rank;
    if (is_tie && t < ties && n_above + t < cap) cand[n_above + t] = rank_sort_key(key, static_cast<uint32_t>(j));
    __syncthreads();
    if (threadIdx.x == 0) ties_seen += total;
    __syncthreads();
  }
  return static_cast<int>(lesser<int64_t>(n_above + lesser<int64_t>(ties, ties_seen), cap));
}

// The `k` entries of a row that rank first by `key_at` (value descending, ties to the lower
// index), sorted, in cand[0, k): radix select, collect, sort. k <= cap.
template <typename T, typename KeyAt>
__device__ int select_row(KeyAt key_at, int64_t F, int64_t k, uint64_t* cand, int cap) {
  int64_t ties;
  const uint32_t cut = row_radix_select<T>(key_at, F, k, &ties);
  const int n = collect(key_at, F, cut, ties, k - ties, [cut](int64_t, uint32_t key) { return key > cut; }, cand,
                        cap);
  block_sort(cand, n, cap);
  return n;
}

// Bitonic sort of cand[0, n) ascending in shared memory (padding with the largest key).
__device__ void block_sort(uint64_t* cand, int n, int cap) {
  int p = 1;
  while (p < n) p <<= 1;
  for (int i = n + threadIdx.x; i < p && i < cap; i += blockDim.x) cand[i] = ~0ull;
  __syncthreads();
  for (int size = 2; size <= p; size <<= 1) {
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      for (int i = threadIdx.x; i < p; i += blockDim.x) {
        const int partner = i ^ stride;
        if (partner > i) {
          const bool ascending = (i & size) == 0;
          const uint64_t a = cand[i], b = cand[partner];
          if ((a > b) == ascending) {
            cand[i] = b;
            cand[partner] = a;
          }
        }
      }
      __syncthreads();
    }
  }
}

// Writes the first `width` ranked entries of a row, padding with value 0 at the lowest
// unselected indices (the reference's packing order). `is_selected(j, key)` re-derives
// membership for the padding scan.
template <typename T, typename Sel>
__device__ void write_row(const T* row, const uint64_t* cand, int n, int64_t width, int64_t F, T* values,
                          int64_t* indices, Sel is_selected, const bool* mask) {
  const int m = static_cast<int>(lesser<int64_t>(n, width));
  for (int r = threadIdx.x; r < m; r += blockDim.x) {
    const int64_t j = static_cast<int64_t>(cand[r] & 0xffffffffull);
    values[r] = (mask == nullptr || mask[j]) ? row[j] : zero_of<T>();
    indices[r] = j;
  }
  if (m == width) return;
  using Scan = cub::BlockScan<int, kBlock>;
  __shared__ typename Scan::TempStorage scan_tmp;
  __shared__ int filled;
  if (threadIdx.x == 0) filled = m;
  __syncthreads();
  for (int64_t base = 0; base < F && filled < width; base += kBlock) {
    const int64_t j = base + threadIdx.x;
    const bool free_slot = j < F && !is_selected(j);
    int rank, total;
    Scan(scan_tmp).ExclusiveSum(free_slot ? 1 : 0, rank, total);
    const int at = filled + rank;
    if (free_slot && at < width) {
      values[at] = zero_of<T>();
      indices[at] = j;
    }
    __syncthreads();
    if (threadIdx.x == 0) filled += total;
    __syncthreads();
  }
}

// ------------------------------------------------------------------------ Top-k per row
// `any_dead` (AuxK): when no latent is dead the row's k picks are the reference's all-tied
// result, value 0 at indices 0..k-1, written without reading h.
template <typename T>
__global__ void __launch_bounds__(kBlock) topk_rows_kernel(const T* h, int64_t F, int64_t k, const bool* mask,
                                                            const unsigned int* any_dead, T* values,
                                                            int64_t* indices, int cap) {
  extern __shared__ uint64_t cand[];
  const int64_t i = blockIdx.x;
  if (any_dead != nullptr && *any_dead == 0u) {
    for (int64_t r = threadIdx.x; r < k; r += blockDim.x) {
      values[i * k + r] = zero_of<T>();
      indices[i * k + r] = r;
    }
    return;
  }
  const T* row = h + i * F;
  const int n = select_row<T>(MaskedKey<T>{row, mask}, F, k, cand, cap);
  // k entries always exist, so no padding is needed
  write_row(row, cand, n, k, F, values + i * k, indices + i * k, [](int64_t) { return true; }, mask);
}

__global__ void any_dead_kernel(const bool* dead, int64_t F, unsigned int* any_dead) {
  for (int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; j < F;
       j += static_cast<int64_t>(gridDim.x) * blockDim.x)
    if (dead[j]) {
      atomicOr(any_dead, 1u);
      return;
    }
}

// ------------------------------------------------------------------------ statistics
template <typename T>
__global__ void fired_kernel(const T* values, const int64_t* indices, int64_t n, unsigned int* bitmap,
                             unsigned long long* fired) {
  const int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (e >= n || !(to_float(values[e]) > 0.0f)) return;
  const int64_t j = indices[e];
  atomicOr(&bitmap[j >> 5], 1u << (j & 31));
  atomicAdd(&fired[j], 1ull);
}

template <typename T>
__global__ void __launch_bounds__(kBlock) active_norms_kernel(const T* h, int64_t F, const unsigned int* bitmap,
                                                               float* n1, float* n2) {
  using Reduce = cub::BlockReduce<float, kBlock>;
  __shared__ typename Reduce::TempStorage tmp1, tmp2;
  const T* row = h + blockIdx.x * F;
  float s = 0.f, q = 0.f;
  for (int64_t j = threadIdx.x; j < F; j += blockDim.x) {
    if (bitmap[j >> 5] & (1u << (j & 31))) {
      const float v = to_float(row[j]);
      s += v;
      q += v * v;
    }
  }
  const float ts = Reduce(tmp1).Sum(s);
  const float tq = Reduce(tmp2).Sum(q);
  if (threadIdx.x == 0) {
    n1[blockIdx.x] = ts;
    n2[blockIdx.x] = sqrtf(tq);
  }
}

// ------------------------------------------------------------------------ BatchTopK
struct GlobalSelect {
  RadixSelectState<uint32_t> st;
};

template <typename T>
__global__ void global_hist_kernel(const T* h, int64_t N, const GlobalSelect* gs, int shift,
                                   unsigned long long* hist) {
  __shared__ unsigned int local[kBins];
  for (int b = threadIdx.x; b < kBins; b += blockDim.x) local[b] = 0;
  __syncthreads();
  const uint32_t prefix = gs->st.prefix, pmask = gs->st.prefix_mask;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < N;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const uint32_t key = key_of(h[e]);
    if ((key & pmask) == prefix) atomicAdd(&local[radix_digit(key, shift, kRadixBits)], 1u);
  }
  __syncthreads();
  for (int b = threadIdx.x; b < kBins; b += blockDim.x)
    if (local[b]) atomicAdd(&hist[b], static_cast<unsigned long long>(local[b]));
}

__global__ void global_pick_kernel(GlobalSelect* gs, unsigned long long* hist, int shift) {
  if (threadIdx.x != 0) return;
  radix_select_step(gs->st, hist, shift, kRadixBits);
  for (int b = 0; b < kBins; ++b) hist[b] = 0;
}

__global__ void global_reset_kernel(GlobalSelect* gs, int64_t n) {
  gs->st.prefix = 0;
  gs->st.prefix_mask = 0;
  gs->st.remaining = n;
}

// A given cut: the key of `cut[0]` (a value of h's dtype, exact in double) and `cut[1]` ties,
// the state the radix passes would end in.
template <typename T>
__global__ void given_cut_kernel(GlobalSelect* gs, const double* cut) {
  T v;
  if constexpr (sizeof(T) == 4) {
    v = static_cast<float>(cut[0]);
  } else if constexpr (std::is_same_v<T, __half>) {
    v = __float2half(static_cast<float>(cut[0]));
  } else {
    v = __float2bfloat16(static_cast<float>(cut[0]));
  }
  gs->st.prefix = key_of(v);
  gs->st.prefix_mask = ~0u;
  gs->st.remaining = static_cast<int64_t>(cut[1]);
}

// Per row: entries above the cut and ties (BatchTopK), or above the threshold.
template <typename T>
__global__ void __launch_bounds__(kBlock) row_counts_kernel(const T* h, int64_t F, const GlobalSelect* gs,
                                                             const T* threshold, int64_t* count,
                                                             int64_t* count_eq) {
  using Reduce = cub::BlockReduce<long long, kBlock>;
  __shared__ typename Reduce::TempStorage tmp1, tmp2;
  const T* row = h + blockIdx.x * F;
  long long c = 0, e = 0;
  const uint32_t cut = gs ? gs->st.prefix : 0;
  for (int64_t j = threadIdx.x; j < F; j += blockDim.x) {
    if (threshold) {
      c += to_float(row[j]) > to_float(threshold[j]);
    } else {
      const uint32_t key = key_of(row[j]);
      c += key > cut;
      e += key == cut;
    }
  }
  const long long tc = Reduce(tmp1).Sum(c);
  const long long te = Reduce(tmp2).Sum(e);
  if (threadIdx.x == 0) {
    count[blockIdx.x] = tc;
    count_eq[blockIdx.x] = te;
  }
}

// Hands the ties of the global cut to rows in row order (the lowest flat indices first): row i
// takes clamp(n - sum_{j<i} count_eq[j], 0, count_eq[i]), a block-wide prefix sum over the rows.
__global__ void __launch_bounds__(kBlock) assign_ties_kernel(const GlobalSelect* gs, int64_t B, int64_t* count,
                                                             int64_t* take_eq, const int64_t* count_eq) {
  using Scan = cub::BlockScan<long long, kBlock>;
  __shared__ typename Scan::TempStorage scan_tmp;
  __shared__ long long carried;  // ties of the rows before this chunk
  if (threadIdx.x == 0) carried = 0;
  __syncthreads();
  const long long n = gs->st.remaining;
  for (int64_t base = 0; base < B; base += kBlock) {
    const int64_t i = base + threadIdx.x;
    const long long c = i < B ? count_eq[i] : 0;
    long long before, total;
    Scan(scan_tmp).ExclusiveSum(c, before, total);
    if (i < B) {
      const long long t = lesser<long long>(c, n - (carried + before) > 0 ? n - (carried + before) : 0);
      take_eq[i] = t;
      count[i] += t;
    }
    __syncthreads();
    if (threadIdx.x == 0) carried += total;
    __syncthreads();
  }
}

template <typename T>
__global__ void __launch_bounds__(kBlock) pack_rows_kernel(const T* h, int64_t F, const GlobalSelect* gs,
                                                            const int64_t* count, const int64_t* take_eq,
                                                            const T* threshold,
                                                            int64_t width, T* values, int64_t* indices, int cap) {
  extern __shared__ uint64_t cand[];
  const int64_t i = blockIdx.x;
  const T* row = h + i * F;
  int n;
  if (count[i] > cap) {
    // More selected entries than the buffer holds (cap >= width): keep the `width` that rank
    // first, exactly as the reference does, by a radix select within the row's selection.
    // BatchTopK's selection of a row is a prefix of the row's own ranking (every entry above
    // the global cut, then the first ties in index order), so its top `width` are the row's;
    // a threshold selection is not, so entries at or below their threshold are masked out.
    if (threshold) {
      n = select_row<T>(AboveThresholdKey<T>{row, threshold}, F, width, cand, cap);
    } else {
      n = select_row<T>(MaskedKey<T>{row, nullptr}, F, width, cand, cap);
    }
    write_row(row, cand, n, width, F, values + i * width, indices + i * width, [](int64_t) { return true; },
              nullptr);
    return;
  }
  const MaskedKey<T> key_at{row, nullptr};
  if (threshold) {
    auto above = [row, threshold](int64_t j, uint32_t) { return to_float(row[j]) > to_float(threshold[j]); };
    n = collect(key_at, F, 0u, 0, count[i], above, cand, cap);
    block_sort(cand, n, cap);
    write_row(row, cand, n, width, F, values + i * width, indices + i * width,
              [row, threshold](int64_t j) { return to_float(row[j]) > to_float(threshold[j]); }, nullptr);
  } else {
    const uint32_t cut = gs->st.prefix;
    const int64_t ties = take_eq[i];
    n = collect(key_at, F, cut, ties, count[i] - ties, [cut](int64_t, uint32_t key) { return key > cut; }, cand,
                cap);
    block_sort(cand, n, cap);
    // membership for the padding scan: above the cut, or a tie among the selected ones
    const uint64_t* sel = cand;
    const int n_sel = n;
    write_row(row, cand, n, width, F, values + i * width, indices + i * width,
              [row, cut, sel, n_sel](int64_t j) {
                const uint32_t key = key_of(row[j]);
                if (key > cut) return true;
                if (key < cut) return false;
                for (int r = 0; r < n_sel; ++r)  // ties are few; a linear probe is enough
                  if ((sel[r] & 0xffffffffull) == static_cast<uint64_t>(j)) return true;
                return false;
              },
              nullptr);
  }
}

template <typename T>
cudaError_t launch_select(const SelectArgs& a, cudaStream_t stream) {
  const T* h = static_cast<const T*>(a.h);
  T* values = static_cast<T*>(a.values);
  const T* thr = a.mode == SelectMode::kThreshold ? static_cast<const T*>(a.threshold) : nullptr;
  GlobalSelect* gs = a.mode == SelectMode::kBatchTopK ? static_cast<GlobalSelect*>(a.workspace) : nullptr;
  if (a.mode != SelectMode::kTopK && a.phase == SelectPhase::kCount) {
    if (gs && a.cut) {
      given_cut_kernel<T><<<1, 1, 0, stream>>>(gs, a.cut);
    } else if (gs) {
      unsigned long long* hist = reinterpret_cast<unsigned long long*>(gs + 1);
      const int64_t N = a.B * a.F;
      global_reset_kernel<<<1, 1, 0, stream>>>(gs, a.B * a.k);
      cudaMemsetAsync(hist, 0, kBins * sizeof(unsigned long long), stream);
      const int grid = static_cast<int>(lesser<int64_t>((N + kBlock - 1) / kBlock, 1024));
      for (int shift = KeyBits<T>::value - kRadixBits; shift >= 0; shift -= kRadixBits) {
        global_hist_kernel<T><<<grid, kBlock, 0, stream>>>(h, N, gs, shift, hist);
        global_pick_kernel<<<1, 1, 0, stream>>>(gs, hist, shift);
      }
    }
    row_counts_kernel<T><<<a.B, kBlock, 0, stream>>>(h, a.F, gs, thr, a.count, a.count_eq);
    if (gs) assign_ties_kernel<<<1, kBlock, 0, stream>>>(gs, a.B, a.count, a.take_eq, a.count_eq);
    return cudaGetLastError();
  }
  const int cap = select_capacity(a.mode == SelectMode::kTopK ? a.k : a.width);
  const size_t smem = cap * sizeof(uint64_t);
  if (a.mode == SelectMode::kTopK) {
    topk_rows_kernel<T><<<a.B, kBlock, smem, stream>>>(h, a.F, a.k, nullptr, nullptr, values, a.indices, cap);
  } else {
    pack_rows_kernel<T><<<a.B, kBlock, smem, stream>>>(h, a.F, gs, a.count, a.take_eq, thr, a.width, values,
                                                       a.indices, cap);
  }
  if (a.aux_values != nullptr && a.k_aux > 0) {  // AuxK: its own selection, skipped when nothing is dead
    const int cap_aux = select_capacity(a.k_aux);
    const int grid = static_cast<int>(lesser<int64_t>((a.F + 255) / 256, 1024));
    any_dead_kernel<<<grid, 256, 0, stream>>>(a.dead, a.F, a.any_dead);
    topk_rows_kernel<T><<<a.B, kBlock, cap_aux * sizeof(uint64_t), stream>>>(
        h, a.F, a.k_aux, a.dead, a.any_dead, static_cast<T*>(a.aux_values), a.aux_indices, cap_aux);
  }
  const int64_t n = a.B * a.out_width;
  if (n > 0)
    fired_kernel<T><<<static_cast<unsigned>((n + 255) / 256), 256, 0, stream>>>(values, a.indices, n, a.bitmap,
                                                                               a.fired);
  if (a.n1 != nullptr) active_norms_kernel<T><<<a.B, kBlock, 0, stream>>>(h, a.F, a.bitmap, a.n1, a.n2);
  return cudaGetLastError();
}

}  // namespace

size_t select_workspace_bytes() { return sizeof(GlobalSelect) + kBins * sizeof(unsigned long long); }

cudaError_t select_cuda_launch(const SelectArgs& a, cudaStream_t stream) {
  // allow the candidate buffer in dynamic shared memory; the attribute is per device
  static unsigned long long configured = 0;  // bit d: device d done
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  const unsigned long long bit = 1ull << (device & 63);
  if (!(configured & bit)) {
    const int smem = kMaxSelect * sizeof(uint64_t);
    cudaFuncSetAttribute(topk_rows_kernel<float>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    cudaFuncSetAttribute(topk_rows_kernel<__half>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    cudaFuncSetAttribute(topk_rows_kernel<__nv_bfloat16>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    cudaFuncSetAttribute(pack_rows_kernel<float>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    cudaFuncSetAttribute(pack_rows_kernel<__half>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    cudaFuncSetAttribute(pack_rows_kernel<__nv_bfloat16>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    configured |= bit;
  }
  switch (a.dtype) {
    case SelectDtype::kFloat32: return launch_select<float>(a, stream);
    case SelectDtype::kFloat16: return launch_select<__half>(a, stream);
    case SelectDtype::kBFloat16: return launch_select<__nv_bfloat16>(a, stream);
  }
  return cudaErrorInvalidValue;
}

// ------------------------------------------------------------------------ index building
// Entries grouped by latent: a stable radix sort of (latent, entry id) pairs, so entries of
// one latent stay in row-major order (deterministic), then the group offsets.
__global__ void group_offsets_kernel(const int32_t* sorted_latents, int64_t n, int64_t F, int64_t* start) {
  const int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (e > n) return;
  const int64_t here = e < n ? sorted_latents[e] : F;
  const int64_t prev = e > 0 ? sorted_latents[e - 1] : -1;
  for (int64_t j = prev + 1; j <= here; ++j) start[j] = e;  // latents with no entry share the offset
}

size_t group_workspace_bytes(int64_t n) {
  size_t bytes = 0;
  cub::DeviceRadixSort::SortPairs(nullptr, bytes, static_cast<const int32_t*>(nullptr),
                                  static_cast<int32_t*>(nullptr), static_cast<const int64_t*>(nullptr),
                                  static_cast<int64_t*>(nullptr), static_cast<int>(n));
  return bytes;
}

cudaError_t group_by_latent_launch(const int32_t* latents, const int64_t* entry_ids, int64_t n, int64_t F,
                                   int32_t* sorted_latents, int64_t* sorted_entries, int64_t* start,
                                   void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  int end_bit = 1;
  while ((int64_t(1) << end_bit) <= F) ++end_bit;  // ids up to F: F is the left-out bucket
  cudaError_t err = cub::DeviceRadixSort::SortPairs(workspace, workspace_bytes, latents, sorted_latents, entry_ids,
                                                    sorted_entries, static_cast<int>(n), 0, end_bit, stream);
  if (err != cudaSuccess) return err;
  group_offsets_kernel<<<static_cast<unsigned>((n + 1 + 255) / 256), 256, 0, stream>>>(sorted_latents, n, F, start);
  return cudaGetLastError();
}

}  // namespace sparse_sae
