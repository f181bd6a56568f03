// CUDA entry point of the Langevin step: checks, Philox state from torch's default CUDA generator
// (graph-safe, as dropout), kernel in langevin_step_kernel.cu.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAGeneratorImpl.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <mutex>

#include "checks.h"
#include "cuda/dtype.h"

namespace fastood {
namespace {

void langevin_step_cuda(at::Tensor& x, const at::Tensor& grad_in, double step_size, double noise_std,
                        const at::Tensor& lower, const at::Tensor& upper, const c10::optional<at::Tensor>& active_in) {
  check_langevin(x, grad_in, step_size, noise_std, lower, upper, active_in);
  if (x.numel() == 0) return;
  c10::cuda::CUDAGuard guard(x.device());
  const bool in_place = x.is_contiguous();
  at::Tensor work = in_place ? x : x.contiguous();
  auto grad = grad_in.to(x.scalar_type()).contiguous();
  auto lo = lower.to(at::kDouble).contiguous(), hi = upper.to(at::kDouble).contiguous();
  c10::optional<at::Tensor> active;
  if (active_in.has_value()) active = active_in->contiguous();
  at::PhiloxCudaState rng;
  if (noise_std > 0) {
    auto gen = at::get_generator_or_default<at::CUDAGeneratorImpl>(
        c10::nullopt, at::cuda::detail::getDefaultCUDAGenerator(x.device().index()));
    std::lock_guard<std::mutex> lock(gen->mutex_);
    rng = gen->philox_cuda_state(cuda::langevin_philox_increment(work.numel()));
  }
  cuda::LangevinArgs args;
  args.x = work.data_ptr();
  args.grad = grad.data_ptr();
  args.rows = work.size(0);
  args.channels = work.size(1);
  args.inner = work.numel() / (args.rows * args.channels);
  args.half_step = 0.5 * step_size;
  args.noise_std = noise_std;
  args.lower = lo.data_ptr<double>();
  args.upper = hi.data_ptr<double>();
  args.nbounds = lo.size(0);
  args.active = active.has_value() ? active->data_ptr<bool>() : nullptr;
  cuda::launch_langevin_step(cuda::dtype_of(work), args, rng, at::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (!in_place) x.copy_(work);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastood, CUDA, m) { m.impl("langevin_step_", &langevin_step_cuda); }

}  // namespace fastood
