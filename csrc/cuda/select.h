// Launchers of the CUDA selection kernels (select.cu). Plain C++: raw pointers, no torch.
#pragma once
#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

#include "../select_common.h"  // kMaxSelect, select_capacity

namespace sparse_sae {

enum class SelectMode { kTopK, kBatchTopK, kThreshold };
enum class SelectDtype { kFloat32, kFloat16, kBFloat16 };
// Packing modes (BatchTopK, threshold) run in two phases: kCount computes each row's count
// (the caller sizes the output from it), kPack fills the output and the statistics.
enum class SelectPhase { kCount, kPack };

struct SelectArgs {
  SelectMode mode;
  SelectPhase phase;
  SelectDtype dtype;
  const void* h;            // B x F
  int64_t B, F, k;
  const void* threshold;    // F, h's dtype (threshold mode)
  const double* cut;        // 2 (BatchTopK), or null: (value, ties) given instead of the
                            // batch's own radix select (a data-parallel process's share)
  int64_t width;            // packed width (packing modes)
  void* values;             // B x out_width, h's dtype
  int64_t* indices;         // B x out_width
  int64_t out_width;
  const bool* dead;         // F, or null
  int64_t k_aux;
  void* aux_values;         // B x k_aux, or null
  int64_t* aux_indices;
  unsigned int* bitmap;     // ceil(F / 32), zeroed
  unsigned long long* fired;  // F, zeroed
  float* n1;                // B, or null: no norms (plain Top-k)
  float* n2;                // B, or null
  int64_t* count;           // B (packing modes)
  int64_t* count_eq;        // B (packing modes)
  int64_t* take_eq;         // B (packing modes)
  void* workspace;          // select_workspace_bytes() (packing modes)
  unsigned int* any_dead;   // 1 entry, zeroed (with dead): set when some latent is dead, so
                            // AuxK's selection is skipped on the device when none is
};

size_t select_workspace_bytes();
cudaError_t select_cuda_launch(const SelectArgs& args, cudaStream_t stream);

// Index building for the sparse decoder's backward: entries grouped by latent, in row-major
// order within a latent. `start` has F + 1 offsets into `sorted_entries`.
size_t group_workspace_bytes(int64_t n);
cudaError_t group_by_latent_launch(const int32_t* latents, const int64_t* entry_ids, int64_t n, int64_t F,
                                   int32_t* sorted_latents, int64_t* sorted_entries, int64_t* start,
                                   void* workspace, size_t workspace_bytes, cudaStream_t stream);

}  // namespace sparse_sae
