// FIG sign-gradient Langevin step on CPU, in place (DESIGN.md, method 1, LDS):
//   x <- clamp(x - step/2 * sign(grad) + noise_std * z, lower, upper),  z ~ N(0, 1),  on rows where active.
//
// Noise: one fused pass generates z with Philox4x32-10 (counter-based) keyed by two 64-bit words drawn once
// per call from torch's default CPU generator, so torch.manual_seed reproduces a run. The normal of element e
// (flat index in x's logical, contiguous order) depends only on the key and e -- not on the thread count,
// the chunking, the active mask or x's strides. Layout: element e lies in chunk c = e / 256; Philox block
// c * 64 + (e % 64) yields four uniforms -> two Box-Muller pairs -> four normals, and element e takes normal
// number (e % 256) / 64 of it (the chunk is generated in a vectorized loop over its 64 blocks, by the CPU
// capability's philox_normals in cpu/kernels/kernels_impl.h).
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <optional>

#include "checks.h"
#include "cpu/dispatch.h"
#include "cpu/row_math.h"

namespace fastood {
namespace {

using cpu::PhiloxKey;
using cpu::kNormalsPerChunk;

constexpr int64_t kChunk = kNormalsPerChunk;  // elements per chunk (four normals per Philox block)
constexpr int64_t kGrainChunks = 64;          // 16k elements per parallel task at least

// float64: one run of n elements sharing a bound: v = x - half_step * sign(g) (+ sigma * z), clamped (float,
// bfloat16 and float16 runs take the capability's explicit-vector langevin_run instead). As torch.sign,
// sign(NaN) = 0; NaN in x propagates through the clamp (comparisons with NaN are false, as torch.clamp).
template <typename scalar_t, typename acc_t, bool kNoise>
inline void step_run(scalar_t* __restrict__ x, const scalar_t* __restrict__ g, const float* __restrict__ z, int64_t n,
                     acc_t half_step, acc_t sigma, acc_t lo, acc_t hi) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const acc_t gi = static_cast<acc_t>(g[i]);
    const acc_t sign = static_cast<acc_t>((gi > acc_t(0)) - (gi < acc_t(0)));
    acc_t v = static_cast<acc_t>(x[i]) - half_step * sign;
    if constexpr (kNoise) v += sigma * static_cast<acc_t>(z[i]);
    v = v < lo ? lo : v;
    v = v > hi ? hi : v;
    x[i] = static_cast<scalar_t>(v);
  }
}

struct StepShape {
  int64_t numel, per_row, inner, channels, nbounds;
};

// x, grad: contiguous [rows, channels, inner], walked chunk by chunk; inside a chunk, runs of constant
// (row, channel) share the active flag and the bounds.
template <typename scalar_t, bool kNoise>
void langevin_step_forward_kernel(scalar_t* x, const scalar_t* grad, StepShape s, PhiloxKey key, double step_size,
                                  double noise_std, const double* lower, const double* upper, const bool* active) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t half_step = static_cast<acc_t>(0.5 * step_size);
  const acc_t sigma = static_cast<acc_t>(noise_std);
  const int64_t chunks = (s.numel + kChunk - 1) / kChunk;
  // A run ends where the bound or the active flag may change.
  const int64_t run_unit = s.nbounds > 1 ? s.inner : (active ? s.per_row : s.numel);
  const auto philox_normals = cpu::kernels().philox_normals;  // the CPU capability's vectorized generator
  const auto langevin_run = cpu::kernels().langevin_run;
  at::parallel_for(0, chunks, kGrainChunks, [&](int64_t begin, int64_t end) {
    alignas(64) float z[kChunk];
    for (int64_t c = begin; c < end; ++c) {
      const int64_t first = c * kChunk, last = std::min(first + kChunk, s.numel);
      bool generated = false;
      for (int64_t e = first; e < last;) {
        const int64_t stop = std::min(last, (e / run_unit + 1) * run_unit);
        if (!active || active[e / s.per_row]) {
          if (kNoise && !generated) {
            philox_normals(c, key, z);
            generated = true;
          }
          const int64_t b = s.nbounds > 1 ? (e / s.inner) % s.channels : 0;
          if constexpr (std::is_same_v<scalar_t, double>) {
            step_run<scalar_t, acc_t, kNoise>(x + e, grad + e, z + (e - first), stop - e, half_step, sigma,
                                              static_cast<acc_t>(lower[b]), static_cast<acc_t>(upper[b]));
          } else {  // float, bfloat16, float16: the capability's vectorized run (cpu/kernels/kernels_impl.h)
            langevin_run(cpu::row_dtype<scalar_t>(), x + e, grad + e, kNoise ? z + (e - first) : nullptr, stop - e,
                         half_step, sigma, static_cast<float>(lower[b]), static_cast<float>(upper[b]));
          }
        }
        e = stop;
      }
    }
  });
}

PhiloxKey draw_key() {
  auto gen = at::get_generator_or_default<at::CPUGeneratorImpl>(std::nullopt, at::detail::getDefaultCPUGenerator());
  std::lock_guard<std::mutex> lock(gen->mutex_);
  const uint64_t key = gen->random64();
  const uint64_t stream = gen->random64();
  return PhiloxKey{static_cast<uint32_t>(key), static_cast<uint32_t>(key >> 32), static_cast<uint32_t>(stream),
                   static_cast<uint32_t>(stream >> 32)};
}

void langevin_step_cpu(at::Tensor& x, const at::Tensor& grad_in, double step_size, double noise_std,
                       const at::Tensor& lower_in, const at::Tensor& upper_in,
                       const std::optional<at::Tensor>& active_in) {
  check_langevin(x, grad_in, step_size, noise_std, lower_in, upper_in, active_in);
  if (x.numel() == 0) return;
  // A grad of another dtype contributes only its sign: take it in grad's own dtype (exact in any dtype).
  const at::Tensor grad = (grad_in.scalar_type() == x.scalar_type() ? grad_in : at::sign(grad_in).to(x.scalar_type()))
                              .contiguous();
  const bool in_place = x.is_contiguous();
  at::Tensor work = in_place ? x : x.contiguous();
  const at::Tensor lower = lower_in.to(at::kDouble).contiguous(), upper = upper_in.to(at::kDouble).contiguous();
  std::optional<at::Tensor> active;
  if (active_in.has_value()) active = active_in->contiguous();
  const bool with_noise = noise_std > 0;
  const PhiloxKey key = with_noise ? draw_key() : PhiloxKey{0, 0, 0, 0};
  const int64_t rows = work.size(0), channels = work.size(1);
  const StepShape shape{work.numel(), work.numel() / rows, work.numel() / (rows * channels), channels,
                        lower.size(0)};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, work.scalar_type(), "langevin_step_", [&] {
    auto kernel = with_noise ? &langevin_step_forward_kernel<scalar_t, true>
                             : &langevin_step_forward_kernel<scalar_t, false>;
    kernel(work.data_ptr<scalar_t>(), grad.data_ptr<scalar_t>(), shape, key, step_size, noise_std,
           lower.data_ptr<double>(), upper.data_ptr<double>(), active ? active->data_ptr<bool>() : nullptr);
  });
  if (!in_place) x.copy_(work);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastood, CPU, m) { m.impl("langevin_step_", &langevin_step_cpu); }

}  // namespace fastood
