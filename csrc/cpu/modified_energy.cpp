// FIG modified energy on CPU (DESIGN.md, method 1), per row of logits f [B, C] with s = f / c:
//   E = sum_y s_y (1 - exp(s_y)),        dE/df_y = (1/c) (1 - (1 + s_y) exp(s_y)).
// Rows are split over threads (at::parallel_for) and walked in blocks of one 64-byte vector (kLanes values).
// The loops are written so gcc vectorizes them: a branch-free exp, per-lane accumulators in a local array
// reduced once per row by a tree, and the row's partial last block masked in place (lanes past the row get
// s = 0, whose energy term is exactly 0) rather than finished by a scalar remainder loop, which for C = 100
// would cost as much as the vector part. float16/bfloat16 rows are converted to float and back in a
// per-thread buffer. Accumulation in float (double for float64). NaN and +-inf propagate as in the reference.
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

// ---- Row helpers (the same in softmax_entropy.cpp) ----

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

// ---- Math ----

// exp(x), float: Cephes polynomial on x = n ln2 + r (~1 ulp), branch-free so it vectorizes. 0 below -87.3
// (where exp is subnormal) and +inf above 88.37 (where exp(x) > 2^127.5: every use here multiplies it by
// |s| > 88, which overflows float anyway, as in the reference); NaN stays NaN.
__attribute__((always_inline)) inline float exp_lanes(float x) {
  float xc = x < -87.3f ? -87.3f : x;  // NaN passes both clamps and stays NaN through the arithmetic
  xc = xc > 88.37f ? 88.37f : xc;
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
  const float out = x > 88.37f ? std::numeric_limits<float>::infinity() : p * scale;
  return x < -87.3f ? 0.0f : out;
}

// exp(x), double: the same scheme with a degree-13 Taylor polynomial on |r| <= ln2 / 2 (< 1 ulp); 0 below
// -708 and +inf above 709 (multiplied by |s| > 709 it overflows double anyway); NaN stays NaN.
__attribute__((always_inline)) inline double exp_lanes(double x) {
  double xc = x < -708.0 ? -708.0 : x;
  xc = xc > 709.0 ? 709.0 : xc;
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
  const double out = x > 709.0 ? std::numeric_limits<double>::infinity() : p * scale;
  return x < -708.0 ? 0.0 : out;
}

// ---- Kernels ----

// One row of `cols` values: returns its energy (kEnergy) and writes out[k] = g * dE/df_k (kGrad).
// `overread`: the kLanes - 1 values after the row may be read, which lets the partial last block load as one
// vector; its lanes past the row get s = 0, whose energy term is exactly 0, and their gradients are dropped.
template <bool kEnergy, bool kGrad, typename acc_t>
__attribute__((always_inline)) inline acc_t energy_row(const acc_t* row, int64_t cols, bool overread, acc_t inv_c,
                                                       acc_t g, acc_t* out) {
  constexpr int W = kLanes<acc_t>;
  const int64_t full = cols / W * W;
  const int rem = static_cast<int>(cols - full);
  acc_t terms[W] = {};
  for (int64_t k = 0; k < full; k += W) {
#pragma omp simd
    for (int l = 0; l < W; ++l) {
      const acc_t s = row[k + l] * inv_c;
      const acc_t e = exp_lanes(s);
      if constexpr (kEnergy) terms[l] += s * (acc_t(1) - e);
      if constexpr (kGrad) out[k + l] = g * (acc_t(1) - (acc_t(1) + s) * e);
    }
  }
  if (rem > 0) {
    acc_t copy[W], tail_out[W];
    const acc_t* tail = row + full;
    if (!overread) {
      for (int l = 0; l < W; ++l) copy[l] = l < rem ? tail[l] : acc_t(0);
      tail = copy;
    }
#pragma omp simd
    for (int l = 0; l < W; ++l) {
      const acc_t s = l < rem ? tail[l] * inv_c : acc_t(0);
      const acc_t e = exp_lanes(s);
      if constexpr (kEnergy) terms[l] += s * (acc_t(1) - e);
      if constexpr (kGrad) tail_out[l] = g * (acc_t(1) - (acc_t(1) + s) * e);
    }
    if constexpr (kGrad) std::copy(tail_out, tail_out + rem, out + full);
  }
  return kEnergy ? tree_sum(terms) : acc_t(0);
}

// energy[b] (kEnergy) and grad[b, :] = scale_b * dE/df (kGrad) for every row, where scale_b is grad_scale[b]
// (the incoming gradient, backward) or 1 (grad_scale == nullptr). float/double rows are used in place;
// float16/bfloat16 rows go through per-thread float buffers (the input one padded to kLanes).
template <typename scalar_t, bool kEnergy, bool kGrad>
void modified_energy_rows(const scalar_t* logits, int64_t rows, int64_t cols, double c, scalar_t* energy,
                          scalar_t* grad, const at::opmath_type<scalar_t>* grad_scale) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int W = kLanes<acc_t>;
  constexpr bool kInPlace = std::is_same_v<scalar_t, acc_t>;
  const acc_t inv_c = acc_t(1) / static_cast<acc_t>(c);
  const scalar_t* logits_end = logits + rows * cols;
  at::parallel_for(0, rows, row_grain(cols), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> in_buf(kInPlace ? 0 : (cols + W - 1) / W * W), out_buf(kInPlace || !kGrad ? 0 : cols);
    for (int64_t b = begin; b < end; ++b) {
      const scalar_t* row = logits + b * cols;
      const acc_t g = grad_scale != nullptr ? grad_scale[b] * inv_c : inv_c;
      acc_t e;
      if constexpr (kInPlace) {
        const bool overread = row + cols + W - 1 <= logits_end;
        e = energy_row<kEnergy, kGrad>(row, cols, overread, inv_c, g, kGrad ? grad + b * cols : nullptr);
      } else {
        to_acc(row, in_buf.data(), cols);
        e = energy_row<kEnergy, kGrad>(in_buf.data(), cols, /*overread=*/true, inv_c, g, out_buf.data());
        if constexpr (kGrad) from_acc(out_buf.data(), grad + b * cols, cols);
      }
      if constexpr (kEnergy) energy[b] = static_cast<scalar_t>(e);
    }
  });
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
