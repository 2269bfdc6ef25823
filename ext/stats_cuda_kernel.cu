// The CUDA kernel. Each row of logits is split into chunks, one block per (row, chunk), so that a few rows still
// fill the GPU: a block of 256 threads streams its chunk with 16-byte loads, kUnroll of them in flight per thread,
// keeping an online-softmax partial (running max, sums of 2^y, y 2^y, y^2 2^y); the threads' partials merge with
// warp shuffles, then across warps through shared memory. With one chunk per row, thread 0 finalizes the row;
// otherwise the blocks write their partials to scratch memory and a second kernel merges each row's (a warp per
// row) and finalizes it.
// Why chunks: a block per row leaves a batch of 1-32 rows on 1-32 of the GPU's SMs, each with 8 warps and one load
// in flight per thread, which is bound by memory latency, not bandwidth (a few GB/s per SM).
// Plain CUDA (no torch headers), so a compile-only check needs nvcc and nothing else; tests/ext/cuda_emu runs it on
// the CPU.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "stats_common.h"
#include "stats_cuda_kernel.h"

namespace sedac {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kUnroll = 4;              // loads in flight per thread
constexpr int64_t kMinChunk = 4096;     // elements per block at least: 16 per thread
constexpr int64_t kChunkAlign = 256;    // chunk starts stay 1 KiB (fp32) aligned, and whole packs
constexpr int kBlocksPerSm = 4;         // enough blocks to cover the GPU a few times over
constexpr int kMaxSplits = 64;
constexpr int kFinalizeWarps = 4;       // rows per block of the merge kernel

struct RowOutputs {
  float *ent, *var, *maxp, *lse;
  int64_t *arg, *dec;
};

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

// Per-thread state, in fp32 (a thread sees at most a chunk / kThreads elements); its indices only increase, so
// the first maximum and the first NaN are the ones kept.
struct ThreadAcc {
  float m = -INFINITY;
  float s = 0.f, t = 0.f, u = 0.f;
  int64_t arg = 0;
  int64_t nan_at = -1;

  __device__ __forceinline__ void add(float x, int64_t i) {
    if (x != x) {  // NaN: remembered, never accumulated
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

  // `empty_arg` for a thread that saw no finite or +inf value, so it cannot win a tie against real indices
  __device__ __forceinline__ Partial partial(int64_t empty_arg) const {
    Partial p;
    p.m = m;
    p.s = s;
    p.t = t;
    p.u = u;
    p.arg = m == -INFINITY ? empty_arg : arg;
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

// Lane 0 ends with the merge of the warp's 32 partials.
__device__ __forceinline__ Partial warp_reduce(Partial p) {
  for (int delta = 16; delta > 0; delta >>= 1) merge(p, shfl_down(p, delta));
  return p;
}

__device__ __forceinline__ void write_row(int64_t row, Partial p, int64_t V, float tau_low, float tau_high,
                                          const RowOutputs& out) {
  if (p.arg >= V) p.arg = 0;  // the whole row is -inf: the reference's argmax is 0
  const RowStats r = finalize(p, tau_low, tau_high);
  out.ent[row] = r.entropy_bits;
  out.var[row] = r.varentropy;
  out.maxp[row] = r.max_prob;
  out.lse[row] = r.logsumexp;
  out.arg[row] = r.argmax;
  out.dec[row] = r.decision;
}

// Block b covers row b / splits, elements [chunk * (b % splits), min(V, chunk * (b % splits + 1))). VEC elements of
// T per load (VEC > 1 only for 16-byte aligned rows with V % VEC == 0; chunk is a multiple of VEC).
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads) chunk_stats_kernel(const T* __restrict__ logits, int64_t V, int64_t chunk,
                                                               int splits, float tau_low, float tau_high,
                                                               Partial* __restrict__ scratch, RowOutputs out) {
  const int64_t row = blockIdx.x / splits;
  const int64_t split = blockIdx.x % splits;
  const int64_t begin = split * chunk;
  const int64_t end = begin + chunk < V ? begin + chunk : V;
  struct alignas(sizeof(T) * VEC) Pack { T v[VEC]; };
  const Pack* xp = reinterpret_cast<const Pack*>(logits + row * V);
  const int64_t p_end = end / VEC;

  ThreadAcc acc;
  for (int64_t base = begin / VEC + threadIdx.x; base < p_end; base += kThreads * kUnroll) {
    Pack pk[kUnroll];
#pragma unroll
    for (int j = 0; j < kUnroll; ++j) {
      const int64_t k = base + j * kThreads;
      if (k < p_end) pk[j] = xp[k];
    }
#pragma unroll
    for (int j = 0; j < kUnroll; ++j) {
      const int64_t k = base + j * kThreads;
      if (k < p_end) {
#pragma unroll
        for (int e = 0; e < VEC; ++e) acc.add(to_float(pk[j].v[e]), k * VEC + e);
      }
    }
  }

  Partial p = warp_reduce(acc.partial(V));
  __shared__ Partial warp_parts[kWarps];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) warp_parts[warp] = p;
  __syncthreads();
  if (warp != 0) return;
  p = warp_reduce(lane < kWarps ? warp_parts[lane] : empty_partial(V));
  if (lane != 0) return;
  if (splits == 1) write_row(row, p, V, tau_low, tau_high, out);
  else scratch[blockIdx.x] = p;
}

// A warp per row merges the row's `splits` partials and writes its statistics.
__global__ void __launch_bounds__(kFinalizeWarps * 32) merge_rows_kernel(const Partial* __restrict__ scratch,
                                                                         int64_t rows, int64_t V, int splits,
                                                                         float tau_low, float tau_high,
                                                                         RowOutputs out) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kFinalizeWarps + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (row >= rows) return;  // the whole warp
  Partial p = empty_partial(V);
  for (int s = lane; s < splits; s += 32) merge(p, scratch[row * splits + s]);
  p = warp_reduce(p);
  if (lane == 0) write_row(row, p, V, tau_low, tau_high, out);
}

struct Plan {
  int splits;
  int64_t chunk;
};

Plan plan(int64_t rows, int64_t V) {
  int dev = 0, sms = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) !=
                                                   cudaSuccess || sms <= 0)
    sms = 1;
  int64_t splits = (static_cast<int64_t>(kBlocksPerSm) * sms + rows - 1) / rows;  // blocks to fill the GPU
  const int64_t by_size = (V + kMinChunk - 1) / kMinChunk;                         // but chunks not too small
  if (splits > by_size) splits = by_size;
  if (splits > kMaxSplits) splits = kMaxSplits;
  if (splits < 1) splits = 1;
  int64_t chunk = (V + splits - 1) / splits;
  chunk = (chunk + kChunkAlign - 1) / kChunkAlign * kChunkAlign;
  splits = (V + chunk - 1) / chunk;  // no empty chunk at the end
  return Plan{static_cast<int>(splits), chunk};
}

template <typename T, int VEC>
void launch(const void* logits, int64_t rows, int64_t V, const Plan& pl, float lo, float hi, Partial* scratch,
            const RowOutputs& out, cudaStream_t stream) {
  const int64_t blocks = rows * pl.splits;
  chunk_stats_kernel<T, VEC><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      static_cast<const T*>(logits), V, pl.chunk, pl.splits, lo, hi, scratch, out);
  if (pl.splits > 1) {
    const unsigned merge_blocks = static_cast<unsigned>((rows + kFinalizeWarps - 1) / kFinalizeWarps);
    merge_rows_kernel<<<merge_blocks, kFinalizeWarps * 32, 0, stream>>>(scratch, rows, V, pl.splits, lo, hi, out);
  }
}

}  // namespace

int64_t token_stats_cuda_scratch_bytes(int64_t rows, int64_t V) {
  if (rows <= 0 || V <= 0) return 0;
  const Plan pl = plan(rows, V);
  return pl.splits > 1 ? rows * pl.splits * static_cast<int64_t>(sizeof(Partial)) : 0;
}

int launch_token_stats_cuda(const void* logits, int dtype, int64_t rows, int64_t V, float tau_low, float tau_high,
                            float* ent, float* var, float* maxp, float* lse, int64_t* arg, int64_t* dec,
                            void* scratch, void* stream_ptr) {
  if (rows <= 0) return 0;
  if (V <= 0) return static_cast<int>(cudaErrorInvalidValue);
  const Plan pl = plan(rows, V);
  if (rows * pl.splits > 2147483647LL) return static_cast<int>(cudaErrorInvalidValue);
  if (pl.splits > 1 && scratch == nullptr) return static_cast<int>(cudaErrorInvalidValue);
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  const RowOutputs out{ent, var, maxp, lse, arg, dec};
  Partial* parts = static_cast<Partial*>(scratch);
  const bool aligned = (reinterpret_cast<uintptr_t>(logits) % 16) == 0;
  switch (dtype) {
    case kDtypeFloat32:
      if (aligned && V % 4 == 0) launch<float, 4>(logits, rows, V, pl, tau_low, tau_high, parts, out, stream);
      else launch<float, 1>(logits, rows, V, pl, tau_low, tau_high, parts, out, stream);
      break;
    case kDtypeFloat16:
      if (aligned && V % 8 == 0) launch<__half, 8>(logits, rows, V, pl, tau_low, tau_high, parts, out, stream);
      else launch<__half, 1>(logits, rows, V, pl, tau_low, tau_high, parts, out, stream);
      break;
    case kDtypeBFloat16:
      if (aligned && V % 8 == 0) launch<__nv_bfloat16, 8>(logits, rows, V, pl, tau_low, tau_high, parts, out, stream);
      else launch<__nv_bfloat16, 1>(logits, rows, V, pl, tau_low, tau_high, parts, out, stream);
      break;
    default:
      return static_cast<int>(cudaErrorInvalidValue);
  }
  return static_cast<int>(cudaGetLastError());
}

}  // namespace sedac
