// The CPU inner loop: statistics of one chunk of one row of logits, in a single pass over memory.
// This file is compiled once per instruction set (DEFAULT, AVX2, AVX512), each time with CPU_CAPABILITY set to
// that name, so at::vec::Vectorized is the native vector of that ISA and every symbol here lands in the
// namespace sedac::<ISA>; the binding picks one at run time from what the CPU supports.
//
// Per block of kBlock elements: 2^y with y = (z - m) * log2(e) is a degree-4 polynomial times an exponent
// shift; s, t, u accumulate in fp32 lanes, then fold into double running sums, rescaled when the running max
// grows. The first block (and any with a NaN/inf or a far larger max) takes a max pass first (then in L1).
// The loop is bound by floating-point throughput (about 12 vector instructions per 16 logits on AVX512, against
// 1 for a plain read), so every instruction counts: y is one FMA, the range reduction of 2^y two instructions.
#include "stats_cpu_kernel.h"

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstring>

#ifndef CPU_CAPABILITY
#error "compile with -DCPU_CAPABILITY=DEFAULT|AVX2|AVX512"
#endif

namespace sedac {
namespace CPU_CAPABILITY {
namespace {

using fVec = at::vec::Vectorized<float>;
using iVec = at::vec::Vectorized<int32_t>;
constexpr int64_t kW = fVec::size();
constexpr int64_t kBlock = 2048;  // 8 KiB of fp32: a second pass over a block (max, then sums) hits L1
constexpr float kYMin = -126.0f;  // 2^-126 is the smallest normal float; -inf logits clamp here (weight ~1e-38)
constexpr float kMaxRise = 1.0f;  // bits a block's max may exceed the running max and still be summed in one pass

#if defined(CPU_CAPABILITY_AVX512)
// 2^f on [0, 1), degree 4, constant fixed at 1 so that y = 0 (the max, in the exact sums) gets exactly weight 1;
// near-minimax in relative error (3.0e-6 in fp32: ~1e-5 bits of entropy at most, inside the 1e-4 the reference
// tests allow; degree 5 cost one more FMA per element in a loop bound by floating-point throughput)
constexpr float kC0 = 1.0f, kC1 = 0.693044841f, kC2 = 0.241280198f, kC3 = 0.0522425026f, kC4 = 0.0134266671f;
#else
// 2^f on [-0.5, 0.5], degree 4, constant fixed at 1 (relative error 2.9e-6 in fp32)
constexpr float kC0 = 1.0f, kC1 = 0.693124175f, kC2 = 0.240240991f, kC3 = 0.0559064075f, kC4 = 0.00958283897f;
#endif

// 2^y. AVX512: VREDUCEPS gives f = y - floor(y) and VSCALEFPS multiplies by 2^floor(y), so the range reduction is
// two instructions and any y works (-inf gives 0 * -inf = NaN later in y 2^y: such blocks go the clamped way).
// Elsewhere: 2^round(y) * poly(y - round(y)), the power of two built in the exponent bits, for y >= kYMin.
C10_ALWAYS_INLINE fVec exp2_poly(const fVec& y) {
#if defined(CPU_CAPABILITY_AVX512)
  const fVec f(_mm512_reduce_ps(y, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC));
#elif defined(CPU_CAPABILITY_AVX2)
  const fVec n = y.round();
  const fVec f = y - n;
#else
  // round-to-nearest by adding and removing 1.5 * 2^23 (exact for |y| < 2^22): plain adds the compiler
  // vectorises, where the generic round() calls nearbyint per element
  const fVec magic(12582912.0f);
  const fVec n = (y + magic) - magic;
  const fVec f = y - n;
#endif
  fVec p = at::vec::fmadd(fVec(kC4), f, fVec(kC3));
  p = at::vec::fmadd(p, f, fVec(kC2));
  p = at::vec::fmadd(p, f, fVec(kC1));
  p = at::vec::fmadd(p, f, fVec(kC0));
#if defined(CPU_CAPABILITY_AVX512)
  return fVec(_mm512_scalef_ps(p, y));  // p * 2^floor(y)
#else
  iVec e = at::vec::convert_to_int_of_same_size(n) + iVec(127);
  e = e << iVec(23);
  return p * at::vec::cast<float>(e);
#endif
}

inline float exp2_scalar(float y) { return std::exp2(y); }

inline bool is_nan(float x) { return x != x; }

int64_t first_nan(const float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i)
    if (is_nan(x[i])) return i;
  return -1;
}

// Where the block's new maximum sits (a vector compare: a rise is rare, but a scalar scan of a block cost as much as
// two blocks of statistics, and the first blocks of a row rise often).
int64_t first_equal(const float* x, int64_t n, float v) {
  const fVec vv(v);
  int64_t i = 0;
  for (; i + kW <= n; i += kW) {
    const int equal = (fVec::loadu(x + i) != vv).zero_mask();  // bit k: lane k equals v
    if (equal != 0) return i + __builtin_ctz(static_cast<unsigned>(equal));
  }
  for (; i < n; ++i)
    if (x[i] == v) return i;
  return 0;
}

float block_max(const float* x, int64_t n, bool& saw_nan) {
  // clamp_min(a, b) = max(b, a) in one instruction; a NaN may or may not survive it, so pass 2 (and the
  // lane check below) catch NaNs rather than this pass.
  fVec m0(-INFINITY), m1(-INFINITY), m2(-INFINITY), m3(-INFINITY);
  int64_t i = 0;
  for (; i + 4 * kW <= n; i += 4 * kW) {
    m0 = at::vec::clamp_min(fVec::loadu(x + i), m0);
    m1 = at::vec::clamp_min(fVec::loadu(x + i + kW), m1);
    m2 = at::vec::clamp_min(fVec::loadu(x + i + 2 * kW), m2);
    m3 = at::vec::clamp_min(fVec::loadu(x + i + 3 * kW), m3);
  }
  for (; i + kW <= n; i += kW) m0 = at::vec::clamp_min(fVec::loadu(x + i), m0);
  m0 = at::vec::clamp_min(m0, m1);
  m2 = at::vec::clamp_min(m2, m3);
  m0 = at::vec::clamp_min(m0, m2);
  float lanes[kW];
  m0.store(lanes);
  float best = -INFINITY;
  for (int64_t k = 0; k < kW; ++k) {
    if (is_nan(lanes[k])) saw_nan = true;
    else if (lanes[k] > best) best = lanes[k];
  }
  for (; i < n; ++i) {
    if (is_nan(x[i])) saw_nan = true;
    else if (x[i] > best) best = x[i];
  }
  return best;
}

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
constexpr bool kHaveFma = true;  // fmadd is a true fused multiply-add on these ISAs
#else
constexpr bool kHaveFma = false;
#endif
#if defined(CPU_CAPABILITY_AVX512)
constexpr bool kUnclampedExp = true;  // exp2_poly is right for any y, -inf aside
#else
constexpr bool kUnclampedExp = false;
#endif

// Sums of 2^y, y 2^y, y^2 2^y over a block, y = (x - m) log2(e) for a finite m, and the block's max.
// Exact (kFast false): y = (x - m) * log2e, clamped at kYMin; the max element gets exactly weight 1 (max_prob = 1/s
// is exact for a row with one finite entry). Fast, for the bulk of a row: with a true FMA, y = x log2e - M in one
// instruction, M = fl(m log2e), a single rounding (as exact as the two-step form, near the max too); the sums are
// relative to M and are moved back to m log2e by the tiny difference (a rebase) once per block. And where
// exp2_poly takes any y (AVX512) there is no clamp: a -inf makes the sums NaN, and the caller redoes the block.
template <bool kFast>
void block_sums(const float* x, int64_t n, float m, double& s_out, double& t_out, double& u_out, float& max_out) {
  constexpr bool kFused = kFast && kHaveFma;
  constexpr bool kClamp = !(kFast && kUnclampedExp);
  const float M = kFused ? m * kLog2e : m;
  const fVec vm(M), vl2e(kLog2e), vymin(kYMin), zero(0.0f);
  const fVec vnegm(-M);
  auto y_of = [&](const fVec& xv) {
    fVec y = kFused ? at::vec::fmadd(xv, vl2e, vnegm) : (xv - vm) * vl2e;
    return kClamp ? at::vec::clamp_min(y, vymin) : y;
  };
  fVec s0 = zero, s1 = zero, t0 = zero, t1 = zero, u0 = zero, u1 = zero, mx(-INFINITY);
  int64_t i = 0;
  for (; i + 2 * kW <= n; i += 2 * kW) {
    const fVec x0 = fVec::loadu(x + i), x1 = fVec::loadu(x + i + kW);
    mx = at::vec::clamp_min(at::vec::clamp_min(x0, mx), x1);
    const fVec y0 = y_of(x0);
    const fVec y1 = y_of(x1);
    const fVec e0 = exp2_poly(y0);
    const fVec e1 = exp2_poly(y1);
    const fVec w0 = e0 * y0;
    const fVec w1 = e1 * y1;
    s0 = s0 + e0;
    s1 = s1 + e1;
    t0 = t0 + w0;
    t1 = t1 + w1;
    u0 = at::vec::fmadd(w0, y0, u0);
    u1 = at::vec::fmadd(w1, y1, u1);
  }
  for (; i + kW <= n; i += kW) {
    const fVec x0 = fVec::loadu(x + i);
    mx = at::vec::clamp_min(x0, mx);
    const fVec y0 = y_of(x0);
    const fVec e0 = exp2_poly(y0);
    const fVec w0 = e0 * y0;
    s0 = s0 + e0;
    t0 = t0 + w0;
    u0 = at::vec::fmadd(w0, y0, u0);
  }
  float ls[kW], lt[kW], lu[kW], lm[kW];
  (s0 + s1).store(ls);
  (t0 + t1).store(lt);
  (u0 + u1).store(lu);
  mx.store(lm);
  double s = 0.0, t = 0.0, u = 0.0;
  float bmax = -INFINITY;
  for (int64_t k = 0; k < kW; ++k) {
    s += ls[k];
    t += lt[k];
    u += lu[k];
    bmax = lm[k] > bmax ? lm[k] : bmax;
  }
  for (; i < n; ++i) {
    bmax = x[i] > bmax ? x[i] : bmax;
    float y = kFused ? std::fma(x[i], kLog2e, -M) : (x[i] - m) * kLog2e;
    if (kClamp && y < kYMin) y = kYMin;  // NaN stays NaN
    const float e = exp2_scalar(y);
    s += e;
    t += static_cast<double>(e) * y;
    u += static_cast<double>(e) * y * y;
  }
  if (kFused) {
    // the sums are relative to M; move them to m log2e (d = M - m log2e, exact in double: a float product fits)
    const double d = static_cast<double>(M) - static_cast<double>(m) * static_cast<double>(kLog2e);
    if (d != 0.0 && s != 0.0) {
      const double a = d * kLn2;  // |d| <= half an ulp of M: three terms of 2^d = e^a are exact in double
      const double c = 1.0 + a * (1.0 + 0.5 * a * (1.0 + a / 3.0));
      const double s0d = s, t0d = t;
      s = c * s0d;
      t = c * (t0d + d * s0d);
      u = c * (u + 2.0 * d * t0d + d * d * s0d);
    }
  }
  s_out = s;
  t_out = t;
  u_out = u;
  max_out = bmax;
}

// Fold one block (fp32, in memory) into the running partial: a max pass, then the sums relative to the new max.
// Returns false once the row is known to hold a NaN.
bool fold_block_two_pass(Partial& p, const float* x, int64_t n, int64_t base) {
  bool saw_nan = false;
  const float bmax = block_max(x, n, saw_nan);
  if (saw_nan) {
    p.nan_at = base + first_nan(x, n);
    return false;
  }
  if (bmax > p.m) {
    p.arg = base + first_equal(x, n, bmax);
    if (std::isfinite(bmax)) rebase(p, bmax);
    else p.m = bmax;  // +inf
  }
  if (!std::isfinite(p.m)) {
    // all -inf so far (nothing to add), or a +inf seen (sums are meaningless; only a NaN can change the result)
    if (p.m == INFINITY) {
      const int64_t k = first_nan(x, n);
      if (k >= 0) {
        p.nan_at = base + k;
        return false;
      }
    }
    return true;
  }
  double s, t, u;
  float unused;
  block_sums<false>(x, n, p.m, s, t, u, unused);
  if (is_nan(static_cast<float>(s + t + u))) {  // a NaN the max pass did not see
    const int64_t k = first_nan(x, n);
    p.nan_at = base + (k >= 0 ? k : 0);
    return false;
  }
  p.s += s;
  p.t += t;
  p.u += u;
  return true;
}

// The usual case, once the row has a finite max: one pass computing the sums relative to the running max and the
// block's max together (the separate max pass would read the block from L2 a second time). Sums relative to an
// older, smaller max are still right, but a large element then swamps the small ones in its fp32 lane and the
// rebase cancels digits; so only a rise of up to one bit is rebased, while a larger rise, a NaN or an infinity
// sends the block through the two-pass path (rare after a row's first blocks). Where the fast sums have no clamp
// (AVX512), a -inf (a masked token) makes them NaN; from then on the chunk's blocks take the exact (clamped) sums
// (`exact`), so a row with many masked tokens does not do every block twice.
bool fold_block(Partial& p, const float* x, int64_t n, int64_t base, bool& exact) {
  if (!std::isfinite(p.m)) return fold_block_two_pass(p, x, n, base);
  double s, t, u;
  float bmax;
  if (exact) block_sums<false>(x, n, p.m, s, t, u, bmax);
  else block_sums<true>(x, n, p.m, s, t, u, bmax);
  const bool rise = bmax > p.m;
  const bool bad = is_nan(static_cast<float>(s + t + u));
  if (bad || !std::isfinite(bmax) || (rise && (bmax - p.m) * kLog2e > kMaxRise)) {
    if (bad && kUnclampedExp) exact = true;  // a -inf (or a NaN, which ends the row anyway)
    return fold_block_two_pass(p, x, n, base);
  }
  p.s += s;
  p.t += t;
  p.u += u;
  if (rise) {
    p.arg = base + first_equal(x, n, bmax);
    rebase(p, bmax);
  }
  return true;
}

template <typename T>
void to_float(const T* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + kW <= n; i += kW) {
    fVec v;
    at::vec::load_to_float<T>(src + i, v);
    v.store(dst + i);
  }
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

}  // namespace

Partial chunk_stats_f32(const float* x, int64_t n, int64_t base) {
  Partial p = empty_partial(base);
  bool exact = false;
  for (int64_t off = 0; off < n; off += kBlock) {
    const int64_t len = n - off < kBlock ? n - off : kBlock;
    if (!fold_block(p, x + off, len, base + off, exact)) break;
  }
  return p;
}

template <typename T>
static Partial chunk_stats_reduced(const T* x, int64_t n, int64_t base) {
  alignas(64) float buf[kBlock];
  Partial p = empty_partial(base);
  bool exact = false;
  for (int64_t off = 0; off < n; off += kBlock) {
    const int64_t len = n - off < kBlock ? n - off : kBlock;
    to_float<T>(x + off, buf, len);
    if (!fold_block(p, buf, len, base + off, exact)) break;
  }
  return p;
}

// The benchmark's memory limit: a plain read of the same bytes (32-bit words summed, one vector add per vector
// loaded, four independent accumulators), run with the same task split as the statistics.
int64_t chunk_read_bytes(const void* x, int64_t nbytes) {
  using lVec = at::vec::Vectorized<int32_t>;
  constexpr int64_t kL = lVec::size();
  const auto* w = static_cast<const int32_t*>(x);
  const int64_t n = nbytes / 4;
  lVec a(0), b(0), c(0), d(0);
  int64_t i = 0;
  for (; i + 4 * kL <= n; i += 4 * kL) {
    a = a + lVec::loadu(w + i);
    b = b + lVec::loadu(w + i + kL);
    c = c + lVec::loadu(w + i + 2 * kL);
    d = d + lVec::loadu(w + i + 3 * kL);
  }
  int32_t lanes[kL];
  ((a + b) + (c + d)).store(lanes);
  int64_t sum = 0;
  for (int64_t k = 0; k < kL; ++k) sum += lanes[k];
  for (; i < n; ++i) sum += w[i];
  const auto* bytes = static_cast<const uint8_t*>(x);
  for (int64_t k = n * 4; k < nbytes; ++k) sum += bytes[k];
  return sum;
}

Partial chunk_stats_f16(const uint16_t* x, int64_t n, int64_t base) {
  return chunk_stats_reduced<c10::Half>(reinterpret_cast<const c10::Half*>(x), n, base);
}

Partial chunk_stats_bf16(const uint16_t* x, int64_t n, int64_t base) {
  return chunk_stats_reduced<c10::BFloat16>(reinterpret_cast<const c10::BFloat16*>(x), n, base);
}

}  // namespace CPU_CAPABILITY
}  // namespace sedac
