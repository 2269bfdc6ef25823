// The per-ISA chunk kernels (stats_cpu_kernel.cpp, compiled once per instruction set) as the binding sees them.
#pragma once

#include "stats_common.h"

#define SEDAC_DECLARE_CHUNK_KERNELS(ISA)                                   \
  namespace sedac {                                                        \
  namespace ISA {                                                          \
  Partial chunk_stats_f32(const float* x, int64_t n, int64_t base);        \
  Partial chunk_stats_f16(const uint16_t* x, int64_t n, int64_t base);     \
  Partial chunk_stats_bf16(const uint16_t* x, int64_t n, int64_t base);    \
  int64_t chunk_read_bytes(const void* x, int64_t nbytes);                 \
  }                                                                        \
  }

#ifdef CPU_CAPABILITY
SEDAC_DECLARE_CHUNK_KERNELS(CPU_CAPABILITY)
#endif
