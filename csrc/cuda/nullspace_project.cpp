// CUDA entry point of the null-space projection: checks and tensor handling; kernel in nullspace_project_kernel.cu.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "checks.h"
#include "cuda/dtype.h"
#include "cuda/nullspace_project_kernel.h"

namespace fastood {
namespace {

at::Tensor nullspace_project_cuda(const at::Tensor& jac_in, const at::Tensor& r_in) {
  check_nullspace(jac_in, r_in, kMaxLatent);
  c10::cuda::CUDAGuard guard(jac_in.device());
  const at::Tensor jac = jac_in.contiguous(), r = r_in.contiguous();
  at::Tensor out = at::empty(r.sizes(), r.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  cuda::launch_nullspace_project_kernel(cuda::dtype_of(jac), jac.data_ptr(), r.data_ptr(), out.data_ptr(),
                                        jac.size(0), jac.size(1), jac.size(2), at::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastood, CUDA, m) { m.impl("nullspace_project", &nullspace_project_cuda); }

}  // namespace fastood
