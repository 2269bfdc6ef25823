// Emulator shim (see cuda_emu.h): the CUDA runtime types and calls the kernel file uses.
#pragma once
#include "cuda_emu.h"

typedef struct CUstream_st* cudaStream_t;
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorLaunchFailure = 999 };

inline cudaError_t cudaGetLastError() {
  auto& e = ::cuda_emu::emu();
  const int err = e.error;
  e.error = 0;
  return static_cast<cudaError_t>(err);
}
