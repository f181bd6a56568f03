// CUDA entry point of the Langevin step: checks, tensor handling and the Philox state of torch's default CUDA
// generator (reserved under its mutex, CUDA-graph safe, as dropout does); the kernel is in langevin_step_kernel.cu.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAGeneratorImpl.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <mutex>
#include <optional>

#include "checks.h"
#include "cuda/dtype.h"
#include "cuda/langevin_step_kernel.h"

namespace fastood {
namespace {

void langevin_step_cuda(at::Tensor& x, const at::Tensor& grad_in, double step_size, double noise_std,
                        const at::Tensor& lower_in, const at::Tensor& upper_in,
                        const std::optional<at::Tensor>& active_in) {
  check_langevin(x, grad_in, step_size, noise_std, lower_in, upper_in, active_in);
  if (x.numel() == 0) return;
  c10::cuda::CUDAGuard guard(x.device());
  // Dense channels_last x (the sampler's layout on CUDA) is stepped where it lies: the kernel addresses
  // [rows, inner, channels] memory, and grad is brought into the same layout (a no-op when it already is).
  const auto format = x.dim() == 4 ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::ChannelsLast3d;
  const bool channels_last = !x.is_contiguous() && (x.dim() == 4 || x.dim() == 5) && x.is_contiguous(format);
  const auto layout = channels_last ? format : at::MemoryFormat::Contiguous;
  // A grad of another dtype contributes only its sign: take it in grad's own dtype (exact in any dtype).
  const at::Tensor grad = (grad_in.scalar_type() == x.scalar_type() ? grad_in : at::sign(grad_in).to(x.scalar_type()))
                              .contiguous(layout);
  const bool in_place = channels_last || x.is_contiguous();
  at::Tensor work = in_place ? x : x.contiguous();
  const at::Tensor lower = lower_in.to(at::kDouble).contiguous(), upper = upper_in.to(at::kDouble).contiguous();
  std::optional<at::Tensor> active;
  if (active_in.has_value()) active = active_in->contiguous();
  at::PhiloxCudaState rng;
  if (noise_std > 0) {
    auto gen = at::get_generator_or_default<at::CUDAGeneratorImpl>(
        std::nullopt, at::cuda::detail::getDefaultCUDAGenerator(x.device().index()));
    std::lock_guard<std::mutex> lock(gen->mutex_);
    rng = gen->philox_cuda_state(cuda::langevin_step_philox_increment(work.numel()));
  }
  cuda::LangevinStepParams params;
  params.x = work.data_ptr();
  params.grad = grad.data_ptr();
  params.numel = work.numel();
  params.per_row = work.numel() / work.size(0);
  params.channels = work.size(1);
  params.inner = params.per_row / params.channels;
  params.channels_last = channels_last;
  params.half_step = 0.5 * step_size;
  params.noise_std = noise_std;
  params.lower = lower.data_ptr<double>();
  params.upper = upper.data_ptr<double>();
  params.nbounds = lower.size(0);
  params.active = active ? active->data_ptr<bool>() : nullptr;
  cuda::launch_langevin_step_kernel(cuda::dtype_of(work), params, rng, at::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (!in_place) x.copy_(work);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastood, CUDA, m) { m.impl("langevin_step_", &langevin_step_cuda); }

}  // namespace fastood
