// Proves the CUDA build: compiled by nvcc and linked into sparse_sae._C without needing a GPU.
#include <cuda_runtime_api.h>
#include <string>

#include "build_info.h"

#ifndef SPARSE_SAE_CUDA_ARCHS
#define SPARSE_SAE_CUDA_ARCHS "unknown"
#endif

namespace sparse_sae {
std::string cuda_build_info() {
  return "cuda " + std::to_string(CUDART_VERSION / 1000) + "." + std::to_string((CUDART_VERSION % 1000) / 10) +
         "; archs " + SPARSE_SAE_CUDA_ARCHS;
}
}  // namespace sparse_sae
