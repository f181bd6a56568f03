// Softmax entropy on CPU. With m = max_k f_k, z_k = f_k - m, e_k = exp(z_k), S = sum e_k:
//   H = log S - sum_k e_k (f_k - m) / S          (stable for |f| up to 1e4 and beyond)
//   dH/df_j = -p_j (log p_j + H),  p_j = e_j / S, log p_j = f_j - m - log S.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "checks.h"
#include "cpu/fast_math.h"

namespace fastood {
namespace {

struct RowStats {
  double max, log_sum, entropy;
};

template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
inline RowStats softmax_row_stats(const scalar_t* row, int64_t cols) {
  acc_t m = static_cast<acc_t>(row[0]);
#pragma omp simd reduction(max : m)
  for (int64_t k = 1; k < cols; ++k) {
    const acc_t v = static_cast<acc_t>(row[k]);
    m = v > m ? v : m;  // NaN is skipped here and surfaces through exp(NaN - m) below
  }
  acc_t sum = 0, weighted = 0;
#pragma omp simd reduction(+ : sum, weighted)
  for (int64_t k = 0; k < cols; ++k) {
    const acc_t z = static_cast<acc_t>(row[k]) - m;
    const acc_t e = cpu::exp_approx(z);
    sum += e;
    weighted += e * z;
  }
  const acc_t log_sum = std::log(sum);
  return {static_cast<double>(m), static_cast<double>(log_sum), static_cast<double>(log_sum - weighted / sum)};
}

inline int64_t row_grain(int64_t cols) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(cols, 1)); }

// Backward in two passes over a row: e_k = exp(f_k - m) is stored in the output while S and sum e z are
// accumulated, then rescaled in place: dH/df_k = -g (e_k / S) (z_k - log S + H).
template <typename scalar_t>
void entropy_backward_rows(const scalar_t* in, const scalar_t* g, scalar_t* out, int64_t rows, int64_t cols) {
  using acc_t = at::opmath_type<scalar_t>;
  at::parallel_for(0, rows, row_grain(cols), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> e(cols);
    for (int64_t b = begin; b < end; ++b) {
      const scalar_t* row = in + b * cols;
      acc_t m = static_cast<acc_t>(row[0]);
#pragma omp simd reduction(max : m)
      for (int64_t k = 1; k < cols; ++k) {
        const acc_t v = static_cast<acc_t>(row[k]);
        m = v > m ? v : m;
      }
      acc_t sum = 0, weighted = 0;
      acc_t* ep = e.data();
#pragma omp simd reduction(+ : sum, weighted)
      for (int64_t k = 0; k < cols; ++k) {
        const acc_t z = static_cast<acc_t>(row[k]) - m;
        const acc_t ek = cpu::exp_approx(z);
        ep[k] = ek;
        sum += ek;
        weighted += ek * z;
      }
      const acc_t log_sum = std::log(sum);
      const acc_t shift = log_sum - (log_sum - weighted / sum);  // log S - H
      const acc_t scale = -static_cast<acc_t>(g[b]) / sum;
      scalar_t* orow = out + b * cols;
#pragma omp simd
      for (int64_t k = 0; k < cols; ++k) {
        const acc_t z = static_cast<acc_t>(row[k]) - m;
        orow[k] = static_cast<scalar_t>(scale * ep[k] * (z - shift));
      }
    }
  });
}

at::Tensor softmax_entropy_forward_kernel(const at::Tensor& logits_in) {
  check_logits(logits_in);
  auto logits = logits_in.contiguous();
  const int64_t rows = logits.size(0), cols = logits.size(1);
  auto entropy = at::empty({rows}, logits.options());
  if (logits.numel() == 0) return entropy.zero_();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "softmax_entropy", [&] {
    const scalar_t* in = logits.data_ptr<scalar_t>();
    scalar_t* out = entropy.data_ptr<scalar_t>();
    at::parallel_for(0, rows, row_grain(cols), [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) out[b] = static_cast<scalar_t>(softmax_row_stats(in + b * cols, cols).entropy);
    });
  });
  return entropy;
}

at::Tensor softmax_entropy_backward_kernel(const at::Tensor& grad_entropy_in, const at::Tensor& logits_in) {
  check_logits(logits_in);
  check_row_grad(grad_entropy_in, "grad_entropy", logits_in);
  auto logits = logits_in.contiguous();
  auto grad_entropy = grad_entropy_in.to(logits.scalar_type()).contiguous();
  const int64_t rows = logits.size(0), cols = logits.size(1);
  auto grad = at::empty_like(logits);
  if (logits.numel() == 0) return grad;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "softmax_entropy_backward", [&] {
    entropy_backward_rows<scalar_t>(logits.data_ptr<scalar_t>(), grad_entropy.data_ptr<scalar_t>(),
                                    grad.data_ptr<scalar_t>(), rows, cols);
  });
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastood, CPU, m) {
  m.impl("softmax_entropy", &softmax_entropy_forward_kernel);
  m.impl("softmax_entropy_backward", &softmax_entropy_backward_kernel);
}

}  // namespace fastood
