// Declarations of the CPU kernels bound in bindings.cpp.
#pragma once
#include <torch/extension.h>

namespace sparse_sae {
torch::Tensor sparse_decode_cpu(const torch::Tensor& values, const torch::Tensor& indices,
                                const torch::Tensor& W_dec, const torch::Tensor& b_dec);
}  // namespace sparse_sae
