// The CPU kernels, written once with explicit vectors and compiled once per capability: kernels_<cap>.cpp
// defines CPU_CAPABILITY (the namespace) and FASTOOD_CAP_<CAP>, then includes this file under that
// capability's compiler flags. Vectors are GCC/Clang vector extensions of the capability's register width
// (16 bytes for "default" = SSE2 on x86-64 or the baseline SIMD elsewhere, 32 for AVX2, 64 for AVX-512), with
// intrinsics where the generic form would be slow (masked tail loads/stores, float16 conversion).
//
// Everything here lives in an anonymous namespace inside the capability's namespace, and only <cstdint>,
// <cmath>-free builtins and <immintrin.h> are included: no inline function compiled with AVX flags can be
// shared with (and picked by the linker for) code that runs on a CPU without them.
//
// Formulas (DESIGN.md): modified energy (FIG) with s = f / c: E = sum_y s_y (1 - e^{s_y}) = -sum_y s_y expm1(s_y),
// dE/df_y = (1/c)(1 - (1 + s_y) e^{s_y}) = (1/c)(-expm1(s_y) - s_y e^{s_y}); softmax entropy with m = max f, z = f - m, e = exp z, S = sum e,
// T = sum e z: H = log S - T/S, dH/df_j = -(e_j / S)(z_j - T/S).
#include <cstdint>

#include "cpu/kernels/kernel_table.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

// gcc 12's _mm512_cvtph_ps starts from an intentionally undefined vector and warns about it when inlined.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"

#if !defined(CPU_CAPABILITY)
#error "define CPU_CAPABILITY (cap_default, cap_avx2 or cap_avx512) before including kernels_impl.h"
#endif

#if defined(FASTOOD_CAP_AVX512)
#if !defined(__AVX512F__) || !defined(__AVX512BW__) || !defined(__AVX512VL__) || !defined(__FMA__) || !defined(__F16C__)
#error "kernels_avx512.cpp must be compiled with -mavx512f -mavx512bw -mavx512vl -mavx512dq -mavx2 -mfma -mf16c"
#endif
#define FASTOOD_VBYTES 64
#elif defined(FASTOOD_CAP_AVX2)
#if !defined(__AVX2__) || !defined(__FMA__) || !defined(__F16C__)
#error "kernels_avx2.cpp must be compiled with -mavx2 -mfma -mf16c"
#endif
#define FASTOOD_VBYTES 32
#elif defined(FASTOOD_CAP_DEFAULT)
#define FASTOOD_VBYTES 16
#else
#error "define FASTOOD_CAP_DEFAULT, FASTOOD_CAP_AVX2 or FASTOOD_CAP_AVX512"
#endif

#define FASTOOD_INLINE __attribute__((always_inline)) inline

namespace fastood {
namespace cpu {
namespace CPU_CAPABILITY {
namespace {

constexpr int W = FASTOOD_VBYTES / 4;  // float lanes per vector
typedef float vf __attribute__((vector_size(FASTOOD_VBYTES)));
typedef int32_t vi __attribute__((vector_size(FASTOOD_VBYTES)));
typedef uint32_t vu __attribute__((vector_size(FASTOOD_VBYTES)));
typedef uint16_t vh __attribute__((vector_size(FASTOOD_VBYTES / 2)));

constexpr float kInf = __builtin_inff();

FASTOOD_INLINE vf splat(float v) { return vf{} + v; }
FASTOOD_INLINE vi splat_i(int32_t v) { return vi{} + v; }
FASTOOD_INLINE vu splat_u(uint32_t v) { return vu{} + v; }

FASTOOD_INLINE vi iota() {
  vi r = {};
  for (int l = 0; l < W; ++l) r[l] = l;
  return r;
}

// a * b + c with one rounding where the capability has FMA (the kernels are compiled with -ffp-contract=fast).
FASTOOD_INLINE vf madd(vf a, vf b, vf c) { return a * b + c; }

// Horizontal sum and max in registers (halving: the upper half of the lanes onto the lower half, as the
// pairwise tree a[l] += a[l + w], w = W/2, ..., 1, so every capability adds in the same order). The generic form
// (a lane loop over a stack copy) compiled to a scalar chain through memory, a store-forwarding round trip per
// lane, which cost as much per row as a third of a 100-column row's arithmetic.
#if defined(__SSE2__)
FASTOOD_INLINE __m128 to_m128_sum(vf v) {
#if defined(FASTOOD_CAP_AVX512)
  const __m256 a = _mm256_add_ps(_mm512_castps512_ps256((__m512)v), _mm512_extractf32x8_ps((__m512)v, 1));
  return _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
#elif defined(FASTOOD_CAP_AVX2)
  return _mm_add_ps(_mm256_castps256_ps128((__m256)v), _mm256_extractf128_ps((__m256)v, 1));
#else
  return (__m128)v;
#endif
}

FASTOOD_INLINE __m128 to_m128_max(vf v) {
#if defined(FASTOOD_CAP_AVX512)
  const __m256 a = _mm256_max_ps(_mm512_castps512_ps256((__m512)v), _mm512_extractf32x8_ps((__m512)v, 1));
  return _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
#elif defined(FASTOOD_CAP_AVX2)
  return _mm_max_ps(_mm256_castps256_ps128((__m256)v), _mm256_extractf128_ps((__m256)v, 1));
#else
  return (__m128)v;
#endif
}

FASTOOD_INLINE float hsum(vf v) {
  __m128 b = to_m128_sum(v);
  b = _mm_add_ps(b, _mm_movehl_ps(b, b));                    // lanes 0, 1: (0 + 2), (1 + 3)
  return _mm_cvtss_f32(_mm_add_ss(b, _mm_shuffle_ps(b, b, 1)));  // lane 0 + lane 1
}

// Max of the lanes; v holds no NaN here (the row kernels' running maxima skip NaN), so the order is free.
FASTOOD_INLINE float hmax(vf v) {
  __m128 b = to_m128_max(v);
  b = _mm_max_ps(b, _mm_movehl_ps(b, b));
  return _mm_cvtss_f32(_mm_max_ss(b, _mm_shuffle_ps(b, b, 1)));
}
#else
FASTOOD_INLINE float hsum(vf v) {
  float a[W];
  __builtin_memcpy(a, &v, sizeof(v));
  for (int w = W / 2; w >= 1; w /= 2)
    for (int l = 0; l < w; ++l) a[l] += a[l + w];
  return a[0];
}

FASTOOD_INLINE float hmax(vf v) {  // v holds no NaN here (the row kernels' running maxima skip NaN)
  float m = v[0];
  for (int l = 1; l < W; ++l) m = v[l] > m ? v[l] : m;
  return m;
}
#endif

// ---- Loads and stores of float, bfloat16 and float16 rows as float vectors ----

FASTOOD_INLINE vf load_f32(const float* p) {
  vf v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}

FASTOOD_INLINE void store_f32(float* p, vf v) { __builtin_memcpy(p, &v, sizeof(v)); }

// Lanes [0, n) from p, the others `fill`; n in [1, W). Never reads past p + n.
FASTOOD_INLINE vf load_f32_partial(const float* p, int n, float fill) {
#if defined(FASTOOD_CAP_AVX512)
  return (vf)_mm512_mask_loadu_ps(_mm512_set1_ps(fill), static_cast<__mmask16>((1u << n) - 1u), p);
#elif defined(FASTOOD_CAP_AVX2)
  const vi mask = iota() < n;
  const vf v = (vf)_mm256_maskload_ps(p, (__m256i)mask);
  return mask ? v : splat(fill);
#else
  vf v = splat(fill);
  for (int l = 0; l < n; ++l) v[l] = p[l];
  return v;
#endif
}

FASTOOD_INLINE void store_f32_partial(float* p, vf v, int n) {
#if defined(FASTOOD_CAP_AVX512)
  _mm512_mask_storeu_ps(p, static_cast<__mmask16>((1u << n) - 1u), (__m512)v);
#elif defined(FASTOOD_CAP_AVX2)
  _mm256_maskstore_ps(p, (__m256i)(iota() < n), (__m256)v);
#else
  for (int l = 0; l < n; ++l) p[l] = v[l];
#endif
}

FASTOOD_INLINE float bits_to_float(uint32_t u) {
  float f;
  __builtin_memcpy(&f, &u, sizeof(f));
  return f;
}

FASTOOD_INLINE uint32_t float_to_bits(float f) {
  uint32_t u;
  __builtin_memcpy(&u, &f, sizeof(u));
  return u;
}

// bfloat16 <-> float, rounding to nearest even like torch's casts (NaN -> quiet NaN).
FASTOOD_INLINE float bf16_to_float(uint16_t h) { return bits_to_float(static_cast<uint32_t>(h) << 16); }
FASTOOD_INLINE uint16_t float_to_bf16(float f) {
  const uint32_t u = float_to_bits(f);
  return f != f ? uint16_t(0x7FC0) : static_cast<uint16_t>((u + ((u >> 16) & 1u) + 0x7FFFu) >> 16);
}

// float16 <-> float, IEEE binary16, rounding to nearest even (scalar; the vector paths use F16C).
FASTOOD_INLINE float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1Fu, mantissa = h & 0x3FFu;
  if (exponent == 0x1F) return bits_to_float(sign | 0x7F800000u | (mantissa << 13));
  if (exponent == 0) {
    const float v = static_cast<float>(mantissa) * 5.9604644775390625e-8f;  // mantissa * 2^-24
    return sign ? -v : v;
  }
  return bits_to_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

FASTOOD_INLINE uint16_t float_to_half(float f) {
  uint32_t u = float_to_bits(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  u &= 0x7FFFFFFFu;
  uint32_t out;
  if (u >= 0x47800000u) {  // |f| >= 65536, inf or NaN
    out = u > 0x7F800000u ? 0x7E00u : 0x7C00u;
  } else if (u < 0x38800000u) {  // below 2^-14: a subnormal half; adding 0.5 rounds |f| to a multiple of 2^-24
    out = float_to_bits(bits_to_float(u) + 0.5f) - 0x3F000000u;
  } else {
    const uint32_t odd = (u >> 13) & 1u;
    out = (u + 0xC8000FFFu + odd) >> 13;  // rebias the exponent by -112 and round to nearest even
  }
  return static_cast<uint16_t>(out | sign);
}

// Lanes [0, n) of 16-bit values (n in [1, W)), the others 0, without touching memory past p + n; in registers
// (masked moves), since building the vector element by element through memory stalls store forwarding.
FASTOOD_INLINE vh load_u16_partial(const uint16_t* p, int n) {
#if defined(FASTOOD_CAP_AVX512)
  return (vh)_mm256_maskz_loadu_epi16(static_cast<__mmask16>((1u << n) - 1u), p);
#elif defined(FASTOOD_CAP_AVX2)
  const __m128i pairs = _mm_cmpgt_epi32(_mm_set1_epi32(n / 2), _mm_setr_epi32(0, 1, 2, 3));  // int32 lanes < n/2
  __m128i h = _mm_maskload_epi32(reinterpret_cast<const int*>(p), pairs);  // whole pairs only
  switch (n) {  // an odd n leaves one value: insert it (the lane index must be a constant)
    case 1: h = _mm_insert_epi16(h, p[0], 0); break;
    case 3: h = _mm_insert_epi16(h, p[2], 2); break;
    case 5: h = _mm_insert_epi16(h, p[4], 4); break;
    case 7: h = _mm_insert_epi16(h, p[6], 6); break;
    default: break;
  }
  return (vh)h;
#else
  vh h = {};
  for (int l = 0; l < n; ++l) h[l] = p[l];
  return h;
#endif
}

FASTOOD_INLINE void store_u16_partial(uint16_t* p, vh h, int n) {
#if defined(FASTOOD_CAP_AVX512)
  _mm256_mask_storeu_epi16(p, static_cast<__mmask16>((1u << n) - 1u), (__m256i)h);
#elif defined(FASTOOD_CAP_AVX2)
  const __m128i pairs = _mm_cmpgt_epi32(_mm_set1_epi32(n / 2), _mm_setr_epi32(0, 1, 2, 3));  // int32 lanes < n/2
  _mm_maskstore_epi32(reinterpret_cast<int*>(p), pairs, (__m128i)h);
  switch (n) {
    case 1: p[0] = static_cast<uint16_t>(_mm_extract_epi16((__m128i)h, 0)); break;
    case 3: p[2] = static_cast<uint16_t>(_mm_extract_epi16((__m128i)h, 2)); break;
    case 5: p[4] = static_cast<uint16_t>(_mm_extract_epi16((__m128i)h, 4)); break;
    case 7: p[6] = static_cast<uint16_t>(_mm_extract_epi16((__m128i)h, 6)); break;
    default: break;
  }
#else
  for (int l = 0; l < n; ++l) p[l] = h[l];
#endif
}

// Storage types: how a row of `T` loads into float vectors and stores back.
struct F32 {
  using T = float;
  static FASTOOD_INLINE vf load(const T* p) { return load_f32(p); }
  static FASTOOD_INLINE vf load_partial(const T* p, int n, float fill) { return load_f32_partial(p, n, fill); }
  static FASTOOD_INLINE void store(T* p, vf v) { store_f32(p, v); }
  static FASTOOD_INLINE void store_partial(T* p, vf v, int n) { store_f32_partial(p, v, n); }
  static FASTOOD_INLINE T from_float(float v) { return v; }
};

// Loads and stores of 16-bit rows, shared by BF16 and F16: `Format` supplies widen (vh -> vf) and narrow (vf -> vh).
template <class Format>
struct U16Rows {
  using T = uint16_t;
  static FASTOOD_INLINE vf load(const T* p) {
    vh h;
    __builtin_memcpy(&h, p, sizeof(h));
    return Format::widen(h);
  }
  static FASTOOD_INLINE vf load_partial(const T* p, int n, float fill) {
    return iota() < n ? Format::widen(load_u16_partial(p, n)) : splat(fill);
  }
  static FASTOOD_INLINE void store(T* p, vf v) {
    const vh h = Format::narrow(v);
    __builtin_memcpy(p, &h, sizeof(h));
  }
  static FASTOOD_INLINE void store_partial(T* p, vf v, int n) { store_u16_partial(p, Format::narrow(v), n); }
};

struct BF16 : U16Rows<BF16> {
  using T = uint16_t;
  // Widening is a zero-extension and a shift; narrowing rounds to nearest even and packs (vpmovdw on AVX-512,
  // packus + a lane permute on AVX2): the generic vector conversions compile to slow shuffle sequences.
  static FASTOOD_INLINE vf widen(vh h) {
#if defined(FASTOOD_CAP_AVX512)
    return (vf)_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)h), 16);
#elif defined(FASTOOD_CAP_AVX2)
    return (vf)_mm256_slli_epi32(_mm256_cvtepu16_epi32((__m128i)h), 16);
#else
    return (vf)(__builtin_convertvector(h, vu) << 16);
#endif
  }
  static FASTOOD_INLINE vh narrow(vf v) {
    const vu u = (vu)v;
    vu r = (u + ((u >> 16) & 1u) + 0x7FFFu) >> 16;
    r = (v != v) ? splat_u(0x7FC0u) : r;
#if defined(FASTOOD_CAP_AVX512)
    return (vh)_mm512_cvtepi32_epi16((__m512i)r);
#elif defined(FASTOOD_CAP_AVX2)
    const __m256i packed = _mm256_packus_epi32((__m256i)r, (__m256i)r);  // r < 2^16: no saturation
    return (vh)_mm256_castsi256_si128(_mm256_permute4x64_epi64(packed, 0x08));
#else
    return __builtin_convertvector(r, vh);
#endif
  }
  static FASTOOD_INLINE T from_float(float v) { return float_to_bf16(v); }
};

struct F16 : U16Rows<F16> {
  using T = uint16_t;
#if defined(FASTOOD_CAP_AVX512)
  static FASTOOD_INLINE vf widen(vh h) { return (vf)_mm512_cvtph_ps((__m256i)h); }
  static FASTOOD_INLINE vh narrow(vf v) { return (vh)_mm512_cvtps_ph((__m512)v, _MM_FROUND_TO_NEAREST_INT); }
#elif defined(FASTOOD_CAP_AVX2)
  static FASTOOD_INLINE vf widen(vh h) { return (vf)_mm256_cvtph_ps((__m128i)h); }
  static FASTOOD_INLINE vh narrow(vf v) { return (vh)_mm256_cvtps_ph((__m256)v, _MM_FROUND_TO_NEAREST_INT); }
#else
  static FASTOOD_INLINE vf widen(vh h) {
    vf v;
    for (int l = 0; l < W; ++l) v[l] = half_to_float(h[l]);
    return v;
  }
  static FASTOOD_INLINE vh narrow(vf v) {
    vh h;
    for (int l = 0; l < W; ++l) h[l] = float_to_half(v[l]);
    return h;
  }
#endif
  static FASTOOD_INLINE T from_float(float v) { return float_to_half(v); }
};

// ---- Math ----

// exp(xc) = 2^n (1 + q) for xc in [-87.3, 88.37] (or NaN): Cephes reduction xc = n ln2 + r, |r| <= ln2 / 2, and
// q = expm1(r) = r + r^2 P(r) (~1 ulp relative, also for tiny r, where r = xc exactly since n = 0).
struct ExpParts {
  vf q, scale;  // scale = 2^n
};

FASTOOD_INLINE ExpParts vexp_parts(vf xc) {
  const vf shifted = madd(xc, splat(1.44269504088896341f), splat(12582912.0f));  // 1.5 * 2^23 + round(x / ln2)
  const vf n = shifted - 12582912.0f;
  vf r = madd(n, splat(-0.693359375f), xc);
  r = madd(n, splat(2.12194440e-4f), r);
  vf p = splat(1.9875691500e-4f);
  p = madd(p, r, splat(1.3981999507e-3f));
  p = madd(p, r, splat(8.3334519073e-3f));
  p = madd(p, r, splat(4.1665795894e-2f));
  p = madd(p, r, splat(1.6666665459e-1f));
  p = madd(p, r, splat(5.0000001201e-1f));
  const vu bits = ((vu)shifted - 0x4B400000u + 127u) << 23;  // the low mantissa bits of `shifted` hold n: 2^n
  return {madd(p * r, r, r), (vf)bits};
}

// max(lo, x) per lane; a NaN x stays NaN (x86's max returns its second operand when either is NaN).
FASTOOD_INLINE vf vmax_keep_nan(vf lo, vf x) {
#if defined(FASTOOD_CAP_AVX512)
  return (vf)_mm512_max_ps((__m512)lo, (__m512)x);
#elif defined(FASTOOD_CAP_AVX2)
  return (vf)_mm256_max_ps((__m256)lo, (__m256)x);
#elif defined(__SSE2__)
  return (vf)_mm_max_ps((__m128)lo, (__m128)x);
#else
  return x < lo ? lo : x;
#endif
}

// min(hi, x) per lane; a NaN x stays NaN (as vmax_keep_nan).
FASTOOD_INLINE vf vmin_keep_nan(vf hi, vf x) {
#if defined(FASTOOD_CAP_AVX512)
  return (vf)_mm512_min_ps((__m512)hi, (__m512)x);
#elif defined(FASTOOD_CAP_AVX2)
  return (vf)_mm256_min_ps((__m256)hi, (__m256)x);
#elif defined(__SSE2__)
  return (vf)_mm_min_ps((__m128)hi, (__m128)x);
#else
  return x > hi ? hi : x;
#endif
}

// exp(z) for z <= 0 (softmax's z = f - max f), ~1 ulp; NaN stays NaN. Below -87.3, where exp(z) is subnormal in
// float, it returns exp(-87.3) = 1.2e-38 instead of 0 or the subnormal: an absolute error under 1.2e-38, nothing
// next to S >= 1 or to a gradient's rounding. z = -inf gives 1.2e-38 too, so e z = -inf: the callers turn a -inf
// T into NaN, as the reference's 0 * -inf (row_stats). One max instead of a compare, a blend and a final select.
FASTOOD_INLINE vf vexp_nonpositive(vf z) {
  const ExpParts parts = vexp_parts(vmax_keep_nan(splat(-87.3f), z));
  return madd(parts.q, parts.scale, parts.scale);  // 2^n (1 + q), one rounding
}

// exp(x) and expm1(x) = exp(x) - 1 of any x, both ~1 ulp: expm1 = 2^n q + (2^n - 1), where 2^n - 1 is exact
// and 0 for |x| < ln2 / 2, so small |x| keep all their digits (1 - exp(x) would keep only ~|x| / eps of them).
// Below -87.3: exp 0, expm1 -1; above 88.37: both +inf; NaN stays NaN.
struct ExpExpm1 {
  vf exp, expm1;
};

FASTOOD_INLINE ExpExpm1 vexp_expm1(vf x) {
  // NaN stays NaN through the clamps (vmax_keep_nan, vmin_keep_nan) and the arithmetic.
  const ExpParts parts = vexp_parts(vmin_keep_nan(splat(88.37f), vmax_keep_nan(splat(-87.3f), x)));
  // At the lower clamp 2^n q + (2^n - 1) rounds to -1 by itself; exp must be 0 there (not exp(-87.3)), so that
  // s exp(s) is NaN at s = -inf, as the reference's -inf * 0.
  vf e = madd(parts.q, parts.scale, parts.scale), em1 = madd(parts.q, parts.scale, parts.scale - 1.0f);
  const vi big = x > 88.37f;
  e = big ? splat(kInf) : (x < -87.3f ? splat(0.0f) : e);
  em1 = big ? splat(kInf) : em1;
  return {e, em1};
}

// log(x) for normal x > 0 or NaN (here S in [1, C]): Cephes logf polynomial after splitting off the exponent
// (~1e-7 relative error).
FASTOOD_INLINE vf vlog_positive(vf x) {
  vi bits = (vi)x;
  vi e = ((bits >> 23) & 0xFF) - 126;
  bits = (bits & 0x007FFFFF) | 0x3F000000;  // mantissa in [0.5, 1)
  vf m = (vf)bits;
  const vi small = m < 0.707106781186547524f;  // all ones where true
  e = e + small;
  m = small ? m + m - 1.0f : m - 1.0f;
  const vf z = m * m;
  vf y = splat(7.0376836292e-2f);
  y = madd(y, m, splat(-1.1514610310e-1f));
  y = madd(y, m, splat(1.1676998740e-1f));
  y = madd(y, m, splat(-1.2420140846e-1f));
  y = madd(y, m, splat(1.4249322787e-1f));
  y = madd(y, m, splat(-1.6668057665e-1f));
  y = madd(y, m, splat(2.0000714765e-1f));
  y = madd(y, m, splat(-2.4999993993e-1f));
  y = madd(y, m, splat(3.3333331174e-1f));
  y = y * m * z;
  const vf fe = __builtin_convertvector(e, vf);
  y = madd(fe, splat(-2.12194440e-4f), y);
  y = madd(splat(-0.5f), z, y);
  const vf out = madd(fe, splat(0.693359375f), m + y);
  return x != x ? x : out;
}

// ---- Modified energy (FIG) ----

// Per value with s = f / c (the reference's forms, no cancellation for small |s|):
// energy term -s expm1(s), gradient g (-expm1(s) - s exp(s)).
template <class S, bool kEnergy, bool kGrad>
void energy_rows(const typename S::T* logits, int64_t begin, int64_t end, int64_t cols, float inv_c,
                 typename S::T* energy, typename S::T* grad, const float* grad_scale) {
  const int64_t full = cols / W * W;
  const int rem = static_cast<int>(cols - full);
  const vf vinv = splat(inv_c);
  for (int64_t b = begin; b < end; ++b) {
    const typename S::T* row = logits + b * cols;
    typename S::T* out = kGrad ? grad + b * cols : nullptr;
    const vf g = splat(grad_scale != nullptr ? grad_scale[b] * inv_c : inv_c);
    vf acc0 = {}, acc1 = {};  // two chains: the adds do not wait on each other; they sum s expm1(s), negated once
    int64_t k = 0;
    for (; k + 2 * W <= full; k += 2 * W) {
      const vf s0 = S::load(row + k) * vinv, s1 = S::load(row + k + W) * vinv;
      const ExpExpm1 e0 = vexp_expm1(s0), e1 = vexp_expm1(s1);
      if constexpr (kEnergy) {
        acc0 = madd(s0, e0.expm1, acc0);
        acc1 = madd(s1, e1.expm1, acc1);
      }
      if constexpr (kGrad) {
        S::store(out + k, -g * madd(s0, e0.exp, e0.expm1));
        S::store(out + k + W, -g * madd(s1, e1.exp, e1.expm1));
      }
    }
    for (; k < full; k += W) {
      const vf s = S::load(row + k) * vinv;
      const ExpExpm1 e = vexp_expm1(s);
      if constexpr (kEnergy) acc0 = madd(s, e.expm1, acc0);
      if constexpr (kGrad) S::store(out + k, -g * madd(s, e.exp, e.expm1));
    }
    if (rem > 0) {  // lanes past the row hold s = 0, whose energy term is exactly 0
      const vf s = S::load_partial(row + full, rem, 0.0f) * vinv;
      const ExpExpm1 e = vexp_expm1(s);
      if constexpr (kEnergy) acc0 = madd(s, e.expm1, acc0);
      if constexpr (kGrad) S::store_partial(out + full, -g * madd(s, e.exp, e.expm1), rem);
    }
    if constexpr (kEnergy) energy[b] = S::from_float(-hsum(acc0 + acc1));
  }
}

template <class S>
void energy_rows_for(const void* logits, int64_t begin, int64_t end, int64_t cols, float inv_c, void* energy,
                     void* grad, const float* grad_scale) {
  using T = typename S::T;
  const T* in = static_cast<const T*>(logits);
  T* e = static_cast<T*>(energy);
  T* g = static_cast<T*>(grad);
  if (e != nullptr && g != nullptr) {
    energy_rows<S, true, true>(in, begin, end, cols, inv_c, e, g, grad_scale);
  } else if (e != nullptr) {
    energy_rows<S, true, false>(in, begin, end, cols, inv_c, e, g, grad_scale);
  } else if (g != nullptr) {
    energy_rows<S, false, true>(in, begin, end, cols, inv_c, e, g, grad_scale);
  }
}

void modified_energy_rows(RowDtype dtype, const void* logits, int64_t begin, int64_t end, int64_t cols, float inv_c,
                          void* energy, void* grad, const float* grad_scale) {
  switch (dtype) {
    case RowDtype::kFloat: return energy_rows_for<F32>(logits, begin, end, cols, inv_c, energy, grad, grad_scale);
    case RowDtype::kBFloat16: return energy_rows_for<BF16>(logits, begin, end, cols, inv_c, energy, grad, grad_scale);
    case RowDtype::kHalf: return energy_rows_for<F16>(logits, begin, end, cols, inv_c, energy, grad, grad_scale);
  }
}

// ---- Softmax entropy ----

struct RowStats {
  float max, sum, weighted;  // m, S = sum e_k, T = sum e_k z_k
};

// m, S and T of one row. kStoreExps: also writes e_k to exps (room for cols rounded up to W).
// NaN: the max skips it, and it surfaces through exp(NaN - m) in S and T; a +inf gives inf - inf = NaN and a
// -inf gives 0 * -inf = NaN (as the reference's p log p).
template <class S, bool kStoreExps>
FASTOOD_INLINE RowStats row_stats(const typename S::T* row, int64_t cols, float* exps, float* zs) {
  const int64_t full = cols / W * W;
  const int rem = static_cast<int>(cols - full);
  vf m0 = splat(-kInf), m1 = splat(-kInf);
  int64_t k = 0;
  for (; k + 2 * W <= full; k += 2 * W) {
    const vf v0 = S::load(row + k), v1 = S::load(row + k + W);
    m0 = v0 > m0 ? v0 : m0;
    m1 = v1 > m1 ? v1 : m1;
  }
  for (; k < full; k += W) {
    const vf v = S::load(row + k);
    m0 = v > m0 ? v : m0;
  }
  if (rem > 0) {
    const vf v = S::load_partial(row + full, rem, -kInf);
    m0 = v > m0 ? v : m0;
  }
  m0 = m1 > m0 ? m1 : m0;
  const float m = hmax(m0);
  const vf vm = splat(m);

  vf s0 = {}, s1 = {}, t0 = {}, t1 = {};
  k = 0;
  for (; k + 2 * W <= full; k += 2 * W) {
    const vf z0 = S::load(row + k) - vm, z1 = S::load(row + k + W) - vm;
    const vf e0 = vexp_nonpositive(z0), e1 = vexp_nonpositive(z1);
    s0 += e0;
    s1 += e1;
    t0 = madd(e0, z0, t0);
    t1 = madd(e1, z1, t1);
    if constexpr (kStoreExps) {
      store_f32(exps + k, e0);
      store_f32(exps + k + W, e1);
      store_f32(zs + k, z0);
      store_f32(zs + k + W, z1);
    }
  }
  for (; k < full; k += W) {
    const vf z = S::load(row + k) - vm;
    const vf e = vexp_nonpositive(z);
    s0 += e;
    t0 = madd(e, z, t0);
    if constexpr (kStoreExps) {
      store_f32(exps + k, e);
      store_f32(zs + k, z);
    }
  }
  if (rem > 0) {
    const vi inside = iota() < rem;
    const vf z = S::load_partial(row + full, rem, 0.0f) - vm;
    const vf e = inside ? vexp_nonpositive(z) : splat(0.0f);
    s0 += e;
    t0 += inside ? e * z : splat(0.0f);
    if constexpr (kStoreExps) {
      store_f32(exps + full, e);
      store_f32(zs + full, z);
    }
  }
  const float t = hsum(t0 + t1);
  // T = -inf only from a -inf logit (e z = 1.2e-38 * -inf): NaN, as the reference's 0 * -inf
  return {m, hsum(s0 + s1), t == -kInf ? __builtin_nanf("") : t};
}

// entropy[b] = H = log S - T / S for rows [begin, end), with (S, T) = stats_of(b): rows in groups of W, one vector
// log per group.
template <class S, class StatsOf>
FASTOOD_INLINE void entropy_of_rows(int64_t begin, int64_t end, typename S::T* entropy, StatsOf stats_of) {
  for (int64_t b0 = begin; b0 < end; b0 += W) {
    const int n = static_cast<int>(end - b0 < W ? end - b0 : W);
    vf sums = splat(1.0f), weighted = {};
    for (int r = 0; r < n; ++r) {
      const RowStats st = stats_of(b0 + r);
      sums[r] = st.sum;
      weighted[r] = st.weighted;
    }
    const vf h = vlog_positive(sums) - weighted / sums;
    for (int r = 0; r < n; ++r) entropy[b0 + r] = S::from_float(h[r]);
  }
}

template <class S>
void entropy_forward_rows(const void* logits_v, int64_t begin, int64_t end, int64_t cols, void* entropy_v,
                          float* work) {
  using T = typename S::T;
  const T* logits = static_cast<const T*>(logits_v);
  (void)work;  // 16-bit rows are read in place (widened per vector, which costs less than a widened copy)
  entropy_of_rows<S>(begin, end, static_cast<T*>(entropy_v),
                     [&](int64_t b) { return row_stats<S, false>(logits + b * cols, cols, nullptr, nullptr); });
}

// out[k] = g dH/df_k = (g / S) e_k (T / S - z_k) of one row into `Out` storage (the row's dtype, or float for the
// forward's saved gradient); returns the row's (m, S, T). exps: kRowWork(cols) floats of scratch.
template <class S, class Out>
FASTOOD_INLINE RowStats entropy_row_grad(const typename S::T* row, int64_t cols, float g, typename Out::T* out,
                                         float* exps) {
  const int64_t full = cols / W * W;
  const int rem = static_cast<int>(cols - full);
  // z_k = f_k - m goes to the second half of the work buffer as row_stats forms it, so the gradient pass
  // reads two float rows and never widens the (16-bit) logits again.
  float* zs = exps + (cols + 15) / 16 * 16;
  const RowStats st = row_stats<S, true>(row, cols, exps, zs);
  // z_k = f_k - m formed first: folding m into T / S would round T / S to the ulp of m (1e-3 at |f| = 1e4 in
  // float32).
  const vf scale = splat(g / st.sum), mean_z = splat(st.weighted / st.sum);
  int64_t k = 0;
  for (; k < full; k += W) Out::store(out + k, scale * load_f32(exps + k) * (mean_z - load_f32(zs + k)));
  if (rem > 0) Out::store_partial(out + full, scale * load_f32(exps + full) * (mean_z - load_f32(zs + full)), rem);
  return st;
}

template <class S>
void entropy_backward_rows(const void* logits_v, const float* grad_entropy, int64_t begin, int64_t end, int64_t cols,
                           void* grad_v, float* exps) {
  using T = typename S::T;
  const T* logits = static_cast<const T*>(logits_v);
  T* grad = static_cast<T*>(grad_v);
  for (int64_t b = begin; b < end; ++b) {
    entropy_row_grad<S, S>(logits + b * cols, cols, grad_entropy[b], grad + b * cols, exps);
  }
}

// H and dH/df (float) of each row: the backward's row pass with g = 1, and H = log S - T / S from the same sums.
template <class S>
void entropy_forward_grad_rows(const void* logits_v, int64_t begin, int64_t end, int64_t cols, void* entropy_v,
                               float* dentropy, float* exps) {
  using T = typename S::T;
  const T* logits = static_cast<const T*>(logits_v);
  entropy_of_rows<S>(begin, end, static_cast<T*>(entropy_v), [&](int64_t b) {
    return entropy_row_grad<S, F32>(logits + b * cols, cols, 1.0f, dentropy + b * cols, exps);
  });
}

template <class S>
void scale_rows_for(const float* d, const float* scale, int64_t begin, int64_t end, int64_t cols, void* out_v) {
  using T = typename S::T;
  T* out = static_cast<T*>(out_v);
  const int64_t full = cols / W * W;
  const int rem = static_cast<int>(cols - full);
  for (int64_t b = begin; b < end; ++b) {
    const float* row = d + b * cols;
    T* o = out + b * cols;
    const vf g = splat(scale[b]);
    int64_t k = 0;
    for (; k < full; k += W) S::store(o + k, g * load_f32(row + k));
    if (rem > 0) S::store_partial(o + full, g * load_f32_partial(row + full, rem, 0.0f), rem);
  }
}

void softmax_entropy_forward_rows(RowDtype dtype, const void* logits, int64_t begin, int64_t end, int64_t cols,
                                  void* entropy, float* work) {
  switch (dtype) {
    case RowDtype::kFloat: return entropy_forward_rows<F32>(logits, begin, end, cols, entropy, work);
    case RowDtype::kBFloat16: return entropy_forward_rows<BF16>(logits, begin, end, cols, entropy, work);
    case RowDtype::kHalf: return entropy_forward_rows<F16>(logits, begin, end, cols, entropy, work);
  }
}

void softmax_entropy_backward_rows(RowDtype dtype, const void* logits, const float* grad_entropy, int64_t begin,
                                   int64_t end, int64_t cols, void* grad, float* work) {
  switch (dtype) {
    case RowDtype::kFloat: return entropy_backward_rows<F32>(logits, grad_entropy, begin, end, cols, grad, work);
    case RowDtype::kBFloat16:
      return entropy_backward_rows<BF16>(logits, grad_entropy, begin, end, cols, grad, work);
    case RowDtype::kHalf: return entropy_backward_rows<F16>(logits, grad_entropy, begin, end, cols, grad, work);
  }
}

void softmax_entropy_forward_grad_rows(RowDtype dtype, const void* logits, int64_t begin, int64_t end, int64_t cols,
                                       void* entropy, float* dentropy, float* work) {
  switch (dtype) {
    case RowDtype::kFloat: return entropy_forward_grad_rows<F32>(logits, begin, end, cols, entropy, dentropy, work);
    case RowDtype::kBFloat16:
      return entropy_forward_grad_rows<BF16>(logits, begin, end, cols, entropy, dentropy, work);
    case RowDtype::kHalf: return entropy_forward_grad_rows<F16>(logits, begin, end, cols, entropy, dentropy, work);
  }
}

void scale_rows(RowDtype dtype, const float* d, const float* scale, int64_t begin, int64_t end, int64_t cols,
                void* out) {
  switch (dtype) {
    case RowDtype::kFloat: return scale_rows_for<F32>(d, scale, begin, end, cols, out);
    case RowDtype::kBFloat16: return scale_rows_for<BF16>(d, scale, begin, end, cols, out);
    case RowDtype::kHalf: return scale_rows_for<F16>(d, scale, begin, end, cols, out);
  }
}

// ---- Langevin step (FIG Algorithm 1) ----

// x - half_step * sign(g) (+ sigma * z), clamped to [lo, hi], W values at a time: the sign step is a select
// (sign(NaN) = 0, as torch.sign), and a NaN in x or z fails both comparisons of the clamp and stays NaN.
template <class S, bool kNoise>
FASTOOD_INLINE vf langevin_value(vf x, vf g, const float* z, int n, vf half, vf sigma, vf lo, vf hi) {
  const vf step = g > 0.0f ? half : (g < 0.0f ? -half : splat(0.0f));
  vf v = x - step;
  if constexpr (kNoise) v = madd(sigma, n == W ? load_f32(z) : load_f32_partial(z, n, 0.0f), v);
  v = v < lo ? lo : v;
  return v > hi ? hi : v;
}

template <class S, bool kNoise>
void langevin_run_for(void* x_v, const void* grad_v, const float* z, int64_t n, float half_step, float sigma,
                      float lo, float hi) {
  using T = typename S::T;
  T* x = static_cast<T*>(x_v);
  const T* g = static_cast<const T*>(grad_v);
  const vf vhalf = splat(half_step), vsigma = splat(sigma), vlo = splat(lo), vhi = splat(hi);
  int64_t i = 0;
  for (; i + W <= n; i += W) {
    S::store(x + i, langevin_value<S, kNoise>(S::load(x + i), S::load(g + i), kNoise ? z + i : nullptr, W, vhalf,
                                              vsigma, vlo, vhi));
  }
  const int rem = static_cast<int>(n - i);
  if (rem > 0) {
    const vf v = langevin_value<S, kNoise>(S::load_partial(x + i, rem, 0.0f), S::load_partial(g + i, rem, 0.0f),
                                           kNoise ? z + i : nullptr, rem, vhalf, vsigma, vlo, vhi);
    S::store_partial(x + i, v, rem);
  }
}

template <class S>
void langevin_run_dtype(void* x, const void* grad, const float* z, int64_t n, float half_step, float sigma, float lo,
                        float hi) {
  if (z != nullptr) return langevin_run_for<S, true>(x, grad, z, n, half_step, sigma, lo, hi);
  langevin_run_for<S, false>(x, grad, z, n, half_step, sigma, lo, hi);
}

void langevin_run(RowDtype dtype, void* x, const void* grad, const float* z, int64_t n, float half_step, float sigma,
                  float lo, float hi) {
  switch (dtype) {
    case RowDtype::kFloat: return langevin_run_dtype<F32>(x, grad, z, n, half_step, sigma, lo, hi);
    case RowDtype::kBFloat16: return langevin_run_dtype<BF16>(x, grad, z, n, half_step, sigma, lo, hi);
    case RowDtype::kHalf: return langevin_run_dtype<F16>(x, grad, z, n, half_step, sigma, lo, hi);
  }
}

// ---- Philox normals (Langevin noise) ----
// Scalar code written so that the loop over a chunk's 64 independent Philox blocks vectorizes (`omp simd`,
// built with -fopenmp-simd): plain 32x32->64 products, branch-free log and sincos.

FASTOOD_INLINE float smadd(float a, float b, float c) { return a * b + c; }  // contracted to FMA where available

FASTOOD_INLINE void philox4x32_10(uint32_t lo, uint32_t hi, PhiloxKey key, uint32_t& o0, uint32_t& o1, uint32_t& o2,
                                  uint32_t& o3) {
  uint32_t c0 = lo, c1 = hi, c2 = key.s0, c3 = key.s1, k0 = key.k0, k1 = key.k1;
  for (int round = 0; round < 10; ++round) {
    const uint64_t p0 = static_cast<uint64_t>(0xD2511F53u) * c0;
    const uint64_t p1 = static_cast<uint64_t>(0xCD9E8D57u) * c2;
    const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c1 ^ k0;
    const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(p1);
    c3 = static_cast<uint32_t>(p0);
    c0 = n0;
    c2 = n2;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  o0 = c0;
  o1 = c1;
  o2 = c2;
  o3 = c3;
}

// (cos, sin) of 2 pi * turns for turns in [0, 1): quadrant + Taylor polynomials on [0, pi/2) (error < 1e-7).
FASTOOD_INLINE void sincos_turns(float turns, float& c_out, float& s_out) {
  const float t = turns * 4.0f;
  const int32_t quadrant = static_cast<int32_t>(t);
  const float a = (t - static_cast<float>(quadrant)) * 1.57079632679489662f;
  const float a2 = a * a;
  float s = -2.5052108e-8f;
  s = smadd(s, a2, 2.7557319e-6f);
  s = smadd(s, a2, -1.9841270e-4f);
  s = smadd(s, a2, 8.3333333e-3f);
  s = smadd(s, a2, -1.6666667e-1f);
  s = smadd(s * a2, a, a);
  float c = 2.0876757e-9f;
  c = smadd(c, a2, -2.7557319e-7f);
  c = smadd(c, a2, 2.4801587e-5f);
  c = smadd(c, a2, -1.3888889e-3f);
  c = smadd(c, a2, 4.1666667e-2f);
  c = smadd(c, a2, -0.5f);
  c = smadd(c, a2, 1.0f);
  // Rotate by quadrant * pi/2 on the bits (blend and sign flip), so the loop vectorizes without masks.
  const uint32_t swap = 0u - static_cast<uint32_t>(quadrant & 1);
  const uint32_t flip = static_cast<uint32_t>(quadrant & 2) << 30;
  const uint32_t cb = float_to_bits(c), sb = float_to_bits(s);
  c_out = bits_to_float(((cb & ~swap) | ((sb ^ 0x80000000u) & swap)) ^ flip);
  s_out = bits_to_float(((sb & ~swap) | (cb & swap)) ^ flip);
}

// log(x) for x in (0, 1]: Cephes logf polynomial (relative error < 1e-7), branch-free.
FASTOOD_INLINE float log_unit_interval(float x) {
  int32_t bits = static_cast<int32_t>(float_to_bits(x));
  int32_t e = ((bits >> 23) & 0xff) - 126;
  float m = bits_to_float(static_cast<uint32_t>((bits & 0x007fffff) | 0x3f000000));
  const int32_t small = m < 0.707106781186547524f ? 1 : 0;
  e -= small;
  m = smadd(m, static_cast<float>(small), m) - 1.0f;
  const float z = m * m;
  float y = 7.0376836292e-2f;
  y = smadd(y, m, -1.1514610310e-1f);
  y = smadd(y, m, 1.1676998740e-1f);
  y = smadd(y, m, -1.2420140846e-1f);
  y = smadd(y, m, 1.4249322787e-1f);
  y = smadd(y, m, -1.6668057665e-1f);
  y = smadd(y, m, 2.0000714765e-1f);
  y = smadd(y, m, -2.4999993993e-1f);
  y = smadd(y, m, 3.3333331174e-1f);
  y = y * m * z;
  const float fe = static_cast<float>(e);
  y = smadd(fe, -2.12194440e-4f, y);
  y = smadd(-0.5f, z, y);
  return smadd(fe, 0.693359375f, m + y);
}

// (bits >> 8) + plus, scaled by 2^-24: plus = 1 gives (0, 1], plus = 0 gives [0, 1).
FASTOOD_INLINE float uniform24(uint32_t bits, int32_t plus) {
  return static_cast<float>(static_cast<int32_t>(bits >> 8) + plus) * (1.0f / 16777216.0f);
}

// z[lane * 64 + q] comes from Philox block chunk * 64 + q (four uniforms -> two Box-Muller pairs).
[[maybe_unused]] void philox_normals_scalar(int64_t chunk, PhiloxKey key, float* z) {
  const uint64_t first = static_cast<uint64_t>(chunk) * kPhiloxBlocksPerChunk;
#pragma omp simd
  for (int64_t q = 0; q < kPhiloxBlocksPerChunk; ++q) {
    const uint64_t block = first + static_cast<uint64_t>(q);
    uint32_t u0, u1, u2, u3;
    philox4x32_10(static_cast<uint32_t>(block), static_cast<uint32_t>(block >> 32), key, u0, u1, u2, u3);
    const float r0 = __builtin_sqrtf(-2.0f * log_unit_interval(uniform24(u0, 1)));
    const float r1 = __builtin_sqrtf(-2.0f * log_unit_interval(uniform24(u2, 1)));
    float c0, s0, c1, s1;
    sincos_turns(uniform24(u1, 0), c0, s0);
    sincos_turns(uniform24(u3, 0), c1, s1);
    z[q] = r0 * c0;
    z[kPhiloxBlocksPerChunk + q] = r0 * s0;
    z[2 * kPhiloxBlocksPerChunk + q] = r1 * c1;
    z[3 * kPhiloxBlocksPerChunk + q] = r1 * s1;
  }
}

// ---- The same, W blocks at a time in explicit vectors ----

// Lane-wise 32 x 32 -> 64-bit products of a with the constant m, split into high and low halves: two widening
// multiplies (even and odd lanes) and two blends, instead of the generic code's widen/narrow permutes.
FASTOOD_INLINE void mulhilo(vu a, uint32_t m, vu& hi, vu& lo) {
#if defined(FASTOOD_CAP_AVX512)
  const __m512i vm = _mm512_set1_epi32(static_cast<int>(m));
  const __m512i even = _mm512_mul_epu32((__m512i)a, vm);
  const __m512i odd = _mm512_mul_epu32(_mm512_srli_epi64((__m512i)a, 32), vm);
  lo = (vu)_mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64(odd, 32));
  hi = (vu)_mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
#elif defined(FASTOOD_CAP_AVX2)
  const __m256i vm = _mm256_set1_epi32(static_cast<int>(m));
  const __m256i even = _mm256_mul_epu32((__m256i)a, vm);
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64((__m256i)a, 32), vm);
  lo = (vu)_mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
  hi = (vu)_mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
#elif defined(__SSE2__)
  const __m128i vm = _mm_set1_epi32(static_cast<int>(m));
  const vu even = (vu)_mm_mul_epu32((__m128i)a, vm);
  const vu odd = (vu)_mm_mul_epu32(_mm_srli_epi64((__m128i)a, 32), vm);
  const vu low_half = (vu)_mm_set_epi32(0, -1, 0, -1);
  lo = (even & low_half) | (vu)_mm_slli_epi64((__m128i)odd, 32);
  hi = (vu)_mm_srli_epi64((__m128i)even, 32) | (odd & ~low_half);
#else
  for (int l = 0; l < W; ++l) {
    const uint64_t p = static_cast<uint64_t>(a[l]) * m;
    hi[l] = static_cast<uint32_t>(p >> 32);
    lo[l] = static_cast<uint32_t>(p);
  }
#endif
}

FASTOOD_INLINE vf vsqrt(vf x) {
#if defined(FASTOOD_CAP_AVX512)
  return (vf)_mm512_sqrt_ps((__m512)x);
#elif defined(FASTOOD_CAP_AVX2)
  return (vf)_mm256_sqrt_ps((__m256)x);
#elif defined(__SSE2__)
  return (vf)_mm_sqrt_ps((__m128)x);
#else
  for (int l = 0; l < W; ++l) x[l] = __builtin_sqrtf(x[l]);
  return x;
#endif
}

// (cos, sin) of 2 pi * turns, turns in [0, 1): sincos_turns in vectors.
FASTOOD_INLINE void vsincos_turns(vf turns, vf& c_out, vf& s_out) {
  const vf t = turns * 4.0f;
  const vi quadrant = __builtin_convertvector(t, vi);  // t >= 0: truncation is floor
  const vf a = (t - __builtin_convertvector(quadrant, vf)) * 1.57079632679489662f;
  const vf a2 = a * a;
  vf s = splat(-2.5052108e-8f);
  s = madd(s, a2, splat(2.7557319e-6f));
  s = madd(s, a2, splat(-1.9841270e-4f));
  s = madd(s, a2, splat(8.3333333e-3f));
  s = madd(s, a2, splat(-1.6666667e-1f));
  s = madd(s * a2, a, a);
  vf c = splat(2.0876757e-9f);
  c = madd(c, a2, splat(-2.7557319e-7f));
  c = madd(c, a2, splat(2.4801587e-5f));
  c = madd(c, a2, splat(-1.3888889e-3f));
  c = madd(c, a2, splat(4.1666667e-2f));
  c = madd(c, a2, splat(-0.5f));
  c = madd(c, a2, splat(1.0f));
  const vu swap = vu{} - ((vu)quadrant & 1u);
  const vu flip = ((vu)quadrant & 2u) << 30;
  const vu cb = (vu)c, sb = (vu)s;
  c_out = (vf)(((cb & ~swap) | ((sb ^ 0x80000000u) & swap)) ^ flip);
  s_out = (vf)(((sb & ~swap) | (cb & swap)) ^ flip);
}

FASTOOD_INLINE vf vuniform24(vu bits, int32_t plus) {
  return __builtin_convertvector((vi)(bits >> 8) + plus, vf) * (1.0f / 16777216.0f);
}

// z[lane * 64 + q] comes from Philox block chunk * 64 + q (four uniforms -> two Box-Muller pairs), W blocks at
// a time: the same normals as the scalar form above up to rounding.
void philox_normals(int64_t chunk, PhiloxKey key, float* z) {
  const uint64_t first = static_cast<uint64_t>(chunk) * kPhiloxBlocksPerChunk;
  // first is a multiple of 64 and q < 64: the low word never carries into the high one
  const vu hi_word = splat_u(static_cast<uint32_t>(first >> 32));
  for (int64_t q = 0; q < kPhiloxBlocksPerChunk; q += W) {
    vu c0 = splat_u(static_cast<uint32_t>(first + static_cast<uint64_t>(q))) + (vu)iota(), c1 = hi_word;
    vu c2 = splat_u(key.s0), c3 = splat_u(key.s1);
    uint32_t k0 = key.k0, k1 = key.k1;
    for (int round = 0; round < 10; ++round) {
      vu hi0, lo0, hi1, lo1;
      mulhilo(c0, 0xD2511F53u, hi0, lo0);
      mulhilo(c2, 0xCD9E8D57u, hi1, lo1);
      const vu n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
      c1 = lo1;
      c3 = lo0;
      c0 = n0;
      c2 = n2;
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    const vf r0 = vsqrt(-2.0f * vlog_positive(vuniform24(c0, 1)));
    const vf r1 = vsqrt(-2.0f * vlog_positive(vuniform24(c2, 1)));
    vf cos0, sin0, cos1, sin1;
    vsincos_turns(vuniform24(c1, 0), cos0, sin0);
    vsincos_turns(vuniform24(c3, 0), cos1, sin1);
    store_f32(z + q, r0 * cos0);
    store_f32(z + kPhiloxBlocksPerChunk + q, r0 * sin0);
    store_f32(z + 2 * kPhiloxBlocksPerChunk + q, r1 * cos1);
    store_f32(z + 3 * kPhiloxBlocksPerChunk + q, r1 * sin1);
  }
}

// ---- Peak probe ----

// One FMA on a chain that must stay in its register: the empty asm "uses" the value there, so the loop is neither
// folded away nor spilled to memory (an array of accumulators was kept on the stack: a load and a store per FMA).
#if defined(__x86_64__) || defined(__i386__)
#define FASTOOD_PROBE_FMA(a) \
  a = madd(a, mul, add);     \
  __asm__ volatile("" : "+v"(a))
#else
#define FASTOOD_PROBE_FMA(a) a = madd(a, mul, add)
#endif

double fma_probe(int64_t iterations, float* sink) {
  // 12 chains > FMA latency (4 cycles) x pipes (2): the pipes never wait on a result.
  vf a0 = splat(1.00f), a1 = splat(1.01f), a2 = splat(1.02f), a3 = splat(1.03f), a4 = splat(1.04f),
     a5 = splat(1.05f), a6 = splat(1.06f), a7 = splat(1.07f), a8 = splat(1.08f), a9 = splat(1.09f),
     a10 = splat(1.10f), a11 = splat(1.11f);
  const vf mul = splat(0.9999999f), add = splat(1e-7f);
  for (int64_t i = 0; i < iterations; ++i) {
    FASTOOD_PROBE_FMA(a0);
    FASTOOD_PROBE_FMA(a1);
    FASTOOD_PROBE_FMA(a2);
    FASTOOD_PROBE_FMA(a3);
    FASTOOD_PROBE_FMA(a4);
    FASTOOD_PROBE_FMA(a5);
    FASTOOD_PROBE_FMA(a6);
    FASTOOD_PROBE_FMA(a7);
    FASTOOD_PROBE_FMA(a8);
    FASTOOD_PROBE_FMA(a9);
    FASTOOD_PROBE_FMA(a10);
    FASTOOD_PROBE_FMA(a11);
  }
  *sink = hsum(((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7)) + ((a8 + a9) + (a10 + a11)));
  return static_cast<double>(iterations) * 12 * W * 2.0;
}
#undef FASTOOD_PROBE_FMA

#include "cpu/kernels/nullspace_impl.h"

}  // namespace

const KernelTable kTable = {
#if defined(FASTOOD_CAP_AVX512)
    "avx512",
#elif defined(FASTOOD_CAP_AVX2)
    "avx2",
#else
    "default",
#endif
    &modified_energy_rows, &softmax_entropy_forward_rows, &softmax_entropy_backward_rows,
    &langevin_run, &softmax_entropy_forward_grad_rows, &scale_rows, &fma_probe, &philox_normals,
    &nullspace_workspace_doubles, &nullspace_project_samples};

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace fastood
