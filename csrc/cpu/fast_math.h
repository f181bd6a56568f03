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

namespace fastood {
namespace cpu {

// Counter-based randomness: a 32-bit hash of (key, counter) (murmur3 finalizer over a Weyl sequence), so
// the value of element i depends only on the seed and i -- not on threads or chunking -- and loops vectorize.
__attribute__((always_inline)) inline uint32_t hash32(uint32_t counter, uint32_t key) {
  uint32_t h = counter * 0x9E3779B9u + key;
  h ^= h >> 16;
  h *= 0x85EBCA6Bu;
  h ^= h >> 13;
  h *= 0xC2B2AE35u;
  h ^= h >> 16;
  return h;
}

// log(x) for x in (0, 1] (Cephes logf polynomial after splitting off the exponent), ~1e-7 relative error.
__attribute__((always_inline)) inline float log_unit(float x) {
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
  return std::fma(fe, 0.693359375f, m + y);
}

// One standard normal per counter (Box-Muller; the counter's parity picks the cosine or the sine branch of
// the pair drawn from counter / 2). sin/cos on a quarter turn by Taylor polynomials (error < 4e-6), rotated by
// the quadrant of the angle.
__attribute__((always_inline)) inline float normal_from_counter(uint32_t counter, uint32_t key_a, uint32_t key_b) {
  const uint32_t pair = counter >> 1;
  const float u1 = static_cast<float>((hash32(pair, key_a) >> 8) + 1u) * (1.0f / 16777216.0f);  // (0, 1]
  const float u2 = static_cast<float>(hash32(pair, key_b) >> 8) * (1.0f / 16777216.0f);         // [0, 1)
  const float radius = std::sqrt(-2.0f * log_unit(u1));
  const float turns = u2 * 4.0f;
  const int32_t quadrant = static_cast<int32_t>(turns);
  const float a = (turns - static_cast<float>(quadrant)) * 1.57079632679489662f;
  const float a2 = a * a;
  float s = -2.5052108e-8f;
  s = std::fma(s, a2, 2.7557319e-6f);
  s = std::fma(s, a2, -1.9841270e-4f);
  s = std::fma(s, a2, 8.3333333e-3f);
  s = std::fma(s, a2, -1.6666667e-1f);
  s = std::fma(s * a2, a, a);
  float c = 2.0876757e-9f;
  c = std::fma(c, a2, -2.7557319e-7f);
  c = std::fma(c, a2, 2.4801587e-5f);
  c = std::fma(c, a2, -1.3888889e-3f);
  c = std::fma(c, a2, 4.1666667e-2f);
  c = std::fma(c, a2, -0.5f);
  c = std::fma(c, a2, 1.0f);
  // (cos, sin) of a + quadrant * pi/2.
  const float cq = quadrant == 0 ? c : (quadrant == 1 ? -s : (quadrant == 2 ? -c : s));
  const float sq = quadrant == 0 ? s : (quadrant == 1 ? c : (quadrant == 2 ? -s : -c));
  return radius * ((counter & 1u) ? sq : cq);
}

}  // namespace cpu
}  // namespace fastood
