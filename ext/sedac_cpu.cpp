// The CPU op sedac_cpu::token_stats: splits a [..., V] logits tensor into (row, chunk) tasks, runs the chunk
// kernel of the chosen instruction set on each task in parallel (at::parallel_for), then merges each row's chunk
// partials (online-softmax rescale) and finalizes entropy, varentropy, max prob, argmax, log-sum-exp and the
// routing decision. Registered with the dispatcher (TORCH_LIBRARY) so the build needs no pybind11. Also
// sedac_cpu::read_rows, a plain read with the same split: the benchmark's memory-limit baseline.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "isa_common.h"
#include "stats_cpu_kernel.h"

SEDAC_DECLARE_CHUNK_KERNELS(DEFAULT)
#ifdef SEDAC_HAVE_AVX2
SEDAC_DECLARE_CHUNK_KERNELS(AVX2)
#endif
#ifdef SEDAC_HAVE_AVX512
SEDAC_DECLARE_CHUNK_KERNELS(AVX512)
#endif

namespace sedac {
namespace {

using F32Fn = Partial (*)(const float*, int64_t, int64_t);
using U16Fn = Partial (*)(const uint16_t*, int64_t, int64_t);
using ReadFn = int64_t (*)(const void*, int64_t);

struct KernelSet {
  F32Fn f32;
  U16Fn f16;
  U16Fn bf16;
  ReadFn read;
};

KernelSet kernels_for(int64_t isa) {
  switch (isa) {
    case kIsaDefault:
      return {DEFAULT::chunk_stats_f32, DEFAULT::chunk_stats_f16, DEFAULT::chunk_stats_bf16, DEFAULT::chunk_read_bytes};
#ifdef SEDAC_HAVE_AVX2
    case kIsaAvx2:
      return {AVX2::chunk_stats_f32, AVX2::chunk_stats_f16, AVX2::chunk_stats_bf16, AVX2::chunk_read_bytes};
#endif
#ifdef SEDAC_HAVE_AVX512
    case kIsaAvx512:
      return {AVX512::chunk_stats_f32, AVX512::chunk_stats_f16, AVX512::chunk_stats_bf16, AVX512::chunk_read_bytes};
#endif
    default:
      TORCH_CHECK(false, "sedac_cpu.token_stats: instruction set ", isa, " was not compiled into this build");
  }
}

constexpr int64_t kMinChunk = 8192;   // elements; below this a split costs more than it saves
constexpr int64_t kGrainElems = 32768;  // total work below this runs on the calling thread

// How R rows of V logits become (row, chunk) tasks for at::parallel_for. Enough rows to keep every thread busy:
// one task per row; otherwise rows split into nthreads chunks each, so the tasks divide evenly among the threads.
struct Split {
  int64_t cpr;    // chunks per row
  int64_t chunk;  // elements per chunk (the last one of a row may be shorter)
  int64_t tasks;
  int64_t grain;  // tasks per thread at least (small work stays on the calling thread)
};

Split split_rows(int64_t R, int64_t V) {
  const int64_t nthreads = at::get_num_threads();
  int64_t cpr = 1;
  if (nthreads > 1 && R < 8 * nthreads && V >= 2 * kMinChunk) {
    cpr = std::min<int64_t>(nthreads, V / kMinChunk);
  }
  int64_t chunk = (V + cpr - 1) / cpr;
  chunk = (chunk + 63) / 64 * 64;  // keep chunk starts 256-byte aligned
  cpr = (V + chunk - 1) / chunk;
  return {cpr, chunk, R * cpr, std::max<int64_t>(1, kGrainElems / chunk)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> token_stats_cpu(
    const at::Tensor& logits, double tau_low, double tau_high, int64_t isa) {
  TORCH_CHECK(logits.device().is_cpu(), "sedac_cpu.token_stats: expected a CPU tensor, got ", logits.device());
  TORCH_CHECK(logits.dim() >= 1, "sedac_cpu.token_stats: expected logits of shape [..., V]");
  const auto dtype = logits.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "sedac_cpu.token_stats: expected float32, float16 or bfloat16 logits, got ", dtype);
  const int64_t V = logits.size(-1);
  TORCH_CHECK(V > 0, "sedac_cpu.token_stats: the vocabulary dimension is empty");
  const KernelSet ks = kernels_for(isa);

  const auto lead = logits.sizes().slice(0, logits.dim() - 1);
  const auto fopts = logits.options().dtype(at::kFloat);
  const auto lopts = logits.options().dtype(at::kLong);
  at::Tensor ent = at::empty(lead, fopts), var = at::empty(lead, fopts), maxp = at::empty(lead, fopts);
  at::Tensor lse = at::empty(lead, fopts), arg = at::empty(lead, lopts), dec = at::empty(lead, lopts);
  const int64_t R = ent.numel();
  if (R == 0) return {ent, var, maxp, lse, arg, dec};

  const at::Tensor x = logits.contiguous();
  const auto [cpr, chunk, tasks, grain] = split_rows(R, V);

  std::vector<Partial> parts(static_cast<size_t>(tasks));
  const void* base_ptr = x.const_data_ptr();
  at::parallel_for(0, tasks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t row = task / cpr;
      const int64_t start = (task % cpr) * chunk;
      const int64_t n = std::min(chunk, V - start);
      const int64_t off = row * V + start;
      Partial p;
      if (dtype == at::kFloat) p = ks.f32(static_cast<const float*>(base_ptr) + off, n, start);
      else if (dtype == at::kHalf) p = ks.f16(static_cast<const uint16_t*>(base_ptr) + off, n, start);
      else p = ks.bf16(static_cast<const uint16_t*>(base_ptr) + off, n, start);
      parts[static_cast<size_t>(task)] = p;
    }
  });

  float* ent_p = ent.data_ptr<float>();
  float* var_p = var.data_ptr<float>();
  float* maxp_p = maxp.data_ptr<float>();
  float* lse_p = lse.data_ptr<float>();
  int64_t* arg_p = arg.data_ptr<int64_t>();
  int64_t* dec_p = dec.data_ptr<int64_t>();
  const float lo = static_cast<float>(tau_low), hi = static_cast<float>(tau_high);
  for (int64_t row = 0; row < R; ++row) {
    Partial p = parts[static_cast<size_t>(row * cpr)];
    for (int64_t c = 1; c < cpr; ++c) merge(p, parts[static_cast<size_t>(row * cpr + c)]);
    const RowStats r = finalize(p, lo, hi);
    ent_p[row] = r.entropy_bits;
    var_p[row] = r.varentropy;
    maxp_p[row] = r.max_prob;
    lse_p[row] = r.logsumexp;
    arg_p[row] = r.argmax;
    dec_p[row] = r.decision;
  }
  return {ent, var, maxp, lse, arg, dec};
}

// A plain read of the logits' bytes with exactly token_stats' task split and threads: the benchmark's memory limit,
// so that kernel / read measures what the statistics cost beyond reading, not a difference in threading.
at::Tensor read_rows_cpu(const at::Tensor& logits, int64_t isa) {
  TORCH_CHECK(logits.device().is_cpu() && logits.dim() >= 1 && logits.size(-1) > 0,
              "sedac_cpu.read_rows: expected CPU logits of shape [..., V]");
  const KernelSet ks = kernels_for(isa);
  const int64_t V = logits.size(-1);
  const int64_t R = logits.numel() / V;
  const at::Tensor x = logits.contiguous();
  const auto [cpr, chunk, tasks, grain] = split_rows(R, V);
  std::vector<int64_t> parts(static_cast<size_t>(tasks));
  const auto* base = static_cast<const uint8_t*>(x.const_data_ptr());
  const int64_t esize = static_cast<int64_t>(x.element_size());
  at::parallel_for(0, tasks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t row = task / cpr, start = (task % cpr) * chunk;
      const int64_t n = std::min(chunk, V - start);
      parts[static_cast<size_t>(task)] = ks.read(base + (row * V + start) * esize, n * esize);
    }
  });
  at::Tensor out = at::empty({R}, logits.options().dtype(at::kLong));
  int64_t* o = out.data_ptr<int64_t>();
  for (int64_t row = 0; row < R; ++row) {
    int64_t sum = 0;
    for (int64_t c = 0; c < cpr; ++c) sum += parts[static_cast<size_t>(row * cpr + c)];
    o[row] = sum;
  }
  return out;
}

}  // namespace
}  // namespace sedac

TORCH_LIBRARY(sedac_cpu, m) {
  m.def(
      "token_stats(Tensor logits, float tau_low, float tau_high, int isa) -> "
      "(Tensor entropy_bits, Tensor varentropy, Tensor max_prob, Tensor logsumexp, Tensor argmax, "
      "Tensor decision)");
  m.def("compiled_isas() -> int[]", &sedac::compiled_isas);
  m.def("read_rows(Tensor logits, int isa) -> Tensor");
}

TORCH_LIBRARY_IMPL(sedac_cpu, CPU, m) {
  m.impl("token_stats", &sedac::token_stats_cpu);
  m.impl("read_rows", &sedac::read_rows_cpu);
}
