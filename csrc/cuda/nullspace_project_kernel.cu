// Batched null-space projection on CUDA: one block per sample. Gram matrix G = J^T J (float64, shared memory),
// ridge delta = kRidge * trace(G)/d, Cholesky, p = r - J a with one refinement step, v = p / |p|
// (same algorithm and constants as the CPU kernel; d <= 64 so G fits in 32 KB of shared memory).
#include "cuda/device_math.cuh"

namespace fastood {
namespace cuda {
namespace {

constexpr int kMaxLatent = 64;

__device__ double block_sum(double v, double* scratch) {
  v = warp_sum(v);
  const int lane = threadIdx.x & 31, warp = threadIdx.x / 32;
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  double total = 0;
  for (int w = 0; w < kWarpsPerBlock; ++w) total += scratch[w];
  return total;
}

template <typename T>
__global__ void nullspace_project_kernel(const T* __restrict__ jac_all, const T* __restrict__ r_all,
                                         T* __restrict__ out_all, int64_t dim, int d, double ridge) {
  __shared__ double gram[kMaxLatent * kMaxLatent];
  __shared__ double coef[kMaxLatent];
  __shared__ double scratch[kWarpsPerBlock];
  __shared__ bool ok;
  const T* jac = jac_all + static_cast<int64_t>(blockIdx.x) * dim * d;
  const T* r = r_all + static_cast<int64_t>(blockIdx.x) * dim;
  T* p = out_all + static_cast<int64_t>(blockIdx.x) * dim;
  const int lane = threadIdx.x & 31, warp = threadIdx.x / 32;

  // Upper triangle of G, one warp per entry, mirrored.
  for (int e = warp; e < d * d; e += kWarpsPerBlock) {
    const int i = e / d, j = e % d;
    if (j < i) continue;
    double s = 0;
    for (int64_t k = lane; k < dim; k += 32) s += static_cast<double>(jac[k * d + i]) * static_cast<double>(jac[k * d + j]);
    s = warp_sum(s);
    if (lane == 0) gram[i * d + j] = gram[j * d + i] = s;
  }
  for (int64_t k = threadIdx.x; k < dim; k += blockDim.x) p[k] = r[k];
  __syncthreads();
  if (threadIdx.x == 0) {  // d <= 64: a serial Cholesky is a few microseconds
    double trace = 0;
    for (int i = 0; i < d; ++i) trace += gram[i * d + i];
    const double delta = ridge * trace / d + 2.2250738585072014e-302;
    for (int i = 0; i < d; ++i) gram[i * d + i] += delta;
    ok = true;
    for (int j = 0; j < d && ok; ++j) {
      double diag = gram[j * d + j];
      for (int k = 0; k < j; ++k) diag -= gram[j * d + k] * gram[j * d + k];
      if (!(diag > 0)) { ok = false; break; }
      diag = sqrt(diag);
      gram[j * d + j] = diag;
      for (int i = j + 1; i < d; ++i) {
        double s = gram[i * d + j];
        for (int k = 0; k < j; ++k) s -= gram[i * d + k] * gram[j * d + k];
        gram[i * d + j] = s / diag;
      }
    }
  }
  __syncthreads();
  if (!ok) {  // only with NaN/Inf in J: propagate NaN
    for (int64_t k = threadIdx.x; k < dim; k += blockDim.x) p[k] = static_cast<T>(__longlong_as_double(0x7ff8000000000000LL));
    return;
  }
  for (int pass = 0; pass < 2; ++pass) {  // projection + one refinement step
    for (int i = warp; i < d; i += kWarpsPerBlock) {
      double s = 0;
      for (int64_t k = lane; k < dim; k += 32) s += static_cast<double>(jac[k * d + i]) * static_cast<double>(p[k]);
      s = warp_sum(s);
      if (lane == 0) coef[i] = s;
    }
    __syncthreads();
    if (threadIdx.x == 0) {  // L L^T a = J^T p
      for (int i = 0; i < d; ++i) {
        double s = coef[i];
        for (int k = 0; k < i; ++k) s -= gram[i * d + k] * coef[k];
        coef[i] = s / gram[i * d + i];
      }
      for (int i = d - 1; i >= 0; --i) {
        double s = coef[i];
        for (int k = i + 1; k < d; ++k) s -= gram[k * d + i] * coef[k];
        coef[i] = s / gram[i * d + i];
      }
    }
    __syncthreads();
    for (int64_t k = threadIdx.x; k < dim; k += blockDim.x) {
      double s = 0;
      for (int i = 0; i < d; ++i) s += static_cast<double>(jac[k * d + i]) * coef[i];
      p[k] = static_cast<T>(static_cast<double>(p[k]) - s);
    }
    __syncthreads();
  }
  double local = 0;
  for (int64_t k = threadIdx.x; k < dim; k += blockDim.x) local += static_cast<double>(p[k]) * static_cast<double>(p[k]);
  const double norm = sqrt(block_sum(local, scratch));
  const double inv = norm > 0 ? 1.0 / norm : 0.0;
  for (int64_t k = threadIdx.x; k < dim; k += blockDim.x) p[k] = static_cast<T>(static_cast<double>(p[k]) * inv);
}

}  // namespace

void launch_nullspace_project(DType dtype, const void* jac, const void* r, void* out, int64_t batch, int64_t dim,
                              int64_t latent, cudaStream_t stream) {
  if (dtype == DType::kDouble) {
    nullspace_project_kernel<double><<<batch, kThreads, 0, stream>>>(
        static_cast<const double*>(jac), static_cast<const double*>(r), static_cast<double*>(out), dim,
        static_cast<int>(latent), 1e-12);
  } else {
    nullspace_project_kernel<float><<<batch, kThreads, 0, stream>>>(
        static_cast<const float*>(jac), static_cast<const float*>(r), static_cast<float*>(out), dim,
        static_cast<int>(latent), 1e-6);
  }
}

}  // namespace cuda
}  // namespace fastood
