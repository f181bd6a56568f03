// Batched projection onto the left null space of J (Vernekar et al. 2019, type-I outliers), on CPU.
// Per sample (J transposed once so every loop runs over D): G = J^T J, a = (G + delta I)^-1 J^T r by Cholesky, p = r - J a, one refinement step
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

constexpr int64_t kBlasGramMinLatent = 16;

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

template <typename scalar_t>
inline scalar_t dot(const scalar_t* a, const scalar_t* b, int64_t n) {
  scalar_t s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t k = 0; k < n; ++k) s += a[k] * b[k];
  return s;
}

// One sample. cols = J^T laid out column by column ([d][D], contiguous), so every loop runs over D.
template <typename scalar_t>
void project_sample(const scalar_t* jac, const scalar_t* r, scalar_t* out, int64_t D, int64_t d,
                    const scalar_t* gram, std::vector<scalar_t>& cols) {
  cols.resize(static_cast<size_t>(D * d));
  for (int64_t i = 0; i < d; ++i) {  // sequential writes; the strided reads stay within the sample (cache-resident)
    scalar_t* col = cols.data() + i * D;
    for (int64_t k = 0; k < D; ++k) col[k] = jac[k * d + i];
  }
  double chol[kMaxLatent * kMaxLatent];
  double trace = 0;
  for (int64_t i = 0; i < d; ++i) {
    for (int64_t j = 0; j <= i; ++j) {
      const double g = static_cast<double>(gram ? gram[i * d + j] : dot(cols.data() + i * D, cols.data() + j * D, D));
      chol[i * d + j] = chol[j * d + i] = g;
    }
    trace += chol[i * d + i];
  }
  const double delta = ridge_factor<scalar_t>() * trace / d + std::numeric_limits<double>::min() * 1e6;
  for (int64_t i = 0; i < d; ++i) chol[i * d + i] += delta;
  if (!cholesky(chol, d)) {
    // Only reachable with NaN/Inf in J: propagate NaN rather than return a plausible vector.
    for (int64_t k = 0; k < D; ++k) out[k] = std::numeric_limits<scalar_t>::quiet_NaN();
    return;
  }
  for (int64_t k = 0; k < D; ++k) out[k] = r[k];
  double a[kMaxLatent];
  for (int pass = 0; pass < 2; ++pass) {  // projection + one refinement step
    for (int64_t i = 0; i < d; ++i) a[i] = static_cast<double>(dot(cols.data() + i * D, out, D));
    cholesky_solve(chol, a, d);
    for (int64_t i = 0; i < d; ++i) {
      const scalar_t ai = static_cast<scalar_t>(a[i]);
      const scalar_t* col = cols.data() + i * D;
#pragma omp simd
      for (int64_t k = 0; k < D; ++k) out[k] -= ai * col[k];
    }
  }
  const double norm = std::sqrt(static_cast<double>(dot(out, out, D)));
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
  // For wide Jacobians the Gram matrices are a batched GEMM: BLAS reuses registers far better than dots.
  at::Tensor gram;
  if (d >= kBlasGramMinLatent) gram = at::bmm(jac.transpose(1, 2), jac).contiguous();
  AT_DISPATCH_FLOATING_TYPES(jac.scalar_type(), "nullspace_project", [&] {
    const scalar_t* j = jac.data_ptr<scalar_t>();
    const scalar_t* rp = r.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> cols;
      for (int64_t b = begin; b < end; ++b) {
        const scalar_t* g = gram.defined() ? gram.data_ptr<scalar_t>() + b * d * d : nullptr;
        project_sample(j + b * D * d, rp + b * D, op + b * D, D, d, g, cols);
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastood, CPU, m) { m.impl("nullspace_project", &nullspace_project_kernel); }

}  // namespace fastood
