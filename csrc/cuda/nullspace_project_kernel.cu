// Batched null-space projection on CUDA, one thread block per sample; the same algorithm and constants as the
// CPU kernel (csrc/cpu/nullspace_project.cpp):
//   G = J^T J, b = J^T r in float64 (rows of [J r] staged through shared memory; each thread owns one register
//   block of kBlock x kBlock entries of the upper triangle of [J r]^T [J r], so a row costs it 2 kBlock shared
//   loads for kBlock^2 FMAs; when there are fewer blocks than threads, groups of threads split the rows);
//   delta = kRidge trace(G)/d + kRidgeFloor; Cholesky of G + delta I and the triangular solves by warp 0, with
//   kRefinements refinements a += (G + delta I)^-1 (b - G a); p = r - J a (float64); v = p / |p| (|p| = 0 -> 0).
// A sample whose trace(G) or |p|^2 leaves [1e-200, 1e200] is redone with J and r scaled by powers of two; NaN or
// Inf in a sample's inputs gives a NaN row. Shared memory: 32.5 KB tile / Gram matrix + 2 KB vectors.
#include <cmath>
#include <cstdint>

#include "cuda/device_math.cuh"
#include "cuda/nullspace_project_kernel.h"

namespace fastood {
namespace cuda {
namespace {

constexpr int kLatentMax = 64;
constexpr int kSmemDoubles = kLatentMax * (kLatentMax + 1);  // d rows of stride d + 1
constexpr int kBlock = 4;  // register block of the Gram phase: kBlock x kBlock entries per thread
constexpr int kMaxBlocksPerSide = (kLatentMax + 1 + kBlock - 1) / kBlock;
static_assert(kMaxBlocksPerSide * (kMaxBlocksPerSide + 1) / 2 <= kThreads, "one register block per thread");
static_assert(kThreads * kBlock * kBlock <= kSmemDoubles, "the slices' partial sums fit in shared memory");
constexpr double kRidge = 1e-10;
constexpr double kRidgeFloor = 1e-290;
constexpr int kRefinements = 2;
constexpr double kSumMin = 1e-200, kSumMax = 1e200;
enum Status { kOk = 0, kRescale = 1, kNotFinite = 2 };

__device__ __forceinline__ double block_reduce(double v, double* scratch, bool take_max) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    const double o = __shfl_xor_sync(0xffffffffu, v, offset);
    v = take_max ? fmax(v, o) : v + o;
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x / 32;
  __syncthreads();  // scratch is free
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  double total = scratch[0];
  for (int w = 1; w < kWarpsPerBlock; ++w) total = take_max ? fmax(total, scratch[w]) : total + scratch[w];
  return total;  // identical in every thread
}

// Warp 0: Cholesky of G + delta I. G: upper triangle of g (row stride ld = d + 1: the lanes of a warp that walk a
// column hit 32 different banks, where a stride of d = 16, 32 or 64 would put them all in one) and gdiag; L is
// written to the lower triangle and the diagonal of g, so a failed attempt can be retried with a larger delta.
__device__ bool warp_cholesky(double* g, const double* gdiag, int d, int ld, double delta, int lane) {
  for (int j = 0; j < d; ++j) {
    double s = 0;
    for (int k = lane; k < j; k += 32) s += g[j * ld + k] * g[j * ld + k];
    s = warp_sum(s);  // butterfly: the same value in every lane
    const double diag = gdiag[j] + delta - s;
    if (!(diag > 0) || !isfinite(diag)) return false;
    const double ljj = sqrt(diag);
    for (int i = j + 1 + lane; i < d; i += 32) {
      double v = g[j * ld + i];  // G_ij from the upper triangle
      for (int k = 0; k < j; ++k) v -= g[i * ld + k] * g[j * ld + k];
      g[i * ld + j] = v / ljj;
    }
    if (lane == 0) g[j * ld + j] = ljj;
    __syncwarp();
  }
  return true;
}

// Warp 0: x <- (L L^T)^-1 x, L in the lower triangle of g (row stride ld).
__device__ void warp_cholesky_solve(const double* g, int d, int ld, double* x, int lane) {
  for (int i = 0; i < d; ++i) {
    const double xi = x[i] / g[i * ld + i];
    __syncwarp();
    if (lane == 0) x[i] = xi;
    for (int k = i + 1 + lane; k < d; k += 32) x[k] -= g[k * ld + i] * xi;
    __syncwarp();
  }
  for (int i = d - 1; i >= 0; --i) {
    const double xi = x[i] / g[i * ld + i];
    __syncwarp();
    if (lane == 0) x[i] = xi;
    for (int k = lane; k < i; k += 32) x[k] -= g[i * ld + k] * xi;
    __syncwarp();
  }
}

// 2^-ilogb(m), which brings m into [1, 2); for a subnormal m (ilogb < -1023, where 2^-ilogb(m) overflows) the
// largest finite power of two, 2^1023, which brings m into [2^-52, 1) -- still far inside the safe range.
__device__ __forceinline__ double power_of_two_scale(double m) {
  if (!(m > 0)) return 1.0;
  const int e = -ilogb(m);
  return ldexp(1.0, e < 1023 ? e : 1023);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) nullspace_project_kernel(const T* __restrict__ jac_all,
                                                                     const T* __restrict__ r_all,
                                                                     T* __restrict__ out_all, int64_t dim, int d) {
  __shared__ double smem[kSmemDoubles];  // tile of [J r] rows, then G / L; row stride d + 1 for both
  __shared__ double gdiag[kLatentMax], rhs[kLatentMax], coef[kLatentMax], work[kLatentMax];
  __shared__ double scratch[kWarpsPerBlock];
  __shared__ int status;
  const T* jac = jac_all + static_cast<int64_t>(blockIdx.x) * dim * d;
  const T* r = r_all + static_cast<int64_t>(blockIdx.x) * dim;
  T* out = out_all + static_cast<int64_t>(blockIdx.x) * dim;
  const int ld = d + 1, lane = threadIdx.x & 31;

  // This thread's register block (bi, bj), bi <= bj, of [J r]^T [J r] over the columns of [J r] padded with
  // zeros to nb * kBlock (column d is r: b_i = J_i . r); blocks numbered row by row, block row bi starting at
  // bi nb - bi (bi - 1) / 2. With fewer blocks than threads the threads form `slices` groups that take every
  // slices-th row of a tile each, instead of leaving most threads idle; the groups' partial sums are added at
  // the end (in a fixed order: deterministic). Entries of a block outside i <= j <= d, i < d are computed on the
  // zero padding (or the lower triangle) and dropped.
  const int nb = (d + 1 + kBlock - 1) / kBlock, cols = nb * kBlock;
  const int blocks = nb * (nb + 1) / 2;
  const int slices = kThreads / blocks;  // >= 1 (static_assert above)
  const int slice = static_cast<int>(threadIdx.x) / blocks;
  const int block = static_cast<int>(threadIdx.x) % blocks;
  const bool owns_block = slice < slices;
  int bi = 0;
  while ((bi + 1) * nb - (bi + 1) * bi / 2 <= block) ++bi;  // at most kMaxBlocksPerSide steps
  const int i0 = bi * kBlock, j0 = (block - (bi * nb - bi * (bi - 1) / 2) + bi) * kBlock;

  double sj = 1.0, sr = 1.0;
  for (int attempt = 0; attempt < 2; ++attempt) {
    const bool final_attempt = attempt == 1;
    // Phase 1: Gram matrix and J^T r, tile by tile (tile rows of stride `cols`: [J r] and its zero padding).
    double acc[kBlock][kBlock];
#pragma unroll
    for (int u = 0; u < kBlock; ++u)
#pragma unroll
      for (int v = 0; v < kBlock; ++v) acc[u][v] = 0;
    const int64_t tile_rows = kSmemDoubles / cols;
    for (int64_t k0 = 0; k0 < dim; k0 += tile_rows) {
      const int rows = static_cast<int>(dim - k0 < tile_rows ? dim - k0 : tile_rows);
      __syncthreads();  // the previous tile (or the previous attempt's G) is no longer read
      const T* src = jac + k0 * d;
      for (int idx = threadIdx.x; idx < rows * d; idx += kThreads) {  // coalesced: rows are contiguous
        const int t = idx / d;
        smem[t * cols + (idx - t * d)] = sj * static_cast<double>(src[idx]);
      }
      const int tail = cols - d;  // column d (r) and the zero padding after it
      for (int idx = threadIdx.x; idx < rows * tail; idx += kThreads) {
        const int t = idx / tail, c = idx - t * tail;
        smem[t * cols + d + c] = c == 0 ? sr * static_cast<double>(r[k0 + t]) : 0.0;
      }
      __syncthreads();
      if (owns_block) {
        for (int t = slice; t < rows; t += slices) {
          const double* row = smem + t * cols;
          double a[kBlock], b[kBlock];
#pragma unroll
          for (int u = 0; u < kBlock; ++u) {
            a[u] = row[i0 + u];
            b[u] = row[j0 + u];
          }
#pragma unroll
          for (int u = 0; u < kBlock; ++u)
#pragma unroll
            for (int v = 0; v < kBlock; ++v) acc[u][v] = fma(a[u], b[v], acc[u][v]);
        }
      }
    }
    __syncthreads();
    if (slices > 1) {  // add the slices' partial sums into slice 0
      double* partial = smem + (slice * blocks + block) * kBlock * kBlock;
      if (owns_block)
#pragma unroll
        for (int u = 0; u < kBlock; ++u)
#pragma unroll
          for (int v = 0; v < kBlock; ++v) partial[u * kBlock + v] = acc[u][v];
      __syncthreads();
      if (slice == 0)
        for (int s = 1; s < slices; ++s) {
          const double* other = smem + (s * blocks + block) * kBlock * kBlock;
#pragma unroll
          for (int u = 0; u < kBlock; ++u)
#pragma unroll
            for (int v = 0; v < kBlock; ++v) acc[u][v] += other[u * kBlock + v];
        }
      __syncthreads();  // smem is overwritten with G below
    }
    if (slice == 0) {
#pragma unroll
      for (int u = 0; u < kBlock; ++u)
#pragma unroll
        for (int v = 0; v < kBlock; ++v) {
          const int i = i0 + u, j = j0 + v;
          if (i > j || i >= d || j > d) continue;
          if (j == d) rhs[i] = acc[u][v];
          else smem[i * ld + j] = acc[u][v];  // upper triangle and diagonal of G
        }
    }
    __syncthreads();

    // Phase 2 (warp 0): ridge, Cholesky, solve, refinements -> coef.
    if (threadIdx.x < 32) {
      double trace = 0;
      for (int i = lane; i < d; i += 32) trace += smem[i * ld + i];
      trace = warp_sum(trace);
      int st = kOk;
      if (!isfinite(trace)) st = final_attempt ? kNotFinite : kRescale;
      else if (!final_attempt && (trace > kSumMax || trace < kSumMin)) st = kRescale;
      if (st == kOk) {
        for (int i = lane; i < d; i += 32) gdiag[i] = smem[i * ld + i];
        __syncwarp();
        double delta = kRidge * trace / d + kRidgeFloor;
        bool ok = false;
        for (int retry = 0; retry < 4 && !ok; ++retry, delta *= 1e3)  // retries only if rounding breaks definiteness
          ok = warp_cholesky(smem, gdiag, d, ld, delta, lane);
        if (!ok) {
          st = final_attempt ? kNotFinite : kRescale;
        } else {
          for (int i = lane; i < d; i += 32) coef[i] = rhs[i];
          __syncwarp();
          warp_cholesky_solve(smem, d, ld, coef, lane);
          for (int it = 0; it < kRefinements; ++it) {
            for (int i = lane; i < d; i += 32) {  // b - G a, G from its upper triangle
              double s = rhs[i];
              for (int j = 0; j < d; ++j) {
                const double gij = j == i ? gdiag[i] : (j > i ? smem[i * ld + j] : smem[j * ld + i]);
                s -= gij * coef[j];
              }
              work[i] = s;
            }
            __syncwarp();
            warp_cholesky_solve(smem, d, ld, work, lane);
            for (int i = lane; i < d; i += 32) coef[i] += work[i];
            __syncwarp();
          }
        }
      }
      if (lane == 0) status = st;
    }
    __syncthreads();
    int st = status;

    // Phase 3: p = r - J a (float64), |p|^2, normalization.
    if (st == kOk) {
      double local = 0;
      for (int64_t k = threadIdx.x; k < dim; k += kThreads) {
        const T* row = jac + k * d;
        double s = 0;
        // sj J, not sj (J . a): J may be subnormal, where only the scaled values keep their precision.
        for (int i = 0; i < d; ++i) s = fma(sj * static_cast<double>(row[i]), coef[i], s);
        const double p = sr * static_cast<double>(r[k]) - s;
        local = fma(p, p, local);
        out[k] = static_cast<T>(p);
      }
      const double sumsq = block_reduce(local, scratch, false);
      if (!isfinite(sumsq)) st = final_attempt ? kNotFinite : kRescale;
      else if (!final_attempt && (sumsq > kSumMax || sumsq < kSumMin)) st = kRescale;
      if (st == kOk) {
        const double inv = sumsq > 0 ? 1.0 / sqrt(sumsq) : 0.0;
        for (int64_t k = threadIdx.x; k < dim; k += kThreads) out[k] = static_cast<T>(static_cast<double>(out[k]) * inv);
        return;
      }
    }
    if (st == kRescale) {  // powers of two that bring max|J| and max|r| into [1, 2); NaN/Inf -> NaN row
      double mj = 0, mr = 0;
      bool bad = false;
      for (int64_t idx = threadIdx.x; idx < dim * d; idx += kThreads) {
        const double v = fabs(static_cast<double>(jac[idx]));
        bad |= !isfinite(v);
        mj = fmax(mj, v);
      }
      for (int64_t k = threadIdx.x; k < dim; k += kThreads) {
        const double v = fabs(static_cast<double>(r[k]));
        bad |= !isfinite(v);
        mr = fmax(mr, v);
      }
      bad = __syncthreads_or(bad);
      mj = block_reduce(mj, scratch, true);
      mr = block_reduce(mr, scratch, true);
      if (!bad) {
        sj = power_of_two_scale(mj);
        sr = power_of_two_scale(mr);
        continue;
      }
    }
    break;  // not finite
  }
  const T nan = static_cast<T>(__longlong_as_double(0x7ff8000000000000LL));
  for (int64_t k = threadIdx.x; k < dim; k += kThreads) out[k] = nan;
}

}  // namespace

void launch_nullspace_project_kernel(DType dtype, const void* jac, const void* r, void* out, int64_t batch,
                                     int64_t dim, int64_t latent, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(batch));
  if (dtype == DType::kDouble) {
    auto kernel = &nullspace_project_kernel<double>;
    FASTOOD_LAUNCH(kernel, grid, kThreads, 0, stream)(static_cast<const double*>(jac), static_cast<const double*>(r),
                                                      static_cast<double*>(out), dim, static_cast<int>(latent));
  } else {
    auto kernel = &nullspace_project_kernel<float>;
    FASTOOD_LAUNCH(kernel, grid, kThreads, 0, stream)(static_cast<const float*>(jac), static_cast<const float*>(r),
                                                      static_cast<float*>(out), dim, static_cast<int>(latent));
  }
}

}  // namespace cuda
}  // namespace fastood
