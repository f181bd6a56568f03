// CUDA entry points of the softmax entropy ops: checks and tensor handling; kernels in softmax_entropy_kernel.cu.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>

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

// The forward that keeps dH/df (float32 [B, C]) for the backward, as on CPU (csrc/cpu/softmax_entropy.cpp): the
// backward is then one multiply per value instead of a second max/exp/sum pass over the logits.
std::tuple<at::Tensor, at::Tensor> softmax_entropy_with_grad_cuda(const at::Tensor& logits_in) {
  check_logits(logits_in);
  TORCH_CHECK(logits_in.scalar_type() != at::kDouble,
              "fastood::softmax_entropy_with_grad: logits must be float32, bfloat16 or float16 (float64 logits "
              "take fastood::softmax_entropy), got ", logits_in.scalar_type());
  c10::cuda::CUDAGuard guard(logits_in.device());
  const auto logits = logits_in.contiguous();
  auto entropy = at::empty({logits.size(0)}, logits.options());
  auto dentropy = at::empty(logits.sizes(), logits.options().dtype(at::kFloat));
  if (logits.numel() == 0) return {entropy.zero_(), dentropy};  // C = 0: the empty sum
  cuda::launch_softmax_entropy_with_grad_kernel(cuda::dtype_of(logits), logits.const_data_ptr(), logits.size(0),
                                                logits.size(1), entropy.mutable_data_ptr(),
                                                dentropy.mutable_data_ptr<float>(), at::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {entropy, dentropy};
}

at::Tensor softmax_entropy_backward_from_grad_cuda(const at::Tensor& grad_entropy_in, const at::Tensor& dentropy_in,
                                                   at::ScalarType dtype) {
  TORCH_CHECK(dentropy_in.scalar_type() == at::kFloat && dentropy_in.dim() == 2,
              "fastood::softmax_entropy_backward_from_grad: dentropy must be the float32 [B, C] gradient that "
              "softmax_entropy_with_grad returned, got ", dentropy_in.scalar_type(), " ", dentropy_in.sizes());
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
              "fastood::softmax_entropy_backward_from_grad: dtype must be float32, bfloat16 or float16, got ", dtype);
  check_floating(grad_entropy_in, "grad_entropy", /*allow_half=*/true);
  TORCH_CHECK(grad_entropy_in.dim() == 1 && grad_entropy_in.size(0) == dentropy_in.size(0) &&
                  grad_entropy_in.device() == dentropy_in.device(),
              "fastood::softmax_entropy_backward_from_grad: grad_entropy must be [", dentropy_in.size(0), "] on ",
              dentropy_in.device(), ", got ", grad_entropy_in.sizes(), " on ", grad_entropy_in.device());
  c10::cuda::CUDAGuard guard(dentropy_in.device());
  const auto d = dentropy_in.contiguous();
  const auto grad_entropy = grad_entropy_in.to(at::kFloat).contiguous();  // [B], may arrive expanded
  auto grad = at::empty(d.sizes(), d.options().dtype(dtype));
  if (d.numel() == 0) return grad;
  cuda::launch_softmax_entropy_scale_rows_kernel(cuda::dtype_of(grad), d.const_data_ptr<float>(),
                                                 grad_entropy.const_data_ptr<float>(), d.size(0), d.size(1),
                                                 grad.mutable_data_ptr(), at::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastood, CUDA, m) {
  m.impl("softmax_entropy", &softmax_entropy_cuda);
  m.impl("softmax_entropy_backward", &softmax_entropy_backward_cuda);
  m.impl("softmax_entropy_with_grad", &softmax_entropy_with_grad_cuda);
  m.impl("softmax_entropy_backward_from_grad", &softmax_entropy_backward_from_grad_cuda);
}

}  // namespace fastood
