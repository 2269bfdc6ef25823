// The CUDA kernel's launcher as the binding (sedac_cuda.cpp) sees it: raw pointers, no torch or CUDA types.
#pragma once

#include <cstdint>

namespace sedac {

constexpr int kDtypeFloat32 = 0;
constexpr int kDtypeFloat16 = 1;
constexpr int kDtypeBFloat16 = 2;

// Bytes of device memory launch_token_stats_cuda needs as scratch for `rows` rows of V logits on the current
// device (0: none; a row is then one block and needs no merge).
int64_t token_stats_cuda_scratch_bytes(int64_t rows, int64_t V);

// Launches the statistics of `rows` rows of V logits on `stream` (a cudaStream_t), with `scratch` of at least
// token_stats_cuda_scratch_bytes(rows, V) bytes on the current device; returns the cudaError_t of the launches
// (0 = success).
int launch_token_stats_cuda(const void* logits, int dtype, int64_t rows, int64_t V, float tau_low, float tau_high,
                            float* ent, float* var, float* maxp, float* lse, int64_t* arg, int64_t* dec,
                            void* scratch, void* stream);

}  // namespace sedac
