// CUDA entry points of the modified energy ops: checks and tensor handling; kernels in modified_energy_kernel.cu.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "checks.h"
#include "cuda/dtype.h"

namespace fastood {
namespace {

at::Tensor modified_energy_cuda(const at::Tensor& logits_in, double c) {
  check_logits(logits_in);
  TORCH_CHECK(c > 0, "c must be > 0, got ", c);
  c10::cuda::CUDAGuard guard(logits_in.device());
  auto logits = logits_in.contiguous();
  auto energy = at::empty({logits.size(0)}, logits.options());
  if (logits.numel() == 0) return energy.zero_();
  cuda::launch_modified_energy(cuda::dtype_of(logits), logits.data_ptr(), logits.size(0), logits.size(1), c,
                               energy.data_ptr(), nullptr, nullptr, at::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return energy;
}

at::Tensor modified_energy_backward_cuda(const at::Tensor& grad_energy_in, const at::Tensor& logits_in, double c) {
  check_logits(logits_in);
  check_row_grad(grad_energy_in, "grad_energy", logits_in);
  c10::cuda::CUDAGuard guard(logits_in.device());
  auto logits = logits_in.contiguous();
  auto grad_energy = grad_energy_in.to(logits.scalar_type()).contiguous();
  auto grad = at::empty_like(logits);
  if (logits.numel() == 0) return grad;
  cuda::launch_modified_energy(cuda::dtype_of(logits), logits.data_ptr(), logits.size(0), logits.size(1), c, nullptr,
                               grad.data_ptr(), grad_energy.data_ptr(), at::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return grad;
}

std::tuple<at::Tensor, at::Tensor> modified_energy_grad_cuda(const at::Tensor& logits_in, double c) {
  check_logits(logits_in);
  TORCH_CHECK(c > 0, "c must be > 0, got ", c);
  c10::cuda::CUDAGuard guard(logits_in.device());
  auto logits = logits_in.contiguous();
  auto energy = at::empty({logits.size(0)}, logits.options());
  auto grad = at::empty_like(logits);
  if (logits.numel() == 0) return {energy.zero_(), grad};
  cuda::launch_modified_energy(cuda::dtype_of(logits), logits.data_ptr(), logits.size(0), logits.size(1), c,
                               energy.data_ptr(), grad.data_ptr(), nullptr, at::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {energy, grad};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastood, CUDA, m) {
  m.impl("modified_energy", &modified_energy_cuda);
  m.impl("modified_energy_backward", &modified_energy_backward_cuda);
  m.impl("modified_energy_grad", &modified_energy_grad_cuda);
}

}  // namespace fastood
