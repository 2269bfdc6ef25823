// The AVX2 build of the CPU chunk kernel (see stats_cpu_kernel.cpp; sedac_core/kernels.py sets the compiler flags).
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#include "stats_cpu_kernel.cpp"
