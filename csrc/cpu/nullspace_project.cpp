// Batched projection onto the left null space of J (Vernekar et al. 2019, type-I outliers), on CPU.
// Per sample: G = J^T J, a = (G + delta I)^-1 J^T r by Cholesky, p = r - J a, one refinement step
// (a' = (G + delta I)^-1 J^T p, p -= J a'), v = p / |p|. The ridge delta = kRidge * trace(G) / d
// (+ a tiny floor) keeps rank-deficient or ill-conditioned J finite: directions of J whose squared
// singular values are far below delta are not projected out. |p| = 0 gives v = 0.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <vector>

#include "checks.h"

namespace fastood {
namespace {

template <typename scalar_t>
constexpr double ridge_factor() {
  return std::is_same<scalar_t, double>::value ? 1e-12 : 1e-6;
}

// In-place Cholesky of a d x d SPD matrix (lower triangle); returns false if a pivot is not positive.
inline bool cholesky(double* a, int64_t d) {
  for (int64_t j = 0; j < d; ++j) {
    double diag = a[j * d + j];
    for (int64_t k = 0; k < j; ++k) diag -= a[j * d + k] * a[j * d + k];
    if (!(diag > 0)) return false;
    diag = std::sqrt(diag);
    a[j * d + j] = diag;
    for (int64_t i = j + 1; i < d; ++i) {
      double s = a[i * d + j];
      for (int64_t k = 0; k < j; ++k) s -= a[i * d + k] * a[j * d + k];
      a[i * d + j] = s / diag;
    }
  }
  return true;
}

// Solves L L^T x = b in place.
inline void cholesky_solve(const double* l, double* b, int64_t d) {
  for (int64_t i = 0; i < d; ++i) {
    double s = b[i];
    for (int64_t k = 0; k < i; ++k) s -= l[i * d + k] * b[k];
    b[i] = s / l[i * d + i];
  }
  for (int64_t i = d - 1; i >= 0; --i) {
    double s = b[i];
    for (int64_t k = i + 1; k < d; ++k) s -= l[k * d + i] * b[k];
    b[i] = s / l[i * d + i];
  }
}

// rhs = J^T v (rows of J are contiguous: J[k, :] = jac + k * d).
template <typename scalar_t>
inline void jt_times(const scalar_t* jac, const scalar_t* v, int64_t D, int64_t d, double* rhs) {
  scalar_t acc[kMaxLatent] = {};
  for (int64_t k = 0; k < D; ++k) {
    const scalar_t vk = v[k];
    const scalar_t* row = jac + k * d;
#pragma omp simd
    for (int64_t i = 0; i < d; ++i) acc[i] += row[i] * vk;
  }
  for (int64_t i = 0; i < d; ++i) rhs[i] = static_cast<double>(acc[i]);
}

// p -= J a.
template <typename scalar_t>
inline void subtract_j_times(const scalar_t* jac, const double* a, int64_t D, int64_t d, scalar_t* p) {
  scalar_t af[kMaxLatent];
  for (int64_t i = 0; i < d; ++i) af[i] = static_cast<scalar_t>(a[i]);
  for (int64_t k = 0; k < D; ++k) {
    const scalar_t* row = jac + k * d;
    scalar_t s = 0;
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < d; ++i) s += row[i] * af[i];
    p[k] -= s;
  }
}

template <typename scalar_t>
void project_sample(const scalar_t* jac, const scalar_t* r, scalar_t* out, int64_t D, int64_t d) {
  // Gram matrix, accumulated in the input precision (vectorized over columns), solved in float64.
  std::vector<scalar_t> gram(d * d, scalar_t(0));
  for (int64_t k = 0; k < D; ++k) {
    const scalar_t* row = jac + k * d;
    for (int64_t i = 0; i < d; ++i) {
      const scalar_t ji = row[i];
      scalar_t* gi = gram.data() + i * d;
#pragma omp simd
      for (int64_t j = 0; j < d; ++j) gi[j] += ji * row[j];
    }
  }
  double chol[kMaxLatent * kMaxLatent];
  double trace = 0;
  for (int64_t i = 0; i < d * d; ++i) chol[i] = static_cast<double>(gram[i]);
  for (int64_t i = 0; i < d; ++i) trace += chol[i * d + i];
  const double delta = ridge_factor<scalar_t>() * trace / d + std::numeric_limits<double>::min() * 1e6;
  for (int64_t i = 0; i < d; ++i) chol[i * d + i] += delta;
  const bool ok = cholesky(chol, d);
  for (int64_t k = 0; k < D; ++k) out[k] = r[k];
  if (ok) {
    double a[kMaxLatent];
    for (int pass = 0; pass < 2; ++pass) {  // projection + one refinement step
      jt_times(jac, out, D, d, a);
      cholesky_solve(chol, a, d);
      subtract_j_times(jac, a, D, d, out);
    }
  } else {
    // Only reachable with NaN/Inf in J: propagate NaN rather than return a plausible vector.
    for (int64_t k = 0; k < D; ++k) out[k] = std::numeric_limits<scalar_t>::quiet_NaN();
    return;
  }
  double norm2 = 0;
  for (int64_t k = 0; k < D; ++k) norm2 += static_cast<double>(out[k]) * static_cast<double>(out[k]);
  const double norm = std::sqrt(norm2);
  const scalar_t inv = norm > 0 ? static_cast<scalar_t>(1.0 / norm) : scalar_t(0);
#pragma omp simd
  for (int64_t k = 0; k < D; ++k) out[k] *= inv;
}

at::Tensor nullspace_project_kernel(const at::Tensor& jac_in, const at::Tensor& r_in) {
  check_nullspace(jac_in, r_in, kMaxLatent);
  auto jac = jac_in.contiguous();
  auto r = r_in.contiguous();
  auto out = at::empty_like(r);
  const int64_t B = jac.size(0), D = jac.size(1), d = jac.size(2);
  if (B == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(jac.scalar_type(), "nullspace_project", [&] {
    const scalar_t* j = jac.data_ptr<scalar_t>();
    const scalar_t* rp = r.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) project_sample(j + b * D * d, rp + b * D, op + b * D, D, d);
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastood, CPU, m) { m.impl("nullspace_project", &nullspace_project_kernel); }

}  // namespace fastood
