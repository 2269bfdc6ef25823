// The per-ISA skinny-matmul kernels (skinny_gemm_kernel.cpp, compiled once per instruction set) as the binding
// sees them: out[m, n] = bias[n] + sum_k x[m, k] * w[k, n] for the columns [n_begin, n_end), with xt = x transposed
// ([K, M] contiguous), w input-major [K, N], out [M, N].
#pragma once

#include <cstdint>

#define SEDAC_DECLARE_GEMM_KERNELS(ISA)                                                                       \
  namespace sedac {                                                                                           \
  namespace gemm {                                                                                            \
  namespace ISA {                                                                                             \
  void rows_f32(const float* xt, int64_t M, int64_t K, const float* w, int64_t N, const float* bias, float* out, \
                int64_t n_begin, int64_t n_end);                                                              \
  void rows_bf16(const float* xt, int64_t M, int64_t K, const uint16_t* w, int64_t N, const float* bias,       \
                 float* out, int64_t n_begin, int64_t n_end);                                                 \
  void rows_f16(const float* xt, int64_t M, int64_t K, const uint16_t* w, int64_t N, const float* bias,        \
                float* out, int64_t n_begin, int64_t n_end);                                                  \
  }                                                                                                           \
  }                                                                                                           \
  }

#ifdef CPU_CAPABILITY
SEDAC_DECLARE_GEMM_KERNELS(CPU_CAPABILITY)
#endif
