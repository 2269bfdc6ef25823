// Shared by the CPU and CUDA kernels: the per-chunk partial statistics of one row of logits, how two partials
// merge (the online-softmax rescale), and how a row's partial becomes the final statistics.
//
// A partial holds, relative to its own running max m, in base 2 (y = (z - m) * log2(e)):
//   s = sum 2^y,  t = sum y 2^y,  u = sum y^2 2^y
// so that for p = 2^y / s:  H_bits = log2(s) - t/s,  Var_bits2 = u/s - (t/s)^2,  max_prob = 1/s,
// lse = m + ln(s). Base 2 makes the exponential a polynomial plus an exponent shift, and gives bits directly.
#pragma once

#include <cstdint>
#include <cmath>

#if defined(__CUDACC__)
#define SEDAC_HD __host__ __device__ __forceinline__
#else
#define SEDAC_HD inline
#endif

namespace sedac {

#if !defined(__CUDACC__)
using std::exp2;
using std::isfinite;
using std::log;
using std::log2;
#endif

constexpr float kLog2e = 1.4426950408889634f;
constexpr double kLn2 = 0.69314718055994530942;
constexpr double kEntropyFloor = 1e-30;  // bits; see finalize

// routing decision codes, the same as sedac_core/entropy.py
constexpr int64_t kDecisionExit = 0;
constexpr int64_t kDecisionContinue = 1;
constexpr int64_t kDecisionEscalate = 2;

struct Partial {
  float m;          // running max (raw logit units); -inf while empty
  double s, t, u;   // sums relative to m (see above); double so long rows and merges lose nothing
  int64_t arg;      // index of the first maximum
  int64_t nan_at;   // index of the first NaN, or -1
};

SEDAC_HD Partial empty_partial(int64_t first_index) {
  Partial p;
  p.m = -INFINITY;
  p.s = 0.0;
  p.t = 0.0;
  p.u = 0.0;
  p.arg = first_index;
  p.nan_at = -1;
  return p;
}

// Move a partial's sums to a larger reference max m_new (m_new >= a.m, both finite).
SEDAC_HD void rebase(Partial& a, float m_new) {
  if (a.s == 0.0) {
    a.m = m_new;
    return;
  }
  const double d = (static_cast<double>(a.m) - static_cast<double>(m_new)) * static_cast<double>(kLog2e);
  const double c = exp2(d);
  const double s = a.s, t = a.t, u = a.u;
  a.s = c * s;
  a.t = c * (t + d * s);
  a.u = c * (u + 2.0 * d * t + d * d * s);
  a.m = m_new;
}

// Merge b into a (any order: ties between equal maxima go to the smaller index).
SEDAC_HD void merge(Partial& a, Partial b) {
  if (b.nan_at >= 0 && (a.nan_at < 0 || b.nan_at < a.nan_at)) a.nan_at = b.nan_at;
  if (b.m > a.m || (b.m == a.m && b.arg < a.arg)) a.arg = b.arg;  // ties keep the earlier index
  const float m = a.m > b.m ? a.m : b.m;
  if (!isfinite(m)) {  // both empty (-inf), or a +inf logit (sums are meaningless then)
    a.m = m;
    return;
  }
  rebase(a, m);
  rebase(b, m);
  a.s += b.s;
  a.t += b.t;
  a.u += b.u;
}

struct RowStats {
  float entropy_bits, varentropy, max_prob, logsumexp;
  int64_t argmax, decision;
};

// Defined results for degenerate rows (the same values the torch reference produces):
//  - any NaN: entropy, varentropy, max_prob, logsumexp NaN; argmax = first NaN; decision continue
//  - any +inf: entropy, varentropy, max_prob NaN; logsumexp +inf; argmax = first +inf; decision continue
//  - all -inf: entropy, varentropy, max_prob NaN; logsumexp -inf; argmax 0; decision continue
SEDAC_HD RowStats finalize(const Partial& p, float tau_low, float tau_high) {
  RowStats r;
  const float qnan = NAN;
  if (p.nan_at >= 0) {
    r.entropy_bits = r.varentropy = r.max_prob = r.logsumexp = qnan;
    r.argmax = p.nan_at;
    r.decision = kDecisionContinue;
    return r;
  }
  r.argmax = p.arg;
  if (!isfinite(p.m) || !(p.s > 0.0)) {
    r.entropy_bits = r.varentropy = r.max_prob = qnan;
    r.logsumexp = p.m;  // +inf or -inf
    r.decision = kDecisionContinue;
    return r;
  }
  const double mean_y = p.t / p.s;
  const double h = log2(p.s) - mean_y;
  double var = p.u / p.s - mean_y * mean_y;
  if (var < 0.0) var = 0.0;
  // below kEntropyFloor is what masked (-inf) logits clamped at 2^-126 leave behind (at most V * 126 * 2^-126, under
  // 4e-31 bits for V <= 262,144): a row with one finite logit is certain, entropy 0, as in the reference
  r.entropy_bits = static_cast<float>(h < kEntropyFloor ? 0.0 : h);
  r.varentropy = static_cast<float>(var);
  r.max_prob = static_cast<float>(1.0 / p.s);
  r.logsumexp = static_cast<float>(static_cast<double>(p.m) + log(p.s));
  r.decision = r.entropy_bits < tau_low ? kDecisionExit
               : (r.entropy_bits > tau_high ? kDecisionEscalate : kDecisionContinue);
  return r;
}

}  // namespace sedac
