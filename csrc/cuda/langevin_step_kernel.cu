// FIG sign-gradient Langevin step on CUDA, in place, with in-kernel Philox noise as PyTorch's dropout:
//   x <- clamp(x - step/2 sign(g) + noise_std z, lower, upper)  on rows where active.
// Thread `tid` owns elements 4 tid + 4 k * (threads in the grid) and draws their normals with curand_normal4
// from Philox subsequence tid at the generator's offset; the grid size depends only on numel, so a seed
// reproduces the noise on any GPU. Element indices are logical (contiguous [rows, channels, inner]) for x and
// grad in contiguous and in channels_last memory alike, so the noise does not depend on the memory format.
// sign(NaN) = 0 (as torch.sign); NaN in x survives the clamp.
#include <ATen/cuda/PhiloxCudaState.h>
#include <curand_kernel.h>

#include <cstdint>
#include <tuple>

#include <ATen/cuda/detail/UnpackRaw.cuh>

#include "cuda/device_math.cuh"
#include "cuda/langevin_step_kernel.h"

namespace fastood {
namespace cuda {
namespace {

constexpr int kUnroll = 4;  // elements per thread and iteration: one curand_normal4
constexpr int64_t kMaxBlocks = 1024;

template <typename T>
struct alignas(sizeof(T) * kUnroll) Pack {
  T v[kUnroll];
};

template <typename A>
__device__ __forceinline__ A step_value(A x, A g, A half_step, A sigma, float z, A lo, A hi, bool noise) {
  const A sign = static_cast<A>((g > A(0)) - (g < A(0)));
  A v = x - half_step * sign;
  if (noise) v += sigma * static_cast<A>(z);
  v = v < lo ? lo : v;  // comparisons with NaN are false: NaN passes (as torch.clamp)
  v = v > hi ? hi : v;
  return v;
}

// Coordinates of a logical element index i = (row * channels + ch) * inner + pos, computed once per group of
// kUnroll elements (one or two divisions; 32-bit ones when numel fits) and then stepped element by element.
struct Coord {
  int64_t row, ch, pos;
  __device__ __forceinline__ void set(int64_t i, int64_t per_row, int64_t inner, bool small) {
    int64_t rem;
    if (small) {
      row = static_cast<uint32_t>(i) / static_cast<uint32_t>(per_row);
      rem = i - row * per_row;
      ch = static_cast<uint32_t>(rem) / static_cast<uint32_t>(inner);
    } else {
      row = i / per_row;
      rem = i - row * per_row;
      ch = rem / inner;
    }
    pos = rem - ch * inner;
  }
  __device__ __forceinline__ void next(int64_t inner, int64_t channels) {
    if (++pos == inner) {
      pos = 0;
      if (++ch == channels) {
        ch = 0;
        ++row;
      }
    }
  }
};

template <typename T, bool kNoise>
__global__ void langevin_step_kernel(T* __restrict__ x, const T* __restrict__ grad, int64_t numel, int64_t per_row,
                                     int64_t inner, int64_t channels, bool channels_last, double half_step_d,
                                     double noise_std_d, const double* __restrict__ lower,
                                     const double* __restrict__ upper, int64_t nbounds,
                                     const bool* __restrict__ active, bool vector_io, at::PhiloxCudaState rng) {
  using A = typename Acc<T>::type;
  const A half_step = static_cast<A>(half_step_d), sigma = static_cast<A>(noise_std_d);
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x * kUnroll;
  curandStatePhilox4_32_10_t state;
  if (kNoise) {
    const auto seeds = at::cuda::philox::unpack(rng);
    curand_init(std::get<0>(seeds), tid, std::get<1>(seeds), &state);
  }
  // Threads walk the logical (contiguous [rows, channels, inner]) order, which fixes the noise of every element;
  // channels_last memory is addressed as [rows, inner, channels].
  const bool coords = nbounds > 1 || active != nullptr || channels_last;
  const bool small = numel <= 0xffffffffLL;  // 32-bit division is far cheaper than 64-bit
  const bool vector = vector_io && !channels_last;
  A lo = static_cast<A>(lower[0]), hi = static_cast<A>(upper[0]);
  for (int64_t base = tid * kUnroll; base < numel; base += stride) {
    float4 z4 = make_float4(0.f, 0.f, 0.f, 0.f);
    if (kNoise) z4 = curand_normal4(&state);  // drawn for every group: keeps the Philox layout fixed
    const float z[kUnroll] = {z4.x, z4.y, z4.z, z4.w};
    const bool full = base + kUnroll <= numel;
    int64_t addr[kUnroll], chan[kUnroll];
    bool keep[kUnroll];  // elements left alone: past the end, or on an inactive row
    Coord c{0, 0, 0};
    if (coords) c.set(base, per_row, inner, small);
#pragma unroll
    for (int j = 0; j < kUnroll; ++j) {
      keep[j] = base + j >= numel;
      addr[j] = channels_last ? (c.row * inner + c.pos) * channels + c.ch : base + j;
      chan[j] = c.ch;
      if (!keep[j] && active != nullptr && !active[c.row]) keep[j] = true;
      if (coords) c.next(inner, channels);
    }
    T xs[kUnroll], gs[kUnroll];
    if (full && vector) {
      const Pack<T> xp = *reinterpret_cast<const Pack<T>*>(x + base);
      const Pack<T> gp = *reinterpret_cast<const Pack<T>*>(grad + base);
#pragma unroll
      for (int j = 0; j < kUnroll; ++j) {
        xs[j] = xp.v[j];
        gs[j] = gp.v[j];
      }
    } else {
#pragma unroll
      for (int j = 0; j < kUnroll; ++j) {
        if (base + j < numel) {  // elements past the end are never used (keep[j])
          xs[j] = x[addr[j]];
          gs[j] = grad[addr[j]];
        }
      }
    }
#pragma unroll
    for (int j = 0; j < kUnroll; ++j) {
      if (nbounds > 1 && !keep[j]) {
        lo = static_cast<A>(lower[chan[j]]);
        hi = static_cast<A>(upper[chan[j]]);
      }
      if (!keep[j]) xs[j] = from_acc<T>(step_value<A>(to_acc(xs[j]), to_acc(gs[j]), half_step, sigma, z[j], lo, hi,
                                                      kNoise));
    }
    if (full && vector && !(keep[0] || keep[1] || keep[2] || keep[3])) {
      Pack<T> out;
#pragma unroll
      for (int j = 0; j < kUnroll; ++j) out.v[j] = xs[j];
      *reinterpret_cast<Pack<T>*>(x + base) = out;
    } else {
#pragma unroll
      for (int j = 0; j < kUnroll; ++j)
        if (!keep[j]) x[addr[j]] = xs[j];  // inactive rows are not written at all
    }
  }
}

int64_t grid_size(int64_t numel) {
  const int64_t per_block = static_cast<int64_t>(kThreads) * kUnroll;
  const int64_t blocks = (numel + per_block - 1) / per_block;
  return blocks < kMaxBlocks ? (blocks > 0 ? blocks : 1) : kMaxBlocks;
}

}  // namespace

int64_t langevin_step_philox_increment(int64_t numel) {
  const int64_t per_launch = grid_size(numel) * kThreads * kUnroll;
  // Each curand_normal4 consumes one Philox block of four 32-bit values: kUnroll counter units per iteration.
  return ((numel - 1) / per_launch + 1) * kUnroll;
}

void launch_langevin_step_kernel(DType dtype, const LangevinStepParams& p, const at::PhiloxCudaState& rng,
                                 cudaStream_t stream) {
  const int64_t blocks = grid_size(p.numel);
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const bool vector_io = reinterpret_cast<uintptr_t>(p.x) % sizeof(Pack<T>) == 0 &&
                           reinterpret_cast<uintptr_t>(p.grad) % sizeof(Pack<T>) == 0;
    auto kernel = p.noise_std > 0 ? &langevin_step_kernel<T, true> : &langevin_step_kernel<T, false>;
    FASTOOD_LAUNCH(kernel, static_cast<unsigned>(blocks), kThreads, 0, stream)(
        static_cast<T*>(p.x), static_cast<const T*>(p.grad), p.numel, p.per_row, p.inner, p.channels,
        p.channels_last, p.half_step, p.noise_std, p.lower, p.upper, p.nbounds, p.active, vector_io, rng);
  });
}

}  // namespace cuda
}  // namespace fastood
