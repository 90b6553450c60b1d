// Input checks shared by the CPU kernels; each message names the argument.
#pragma once
#include <torch/extension.h>

#define SAE_CHECK_CPU(t) TORCH_CHECK((t).device().is_cpu(), #t " must be a CPU tensor, got ", (t).device())
#define SAE_CHECK_CONTIG(t) TORCH_CHECK((t).is_contiguous(), #t " must be contiguous")
#define SAE_CHECK_DIM(t, d) TORCH_CHECK((t).dim() == (d), #t " must have ", d, " dimensions, got ", (t).dim())
