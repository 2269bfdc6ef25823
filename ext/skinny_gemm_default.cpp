// The DEFAULT build of the skinny-matmul kernel (skinny_gemm_kernel.cpp; kernels.py sets the flags).
#define CPU_CAPABILITY DEFAULT
#include "skinny_gemm_kernel.cpp"
