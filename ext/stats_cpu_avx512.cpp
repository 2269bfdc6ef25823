// The AVX512 build of the CPU chunk kernel (see stats_cpu_kernel.cpp; sedac_core/kernels.py sets the compiler flags).
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#include "stats_cpu_kernel.cpp"
