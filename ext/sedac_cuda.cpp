// The CUDA op sedac_cuda::token_stats: checks and allocates with ATen (outputs and scratch), launches the kernels
// of stats_cuda_kernel.cu on the current stream. Registered with the dispatcher (TORCH_LIBRARY), no pybind11.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <tuple>

#include "stats_cuda_kernel.h"

namespace sedac {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> token_stats_cuda(
    const at::Tensor& logits, double tau_low, double tau_high) {
  TORCH_CHECK(logits.is_cuda(), "sedac_cuda.token_stats: expected a CUDA tensor, got ", logits.device());
  TORCH_CHECK(logits.dim() >= 1, "sedac_cuda.token_stats: expected logits of shape [..., V]");
  const auto dtype = logits.scalar_type();
  int code;
  if (dtype == at::kFloat) code = kDtypeFloat32;
  else if (dtype == at::kHalf) code = kDtypeFloat16;
  else if (dtype == at::kBFloat16) code = kDtypeBFloat16;
  else TORCH_CHECK(false, "sedac_cuda.token_stats: expected float32, float16 or bfloat16 logits, got ", dtype);
  const int64_t V = logits.size(-1);
  TORCH_CHECK(V > 0, "sedac_cuda.token_stats: the vocabulary dimension is empty");

  c10::cuda::CUDAGuard guard(logits.device());
  const auto lead = logits.sizes().slice(0, logits.dim() - 1);
  const auto fopts = logits.options().dtype(at::kFloat);
  const auto lopts = logits.options().dtype(at::kLong);
  at::Tensor ent = at::empty(lead, fopts), var = at::empty(lead, fopts), maxp = at::empty(lead, fopts);
  at::Tensor lse = at::empty(lead, fopts), arg = at::empty(lead, lopts), dec = at::empty(lead, lopts);
  const int64_t rows = ent.numel();
  if (rows == 0) return {ent, var, maxp, lse, arg, dec};
  const at::Tensor x = logits.contiguous();
  // the per-chunk partials of rows split across blocks (from torch's caching allocator: no cudaMalloc per call)
  const int64_t scratch_bytes = token_stats_cuda_scratch_bytes(rows, V);
  at::Tensor scratch = at::empty({scratch_bytes}, logits.options().dtype(at::kByte));
  const int err = launch_token_stats_cuda(
      x.const_data_ptr(), code, rows, V, static_cast<float>(tau_low), static_cast<float>(tau_high),
      ent.data_ptr<float>(), var.data_ptr<float>(), maxp.data_ptr<float>(), lse.data_ptr<float>(),
      arg.data_ptr<int64_t>(), dec.data_ptr<int64_t>(), scratch_bytes > 0 ? scratch.data_ptr() : nullptr,
      c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == 0, "sedac_cuda.token_stats: kernel launch failed: ",
              cudaGetErrorString(static_cast<cudaError_t>(err)));
  return {ent, var, maxp, lse, arg, dec};
}

}  // namespace
}  // namespace sedac

TORCH_LIBRARY(sedac_cuda, m) {
  m.def(
      "token_stats(Tensor logits, float tau_low, float tau_high) -> "
      "(Tensor entropy_bits, Tensor varentropy, Tensor max_prob, Tensor logsumexp, Tensor argmax, "
      "Tensor decision)");
}

TORCH_LIBRARY_IMPL(sedac_cuda, CUDA, m) { m.impl("token_stats", &sedac::token_stats_cuda); }
