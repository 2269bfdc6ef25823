// The CUDA kernel: one block per row of logits. Each thread streams its share of the row with vectorised 16-byte
// loads, keeping an online-softmax partial (running max, sums of 2^y, y 2^y, y^2 2^y); the partials merge with
// warp shuffles, then across warps through shared memory, and thread 0 finalizes the row.
// Plain CUDA (no torch headers), so a compile-only check needs nvcc and nothing else.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "stats_common.h"
#include "stats_cuda_kernel.h"

namespace sedac {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

// Per-thread state, in fp32 (a thread sees at most V / kThreads elements).
struct ThreadAcc {
  float m = -INFINITY;
  float s = 0.f, t = 0.f, u = 0.f;
  int64_t arg = 0;
  int64_t nan_at = -1;

  __device__ __forceinline__ void add(float x, int64_t i) {
    if (x != x) {  // NaN: remembered, never accumulated (a thread's indices increase, so the first one sticks)
      if (nan_at < 0) nan_at = i;
      return;
    }
    if (x > m) {
      if (s > 0.f && isfinite(x)) {
        const float d = (m - x) * kLog2e;
        const float c = exp2f(d);
        const float t0 = t;
        u = c * (u + 2.f * d * t0 + d * d * s);
        t = c * (t0 + d * s);
        s = c * s;
      }
      m = x;
      arg = i;
    }
    if (!isfinite(m) || x == -INFINITY) return;  // all -inf so far, a +inf seen, or a masked (-inf) logit
    const float y = (x - m) * kLog2e;
    const float e = exp2f(y);
    const float w = e * y;
    s += e;
    t += w;
    u = fmaf(w, y, u);
  }

  __device__ __forceinline__ Partial partial() const {
    Partial p;
    p.m = m;
    p.s = s;
    p.t = t;
    p.u = u;
    p.arg = arg;
    p.nan_at = nan_at;
    return p;
  }
};

__device__ __forceinline__ Partial shfl_down(const Partial& p, int delta) {
  Partial q;
  q.m = __shfl_down_sync(0xffffffffu, p.m, delta);
  q.s = __shfl_down_sync(0xffffffffu, p.s, delta);
  q.t = __shfl_down_sync(0xffffffffu, p.t, delta);
  q.u = __shfl_down_sync(0xffffffffu, p.u, delta);
  q.arg = __shfl_down_sync(0xffffffffu, static_cast<long long>(p.arg), delta);
  q.nan_at = __shfl_down_sync(0xffffffffu, static_cast<long long>(p.nan_at), delta);
  return q;
}

__device__ __forceinline__ Partial warp_reduce(Partial p) {
  for (int delta = 16; delta > 0; delta >>= 1) merge(p, shfl_down(p, delta));
  return p;
}

// VEC elements of T per 16-byte load when the row allows it (VEC = 1: scalar loads).
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads) token_stats_kernel(const T* __restrict__ logits, int64_t V,
                                                               float tau_low, float tau_high, float* ent,
                                                               float* var, float* maxp, float* lse,
                                                               int64_t* arg, int64_t* dec) {
  const int64_t row = blockIdx.x;
  const T* x = logits + row * V;
  ThreadAcc acc;
  acc.arg = 0;
  if constexpr (VEC > 1) {
    struct alignas(16) Pack { T v[VEC]; };
    const Pack* xp = reinterpret_cast<const Pack*>(x);
    const int64_t nvec = V / VEC;
    for (int64_t k = threadIdx.x; k < nvec; k += kThreads) {
      const Pack pk = xp[k];
#pragma unroll
      for (int j = 0; j < VEC; ++j) acc.add(to_float(pk.v[j]), k * VEC + j);
    }
    for (int64_t i = nvec * VEC + threadIdx.x; i < V; i += kThreads) acc.add(to_float(x[i]), i);
  } else {
    for (int64_t i = threadIdx.x; i < V; i += kThreads) acc.add(to_float(x[i]), i);
  }

  Partial p = acc.partial();
  if (acc.m == -INFINITY) p.arg = V;  // an empty/all -inf thread must not win a tie against real indices
  p = warp_reduce(p);
  __shared__ Partial warp_parts[kWarps];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) warp_parts[warp] = p;
  __syncthreads();
  if (warp == 0) {
    p = lane < kWarps ? warp_parts[lane] : empty_partial(V);
    p = warp_reduce(p);
    if (lane == 0) {
      if (p.arg >= V) p.arg = 0;  // the whole row is -inf: the reference's argmax is 0
      const RowStats r = finalize(p, tau_low, tau_high);
      ent[row] = r.entropy_bits;
      var[row] = r.varentropy;
      maxp[row] = r.max_prob;
      lse[row] = r.logsumexp;
      arg[row] = r.argmax;
      dec[row] = r.decision;
    }
  }
}

template <typename T, int VEC>
void launch(const void* logits, int64_t rows, int64_t V, float lo, float hi, float* ent, float* var, float* maxp,
            float* lse, int64_t* arg, int64_t* dec, cudaStream_t stream) {
  token_stats_kernel<T, VEC><<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(
      static_cast<const T*>(logits), V, lo, hi, ent, var, maxp, lse, arg, dec);
}

}  // namespace

int launch_token_stats_cuda(const void* logits, int dtype, int64_t rows, int64_t V, float tau_low, float tau_high,
                            float* ent, float* var, float* maxp, float* lse, int64_t* arg, int64_t* dec,
                            void* stream_ptr) {
  if (rows <= 0) return 0;
  if (rows > 2147483647LL) return static_cast<int>(cudaErrorInvalidValue);
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  const bool aligned = (reinterpret_cast<uintptr_t>(logits) % 16) == 0;
  switch (dtype) {
    case kDtypeFloat32:
      if (aligned && V % 4 == 0) launch<float, 4>(logits, rows, V, tau_low, tau_high, ent, var, maxp, lse, arg, dec, stream);
      else launch<float, 1>(logits, rows, V, tau_low, tau_high, ent, var, maxp, lse, arg, dec, stream);
      break;
    case kDtypeFloat16:
      if (aligned && V % 8 == 0) launch<__half, 8>(logits, rows, V, tau_low, tau_high, ent, var, maxp, lse, arg, dec, stream);
      else launch<__half, 1>(logits, rows, V, tau_low, tau_high, ent, var, maxp, lse, arg, dec, stream);
      break;
    case kDtypeBFloat16:
      if (aligned && V % 8 == 0) launch<__nv_bfloat16, 8>(logits, rows, V, tau_low, tau_high, ent, var, maxp, lse, arg, dec, stream);
      else launch<__nv_bfloat16, 1>(logits, rows, V, tau_low, tau_high, ent, var, maxp, lse, arg, dec, stream);
      break;
    default:
      return static_cast<int>(cudaErrorInvalidValue);
  }
  return static_cast<int>(cudaGetLastError());
}

}  // namespace sedac
