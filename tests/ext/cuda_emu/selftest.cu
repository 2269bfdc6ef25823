// Checks of the emulator itself (tests/ext/test_cuda_emulated.py): it must follow CUDA's rules for the constructs
// the real kernel uses, and report a broken kernel instead of passing it or hanging.
//   selftest shuffle   lane i of each warp prints what __shfl_down_sync(full, 100 * warp + i, d) gives, d = 16, 1
//   selftest shared    a block sums its thread ids through shared memory and __syncthreads
//   selftest divergent a __syncthreads that only some threads reach (undefined on a GPU): must be a launch error
#include <cstdio>
#include <cstring>

#include "cuda_runtime.h"

__global__ void shuffle_kernel(int* out) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int v = 100 * warp + lane;
  out[2 * threadIdx.x] = __shfl_down_sync(0xffffffffu, v, 16);
  out[2 * threadIdx.x + 1] = __shfl_down_sync(0xffffffffu, v, 1);
}

__global__ void shared_kernel(long long* out) {
  __shared__ long long part[64];
  part[threadIdx.x] = threadIdx.x + 1000LL * blockIdx.x;
  __syncthreads();
  if (threadIdx.x == 0) {
    long long s = 0;
    for (unsigned i = 0; i < blockDim.x; ++i) s += part[i];
    out[blockIdx.x] = s;
  }
}

__global__ void divergent_kernel(int* out) {
  if (threadIdx.x < 32) __syncthreads();
  out[threadIdx.x] = 1;
}

int main(int argc, char** argv) {
  if (argc != 2) return 2;
  if (!std::strcmp(argv[1], "shuffle")) {
    int out[128];
    shuffle_kernel<<<1, 64, 0, nullptr>>>(out);
    if (cudaGetLastError() != cudaSuccess) return 3;
    for (int i = 0; i < 128; ++i) std::printf("%d\n", out[i]);
  } else if (!std::strcmp(argv[1], "shared")) {
    long long out[3];
    shared_kernel<<<3, 64, 0, nullptr>>>(out);
    if (cudaGetLastError() != cudaSuccess) return 3;
    for (long long v : out) std::printf("%lld\n", v);
  } else if (!std::strcmp(argv[1], "divergent")) {
    int out[64];
    divergent_kernel<<<1, 64, 0, nullptr>>>(out);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) {
      std::printf("launch error: %s\n", ::cuda_emu::emu().message.c_str());
      return 3;
    }
  } else {
    return 2;
  }
  return 0;
}
