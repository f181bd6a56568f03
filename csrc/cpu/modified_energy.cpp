// FIG modified energy on CPU (DESIGN.md, method 1), per row of logits f [B, C] with s = f / c:
//   E = sum_y s_y (1 - exp(s_y)),        dE/df_y = (1/c) (1 - (1 + s_y) exp(s_y)),
// computed as the reference does, E = sum_y -s_y expm1(s_y) and dE/df_y = (1/c) (-expm1(s_y) - s_y exp(s_y)):
// 1 - exp(s) keeps only ~|s| / eps of its digits for small |s| (float: relative error 1.4e-3 at s = 1e-5).
// Rows are split over threads (at::parallel_for). float, bfloat16 and float16 rows run the explicitly vectorized
// kernels of the CPU's capability (cpu/kernels/kernels_impl.h, chosen at run time by cpu/dispatch.cpp); the
// float64 path below walks rows in blocks of one 64-byte vector (kLanes values).
// The loops are written so gcc vectorizes them: a branch-free exp/expm1, per-lane accumulators in a local array
// reduced once per row by a tree, and the row's partial last block masked in place (lanes past the row get
// s = 0, whose energy term is exactly 0) rather than finished by a scalar remainder loop, which for C = 100
// would cost as much as the vector part. Accumulation in float (double for float64). NaN and +-inf propagate as
// in the reference.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "checks.h"
#include "cpu/dispatch.h"
#include "cpu/row_math.h"

namespace fastood {
namespace {

using namespace cpu;  // row helpers and exp_lanes (cpu/row_math.h)

// ---- Kernels ----

// exp(x) and expm1(x) of a double, branch-free (vectorizable): the scheme of cpu::exp_lanes<true>(double)
// (the shared reduction and polynomial: cpu::exp_reduce),
// x = n ln2 + r with |r| <= ln2 / 2, exp(x) = 2^n (1 + q) where q = expm1(r) = r + r^2 P(r) (degree-13 Taylor,
// < 1 ulp), and expm1(x) = 2^n q + (2^n - 1), where 2^n - 1 is exact and 0 for |x| < ln2 / 2 (then r = x and
// expm1(x) = q keeps all its digits). Below -708: exp 0, expm1 -1; above 709: both +inf; NaN stays NaN.
__attribute__((always_inline)) inline void exp_expm1_lanes(double x, double& e, double& em1) {
  double xc = x < -708.0 ? -708.0 : x;  // NaN passes the clamps and stays NaN through the arithmetic
  xc = xc > 709.0 ? 709.0 : xc;
  double r, scale;
  const double p = exp_reduce(xc, r, scale);  // its own statement: it sets r, which the next line reads
  const double q = p * r;                      // expm1(r)
  // q * scale is exact (a power of two): plain operations round once, as an fma would, and cost less where the
  // baseline build has no FMA instruction (std::fma is then a libm call).
  e = q * scale + scale;
  em1 = q * scale + (scale - 1.0);
  const bool big = x > 709.0, tiny = x < -708.0;
  e = big ? std::numeric_limits<double>::infinity() : (tiny ? 0.0 : e);
  em1 = big ? std::numeric_limits<double>::infinity() : (tiny ? -1.0 : em1);
}

// One row of `cols` values: returns its energy (kEnergy) and writes out[k] = g * dE/df_k (kGrad).
// `overread`: the kLanes - 1 values after the row may be read, which lets the partial last block load as one
// vector; its lanes past the row get s = 0, whose energy term is exactly 0, and their gradients are dropped.
template <bool kEnergy, bool kGrad>
__attribute__((always_inline)) inline double energy_row(const double* row, int64_t cols, bool overread, double inv_c,
                                                        double g, double* out) {
  constexpr int W = kLanes<double>;
  const int64_t full = cols / W * W;
  const int rem = static_cast<int>(cols - full);
  double terms[W] = {};  // sums of s expm1(s), negated once per row
  for (int64_t k = 0; k < full; k += W) {
#pragma omp simd
    for (int l = 0; l < W; ++l) {
      const double s = row[k + l] * inv_c;
      double e, em1;
      exp_expm1_lanes(s, e, em1);
      if constexpr (kEnergy) terms[l] += s * em1;
      if constexpr (kGrad) out[k + l] = -g * (s * e + em1);
    }
  }
  if (rem > 0) {
    double copy[W], tail_out[W];
    const double* tail = row + full;
    if (!overread) {
      for (int l = 0; l < W; ++l) copy[l] = l < rem ? tail[l] : 0.0;
      tail = copy;
    }
#pragma omp simd
    for (int l = 0; l < W; ++l) {
      const double s = l < rem ? tail[l] * inv_c : 0.0;
      double e, em1;
      exp_expm1_lanes(s, e, em1);
      if constexpr (kEnergy) terms[l] += s * em1;
      if constexpr (kGrad) tail_out[l] = -g * (s * e + em1);
    }
    if constexpr (kGrad) std::copy(tail_out, tail_out + rem, out + full);
  }
  return kEnergy ? -tree_sum(terms) : 0.0;
}

// energy[b] (kEnergy) and grad[b, :] = scale_b * dE/df (kGrad) for every row, where scale_b is grad_scale[b]
// (the incoming gradient, backward) or 1 (grad_scale == nullptr).
template <typename scalar_t, bool kEnergy, bool kGrad>
void modified_energy_rows(const scalar_t* logits, int64_t rows, int64_t cols, double c, scalar_t* energy,
                          scalar_t* grad, const at::opmath_type<scalar_t>* grad_scale) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t inv_c = acc_t(1) / static_cast<acc_t>(c);
  if constexpr (!std::is_same_v<scalar_t, double>) {
    // float, bfloat16, float16: the explicitly vectorized kernels of the CPU's capability (cpu/kernels/).
    const KernelTable& table = kernels();
    at::parallel_for(0, rows, row_grain(cols), [&](int64_t begin, int64_t end) {
      table.modified_energy_rows(row_dtype<scalar_t>(), logits, begin, end, cols, inv_c, kEnergy ? energy : nullptr,
                                 kGrad ? grad : nullptr, grad_scale);
    });
  } else {
    // float64: the vectorizable row loops above, in place.
    constexpr int W = kLanes<double>;
    const double* logits_end = logits + rows * cols;
    at::parallel_for(0, rows, row_grain(cols), [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        const double* row = logits + b * cols;
        const double g = grad_scale != nullptr ? grad_scale[b] * inv_c : inv_c;
        const bool overread = row + cols + W - 1 <= logits_end;
        const double e = energy_row<kEnergy, kGrad>(row, cols, overread, inv_c, g, kGrad ? grad + b * cols : nullptr);
        if constexpr (kEnergy) energy[b] = e;
      }
    });
  }
}

void check_c(double c) { TORCH_CHECK(c > 0 && std::isfinite(c), "c must be a finite number > 0, got ", c); }

at::ScalarType acc_dtype(const at::Tensor& logits) {
  return logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

at::Tensor modified_energy_forward_kernel(const at::Tensor& logits_in, double c) {
  check_logits(logits_in);
  check_c(c);
  const auto logits = logits_in.contiguous();
  auto energy = at::empty({logits.size(0)}, logits.options());
  if (logits.numel() == 0) return energy.zero_();  // C = 0: the empty sum
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "modified_energy", [&] {
    modified_energy_rows<scalar_t, true, false>(logits.const_data_ptr<scalar_t>(), logits.size(0), logits.size(1),
                                                c, energy.mutable_data_ptr<scalar_t>(), nullptr, nullptr);
  });
  return energy;
}

at::Tensor modified_energy_backward_kernel(const at::Tensor& grad_energy_in, const at::Tensor& logits_in, double c) {
  check_logits(logits_in);
  check_row_grad(grad_energy_in, "grad_energy", logits_in);
  check_floating(grad_energy_in, "grad_energy", /*allow_half=*/true);
  check_c(c);
  const auto logits = logits_in.contiguous();
  const auto grad_energy = grad_energy_in.to(acc_dtype(logits)).contiguous();  // [B], may arrive expanded
  auto grad = at::empty(logits.sizes(), logits.options());
  if (logits.numel() == 0) return grad;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "modified_energy_backward", [&] {
    modified_energy_rows<scalar_t, false, true>(
        logits.const_data_ptr<scalar_t>(), logits.size(0), logits.size(1), c, nullptr,
        grad.mutable_data_ptr<scalar_t>(), grad_energy.const_data_ptr<at::opmath_type<scalar_t>>());
  });
  return grad;
}

std::tuple<at::Tensor, at::Tensor> modified_energy_grad_kernel(const at::Tensor& logits_in, double c) {
  check_logits(logits_in);
  check_c(c);
  const auto logits = logits_in.contiguous();
  auto energy = at::empty({logits.size(0)}, logits.options());
  auto grad = at::empty(logits.sizes(), logits.options());
  if (logits.numel() == 0) return {energy.zero_(), grad};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "modified_energy_grad", [&] {
    modified_energy_rows<scalar_t, true, true>(logits.const_data_ptr<scalar_t>(), logits.size(0), logits.size(1), c,
                                               energy.mutable_data_ptr<scalar_t>(),
                                               grad.mutable_data_ptr<scalar_t>(), nullptr);
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
