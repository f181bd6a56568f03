// Schemas of every fastood op. Kernels live in cpu/<op>.cpp and cuda/<op>.cpp (+ cuda/<op>_kernel.cu);
// autograd and fake (meta) kernels are registered from Python (fastood/ops/<op>.py), except the in-place
// langevin_step_'s autograd kernel below.
#include <ATen/ATen.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/library.h>

#include <optional>
#include <string>

// The torch (and CUDA) this library was compiled against. setup.py generates fastood_build_versions.h with torch's
// full version ("2.13.0+cu130") and torch.version.cuda; the CMake build has no generated header and records
// LibTorch's version without the local part. The marker is also read from the file by fastood/ops/_backend.py
// when the library cannot be loaded (e.g. an undefined symbol of another torch), to say which torch it wants.
#if __has_include("fastood_build_versions.h")
#include "fastood_build_versions.h"
#else
#include <torch/version.h>
#define FASTOOD_BUILT_TORCH TORCH_VERSION
#define FASTOOD_BUILT_TORCH_CUDA "unknown"
#endif

extern "C" {
__attribute__((used, visibility("default"))) const char fastood_build_versions_marker[] =
    "FASTOOD-BUILD-VERSIONS torch=" FASTOOD_BUILT_TORCH " cuda=" FASTOOD_BUILT_TORCH_CUDA;
}

namespace fastood {

// "torch=<version> cuda=<version|none|unknown>" (the marker without its prefix).
std::string build_versions() {
  constexpr size_t prefix = sizeof("FASTOOD-BUILD-VERSIONS ") - 1;
  return std::string(fastood_build_versions_marker + prefix);
}

bool cuda_built() {
#ifdef FASTOOD_WITH_CUDA
  return true;
#else
  return false;
#endif
}

TORCH_LIBRARY(fastood, m) {
  // FIG eq. (modified energy): E = sum_y (f_y/c) (1 - exp(f_y/c)), per row of logits [B, C].
  m.def("modified_energy(Tensor logits, float c) -> Tensor");
  m.def("modified_energy_backward(Tensor grad_energy, Tensor logits, float c) -> Tensor");
  m.def("modified_energy_grad(Tensor logits, float c) -> (Tensor, Tensor)");
  // H(softmax(f)) per row of logits [B, C].
  m.def("softmax_entropy(Tensor logits) -> Tensor");
  m.def("softmax_entropy_backward(Tensor grad_entropy, Tensor logits) -> Tensor");
  // CPU, float/bfloat16/float16 logits that a backward will follow: the entropy and dH/df (float32 [B, C]);
  // the backward is then grad_entropy[b] * dH/df rounded to `dtype` (the logits' dtype).
  m.def("softmax_entropy_with_grad(Tensor logits) -> (Tensor, Tensor)");
  m.def("softmax_entropy_backward_from_grad(Tensor grad_entropy, Tensor dentropy, ScalarType dtype) -> Tensor");
  // x <- clamp(x - step/2 sign(grad) + noise_std N(0,1), lower, upper) on rows where active;
  // lower/upper: float64 (or float32) [1] or [C] on x's device.
  m.def(
      "langevin_step_(Tensor(a!) x, Tensor grad, float step_size, float noise_std, "
      "Tensor lower, Tensor upper, Tensor? active) -> ()");
  // Unit vectors P r / |P r|, P = I - J (J^T J)^-1 J^T, per sample.
  m.def("nullspace_project(Tensor jac, Tensor r) -> Tensor");
  m.def("cuda_built() -> bool", &cuda_built);
  m.def("build_versions() -> str", &build_versions);
}

namespace {

// Autograd kernel of the in-place langevin_step_, doing what ATen's in-place ops get from their generated
// autograd and ADInplaceOrView kernels: refuse to overwrite a tensor autograd tracks (the step is not
// differentiable: sign(grad) is piecewise constant and the noise is not a function of x) and bump x's version
// counter, so a graph that saved x for its backward raises instead of silently using the new values.
void langevin_step_autograd(at::Tensor& x, const at::Tensor& grad, double step_size, double noise_std,
                            const at::Tensor& lower, const at::Tensor& upper, const std::optional<at::Tensor>& active) {
  if (at::GradMode::is_enabled() && x.requires_grad()) {
    TORCH_CHECK(!x.is_leaf(),
                "a leaf Variable that requires grad is being used in an in-place operation "
                "(fastood::langevin_step_ on x); run the step under torch.no_grad() or on x.detach()");
    TORCH_CHECK(false,
                "fastood::langevin_step_ is not differentiable, but x requires grad (it is part of an autograd "
                "graph); run the step under torch.no_grad() or on x.detach()");
  }
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fastood::langevin_step_", "")
                             .typed<void(at::Tensor&, const at::Tensor&, double, double, const at::Tensor&,
                                         const at::Tensor&, const std::optional<at::Tensor>&)>();
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    op.call(x, grad, step_size, noise_std, lower, upper, active);
  }
  torch::autograd::impl::bump_version(x);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastood, Autograd, m) { m.impl("langevin_step_", &langevin_step_autograd); }

}  // namespace fastood
