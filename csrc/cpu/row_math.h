// Row-wise vector helpers of the CPU row ops' float64 path (modified_energy.cpp, softmax_entropy.cpp; float,
// bfloat16 and float16 rows go to the per-capability kernels of cpu/kernels/): block width, task grain, tree reductions over per-lane accumulators, conversions to the accumulation type and a
// branch-free exp that gcc vectorizes. Everything is inline: each kernel file compiles its own copy with
// its own flags.
#pragma once
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "cpu/kernels/kernel_table.h"

#if defined(__F16C__)
#include <immintrin.h>
#endif

namespace fastood {
namespace cpu {

// The storage tag of the per-capability row kernels (cpu/kernels/kernel_table.h) for float/bfloat16/float16.
template <typename scalar_t>
constexpr RowDtype row_dtype() {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) return RowDtype::kBFloat16;
  if constexpr (std::is_same_v<scalar_t, c10::Half>) return RowDtype::kHalf;
  static_assert(std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, c10::BFloat16> ||
                std::is_same_v<scalar_t, c10::Half>, "row kernels take float, bfloat16 or float16");
  return RowDtype::kFloat;
}

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

// a * b + c: one fused multiply-add where the build has FMA instructions, else a product and a sum. The portable
// (baseline x86-64) build of this header has none, and there std::fma is a libm call that emulates the fused
// rounding in software -- it made the float64 row ops 2x slower than the eager reference. The exp reductions
// below stay exact without it (ln2's high parts have enough trailing zero bits that n * hi is exact).
template <typename T>
__attribute__((always_inline)) inline T mul_add(T a, T b, T c) {
#if defined(__FMA__)
  return std::fma(a, b, c);
#else
  return a * b + c;
#endif
}

// exp(x), float: Cephes polynomial on x = n ln2 + r (~1 ulp), branch-free so it vectorizes. 0 below -87.3
// (where exp is subnormal); NaN stays NaN. kAnySign: +inf above 88.37 (where exp(x) > 2^127.5: the callers
// multiply it by |s| > 88, which overflows float anyway, as in the reference); without it x must be <= 0
// (softmax's z = f - max f), which saves the upper clamp.
template <bool kAnySign>
__attribute__((always_inline)) inline float exp_lanes(float x) {
  float xc = x < -87.3f ? -87.3f : x;  // NaN passes the clamps and stays NaN through the arithmetic
  if constexpr (kAnySign) xc = xc > 88.37f ? 88.37f : xc;
  const float shifted = mul_add(xc, 1.44269504088896341f, 12582912.0f);  // 1.5 * 2^23 + round(x / ln2)
  const float n = shifted - 12582912.0f;
  float r = mul_add(n, -0.693359375f, xc);
  r = mul_add(n, 2.12194440e-4f, r);
  float p = 1.9875691500e-4f;
  p = mul_add(p, r, 1.3981999507e-3f);
  p = mul_add(p, r, 8.3334519073e-3f);
  p = mul_add(p, r, 4.1665795894e-2f);
  p = mul_add(p, r, 1.6666665459e-1f);
  p = mul_add(p, r, 5.0000001201e-1f);
  p = mul_add(p * r, r, r) + 1.0f;
  uint32_t bits;
  std::memcpy(&bits, &shifted, sizeof(bits));
  bits = (bits - 0x4B400000u + 127u) << 23;  // the low mantissa bits of `shifted` hold n: 2^n as a float
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  float out = p * scale;
  if constexpr (kAnySign) out = x > 88.37f ? std::numeric_limits<float>::infinity() : out;
  return x < -87.3f ? 0.0f : out;
}

// The shared core of the double exp/expm1 below: xc = n ln2 + r with |r| <= ln2 / 2 (xc already clamped), returns
// P(r) of the degree-13 Taylor series, so that expm1(r) = r P(r) and exp(r) = 1 + r P(r), and sets scale = 2^n.
__attribute__((always_inline)) inline double exp_reduce(double xc, double& r, double& scale) {
  const double shifted = mul_add(xc, 1.4426950408889634074, 6755399441055744.0);  // 1.5 * 2^52 + round(x / ln2)
  const double n = shifted - 6755399441055744.0;
  r = mul_add(n, -6.93147180369123816490e-01, xc);
  r = mul_add(n, -1.90821492927058770002e-10, r);
  double p = 1.0 / 6227020800.0;
  p = mul_add(p, r, 1.0 / 479001600.0);
  p = mul_add(p, r, 1.0 / 39916800.0);
  p = mul_add(p, r, 1.0 / 3628800.0);
  p = mul_add(p, r, 1.0 / 362880.0);
  p = mul_add(p, r, 1.0 / 40320.0);
  p = mul_add(p, r, 1.0 / 5040.0);
  p = mul_add(p, r, 1.0 / 720.0);
  p = mul_add(p, r, 1.0 / 120.0);
  p = mul_add(p, r, 1.0 / 24.0);
  p = mul_add(p, r, 1.0 / 6.0);
  p = mul_add(p, r, 0.5);
  p = mul_add(p, r, 1.0);
  uint64_t bits;
  std::memcpy(&bits, &shifted, sizeof(bits));
  bits = (bits - 0x4338000000000000ull + 1023ull) << 52;  // the low mantissa bits of `shifted` hold n: 2^n
  std::memcpy(&scale, &bits, sizeof(scale));
  return p;
}

// exp(x), double: the same scheme with a degree-13 Taylor polynomial on |r| <= ln2 / 2 (< 1 ulp); 0 below
// -708; kAnySign: +inf above 709 (multiplied by |s| > 709 it overflows double anyway); NaN stays NaN.
template <bool kAnySign>
__attribute__((always_inline)) inline double exp_lanes(double x) {
  double xc = x < -708.0 ? -708.0 : x;
  if constexpr (kAnySign) xc = xc > 709.0 ? 709.0 : xc;
  double r, scale;
  const double p = exp_reduce(xc, r, scale);  // its own statement: it sets r, which the next line reads
  double out = mul_add(p, r, 1.0) * scale;
  if constexpr (kAnySign) out = x > 709.0 ? std::numeric_limits<double>::infinity() : out;
  return x < -708.0 ? 0.0 : out;
}

}  // namespace cpu
}  // namespace fastood
