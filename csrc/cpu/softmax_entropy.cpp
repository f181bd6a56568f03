// Entropy of softmax on CPU, per row of logits f [B, C]. With m = max_k f_k, z_k = f_k - m, e_k = exp(z_k),
// S = sum_k e_k and T = sum_k e_k z_k (stable for |f| up to 1e4 and beyond: z <= 0 and S >= 1):
//   H = log S - T / S,
//   dH/df_j = -p_j (log p_j + H) = -(e_j / S) (z_j - T / S)        (log p_j = z_j - log S).
// Rows are split over threads (at::parallel_for). float, bfloat16 and float16 rows run the explicitly vectorized
// kernels of the CPU's capability (cpu/kernels/kernels_impl.h, chosen at run time by cpu/dispatch.cpp); the
// float64 path below walks rows in blocks of one 64-byte vector (kLanes values);
// the loops are written so gcc vectorizes them: accumulators are per-lane local arrays reduced once per row
// by a tree, and a row's partial last block is masked in place (lanes past the row get z = -1e30, so e = 0
// and e z = 0) instead of being finished by a scalar remainder loop, which for C = 100 would cost as much as
// the vector part. float16/bfloat16 rows are converted to float first; accumulation in float (double for
// float64). NaN: the max skips NaN, which then surfaces through exp(NaN - m) in S and T, so a row holding a
// NaN, a +inf (inf - inf) or a -inf (0 * -inf, as in the reference's p log p) gives NaN, as the reference does.
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
#include <tuple>
#include <type_traits>
#include <vector>

#include "checks.h"
#include "cpu/dispatch.h"
#include "cpu/row_math.h"

namespace fastood {
namespace {

using namespace cpu;  // row helpers, tree reductions and exp_lanes (cpu/row_math.h)

// ---- Math ----

// log(S) of the float64 rows (float, bfloat16 and float16 rows take the capability kernels' vlog_positive).
__attribute__((always_inline)) inline double log_positive(double x) { return std::log(x); }

// ---- Kernels ----

template <typename acc_t>
struct RowStats {
  acc_t max, sum, weighted;  // m, S = sum e_k, T = sum e_k z_k
};

// m, S and T of one row of `cols` values. `overread`: the kLanes - 1 values after the row may be read (they
// are masked), which lets the last block load as one vector. kStoreExps: also writes e_k to exps (which has
// room for cols rounded up to kLanes).
template <bool kStoreExps, typename acc_t>
__attribute__((always_inline)) inline RowStats<acc_t> row_stats(const acc_t* row, int64_t cols, bool overread,
                                                                acc_t* exps) {
  constexpr int W = kLanes<acc_t>;
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  const int64_t full = cols / W * W;
  const int rem = static_cast<int>(cols - full);
  acc_t copy[W];
  const acc_t* tail = row + full;
  if (rem > 0 && !overread) {
    for (int l = 0; l < W; ++l) copy[l] = l < rem ? tail[l] : acc_t(0);
    tail = copy;
  }

  acc_t maxes[W];
  for (int l = 0; l < W; ++l) maxes[l] = kNegInf;
  for (int64_t k = 0; k < full; k += W) {
#pragma omp simd
    for (int l = 0; l < W; ++l) maxes[l] = row[k + l] > maxes[l] ? row[k + l] : maxes[l];  // skips NaN
  }
  if (rem > 0) {
#pragma omp simd
    for (int l = 0; l < W; ++l) {
      const acc_t v = l < rem ? tail[l] : kNegInf;
      maxes[l] = v > maxes[l] ? v : maxes[l];
    }
  }
  const acc_t m = tree_max(maxes);

  acc_t sums[W] = {}, weighted[W] = {};
  for (int64_t k = 0; k < full; k += W) {
#pragma omp simd
    for (int l = 0; l < W; ++l) {
      const acc_t z = row[k + l] - m;
      const acc_t e = exp_lanes<false>(z);
      sums[l] += e;
      weighted[l] += e * z;
      if constexpr (kStoreExps) exps[k + l] = e;
    }
  }
  if (rem > 0) {
#pragma omp simd
    for (int l = 0; l < W; ++l) {
      const acc_t z = l < rem ? tail[l] - m : acc_t(-1e30);
      const acc_t e = exp_lanes<false>(z);
      sums[l] += e;
      weighted[l] += e * z;
      if constexpr (kStoreExps) exps[full + l] = e;
    }
  }
  return {m, tree_sum(sums), tree_sum(weighted)};
}

// Rows as acc_t: float/double rows are used in place; float16/bfloat16 rows are converted into a per-thread
// buffer padded to a multiple of kLanes (so its last block may always be read whole).
template <typename scalar_t>
class AccRows {
 public:
  using acc_t = at::opmath_type<scalar_t>;
  static constexpr bool kInPlace = std::is_same_v<scalar_t, acc_t>;

  AccRows(const scalar_t* data, int64_t rows, int64_t cols)
      : data_(data), end_(data + rows * cols), cols_(cols),
        buffer_(kInPlace ? 0 : (cols + kLanes<acc_t> - 1) / kLanes<acc_t> * kLanes<acc_t>) {}

  // Row b as acc_t values; `overread` says whether the kLanes - 1 values after it may be read.
  const acc_t* row(int64_t b, bool* overread) {
    const scalar_t* src = data_ + b * cols_;
    if constexpr (kInPlace) {
      *overread = src + cols_ + kLanes<acc_t> - 1 <= end_;
      return src;
    } else {
      to_acc(src, buffer_.data(), cols_);
      *overread = true;
      return buffer_.data();
    }
  }

 private:
  const scalar_t* data_;
  const scalar_t* end_;
  int64_t cols_;
  std::vector<acc_t> buffer_;
};

template <typename scalar_t>
void softmax_entropy_forward_rows(const scalar_t* logits, int64_t rows, int64_t cols, scalar_t* entropy) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int W = kLanes<acc_t>;
  if constexpr (!std::is_same_v<scalar_t, double>) {
    // float, bfloat16, float16: the explicitly vectorized kernels of the CPU's capability (cpu/kernels/).
    const KernelTable& table = kernels();
    at::parallel_for(0, rows, row_grain(cols), [&](int64_t begin, int64_t end) {
      std::vector<float> work(kRowWork(cols));
      table.softmax_entropy_forward_rows(row_dtype<scalar_t>(), logits, begin, end, cols, entropy, work.data());
    });
    return;
  }
  at::parallel_for(0, rows, row_grain(cols), [&](int64_t begin, int64_t end) {
    AccRows<scalar_t> source(logits, rows, cols);
    // Rows in groups of W: S and T per row, then H = log S - T / S for the whole group in one vector step.
    for (int64_t b0 = begin; b0 < end; b0 += W) {
      const int n = static_cast<int>(std::min<int64_t>(W, end - b0));
      acc_t sums[W], weighted[W], h[W];
      for (int r = 0; r < W; ++r) {
        sums[r] = 1;
        weighted[r] = 0;
      }
      for (int r = 0; r < n; ++r) {
        bool overread;
        const acc_t* row = source.row(b0 + r, &overread);
        const RowStats<acc_t> st = row_stats<false>(row, cols, overread, static_cast<acc_t*>(nullptr));
        sums[r] = st.sum;
        weighted[r] = st.weighted;
      }
#pragma omp simd
      for (int r = 0; r < W; ++r) h[r] = log_positive(sums[r]) - weighted[r] / sums[r];
      for (int r = 0; r < n; ++r) entropy[b0 + r] = static_cast<scalar_t>(h[r]);
    }
  });
}

template <typename scalar_t>
void softmax_entropy_backward_rows(const scalar_t* logits, const at::opmath_type<scalar_t>* grad_entropy,
                                   int64_t rows, int64_t cols, scalar_t* grad) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int W = kLanes<acc_t>;
  if constexpr (!std::is_same_v<scalar_t, double>) {
    const KernelTable& table = kernels();
    at::parallel_for(0, rows, row_grain(cols), [&](int64_t begin, int64_t end) {
      std::vector<float> work(kRowWork(cols));  // e_k and z_k = f_k - m of the current row
      table.softmax_entropy_backward_rows(row_dtype<scalar_t>(), logits, grad_entropy, begin, end, cols, grad,
                                          work.data());
    });
    return;
  }
  at::parallel_for(0, rows, row_grain(cols), [&](int64_t begin, int64_t end) {
    AccRows<scalar_t> source(logits, rows, cols);
    std::vector<acc_t> exps((cols + W - 1) / W * W);  // e_k of the current row
    acc_t* e = exps.data();
    for (int64_t b = begin; b < end; ++b) {
      bool overread;
      const acc_t* row = source.row(b, &overread);
      const RowStats<acc_t> st = row_stats<true>(row, cols, overread, e);
      const acc_t mean_z = st.weighted / st.sum;     // T / S
      const acc_t scale = grad_entropy[b] / st.sum;  // g / S
      const acc_t m = st.max;
      // dH/df_k = (g / S) e_k (T / S - z_k): float/double straight into grad, float16/bfloat16 through e.
      acc_t* out = e;
      if constexpr (AccRows<scalar_t>::kInPlace) out = grad + b * cols;
#pragma omp simd
      for (int64_t k = 0; k < cols; ++k) out[k] = scale * e[k] * (mean_z - (row[k] - m));
      if constexpr (!AccRows<scalar_t>::kInPlace) from_acc(e, grad + b * cols, cols);
    }
  });
}

at::ScalarType acc_dtype(const at::Tensor& logits) {
  return logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

at::Tensor softmax_entropy_forward_kernel(const at::Tensor& logits_in) {
  check_logits(logits_in);
  const auto logits = logits_in.contiguous();
  auto entropy = at::empty({logits.size(0)}, logits.options());
  if (logits.numel() == 0) return entropy.zero_();  // C = 0: the empty sum
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "softmax_entropy", [&] {
    softmax_entropy_forward_rows<scalar_t>(logits.const_data_ptr<scalar_t>(), logits.size(0), logits.size(1),
                                           entropy.mutable_data_ptr<scalar_t>());
  });
  return entropy;
}

at::Tensor softmax_entropy_backward_kernel(const at::Tensor& grad_entropy_in, const at::Tensor& logits_in) {
  check_logits(logits_in);
  check_row_grad(grad_entropy_in, "grad_entropy", logits_in);
  check_floating(grad_entropy_in, "grad_entropy", /*allow_half=*/true);
  const auto logits = logits_in.contiguous();
  const auto grad_entropy = grad_entropy_in.to(acc_dtype(logits)).contiguous();  // [B], may arrive expanded
  auto grad = at::empty(logits.sizes(), logits.options());
  if (logits.numel() == 0) return grad;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "softmax_entropy_backward", [&] {
    softmax_entropy_backward_rows<scalar_t>(logits.const_data_ptr<scalar_t>(),
                                            grad_entropy.const_data_ptr<at::opmath_type<scalar_t>>(),
                                            logits.size(0), logits.size(1), grad.mutable_data_ptr<scalar_t>());
  });
  return grad;
}

// float, float16 and bfloat16 only (the with-grad ops refuse float64 before dispatching).
#define FASTOOD_DISPATCH_FLOAT_HALF_BF16(TYPE, NAME, ...)                                     \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)                    \
                                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)                 \
                                         AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

// ---- Forward with the gradient (float, bfloat16, float16) ----
// When a backward will follow, the forward also writes dH/df (float32 [B, C]) from the exps it has in hand; the
// backward is then grad_entropy[b] * dH/df rounded to the logits' dtype -- one multiply per value instead of a
// second max/exp/sum pass (on AVX2, bfloat16 4096x100: forward + backward 25% fewer vector operations).

at::Tensor softmax_entropy_backward_from_grad_kernel(const at::Tensor& grad_entropy_in, const at::Tensor& dentropy_in,
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
  const auto d = dentropy_in.contiguous();
  const auto grad_entropy = grad_entropy_in.to(at::kFloat).contiguous();  // [B], may arrive expanded
  auto grad = at::empty(d.sizes(), d.options().dtype(dtype));
  if (d.numel() == 0) return grad;
  const int64_t rows = d.size(0), cols = d.size(1);
  const KernelTable& table = kernels();
  const RowDtype out_dtype =
      dtype == at::kFloat ? RowDtype::kFloat : (dtype == at::kBFloat16 ? RowDtype::kBFloat16 : RowDtype::kHalf);
  const float* in = d.const_data_ptr<float>();
  const float* g = grad_entropy.const_data_ptr<float>();
  void* out = grad.mutable_data_ptr();
  at::parallel_for(0, rows, row_grain(cols), [&](int64_t begin, int64_t end) {
    table.scale_rows(out_dtype, in, g, begin, end, cols, out);
  });
  return grad;
}

std::tuple<at::Tensor, at::Tensor> softmax_entropy_with_grad_kernel(const at::Tensor& logits_in) {
  check_logits(logits_in);
  TORCH_CHECK(logits_in.scalar_type() != at::kDouble,
              "fastood::softmax_entropy_with_grad: logits must be float32, bfloat16 or float16 (float64 logits "
              "take fastood::softmax_entropy), got ", logits_in.scalar_type());
  const auto logits = logits_in.contiguous();
  const int64_t rows = logits.size(0), cols = logits.size(1);
  auto entropy = at::empty({rows}, logits.options());
  auto dentropy = at::empty({rows, cols}, logits.options().dtype(at::kFloat));
  if (logits.numel() == 0) return {entropy.zero_(), dentropy};  // C = 0: the empty sum
  FASTOOD_DISPATCH_FLOAT_HALF_BF16(logits.scalar_type(), "softmax_entropy_with_grad", [&] {
    const KernelTable& table = kernels();
    const scalar_t* in = logits.const_data_ptr<scalar_t>();
    scalar_t* out = entropy.mutable_data_ptr<scalar_t>();
    float* d = dentropy.mutable_data_ptr<float>();
    at::parallel_for(0, rows, row_grain(cols), [&](int64_t begin, int64_t end) {
      std::vector<float> work(kRowWork(cols));  // e_k and z_k = f_k - m of the current row
      table.softmax_entropy_forward_grad_rows(row_dtype<scalar_t>(), in, begin, end, cols, out, d, work.data());
    });
  });
  return {entropy, dentropy};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastood, CPU, m) {
  m.impl("softmax_entropy", &softmax_entropy_forward_kernel);
  m.impl("softmax_entropy_backward", &softmax_entropy_backward_kernel);
  m.impl("softmax_entropy_with_grad", &softmax_entropy_with_grad_kernel);
  m.impl("softmax_entropy_backward_from_grad", &softmax_entropy_backward_from_grad_kernel);
}

}  // namespace fastood
