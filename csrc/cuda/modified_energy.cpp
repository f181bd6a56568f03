// CUDA entry points of the modified energy ops: checks and tensor handling; kernels in modified_energy_kernel.cu.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>

#include "checks.h"
#include "cuda/dtype.h"
#include "cuda/modified_energy_kernel.h"

namespace fastood {
namespace {

void check_c(double c) { TORCH_CHECK(c > 0 && std::isfinite(c), "c must be a finite number > 0, got ", c); }

at::ScalarType acc_dtype(const at::Tensor& logits) {
  return logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// energy [B] (when `energy`) and grad [B, C] = grad_scale[b] dE/df (when `grad`; grad_scale may be undefined).
void run(const at::Tensor& logits, double c, const at::Tensor& grad_scale, at::Tensor* energy, at::Tensor* grad) {
  cuda::launch_modified_energy_kernel(cuda::dtype_of(logits), logits.const_data_ptr(), logits.size(0),
                                      logits.size(1), c, energy ? energy->mutable_data_ptr() : nullptr,
                                      grad ? grad->mutable_data_ptr() : nullptr,
                                      grad_scale.defined() ? grad_scale.const_data_ptr() : nullptr,
                                      at::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor modified_energy_cuda(const at::Tensor& logits_in, double c) {
  check_logits(logits_in);
  check_c(c);
  c10::cuda::CUDAGuard guard(logits_in.device());
  const auto logits = logits_in.contiguous();
  auto energy = at::empty({logits.size(0)}, logits.options());
  if (logits.numel() == 0) return energy.zero_();  // C = 0: the empty sum
  run(logits, c, at::Tensor(), &energy, nullptr);
  return energy;
}

at::Tensor modified_energy_backward_cuda(const at::Tensor& grad_energy_in, const at::Tensor& logits_in, double c) {
  check_logits(logits_in);
  check_row_grad(grad_energy_in, "grad_energy", logits_in);
  check_floating(grad_energy_in, "grad_energy", /*allow_half=*/true);
  check_c(c);
  c10::cuda::CUDAGuard guard(logits_in.device());
  const auto logits = logits_in.contiguous();
  const auto grad_energy = grad_energy_in.to(acc_dtype(logits)).contiguous();  // [B], may arrive expanded
  auto grad = at::empty(logits.sizes(), logits.options());
  if (logits.numel() == 0) return grad;
  run(logits, c, grad_energy, nullptr, &grad);
  return grad;
}

std::tuple<at::Tensor, at::Tensor> modified_energy_grad_cuda(const at::Tensor& logits_in, double c) {
  check_logits(logits_in);
  check_c(c);
  c10::cuda::CUDAGuard guard(logits_in.device());
  const auto logits = logits_in.contiguous();
  auto energy = at::empty({logits.size(0)}, logits.options());
  auto grad = at::empty(logits.sizes(), logits.options());
  if (logits.numel() == 0) return {energy.zero_(), grad};
  run(logits, c, at::Tensor(), &energy, &grad);
  return {energy, grad};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastood, CUDA, m) {
  m.impl("modified_energy", &modified_energy_cuda);
  m.impl("modified_energy_backward", &modified_energy_backward_cuda);
  m.impl("modified_energy_grad", &modified_energy_grad_cuda);
}

}  // namespace fastood
