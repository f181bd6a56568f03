// Schemas of every fastood op. Kernels live in cpu/<op>.cpp and cuda/<op>.cpp (+ cuda/<op>_kernel.cu);
// autograd and fake (meta) kernels are registered from Python (fastood/ops/<op>.py).
#include <torch/library.h>

namespace fastood {

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
  // x <- clamp(x - step/2 sign(grad) + noise_std N(0,1), lower, upper) on rows where active;
  // lower/upper: float64 (or float32) [1] or [C] on x's device.
  m.def(
      "langevin_step_(Tensor(a!) x, Tensor grad, float step_size, float noise_std, "
      "Tensor lower, Tensor upper, Tensor? active) -> ()");
  // Unit vectors P r / |P r|, P = I - J (J^T J)^-1 J^T, per sample.
  m.def("nullspace_project(Tensor jac, Tensor r) -> Tensor");
  m.def("cuda_built() -> bool", &cuda_built);
}

}  // namespace fastood
