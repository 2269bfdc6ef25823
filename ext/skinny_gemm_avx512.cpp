// The AVX512 build of the skinny-matmul kernel (skinny_gemm_kernel.cpp; kernels.py sets the flags).
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#include "skinny_gemm_kernel.cpp"
