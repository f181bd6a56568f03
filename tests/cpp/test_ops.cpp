// C++ smoke test of the library built by CMake: every op is registered and agrees with ATen.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cmath>
#include <cstdio>
#include <tuple>

namespace {

int failures = 0;

void expect_close(const char* what, const at::Tensor& got, const at::Tensor& want, double tol) {
  double err = (got.to(at::kDouble) - want.to(at::kDouble)).abs().max().item<double>();
  bool ok = err <= tol;
  std::printf("%-36s max error %.3e  %s\n", what, err, ok ? "ok" : "FAIL");
  if (!ok) ++failures;
}

template <typename Signature>
c10::TypedOperatorHandle<Signature> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

}  // namespace

int main() {
  at::manual_seed(0);
  const double c = 5.0;
  at::Tensor logits = at::randn({64, 10}, at::kFloat) * 3;

  // Modified energy and its gradient.
  at::Tensor s = logits / c;
  at::Tensor energy_ref = (s * (1 - s.exp())).sum(1);
  at::Tensor grad_ref = (1 - (1 + s) * s.exp()) / c;
  at::Tensor energy = op<at::Tensor(const at::Tensor&, double)>("fastood::modified_energy").call(logits, c);
  expect_close("modified_energy", energy, energy_ref, 1e-5);
  auto both = op<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, double)>("fastood::modified_energy_grad")
                  .call(logits, c);
  expect_close("modified_energy_grad (energy)", std::get<0>(both), energy_ref, 1e-5);
  expect_close("modified_energy_grad (grad)", std::get<1>(both), grad_ref, 1e-5);

  // Softmax entropy.
  at::Tensor logp = at::log_softmax(logits, 1);
  at::Tensor entropy_ref = -(logp.exp() * logp).sum(1);
  at::Tensor entropy = op<at::Tensor(const at::Tensor&)>("fastood::softmax_entropy").call(logits);
  expect_close("softmax_entropy", entropy, entropy_ref, 1e-5);

  // Langevin step without noise is deterministic.
  at::Tensor x = at::rand({8, 3, 4, 4}) * 2 - 1;
  at::Tensor g = at::randn({8, 3, 4, 4});
  at::Tensor lo = at::full({1}, -0.5, at::kFloat), hi = at::full({1}, 0.5, at::kFloat);
  at::Tensor want = at::clamp(x - 0.05 * at::sign(g), -0.5, 0.5);
  op<void(at::Tensor&, const at::Tensor&, double, double, const at::Tensor&, const at::Tensor&,
          const std::optional<at::Tensor>&)>("fastood::langevin_step_")
      .call(x, g, 0.1, 0.0, lo, hi, std::nullopt);
  expect_close("langevin_step_ (no noise)", x, want, 1e-6);

  // Null-space projection: orthogonal to J and unit norm.
  at::Tensor jac = at::randn({16, 50, 4}, at::kDouble);
  at::Tensor r = at::randn({16, 50}, at::kDouble);
  at::Tensor v = op<at::Tensor(const at::Tensor&, const at::Tensor&)>("fastood::nullspace_project").call(jac, r);
  expect_close("nullspace_project |J^T v|", at::bmm(jac.transpose(1, 2), v.unsqueeze(2)).squeeze(2),
               at::zeros({16, 4}, at::kDouble), 1e-9);
  expect_close("nullspace_project |v|", v.norm(2, {1}), at::ones({16}, at::kDouble), 1e-9);

  std::printf("%d failed\n", failures);
  return failures == 0 ? 0 : 1;
}
