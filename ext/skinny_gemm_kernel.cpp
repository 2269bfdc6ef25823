// The CPU skinny-matmul inner loops: out[m, n] = bias[n] + sum_k x[m, k] * w[k, n] for a few rows x (M <= 16)
// and an input-major weight w ([K, N] in memory, the layout sedac_core/anatomy.py stores on CPU).
// This file is compiled once per instruction set (DEFAULT, AVX2, AVX512), each time with CPU_CAPABILITY set to
// that name, so every symbol lands in the namespace sedac::gemm::<ISA>; the binding picks one at run time.
//
// A register tile holds R rows x J vectors of accumulators (all M rows at once on AVX512: 16 x 1 ... 6 x 4)
// while it streams the weight rows of its columns, so the weights (the memory traffic) are read once whatever
// M is. k runs in chunks (see Plan); between chunks a tile's partial sums wait in a small per-thread buffer.
// Every output element is one chain acc = fma(x[m, k], w[k, n], acc) for k = 0..K-1 from acc = 0, then
// acc + bias[n]: a fused multiply-add is correctly rounded and a parked float reloads exactly, so a vector lane
// and the scalar tail compute the same bits, and a row's result depends neither on M (nor the plan M selects),
// nor on the tiling, nor on the thread count.
#include "skinny_gemm_kernel.h"

#include <c10/macros/Macros.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif

#ifndef CPU_CAPABILITY
#error "compile with -DCPU_CAPABILITY=DEFAULT|AVX2|AVX512"
#endif

namespace sedac {
namespace gemm {
namespace CPU_CAPABILITY {
namespace {

// weight element types: fp32, and bf16 / fp16 read as raw 16-bit words and widened to fp32 exactly
struct F32 {
  using T = float;
};
struct BF16 {
  using T = uint16_t;
};
struct F16 {
  using T = uint16_t;
};

inline float to_float(F32, float v) { return v; }
inline float to_float(BF16, uint16_t v) {
  const uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}
inline float to_float(F16, uint16_t v) { return c10::detail::fp16_ieee_to_fp32_value(v); }

#if defined(CPU_CAPABILITY_AVX512)
using Vec = __m512;
constexpr int kW = 16;          // floats per vector
constexpr int kRegs = 31;       // vector registers a tile may use (of 32)
constexpr int kMaxRows = 16;    // rows in one register tile (16 rows x 1 vector)
inline Vec vzero() { return _mm512_setzero_ps(); }
inline Vec vset1(float a) { return _mm512_set1_ps(a); }
inline Vec vfma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
inline Vec vadd(Vec a, Vec b) { return _mm512_add_ps(a, b); }
inline void vstore(float* p, Vec v) { _mm512_storeu_ps(p, v); }
inline Vec vload(F32, const float* p) { return _mm512_loadu_ps(p); }
inline Vec vload(BF16, const uint16_t* p) {
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}
inline Vec vload(F16, const uint16_t* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
#elif defined(CPU_CAPABILITY_AVX2)
using Vec = __m256;
constexpr int kW = 8;
constexpr int kRegs = 15;       // of 16
constexpr int kMaxRows = 12;
inline Vec vzero() { return _mm256_setzero_ps(); }
inline Vec vset1(float a) { return _mm256_set1_ps(a); }
inline Vec vfma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
inline Vec vadd(Vec a, Vec b) { return _mm256_add_ps(a, b); }
inline void vstore(float* p, Vec v) { _mm256_storeu_ps(p, v); }
inline Vec vload(F32, const float* p) { return _mm256_loadu_ps(p); }
inline Vec vload(BF16, const uint16_t* p) {
  const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}
inline Vec vload(F16, const uint16_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
#else
// portable scalar build: std::fma is one instruction where the target has it (aarch64), a correct libm call
// elsewhere (sedac_core/matmul.py only uses this build off x86)
using Vec = float;
constexpr int kW = 1;
constexpr int kRegs = 16;
constexpr int kMaxRows = 16;
inline Vec vzero() { return 0.0f; }
inline Vec vset1(float a) { return a; }
inline Vec vfma(Vec a, Vec b, Vec c) { return std::fma(a, b, c); }
inline Vec vadd(Vec a, Vec b) { return a + b; }
inline void vstore(float* p, Vec v) { *p = v; }
template <class L>
inline Vec vload(L tag, const typename L::T* p) { return to_float(tag, *p); }
#endif

// vectors per register tile for R rows: R x J accumulators + J weight vectors + 1 broadcast fit in kRegs
constexpr int tile_vectors(int R) { return std::max(1, std::min(4, (kRegs - 1) / (R + 1))); }

// How a row group walks the weights (measured on SmolLM2's shapes, 2-core AMD EPYC with AVX512, cold weights):
// - few rows (memory-bound): k in chunks of 8 rows over wide panels, so DRAM sees 8 long sequential runs, which
//   the hardware prefetchers follow (with 16 or more runs at once the read rate drops by up to 2x); the partial
//   sums' trips to the buffer cost little next to the weight reads;
// - more rows (the fmas catch up with the memory): chunks of 128 rows, so a tile runs long between those trips,
//   over narrow panels (1024 columns: a chunk's weights stay in L2 for the next tile's prefetch to land).
// Both request the piece the compute will read kAhead elements later into L2 (T1: into L1 it evicts what is
// in use). Without it many rows run up to 1.7x slower; requesting the next chunk as one block, 10-25% slower.
// 3-4 rows take the first plan only over a wide range of columns (the LM head), where the long runs pay.
struct Plan {
  int64_t chunk_rows;
  int64_t panel_cols;
};
constexpr int64_t kFewRows = 2;
constexpr int64_t kFewRowsWide = 4;
constexpr int64_t kWideCols = 8192;
constexpr Plan kFewRowsPlan{8, 24576};
constexpr Plan kManyRowsPlan{128, 1024};
constexpr int64_t kAhead = 64;  // elements, along the compute order (at least one tile further)

// R rows x J vectors of output over the weight rows [k0, k1). xt = &xt[0, r0] (x transposed: [K, ldx]),
// w = &w[0, n0]. The accumulators start at 0 (k0 == 0) or from `acc_buf` (the partial sums of the previous
// chunk: a stored float reloads exactly, so chunking k changes no bit) and go back there, or, after the last
// chunk (k1 == K), to out = &out[r0, n0] plus the bias. `ahead`, if set: the piece to request into L2 while
// reading row k0 (one row further per step).
template <class L, int R, int J>
void tile(const float* xt, int64_t ldx, int64_t K, int64_t k0, int64_t k1, const typename L::T* w, int64_t N,
          float* acc_buf, const float* bias, float* out, const typename L::T* ahead) {
  using T = typename L::T;
  Vec acc[R][J];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < J; ++j) acc[r][j] = k0 == 0 ? vzero() : vload(F32{}, acc_buf + (j * R + r) * kW);

  auto step = [&](int64_t k) __attribute__((always_inline)) {
    const T* wk = w + k * N;
    const float* xk = xt + k * ldx;
    Vec wv[J];
    for (int j = 0; j < J; ++j) wv[j] = vload(L{}, wk + j * kW);
    for (int r = 0; r < R; ++r) {
      const Vec b = vset1(xk[r]);
      for (int j = 0; j < J; ++j) acc[r][j] = vfma(b, wv[j], acc[r][j]);
    }
  };
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
  if (ahead != nullptr) {
    constexpr int kBytes = J * kW * static_cast<int>(sizeof(T));
    for (int64_t k = k0; k < k1; ++k) {
      const char* c = reinterpret_cast<const char*>(ahead + (k - k0) * N);
      for (int off = 0; off < kBytes; off += 64) _mm_prefetch(c + off, _MM_HINT_T1);
      step(k);
    }
  } else {
    for (int64_t k = k0; k < k1; ++k) step(k);
  }
#else
  (void)ahead;
  for (int64_t k = k0; k < k1; ++k) step(k);
#endif

  if (k1 < K) {
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < J; ++j) vstore(acc_buf + (j * R + r) * kW, acc[r][j]);
    return;
  }
  for (int r = 0; r < R; ++r) {
    for (int j = 0; j < J; ++j) {
      Vec v = acc[r][j];
      if (bias != nullptr) v = vadd(v, vload(F32{}, bias + j * kW));
      vstore(out + r * N + j * kW, v);
    }
  }
}

// the columns left over after the vectors, one at a time with the same fused multiply-add per step
template <class L>
void scalar_column(const float* xt, int64_t M, int64_t K, const typename L::T* w, int64_t N, const float* bias,
                   float* out) {
  for (int64_t m = 0; m < M; ++m) {
    float acc = 0.0f;
    for (int64_t k = 0; k < K; ++k) acc = std::fma(xt[k * M + m], to_float(L{}, w[k * N]), acc);
    if (bias != nullptr) acc = acc + *bias;
    out[m * N] = acc;
  }
}

// One row group of R rows over the columns [n_begin, n_end) (whole vectors), in panels: each panel goes through
// k in chunks, tile by tile, the partial sums parked in a per-thread buffer between chunks.
template <class L, int R>
void group(const float* xt, int64_t ldx, int64_t K, const typename L::T* w, int64_t N, const float* bias,
           float* out, int64_t n_begin, int64_t n_end, const Plan& plan) {
  using T = typename L::T;
  constexpr int J = tile_vectors(R);
  constexpr int64_t kAheadCols = std::max<int64_t>(kAhead, J * kW);
  const int64_t chunk = plan.chunk_rows;
  const int64_t panel_vecs = std::max<int64_t>(J, plan.panel_cols / kW / J * J);
  const int64_t vecs = (n_end - n_begin) / kW;
  thread_local std::vector<float> buf;
  const int64_t need = K > chunk ? std::min(panel_vecs, vecs) * R * kW : 0;
  if (static_cast<int64_t>(buf.size()) < need) buf.resize(static_cast<size_t>(need));
  float* acc_buf = buf.data();
  for (int64_t v0 = 0; v0 < vecs; v0 += panel_vecs) {
    const int64_t nv = std::min(panel_vecs, vecs - v0);
    const T* panel = w + n_begin + v0 * kW;
    for (int64_t k0 = 0; k0 < K; k0 += chunk) {
      const int64_t k1 = std::min(K, k0 + chunk);
      // the piece the compute reads kAheadCols columns later: further along these rows or, past the panel's
      // end, in the next chunk's rows (or the next panel's first rows); none where those rows run short
      auto ahead_of = [&](int64_t v) -> const T* {
        const int64_t target = v * kW + kAheadCols, width = nv * kW;
        if (target < width) return panel + k0 * N + target;
        if (k1 + (k1 - k0) <= K) return panel + k1 * N + (target - width);
        if (k1 == K && v0 + nv < vecs) return panel + width + (target - width);
        return nullptr;
      };
      int64_t v = 0;
      for (; v + J <= nv; v += J) {
        const int64_t n = n_begin + (v0 + v) * kW;
        tile<L, R, J>(xt, ldx, K, k0, k1, w + n, N, acc_buf + v * R * kW, bias ? bias + n : nullptr, out + n,
                      ahead_of(v));
      }
      for (; v < nv; ++v) {
        const int64_t n = n_begin + (v0 + v) * kW;
        tile<L, R, 1>(xt, ldx, K, k0, k1, w + n, N, acc_buf + v * R * kW, bias ? bias + n : nullptr, out + n,
                      ahead_of(v));
      }
    }
  }
}

template <class L>
void rows(const float* xt, int64_t M, int64_t K, const typename L::T* w, int64_t N, const float* bias, float* out,
          int64_t n_begin, int64_t n_end) {
  if (M <= 0 || n_end <= n_begin) return;
  const int64_t n_vec_end = n_begin + (n_end - n_begin) / kW * kW;
  const bool wide = n_end - n_begin >= kWideCols;
  const Plan& plan = M <= kFewRows || (M <= kFewRowsWide && wide) ? kFewRowsPlan : kManyRowsPlan;
  // near-equal row groups of at most kMaxRows (one group on AVX512)
  const int64_t groups = (M + kMaxRows - 1) / kMaxRows;
  const int64_t base = M / groups, extra = M % groups;
  int64_t r0 = 0;
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t rg = base + (g < extra ? 1 : 0);
    const float* xg = xt + r0;
    float* og = out + r0 * N;
    switch (rg) {
#define SEDAC_GEMM_CASE(n)                                                                  \
  case n:                                                                                   \
    if constexpr (n <= kMaxRows) group<L, n>(xg, M, K, w, N, bias, og, n_begin, n_vec_end, plan); \
    break;
      SEDAC_GEMM_CASE(1)
      SEDAC_GEMM_CASE(2)
      SEDAC_GEMM_CASE(3)
      SEDAC_GEMM_CASE(4)
      SEDAC_GEMM_CASE(5)
      SEDAC_GEMM_CASE(6)
      SEDAC_GEMM_CASE(7)
      SEDAC_GEMM_CASE(8)
      SEDAC_GEMM_CASE(9)
      SEDAC_GEMM_CASE(10)
      SEDAC_GEMM_CASE(11)
      SEDAC_GEMM_CASE(12)
      SEDAC_GEMM_CASE(13)
      SEDAC_GEMM_CASE(14)
      SEDAC_GEMM_CASE(15)
      SEDAC_GEMM_CASE(16)
#undef SEDAC_GEMM_CASE
      default:
        break;
    }
    r0 += rg;
  }
  for (int64_t n = n_vec_end; n < n_end; ++n) scalar_column<L>(xt, M, K, w + n, N, bias ? bias + n : nullptr, out + n);
}

}  // namespace

void rows_f32(const float* xt, int64_t M, int64_t K, const float* w, int64_t N, const float* bias, float* out,
              int64_t n_begin, int64_t n_end) {
  rows<F32>(xt, M, K, w, N, bias, out, n_begin, n_end);
}

void rows_bf16(const float* xt, int64_t M, int64_t K, const uint16_t* w, int64_t N, const float* bias, float* out,
               int64_t n_begin, int64_t n_end) {
  rows<BF16>(xt, M, K, w, N, bias, out, n_begin, n_end);
}

void rows_f16(const float* xt, int64_t M, int64_t K, const uint16_t* w, int64_t N, const float* bias, float* out,
              int64_t n_begin, int64_t n_end) {
  rows<F16>(xt, M, K, w, N, bias, out, n_begin, n_end);
}

}  // namespace CPU_CAPABILITY
}  // namespace gemm
}  // namespace sedac
