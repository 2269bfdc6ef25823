// Emulator shim (see cuda_emu.h): the CUDA runtime types and calls the kernel file uses.
#pragma once
#include <cstdlib>

#include "cuda_emu.h"

typedef struct CUstream_st* cudaStream_t;
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorLaunchFailure = 999 };
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16 };

inline cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}

// The emulated device has $SEDAC_EMU_SMS multiprocessors (default 132, an H100/H200), so work is split into
// blocks as it would be there.
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int /*device*/) {
  if (attr != cudaDevAttrMultiProcessorCount) return cudaErrorInvalidValue;
  const char* env = std::getenv("SEDAC_EMU_SMS");
  *value = env ? std::atoi(env) : 132;
  return cudaSuccess;
}

inline cudaError_t cudaGetLastError() {
  auto& e = ::cuda_emu::emu();
  const int err = e.error;
  e.error = 0;
  return static_cast<cudaError_t>(err);
}
