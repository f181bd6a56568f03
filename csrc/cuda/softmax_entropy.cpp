// CUDA entry points of the softmax entropy ops: checks and tensor handling; kernels in softmax_entropy_kernel.cu.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "checks.h"
#include "cuda/dtype.h"
#include "cuda/softmax_entropy_kernel.h"

namespace fastood {
namespace {

at::Tensor softmax_entropy_cuda(const at::Tensor& logits_in) {
  check_logits(logits_in);
  c10::cuda::CUDAGuard guard(logits_in.device());
  const auto logits = logits_in.contiguous();
  auto entropy = at::empty({logits.size(0)}, logits.options());
  if (logits.numel() == 0) return entropy.zero_();  // C = 0: the empty sum
  cuda::launch_softmax_entropy_kernel(cuda::dtype_of(logits), logits.const_data_ptr(), logits.size(0),
                                      logits.size(1), entropy.mutable_data_ptr(), nullptr, nullptr,
                                      at::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return entropy;
}

at::Tensor softmax_entropy_backward_cuda(const at::Tensor& grad_entropy_in, const at::Tensor& logits_in) {
  check_logits(logits_in);
  check_row_grad(grad_entropy_in, "grad_entropy", logits_in);
  check_floating(grad_entropy_in, "grad_entropy", /*allow_half=*/true);
  c10::cuda::CUDAGuard guard(logits_in.device());
  const auto logits = logits_in.contiguous();
  const auto acc = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto grad_entropy = grad_entropy_in.to(acc).contiguous();  // [B], may arrive expanded
  auto grad = at::empty(logits.sizes(), logits.options());
  if (logits.numel() == 0) return grad;
  cuda::launch_softmax_entropy_kernel(cuda::dtype_of(logits), logits.const_data_ptr(), logits.size(0),
                                      logits.size(1), nullptr, grad.mutable_data_ptr(),
                                      grad_entropy.const_data_ptr(), at::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastood, CUDA, m) {
  m.impl("softmax_entropy", &softmax_entropy_cuda);
  m.impl("softmax_entropy_backward", &softmax_entropy_backward_cuda);
}

}  // namespace fastood
