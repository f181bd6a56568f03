// FIG sign-gradient Langevin step on CUDA, in place, with in-kernel Philox noise (as PyTorch's dropout):
// x <- clamp(x - step/2 sign(g) + noise_std z, lower, upper) on rows where active.
#include <ATen/cuda/PhiloxCudaState.h>
#include <curand_kernel.h>

#include "cuda/device_math.cuh"

namespace fastood {
namespace cuda {
namespace {

constexpr int kUnroll = 4;  // curand_normal4 draws four normals per call
constexpr int64_t kMaxBlocks = 1024;

// Seed and offset from a PhiloxCudaState, also under CUDA-graph capture (then they live in device memory).
__device__ __forceinline__ void unpack_philox(const at::PhiloxCudaState& s, uint64_t& seed, uint64_t& offset) {
  if (s.captured_) {
    seed = static_cast<uint64_t>(*s.seed_.ptr);
    offset = static_cast<uint64_t>(*s.offset_.ptr) + s.offset_intragraph_;
  } else {
    seed = s.seed_.val;
    offset = s.offset_.val;
  }
}

template <typename T, bool kNoise>
__global__ void langevin_step_kernel(T* __restrict__ x, const T* __restrict__ grad, int64_t rows, int64_t channels,
                                     int64_t inner, double half_step, double noise_std, const double* __restrict__ lower,
                                     const double* __restrict__ upper, int64_t nbounds,
                                     const bool* __restrict__ active, at::PhiloxCudaState rng) {
  using A = typename Acc<T>::type;
  const int64_t numel = rows * channels * inner;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x * kUnroll;
  curandStatePhilox4_32_10_t state;
  if (kNoise) {
    uint64_t seed, offset;
    unpack_philox(rng, seed, offset);
    curand_init(seed, tid, offset, &state);
  }
  for (int64_t base = tid * kUnroll; base < numel; base += stride) {
    float4 z = make_float4(0.f, 0.f, 0.f, 0.f);
    if (kNoise) z = curand_normal4(&state);  // drawn unconditionally: keeps the Philox stream layout fixed
    const float noise[kUnroll] = {z.x, z.y, z.z, z.w};
#pragma unroll
    for (int j = 0; j < kUnroll; ++j) {
      const int64_t i = base + j;
      if (i >= numel) break;
      const int64_t row = i / (channels * inner);
      if (active != nullptr && !active[row]) continue;
      const int64_t b = nbounds == 1 ? 0 : (i / inner) % channels;
      const A g = to_acc(grad[i]);
      const A sign = static_cast<A>((g > A(0)) - (g < A(0)));
      A v = to_acc(x[i]) - static_cast<A>(half_step) * sign;
      if (kNoise) v += static_cast<A>(noise_std) * static_cast<A>(noise[j]);
      const A lo = static_cast<A>(lower[b]), hi = static_cast<A>(upper[b]);
      v = v < lo ? lo : v;
      v = v > hi ? hi : v;
      x[i] = from_acc<T>(v);
    }
  }
}

}  // namespace

int64_t langevin_grid_size(int64_t numel) {
  const int64_t per_block = static_cast<int64_t>(kThreads) * kUnroll;
  const int64_t blocks = (numel + per_block - 1) / per_block;
  return blocks < kMaxBlocks ? (blocks > 0 ? blocks : 1) : kMaxBlocks;
}

int64_t langevin_philox_increment(int64_t numel) {
  const int64_t per_launch = langevin_grid_size(numel) * kThreads * kUnroll;
  return ((numel - 1) / per_launch + 1) * kUnroll;
}

void launch_langevin_step(DType dtype, const LangevinArgs& a, const at::PhiloxCudaState& rng, cudaStream_t stream) {
  const int64_t blocks = langevin_grid_size(a.rows * a.channels * a.inner);
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    auto kernel = a.noise_std > 0 ? &langevin_step_kernel<T, true> : &langevin_step_kernel<T, false>;
    kernel<<<blocks, kThreads, 0, stream>>>(static_cast<T*>(a.x), static_cast<const T*>(a.grad), a.rows, a.channels,
                                            a.inner, a.half_step, a.noise_std, a.lower, a.upper, a.nbounds, a.active,
                                            rng);
  });
}

}  // namespace cuda
}  // namespace fastood
