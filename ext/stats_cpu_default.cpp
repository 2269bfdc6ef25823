// The DEFAULT build of the CPU chunk kernel (see stats_cpu_kernel.cpp; sedac_core/kernels.py sets the compiler flags).
#define CPU_CAPABILITY DEFAULT
#include "stats_cpu_kernel.cpp"
