// The batched null-space projection (cpu/nullspace_project.cpp holds the op; formulas and layout are described
// there), compiled per CPU capability: included by cpu/kernels/kernels_impl.h inside the capability's anonymous
// namespace. The vector width follows the capability's flags (__AVX512F__: 8 doubles, __AVX__: 4, else 2). Only
// builtins here, no standard-library templates (see kernels_impl.h).

FASTOOD_INLINE int64_t imin(int64_t x, int64_t y) { return x < y ? x : y; }
FASTOOD_INLINE int64_t imax(int64_t x, int64_t y) { return x > y ? x : y; }
template <typename T>
constexpr bool kIsDouble = false;
template <>
constexpr bool kIsDouble<double> = true;
template <typename T>
constexpr bool kIsFloat = false;
template <>
constexpr bool kIsFloat<float> = true;
constexpr int64_t kMaxLatent = 64;

constexpr double kRidge = 1e-10;                // relative ridge: delta = kRidge * trace(G) / d (+ floor)
constexpr double kRidgeFloor = 1e-290;          // keeps G + delta I positive definite when J == 0
constexpr int kRefinements = 2;
constexpr int64_t kTileDoubles = 131072;        // rows converted per tile: 1 MB of float64 (stays in L2 for pass 2)
// Outside these bounds (float64 inputs only) the sample is rescaled by powers of two before projecting.
constexpr double kTraceMin = 1e-200, kTraceMax = 1e200;

// Small SIMD layer: GCC/Clang vector types plus an explicit FMA (builds use ISO C++, where gcc does not contract
// a * b + c into an FMA on its own).
#if defined(__AVX512F__)
constexpr int kVec = 8;        // doubles per vector
constexpr int kRowBlock = 8;   // rows of G per register block
constexpr int kMaxGroup = 3;   // column vectors per register block: 8 x 3 accumulators + 3 loads of 32 registers
#elif defined(__AVX__)
constexpr int kVec = 4;
constexpr int kRowBlock = 4;
constexpr int kMaxGroup = 2;   // 4 x 2 accumulators + 2 loads of 16 registers
#else
constexpr int kVec = 2;
constexpr int kRowBlock = 4;
constexpr int kMaxGroup = 2;
#endif
typedef double vec_t __attribute__((vector_size(kVec * sizeof(double))));

inline vec_t load_vec(const double* p) {
  vec_t v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}
inline void store_vec(double* p, vec_t v) { __builtin_memcpy(p, &v, sizeof(v)); }
inline vec_t broadcast(double x) {
#if defined(__AVX512F__)
  return (vec_t)_mm512_set1_pd(x);
#elif defined(__AVX__)
  return (vec_t)_mm256_set1_pd(x);
#elif defined(__SSE2__)
  return (vec_t)_mm_set1_pd(x);  // in a register: filling the lanes through memory stalls store forwarding
#else
  return vec_t{} + x;
#endif
}
inline vec_t fmadd(vec_t a, vec_t b, vec_t c) {
#if defined(__AVX512F__)
  return (vec_t)_mm512_fmadd_pd((__m512d)a, (__m512d)b, (__m512d)c);
#elif defined(__FMA__)
  return (vec_t)_mm256_fmadd_pd((__m256d)a, (__m256d)b, (__m256d)c);
#else
  return a * b + c;
#endif
}
// Pairwise (tree) sum of the lanes: short dependency chains, so consecutive rows overlap.
inline double reduce_add(vec_t v) {
  double t[kVec];
  __builtin_memcpy(t, &v, sizeof(v));
  for (int half = kVec / 2; half >= 1; half /= 2)
    for (int l = 0; l < half; ++l) t[l] += t[l + half];
  return t[0];
}

// G[i0, i0 + kRowBlock) x [c0, c0 + NC kVec) += tile^T tile over `rows` rows; with kWithR also
// b[c0, c0 + NC kVec) += tile^T r.  tile: [rows, dp] float64, zero-padded beyond d.
template <int NC, bool kWithR>
void gram_block(const double* __restrict__ tile, const double* __restrict__ rt, int64_t rows, int64_t dp, int64_t i0,
                int64_t c0, double* __restrict__ gram, double* __restrict__ b) {
  vec_t acc[kRowBlock][NC], acc_r[NC];
  for (int c = 0; c < NC; ++c) {
    acc_r[c] = vec_t{};
    for (int i = 0; i < kRowBlock; ++i) acc[i][c] = vec_t{};
  }
  for (int64_t t = 0; t < rows; ++t) {
    const double* row = tile + t * dp;
    vec_t cols[NC];
    for (int c = 0; c < NC; ++c) cols[c] = load_vec(row + c0 + c * kVec);
    for (int i = 0; i < kRowBlock; ++i) {
      const vec_t bi = broadcast(row[i0 + i]);
      for (int c = 0; c < NC; ++c) acc[i][c] = fmadd(bi, cols[c], acc[i][c]);
    }
    if constexpr (kWithR) {
      const vec_t ri = broadcast(rt[t]);
      for (int c = 0; c < NC; ++c) acc_r[c] = fmadd(ri, cols[c], acc_r[c]);
    }
  }
  for (int i = 0; i < kRowBlock; ++i)
    for (int c = 0; c < NC; ++c) {
      double* g = gram + (i0 + i) * dp + c0 + c * kVec;
      store_vec(g, load_vec(g) + acc[i][c]);
    }
  if constexpr (kWithR)
    for (int c = 0; c < NC; ++c) store_vec(b + c0 + c * kVec, load_vec(b + c0 + c * kVec) + acc_r[c]);
}

template <bool kWithR>
void gram_block_any(int64_t nc, const double* tile, const double* rt, int64_t rows, int64_t dp, int64_t i0,
                    int64_t c0, double* gram, double* b) {
  if (nc >= 3 && kMaxGroup >= 3) gram_block<(kMaxGroup >= 3 ? 3 : 1), kWithR>(tile, rt, rows, dp, i0, c0, gram, b);
  else if (nc == 2) gram_block<2, kWithR>(tile, rt, rows, dp, i0, c0, gram, b);
  else gram_block<1, kWithR>(tile, rt, rows, dp, i0, c0, gram, b);
}

// All register blocks of G that hold an entry on or above the diagonal (and b along with block row 0), one tile.
void gram_tile(const double* tile, const double* rt, int64_t rows, int64_t dp, double* gram, double* b) {
  const int64_t vecs = dp / kVec;
  for (int64_t i0 = 0; i0 < dp; i0 += kRowBlock) {
    const bool with_r = i0 == 0;  // b needs every column vector once: ride along with the first block row
    const int64_t group = with_r ? 2 : kMaxGroup;
    for (int64_t c = i0 / kVec; c < vecs; c += group) {
      const int64_t nc = imin(group, vecs - c);
      if (with_r) gram_block_any<true>(nc, tile, rt, rows, dp, i0, c * kVec, gram, b);
      else gram_block_any<false>(nc, tile, rt, rows, dp, i0, c * kVec, gram, b);
    }
  }
}

// Rows [k0, k0 + rows) of J [D, d] as float64 [rows, dp] (columns >= d zero) and r[k0 ...] as float64. Returns
// the tile: J itself when it is float64 with d == dp, else `buf`.
template <typename in_t>
const double* load_tile(const in_t* __restrict__ jac, const in_t* __restrict__ r, int64_t k0, int64_t rows,
                        int64_t d, int64_t dp, double* __restrict__ buf, double* __restrict__ rt) {
#pragma omp simd
  for (int64_t t = 0; t < rows; ++t) rt[t] = static_cast<double>(r[k0 + t]);
  const in_t* src = jac + k0 * d;
  if (d == dp) {
    if constexpr (kIsDouble<in_t>) return src;
#pragma omp simd
    for (int64_t k = 0; k < rows * d; ++k) buf[k] = static_cast<double>(src[k]);
    return buf;
  }
  for (int64_t t = 0; t < rows; ++t) {
#pragma omp simd
    for (int64_t i = 0; i < d; ++i) buf[t * dp + i] = static_cast<double>(src[t * d + i]);
  }
  return buf;
}

// Lane sums of kVec vectors: result[l] = sum of the lanes of s[l] (a transposing tree of shuffles and adds).
inline vec_t reduce_rows(const vec_t* s) {
#if defined(__AVX512F__)
  __m512d u[4];
  for (int q = 0; q < 4; ++q) {
    const __m512d a = (__m512d)s[2 * q], b = (__m512d)s[2 * q + 1];
    u[q] = _mm512_add_pd(_mm512_unpacklo_pd(a, b), _mm512_unpackhi_pd(a, b));  // pairs of lanes of a, b
  }
  __m512d w[2];
  for (int q = 0; q < 2; ++q)  // 128-bit lanes 0+1 and 2+3
    w[q] = _mm512_add_pd(_mm512_shuffle_f64x2(u[2 * q], u[2 * q + 1], 0x88),
                         _mm512_shuffle_f64x2(u[2 * q], u[2 * q + 1], 0xDD));
  return (vec_t)_mm512_add_pd(_mm512_shuffle_f64x2(w[0], w[1], 0x88), _mm512_shuffle_f64x2(w[0], w[1], 0xDD));
#elif defined(__AVX__)
  const __m256d u0 = _mm256_hadd_pd((__m256d)s[0], (__m256d)s[1]);
  const __m256d u1 = _mm256_hadd_pd((__m256d)s[2], (__m256d)s[3]);
  return (vec_t)_mm256_add_pd(_mm256_permute2f128_pd(u0, u1, 0x20), _mm256_permute2f128_pd(u0, u1, 0x31));
#else
  vec_t out;
  for (int l = 0; l < kVec; ++l) out[l] = reduce_add(s[l]);
  return out;
#endif
}

// p[t] = rt[t] - tile[t, :] . a over the padded width NV kVec, kVec rows at a time; returns sum of p^2 (all in
// float64).
template <int NV, typename out_t>
double residual_tile(const double* __restrict__ tile, const double* __restrict__ rt, int64_t rows, int64_t dp,
                     const double* __restrict__ a, out_t* __restrict__ out) {
  vec_t coef[NV];
  for (int c = 0; c < NV; ++c) coef[c] = load_vec(a + c * kVec);
  auto row_dot = [&](int64_t t) {
    const double* row = tile + t * dp;
    vec_t s = load_vec(row) * coef[0];
    for (int c = 1; c < NV; ++c) s = fmadd(load_vec(row + c * kVec), coef[c], s);
    return s;
  };
  vec_t sumsq = vec_t{};
  int64_t t = 0;
  for (; t + kVec <= rows; t += kVec) {
    vec_t s[kVec];
    for (int l = 0; l < kVec; ++l) s[l] = row_dot(t + l);
    const vec_t p = load_vec(rt + t) - reduce_rows(s);
    sumsq = fmadd(p, p, sumsq);
    for (int l = 0; l < kVec; ++l) out[t + l] = static_cast<out_t>(p[l]);
  }
  double total = reduce_add(sumsq);
  for (; t < rows; ++t) {
    const double p = rt[t] - reduce_add(row_dot(t));
    total += p * p;
    out[t] = static_cast<out_t>(p);
  }
  return total;
}

template <int NV = 1, typename out_t>
double residual_tile_any(int64_t nv, const double* tile, const double* rt, int64_t rows, int64_t dp,
                         const double* a, out_t* out) {
  if constexpr (NV * kVec >= kMaxLatent) {
    return residual_tile<NV>(tile, rt, rows, dp, a, out);
  } else {
    if (nv <= NV) return residual_tile<NV>(tile, rt, rows, dp, a, out);
    return residual_tile_any<NV + 1>(nv, tile, rt, rows, dp, a, out);
  }
}

// In-place Cholesky of the d x d SPD matrix a (row stride ld, lower triangle); false if a pivot is not positive.
bool cholesky(double* a, int64_t d, int64_t ld) {
  for (int64_t j = 0; j < d; ++j) {
    double diag = a[j * ld + j];
    for (int64_t k = 0; k < j; ++k) diag -= a[j * ld + k] * a[j * ld + k];
    if (!(diag > 0) || !__builtin_isfinite(diag)) return false;
    diag = __builtin_sqrt(diag);
    a[j * ld + j] = diag;
    for (int64_t i = j + 1; i < d; ++i) {
      double s = a[i * ld + j];
      for (int64_t k = 0; k < j; ++k) s -= a[i * ld + k] * a[j * ld + k];
      a[i * ld + j] = s / diag;
    }
  }
  return true;
}

// Solves L L^T x = x in place (L: lower triangle of l, row stride ld).
void cholesky_solve(const double* l, int64_t d, int64_t ld, double* x) {
  for (int64_t i = 0; i < d; ++i) {
    double s = x[i];
    for (int64_t k = 0; k < i; ++k) s -= l[i * ld + k] * x[k];
    x[i] = s / l[i * ld + i];
  }
  for (int64_t i = d - 1; i >= 0; --i) {
    double s = x[i];
    for (int64_t k = i + 1; k < d; ++k) s -= l[k * ld + i] * x[k];
    x[i] = s / l[i * ld + i];
  }
}

// Per-thread buffers, carved from one zeroed block of nullspace_workspace_doubles(d, dim) doubles (the tile's
// padding columns must stay zero).
FASTOOD_INLINE int64_t padded_latent(int64_t d) { return (d + kRowBlock - 1) / kRowBlock * kRowBlock; }
FASTOOD_INLINE int64_t tile_rows_for(int64_t d, int64_t dim) {
  return imin(dim, imax(64, kTileDoubles / padded_latent(d)));
}

struct Workspace {
  int64_t dp, tile_rows;
  double *tile, *rt, *gram, *chol, *b, *a, *res, *scaled_jac, *scaled_r;
  Workspace(int64_t d, int64_t dim, double* w) : dp(padded_latent(d)), tile_rows(tile_rows_for(d, dim)) {
    tile = w;
    rt = tile + tile_rows * dp;
    gram = rt + tile_rows;
    chol = gram + dp * dp;
    b = chol + dp * dp;
    a = b + dp;
    res = a + dp;
    scaled_jac = res + dp;
    scaled_r = scaled_jac + dim * d;
  }
};

int64_t nullspace_workspace_doubles(int64_t d, int64_t dim) {
  const int64_t dp = padded_latent(d), tile_rows = tile_rows_for(d, dim);
  return tile_rows * dp + tile_rows + 2 * dp * dp + 3 * dp + dim * d + dim;
}

enum class Outcome { kDone, kRescale, kNotFinite };

// Whether a sum of squares (trace(G) or |p|^2) asks for rescaling: outside [lo, hi] (0 allowed on the final,
// rescaled attempt only), or not finite.
Outcome check_range(double sumsq, bool final_attempt, double lo = kTraceMin, double hi = kTraceMax) {
  if (!__builtin_isfinite(sumsq)) return final_attempt ? Outcome::kNotFinite : Outcome::kRescale;
  if (final_attempt) return Outcome::kDone;
  return sumsq > hi || sumsq < lo ? Outcome::kRescale : Outcome::kDone;
}

// Range of |p|^2 within which p, stored in out_t before it is normalized, keeps its precision: for float32,
// |p| in [1e-30, 1e30] (a tiny float32 r, e.g. 1e-40, would otherwise leave p subnormal; its norm's reciprocal
// overflowed float and gave Inf/NaN).
template <typename out_t>
constexpr double kResidualMin = kIsFloat<out_t> ? 1e-60 : kTraceMin;
template <typename out_t>
constexpr double kResidualMax = kIsFloat<out_t> ? 1e60 : kTraceMax;

// Coefficients a of r on the columns of J from the Gram matrix (ws.gram, full symmetric) and ws.b.
bool solve_coefficients(Workspace& ws, int64_t d) {
  const int64_t dp = ws.dp;
  double trace = 0;
  for (int64_t i = 0; i < d; ++i) trace += ws.gram[i * dp + i];
  double delta = kRidge * trace / static_cast<double>(d) + kRidgeFloor;
  for (int attempt = 0; attempt < 4; ++attempt, delta *= 1e3) {  // retries only if rounding breaks definiteness
    for (int64_t k = 0; k < dp * dp; ++k) ws.chol[k] = ws.gram[k];
    for (int64_t i = 0; i < d; ++i) ws.chol[i * dp + i] += delta;
    if (!cholesky(ws.chol, d, dp)) continue;
    for (int64_t k = 0; k < dp; ++k) ws.a[k] = k < d ? ws.b[k] : 0.0;
    cholesky_solve(ws.chol, d, dp, ws.a);
    for (int it = 0; it < kRefinements; ++it) {
      for (int64_t i = 0; i < d; ++i) {
        double s = ws.b[i];
        for (int64_t j = 0; j < d; ++j) s -= ws.gram[i * dp + j] * ws.a[j];
        ws.res[i] = s;
      }
      cholesky_solve(ws.chol, d, dp, ws.res);
      for (int64_t i = 0; i < d; ++i) ws.a[i] += ws.res[i];
    }
    return true;
  }
  return false;
}

// One sample: out = P r / |P r|. Returns kRescale when trace(G) or |p|^2 left the safe float64 range (on the
// first attempt), kNotFinite when they are NaN/Inf on the final attempt.
template <typename in_t, typename out_t>
Outcome project_sample(const in_t* jac, const in_t* r, out_t* out, int64_t dim, int64_t d, Workspace& ws,
                       bool final_attempt) {
  const int64_t dp = ws.dp, vecs = dp / kVec, tile_rows = ws.tile_rows;
  for (int64_t k = 0; k < dp * dp; ++k) ws.gram[k] = 0.0;
  for (int64_t k = 0; k < dp; ++k) ws.b[k] = 0.0;
  const double* tile = nullptr;
  for (int64_t k0 = 0; k0 < dim; k0 += tile_rows) {
    const int64_t rows = imin(tile_rows, dim - k0);
    tile = load_tile(jac, r, k0, rows, d, dp, ws.tile, ws.rt);
    gram_tile(tile, ws.rt, rows, dp, ws.gram, ws.b);
  }
  double trace = 0;
  for (int64_t i = 0; i < d; ++i) trace += ws.gram[i * dp + i];
  if (Outcome o = check_range(trace, final_attempt); o != Outcome::kDone) return o;
  for (int64_t i = 0; i < d; ++i)  // mirror the upper triangle
    for (int64_t j = i + 1; j < d; ++j) ws.gram[j * dp + i] = ws.gram[i * dp + j];
  if (!solve_coefficients(ws, d)) return final_attempt ? Outcome::kNotFinite : Outcome::kRescale;
  double sumsq = 0;
  for (int64_t k0 = 0; k0 < dim; k0 += tile_rows) {
    const int64_t rows = imin(tile_rows, dim - k0);
    if (dim > tile_rows) tile = load_tile(jac, r, k0, rows, d, dp, ws.tile, ws.rt);  // else loaded
    sumsq += residual_tile_any(vecs, tile, ws.rt, rows, dp, ws.a, out + k0);
  }
  if (Outcome o = check_range(sumsq, final_attempt, kResidualMin<out_t>, kResidualMax<out_t>); o != Outcome::kDone)
    return o;
  const double norm = __builtin_sqrt(sumsq);
  const double inv = norm > 0 ? 1.0 / norm : 0.0;  // in float64: 1 / |p| may exceed the float32 range
#pragma omp simd
  for (int64_t k = 0; k < dim; ++k) out[k] = static_cast<out_t>(static_cast<double>(out[k]) * inv);
  return Outcome::kDone;
}

// Exponent e with 2^e * max|x| in [1, 2) (0 for an all-zero x); false if x holds NaN or Inf. Callers scale with
// ldexp(x, e) and never form 2^e itself: for a subnormal max|x| (e > 1023) 2^e overflows double.
template <typename in_t>
bool power_of_two_exponent(const in_t* x, int64_t n, int* exponent) {
  double mx = 0;
  for (int64_t k = 0; k < n; ++k) {
    const double v = __builtin_fabs(static_cast<double>(x[k]));
    if (!__builtin_isfinite(v)) return false;
    mx = v > mx ? v : mx;
  }
  *exponent = mx > 0 ? -__builtin_ilogb(mx) : 0;
  return true;
}

template <typename scalar_t>
void project_or_rescale(const scalar_t* jac, const scalar_t* r, scalar_t* out, int64_t dim, int64_t d,
                        Workspace& ws) {
  if (project_sample(jac, r, out, dim, d, ws, /*final_attempt=*/false) == Outcome::kDone) return;
  int ej = 0, er = 0;
  Outcome outcome = Outcome::kNotFinite;
  if (power_of_two_exponent(jac, dim * d, &ej) && power_of_two_exponent(r, dim, &er)) {
    for (int64_t k = 0; k < dim * d; ++k) ws.scaled_jac[k] = __builtin_ldexp(static_cast<double>(jac[k]), ej);
    for (int64_t k = 0; k < dim; ++k) ws.scaled_r[k] = __builtin_ldexp(static_cast<double>(r[k]), er);
    outcome = project_sample(ws.scaled_jac, ws.scaled_r, out, dim, d, ws, /*final_attempt=*/true);
  }
  if (outcome != Outcome::kDone)  // NaN/Inf in the sample's inputs
    for (int64_t k = 0; k < dim; ++k) out[k] = static_cast<scalar_t>(__builtin_nan(""));
}


void nullspace_project_samples(bool is_double, const void* jac, const void* r, void* out, int64_t begin, int64_t end,
                               int64_t dim, int64_t d, double* work) {
  Workspace ws(d, dim, work);
  if (is_double) {
    const double *j = static_cast<const double*>(jac), *rr = static_cast<const double*>(r);
    double* o = static_cast<double*>(out);
    for (int64_t s = begin; s < end; ++s) project_or_rescale(j + s * dim * d, rr + s * dim, o + s * dim, dim, d, ws);
  } else {
    const float *j = static_cast<const float*>(jac), *rr = static_cast<const float*>(r);
    float* o = static_cast<float*>(out);
    for (int64_t s = begin; s < end; ++s) project_or_rescale(j + s * dim * d, rr + s * dim, o + s * dim, dim, d, ws);
  }
}
