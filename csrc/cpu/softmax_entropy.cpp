// Entropy of softmax on CPU, per row of logits f [B, C]. With m = max_k f_k, z_k = f_k - m, e_k = exp(z_k),
// S = sum_k e_k and T = sum_k e_k z_k (stable for |f| up to 1e4 and beyond: z <= 0 and S >= 1):
//   H = log S - T / S,
//   dH/df_j = -p_j (log p_j + H) = -(e_j / S) (z_j - T / S)        (log p_j = z_j - log S).
// Rows are split over threads (at::parallel_for) and walked in blocks of one 64-byte vector (kLanes values);
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
#include <type_traits>
#include <vector>

#include "checks.h"

#if defined(__F16C__)
#include <immintrin.h>
#endif

namespace fastood {
namespace {

// ---- Row helpers (the same in modified_energy.cpp) ----

template <typename acc_t>
constexpr int kLanes = 64 / sizeof(acc_t);

// Rows per task: about 16K elements, so small inputs stay on one thread.
inline int64_t row_grain(int64_t cols) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(cols, 1)); }

// Sum of the kLanes values of a (destroyed), as a tree of vector steps rather than a serial chain.
template <typename acc_t>
__attribute__((always_inline)) inline acc_t tree_sum(acc_t* a) {
#pragma GCC unroll 8
  for (int w = kLanes<acc_t> / 2; w >= 1; w /= 2) {
#pragma omp simd
    for (int l = 0; l < w; ++l) a[l] += a[l + w];
  }
  return a[0];
}

// n values scalar_t -> acc_t and back, rounding to nearest even like torch's casts. Written so the loops
// vectorize: bfloat16 by bit shifts, float16 with the F16C instructions where the target has them.
template <typename acc_t, typename scalar_t>
inline void to_acc(const scalar_t* src, acc_t* dst, int64_t n) {
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) dst[k] = static_cast<acc_t>(src[k]);
}

template <typename acc_t, typename scalar_t>
inline void from_acc(const acc_t* src, scalar_t* dst, int64_t n) {
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) dst[k] = static_cast<scalar_t>(src[k]);
}

template <>
inline void from_acc(const float* src, c10::BFloat16* dst, int64_t n) {
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) {
    uint32_t bits;
    std::memcpy(&bits, &src[k], sizeof(bits));
    const uint32_t rounded = (bits + ((bits >> 16) & 1u) + 0x7FFFu) >> 16;
    dst[k].x = src[k] != src[k] ? uint16_t(0x7FC0) : static_cast<uint16_t>(rounded);  // NaN -> quiet NaN
  }
}

#if defined(__F16C__)
template <>
inline void to_acc(const c10::Half* src, float* dst, int64_t n) {
  int64_t k = 0;
  for (; k + 8 <= n; k += 8) {
    _mm256_storeu_ps(dst + k, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + k))));
  }
  for (; k < n; ++k) dst[k] = static_cast<float>(src[k]);
}

template <>
inline void from_acc(const float* src, c10::Half* dst, int64_t n) {
  int64_t k = 0;
  for (; k + 8 <= n; k += 8) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + k),
                     _mm256_cvtps_ph(_mm256_loadu_ps(src + k), _MM_FROUND_TO_NEAREST_INT));
  }
  for (; k < n; ++k) dst[k] = static_cast<c10::Half>(src[k]);
}
#endif

// Max of the kLanes values of a (destroyed), as a tree of vector steps.
template <typename acc_t>
__attribute__((always_inline)) inline acc_t tree_max(acc_t* a) {
#pragma GCC unroll 8
  for (int w = kLanes<acc_t> / 2; w >= 1; w /= 2) {
#pragma omp simd
    for (int l = 0; l < w; ++l) a[l] = a[l + w] > a[l] ? a[l + w] : a[l];
  }
  return a[0];
}

// ---- Math ----

// exp(x) for x <= 0 (all this file needs), float: Cephes polynomial on x = n ln2 + r (~1 ulp), branch-free so
// it vectorizes; 0 below -87.3 (where exp is subnormal); NaN stays NaN.
__attribute__((always_inline)) inline float exp_nonpositive(float x) {
  const float xc = x < -87.3f ? -87.3f : x;  // NaN passes the clamp and stays NaN through the arithmetic
  const float shifted = std::fma(xc, 1.44269504088896341f, 12582912.0f);  // 1.5 * 2^23 + round(x / ln2)
  const float n = shifted - 12582912.0f;
  float r = std::fma(n, -0.693359375f, xc);
  r = std::fma(n, 2.12194440e-4f, r);
  float p = 1.9875691500e-4f;
  p = std::fma(p, r, 1.3981999507e-3f);
  p = std::fma(p, r, 8.3334519073e-3f);
  p = std::fma(p, r, 4.1665795894e-2f);
  p = std::fma(p, r, 1.6666665459e-1f);
  p = std::fma(p, r, 5.0000001201e-1f);
  p = std::fma(p * r, r, r) + 1.0f;
  uint32_t bits;
  std::memcpy(&bits, &shifted, sizeof(bits));
  bits = (bits - 0x4B400000u + 127u) << 23;  // the low mantissa bits of `shifted` hold n: 2^n as a float
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return x < -87.3f ? 0.0f : p * scale;
}

// exp(x) for x <= 0, double: the same scheme with a degree-13 Taylor polynomial on |r| <= ln2 / 2 (< 1 ulp);
// 0 below -708; NaN stays NaN.
__attribute__((always_inline)) inline double exp_nonpositive(double x) {
  const double xc = x < -708.0 ? -708.0 : x;
  const double shifted = std::fma(xc, 1.4426950408889634074, 6755399441055744.0);  // 1.5 * 2^52 + round(x / ln2)
  const double n = shifted - 6755399441055744.0;
  double r = std::fma(n, -6.93147180369123816490e-01, xc);
  r = std::fma(n, -1.90821492927058770002e-10, r);
  double p = 1.0 / 6227020800.0;
  p = std::fma(p, r, 1.0 / 479001600.0);
  p = std::fma(p, r, 1.0 / 39916800.0);
  p = std::fma(p, r, 1.0 / 3628800.0);
  p = std::fma(p, r, 1.0 / 362880.0);
  p = std::fma(p, r, 1.0 / 40320.0);
  p = std::fma(p, r, 1.0 / 5040.0);
  p = std::fma(p, r, 1.0 / 720.0);
  p = std::fma(p, r, 1.0 / 120.0);
  p = std::fma(p, r, 1.0 / 24.0);
  p = std::fma(p, r, 1.0 / 6.0);
  p = std::fma(p, r, 0.5);
  p = std::fma(p, r, 1.0);
  p = std::fma(p, r, 1.0);
  uint64_t bits;
  std::memcpy(&bits, &shifted, sizeof(bits));
  bits = (bits - 0x4338000000000000ull + 1023ull) << 52;
  double scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return x < -708.0 ? 0.0 : p * scale;
}

// log(x), float, for normal x > 0 or NaN (here S in [1, C] or NaN): Cephes logf polynomial after splitting
// off the exponent (~1e-7 relative error), branch-free so a loop over rows vectorizes. float64: std::log.
__attribute__((always_inline)) inline float log_positive(float x) {
  int32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  int32_t e = ((bits >> 23) & 0xff) - 126;
  bits = (bits & 0x007fffff) | 0x3f000000;  // mantissa in [0.5, 1)
  float m;
  std::memcpy(&m, &bits, sizeof(m));
  const bool small = m < 0.707106781186547524f;
  e = small ? e - 1 : e;
  m = small ? m + m - 1.0f : m - 1.0f;
  const float z = m * m;
  float y = 7.0376836292e-2f;
  y = std::fma(y, m, -1.1514610310e-1f);
  y = std::fma(y, m, 1.1676998740e-1f);
  y = std::fma(y, m, -1.2420140846e-1f);
  y = std::fma(y, m, 1.4249322787e-1f);
  y = std::fma(y, m, -1.6668057665e-1f);
  y = std::fma(y, m, 2.0000714765e-1f);
  y = std::fma(y, m, -2.4999993993e-1f);
  y = std::fma(y, m, 3.3333331174e-1f);
  y = y * m * z;
  const float fe = static_cast<float>(e);
  y = std::fma(fe, -2.12194440e-4f, y);
  y = std::fma(-0.5f, z, y);
  const float out = std::fma(fe, 0.693359375f, m + y);
  return x != x ? x : out;
}

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
      const acc_t e = exp_nonpositive(z);
      sums[l] += e;
      weighted[l] += e * z;
      if constexpr (kStoreExps) exps[k + l] = e;
    }
  }
  if (rem > 0) {
#pragma omp simd
    for (int l = 0; l < W; ++l) {
      const acc_t z = l < rem ? tail[l] - m : acc_t(-1e30);
      const acc_t e = exp_nonpositive(z);
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

}  // namespace

TORCH_LIBRARY_IMPL(fastood, CPU, m) {
  m.impl("softmax_entropy", &softmax_entropy_forward_kernel);
  m.impl("softmax_entropy_backward", &softmax_entropy_backward_kernel);
}

}  // namespace fastood
