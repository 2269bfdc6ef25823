// The CUDA kernel's launcher as the binding (sedac_cuda.cpp) sees it: raw pointers, no torch or CUDA types.
#pragma once

#include <cstdint>

namespace sedac {

constexpr int kDtypeFloat32 = 0;
constexpr int kDtypeFloat16 = 1;
constexpr int kDtypeBFloat16 = 2;

// Launches one block per row on `stream` (a cudaStream_t); returns the cudaError_t of the launch (0 = success).
int launch_token_stats_cuda(const void* logits, int dtype, int64_t rows, int64_t V, float tau_low, float tau_high,
                            float* ent, float* var, float* maxp, float* lse, int64_t* arg, int64_t* dec,
                            void* stream);

}  // namespace sedac
