// FIG modified energy on CPU: E = sum_y (f_y/c)(1 - exp(f_y/c)), dE/df_y = (1/c)(1 - (1 + f_y/c) exp(f_y/c)).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "checks.h"
#include "cpu/fast_math.h"

namespace fastood {
namespace {

inline int64_t row_grain(int64_t cols) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(cols, 1)); }

// One pass per row: energy[b] (kEnergy) and grad[b, :] = grad_scale[b] * dE/df (kGrad; scale 1 if null).
template <typename scalar_t, bool kEnergy, bool kGrad>
void modified_energy_rows(const scalar_t* logits, int64_t rows, int64_t cols, double c, scalar_t* energy,
                          scalar_t* grad, const scalar_t* grad_scale) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t inv_c = acc_t(1) / static_cast<acc_t>(c);
  at::parallel_for(0, rows, row_grain(cols), [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const scalar_t* row = logits + b * cols;
      const acc_t g = grad_scale ? static_cast<acc_t>(grad_scale[b]) * inv_c : inv_c;
      scalar_t* grow = kGrad ? grad + b * cols : nullptr;
      acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
      for (int64_t k = 0; k < cols; ++k) {
        const acc_t s = static_cast<acc_t>(row[k]) * inv_c;
        const acc_t e = cpu::exp_approx(s);
        if constexpr (kEnergy) sum += s * (acc_t(1) - e);
        if constexpr (kGrad) grow[k] = static_cast<scalar_t>(g * (acc_t(1) - (acc_t(1) + s) * e));
      }
      if constexpr (kEnergy) energy[b] = static_cast<scalar_t>(sum);
    }
  });
}

at::Tensor modified_energy_forward_kernel(const at::Tensor& logits_in, double c) {
  check_logits(logits_in);
  TORCH_CHECK(c > 0, "c must be > 0, got ", c);
  auto logits = logits_in.contiguous();
  auto energy = at::empty({logits.size(0)}, logits.options());
  if (logits.numel() == 0) return energy.zero_();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "modified_energy", [&] {
    modified_energy_rows<scalar_t, true, false>(logits.data_ptr<scalar_t>(), logits.size(0), logits.size(1), c,
                                                energy.data_ptr<scalar_t>(), nullptr, nullptr);
  });
  return energy;
}

at::Tensor modified_energy_backward_kernel(const at::Tensor& grad_energy_in, const at::Tensor& logits_in, double c) {
  check_logits(logits_in);
  check_row_grad(grad_energy_in, "grad_energy", logits_in);
  auto logits = logits_in.contiguous();
  auto grad_energy = grad_energy_in.to(logits.scalar_type()).contiguous();
  auto grad = at::empty_like(logits);
  if (logits.numel() == 0) return grad;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "modified_energy_backward", [&] {
    modified_energy_rows<scalar_t, false, true>(logits.data_ptr<scalar_t>(), logits.size(0), logits.size(1), c,
                                                nullptr, grad.data_ptr<scalar_t>(), grad_energy.data_ptr<scalar_t>());
  });
  return grad;
}

std::tuple<at::Tensor, at::Tensor> modified_energy_grad_kernel(const at::Tensor& logits_in, double c) {
  check_logits(logits_in);
  TORCH_CHECK(c > 0, "c must be > 0, got ", c);
  auto logits = logits_in.contiguous();
  auto energy = at::empty({logits.size(0)}, logits.options());
  auto grad = at::empty_like(logits);
  if (logits.numel() == 0) return {energy.zero_(), grad};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "modified_energy_grad", [&] {
    modified_energy_rows<scalar_t, true, true>(logits.data_ptr<scalar_t>(), logits.size(0), logits.size(1), c,
                                               energy.data_ptr<scalar_t>(), grad.data_ptr<scalar_t>(), nullptr);
  });
  return {energy, grad};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastood, CPU, m) {
  m.impl("modified_energy", &modified_energy_forward_kernel);
  m.impl("modified_energy_backward", &modified_energy_backward_kernel);
  m.impl("modified_energy_grad", &modified_energy_grad_kernel);
}

}  // namespace fastood
