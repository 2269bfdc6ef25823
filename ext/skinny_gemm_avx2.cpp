// The AVX2 build of the skinny-matmul kernel (skinny_gemm_kernel.cpp; kernels.py sets the flags).
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#include "skinny_gemm_kernel.cpp"
