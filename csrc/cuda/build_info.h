// What the CUDA part of sparse_sae._C was compiled with. Plain C++: no torch headers,
// so the .cu files stay quick to compile.
#pragma once
#include <string>

namespace sparse_sae {
std::string cuda_build_info();  // "cuda <runtime version>; archs <list>"
}
