// Branch-free float math that gcc vectorizes inside `#pragma omp simd` loops (-fopenmp-simd).
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

namespace fastood {
namespace cpu {

// exp(x) for float with ~1 ulp error (Cephes polynomial on x = n ln2 + r); inf above 88.72, 0 below -87.3,
// NaN stays NaN. Double uses std::exp.
__attribute__((always_inline)) inline float exp_approx(float x) {
  float xc = x < -87.3f ? -87.3f : x;
  xc = xc > 88.7f ? 88.7f : xc;
  xc = xc != xc ? 0.0f : xc;
  // Round to nearest with the 1.5 * 2^23 trick (vectorizes without SSE4.1 rounding intrinsics).
  const float n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  float r = std::fma(n, -0.693359375f, xc);
  r = std::fma(n, 2.12194440e-4f, r);
  float p = 1.9875691500e-4f;
  p = std::fma(p, r, 1.3981999507e-3f);
  p = std::fma(p, r, 8.3334519073e-3f);
  p = std::fma(p, r, 4.1665795894e-2f);
  p = std::fma(p, r, 1.6666665459e-1f);
  p = std::fma(p, r, 5.0000001201e-1f);
  p = std::fma(p * r, r, r) + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  float out = p * scale;
  out = x > 88.72f ? std::numeric_limits<float>::infinity() : out;
  out = x < -87.3f ? 0.0f : out;
  return x != x ? x : out;
}

__attribute__((always_inline)) inline double exp_approx(double x) { return std::exp(x); }

}  // namespace cpu
}  // namespace fastood
