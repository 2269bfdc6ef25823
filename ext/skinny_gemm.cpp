// The CPU ops sedac_gemm::linear (F.linear semantics: the kernel where it applies, else at::linear) and
// sedac_gemm::linear_rows (the kernel: out = x @ w (+ bias) for a few fp32 rows x [M, K] and an input-major weight
// w [K, N] of fp32, bf16 or fp16, in fp32). The output columns are split into fixed 64-column tasks over
// at::parallel_for, each running the chosen instruction set's kernel; the split never changes a result (each
// output element is computed whole by one task). Registered with the dispatcher (TORCH_LIBRARY), no pybind11.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/grad_mode.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/linear.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "isa_common.h"
#include "skinny_gemm_kernel.h"

SEDAC_DECLARE_GEMM_KERNELS(DEFAULT)
#ifdef SEDAC_HAVE_AVX2
SEDAC_DECLARE_GEMM_KERNELS(AVX2)
#endif
#ifdef SEDAC_HAVE_AVX512
SEDAC_DECLARE_GEMM_KERNELS(AVX512)
#endif

namespace sedac {
namespace gemm {
namespace {

constexpr int64_t kMaxRows = 16;           // rows the kernel takes; torch's GEMM is efficient beyond
constexpr int64_t kTaskCols = 64;          // columns per parallel task: a multiple of every ISA's vector width
// Multiply-adds below which a call runs on the calling thread (one row: every projection but the LM head). A
// parallel region costs microseconds on an idle machine, but on a busy one (OpenMP's default spin-then-sleep
// wait) its worker can wait a whole time slice: ~12 ms per call measured on the shared 2-core machines, where
// the one-thread 576 x 3072 projection takes 0.12 ms.
constexpr int64_t kParallelWork = int64_t{1} << 21;

using F32Fn = void (*)(const float*, int64_t, int64_t, const float*, int64_t, const float*, float*, int64_t,
                       int64_t);
using U16Fn = void (*)(const float*, int64_t, int64_t, const uint16_t*, int64_t, const float*, float*, int64_t,
                       int64_t);

struct KernelSet {
  F32Fn f32;
  U16Fn bf16;
  U16Fn f16;
};

KernelSet kernels_for(int64_t isa) {
  switch (isa) {
    case kIsaDefault:
      return {DEFAULT::rows_f32, DEFAULT::rows_bf16, DEFAULT::rows_f16};
#ifdef SEDAC_HAVE_AVX2
    case kIsaAvx2:
      return {AVX2::rows_f32, AVX2::rows_bf16, AVX2::rows_f16};
#endif
#ifdef SEDAC_HAVE_AVX512
    case kIsaAvx512:
      return {AVX512::rows_f32, AVX512::rows_bf16, AVX512::rows_f16};
#endif
    default:
      TORCH_CHECK(false, "sedac_gemm.linear_rows: instruction set ", isa, " was not compiled into this build");
  }
}

// The kernel proper: x [M, K] fp32 contiguous, w [K, N] contiguous (fp32, bf16 or fp16), bias [N] fp32 or none.
at::Tensor linear_rows_cpu(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias,
                           int64_t isa) {
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "sedac_gemm.linear_rows: expected CPU tensors");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "sedac_gemm.linear_rows: expected contiguous float32 rows x [M, K]");
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous(), "sedac_gemm.linear_rows: expected a contiguous weight [K, N]");
  const auto wtype = w.scalar_type();
  TORCH_CHECK(wtype == at::kFloat || wtype == at::kBFloat16 || wtype == at::kHalf,
              "sedac_gemm.linear_rows: expected a float32, bfloat16 or float16 weight, got ", wtype);
  const int64_t M = x.size(0), K = x.size(1), N = w.size(1);
  TORCH_CHECK(w.size(0) == K, "sedac_gemm.linear_rows: x has ", K, " columns but the weight has ", w.size(0),
              " rows");
  const float* bias_p = nullptr;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->device().is_cpu() && bias->scalar_type() == at::kFloat && bias->is_contiguous() &&
                    bias->numel() == N,
                "sedac_gemm.linear_rows: expected a contiguous float32 bias of ", N, " elements");
    bias_p = bias->const_data_ptr<float>();
  }
  const KernelSet ks = kernels_for(isa);
  at::Tensor out = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return out;
  if (K == 0) return bias_p != nullptr ? bias->expand({M, N}).clone() : out.zero_();

  // x transposed ([K, M]): a step k broadcasts its M values from one or two cache lines
  const at::Tensor xt = M == 1 ? x : x.t().contiguous();
  const float* xp = xt.const_data_ptr<float>();
  float* op = out.data_ptr<float>();
  const void* wp = w.const_data_ptr();
  const int64_t tasks = (N + kTaskCols - 1) / kTaskCols;
  const int64_t grain = std::max<int64_t>(1, (kParallelWork + K * kTaskCols * M - 1) / (K * kTaskCols * M));
  at::parallel_for(0, tasks, grain, [&](int64_t begin, int64_t end) {
    const int64_t n0 = begin * kTaskCols, n1 = std::min(N, end * kTaskCols);
    if (wtype == at::kFloat) ks.f32(xp, M, K, static_cast<const float*>(wp), N, bias_p, op, n0, n1);
    else if (wtype == at::kBFloat16) ks.bf16(xp, M, K, static_cast<const uint16_t*>(wp), N, bias_p, op, n0, n1);
    else ks.f16(xp, M, K, static_cast<const uint16_t*>(wp), N, bias_p, op, n0, n1);
  });
  return out;
}

// Whether linear(x, weight, bias) is served by the kernel (else by at::linear): CPU; weight [N, K] the view of an
// input-major [K, N] contiguous storage, fp32 / bf16 / fp16, with x and bias of its dtype; 1..kMaxRows rows;
// nothing that autograd must see.
bool applies(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  if (!x.device().is_cpu() || !weight.device().is_cpu() || weight.dim() != 2 || x.dim() < 1) return false;
  const int64_t K = x.size(-1);
  if (K == 0 || weight.size(1) != K) return false;
  const int64_t rows = x.numel() / K;
  if (rows < 1 || rows > kMaxRows) return false;
  const auto dtype = weight.scalar_type();
  if (x.scalar_type() != dtype || (dtype != at::kFloat && dtype != at::kBFloat16 && dtype != at::kHalf)) return false;
  if (!weight.t().is_contiguous()) return false;
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias && (!bias->device().is_cpu() || bias->scalar_type() != dtype || bias->dim() != 1 ||
                   bias->size(0) != weight.size(0)))
    return false;
  if (at::GradMode::is_enabled() &&
      (x.requires_grad() || weight.requires_grad() || (has_bias && bias->requires_grad())))
    return false;  // the kernel is inference-only; at::linear stays differentiable
  return true;
}

// F.linear semantics; the kernel where `applies`, else at::linear. Registered as a composite (above autograd), so
// the fallback is differentiable and the fast path costs one dispatch.
at::Tensor linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                  int64_t isa) {
  if (!applies(x, weight, bias)) return at::linear(x, weight, bias);
  const int64_t K = x.size(-1), N = weight.size(0);
  const auto dtype = weight.scalar_type();
  at::Tensor x2 = x.reshape({-1, K});
  std::optional<at::Tensor> b = bias;
  if (dtype != at::kFloat) {
    x2 = x2.to(at::kFloat);
    if (b.has_value() && b->defined()) b = b->to(at::kFloat);
  } else if (b.has_value() && b->defined() && !b->is_contiguous()) {
    b = b->contiguous();
  }
  at::Tensor out = linear_rows_cpu(x2.contiguous(), weight.t(), b, isa);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
  out = out.view(shape);
  return dtype == at::kFloat ? out : out.to(dtype);
}

}  // namespace
}  // namespace gemm
}  // namespace sedac

TORCH_LIBRARY(sedac_gemm, m) {
  m.def("linear_rows(Tensor x, Tensor w, Tensor? bias, int isa) -> Tensor");
  m.def("linear(Tensor x, Tensor weight, Tensor? bias, int isa) -> Tensor", &sedac::gemm::linear);
  m.def("applies(Tensor x, Tensor weight, Tensor? bias) -> bool", &sedac::gemm::applies);
  m.def("max_rows() -> int", [] { return sedac::gemm::kMaxRows; });
  m.def("compiled_isas() -> int[]", &sedac::compiled_isas);
}

TORCH_LIBRARY_IMPL(sedac_gemm, CPU, m) { m.impl("linear_rows", &sedac::gemm::linear_rows_cpu); }
