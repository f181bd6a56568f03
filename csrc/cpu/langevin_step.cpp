// FIG sign-gradient Langevin step on CPU, in place:
//   x <- clamp(x - step/2 * sign(grad) + noise_std * z, lower, upper),  z ~ N(0, 1),  on rows where active.
// z is generated inside the fused pass from a counter-based hash of (seed, element index) with Box-Muller; the
// seed is drawn from torch's default CPU generator, so torch.manual_seed reproduces a run, and the result does
// not depend on the number of threads.
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "checks.h"
#include "cpu/fast_math.h"

#include <mutex>

namespace fastood {
namespace {

// One row-channel plane: v = x - half_step * sign(g) (+ sigma * z), clamped. As torch.sign, sign(NaN) = 0;
// NaN in x propagates through the clamp (as torch.clamp).
struct NoiseKey {
  uint32_t a, b;      // hash keys of the two uniforms of a Box-Muller pair
  uint64_t offset;    // counter of element 0
};

template <typename scalar_t, typename acc_t, bool kNoise>
inline void langevin_plane(scalar_t* xp, const scalar_t* gp, NoiseKey key, int64_t first, int64_t n,
                           acc_t half_step, acc_t sigma, acc_t lo, acc_t hi) {
  const uint32_t base = static_cast<uint32_t>(key.offset + static_cast<uint64_t>(first));
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const acc_t g = static_cast<acc_t>(gp[i]);
    const acc_t sign = static_cast<acc_t>((g > acc_t(0)) - (g < acc_t(0)));
    acc_t v = static_cast<acc_t>(xp[i]) - half_step * sign;
    if constexpr (kNoise)
      v += sigma * static_cast<acc_t>(cpu::normal_from_counter(base + static_cast<uint32_t>(i), key.a, key.b));
    // torch.clamp semantics: comparisons with NaN are false, so NaN passes through.
    v = v < lo ? lo : v;
    v = v > hi ? hi : v;
    xp[i] = static_cast<scalar_t>(v);
  }
}

template <typename scalar_t, bool kNoise>
void langevin_rows(scalar_t* x, const scalar_t* grad, NoiseKey key, int64_t rows, int64_t channels,
                   int64_t inner, double step_size, double noise_std, const double* lower, const double* upper,
                   int64_t nbounds, const bool* active) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t half_step = static_cast<acc_t>(0.5 * step_size);
  const acc_t sigma = static_cast<acc_t>(noise_std);
  const int64_t per_row = channels * inner;
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(per_row, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      if (active && !active[b]) continue;
      for (int64_t ch = 0; ch < channels; ++ch) {
        const int64_t base = b * per_row + ch * inner;
        const int64_t bi = nbounds == 1 ? 0 : ch;
        langevin_plane<scalar_t, acc_t, kNoise>(x + base, grad + base, key, base, inner, half_step, sigma,
                                                static_cast<acc_t>(lower[bi]), static_cast<acc_t>(upper[bi]));
      }
    }
  });
}

void langevin_step_kernel(at::Tensor& x, const at::Tensor& grad_in, double step_size, double noise_std,
                          const at::Tensor& lower_in, const at::Tensor& upper_in,
                          const c10::optional<at::Tensor>& active_in) {
  check_langevin(x, grad_in, step_size, noise_std, lower_in, upper_in, active_in);
  if (x.numel() == 0) return;
  const bool in_place = x.is_contiguous();
  at::Tensor work = in_place ? x : x.contiguous();
  auto grad = grad_in.to(x.scalar_type()).contiguous();
  auto lower = lower_in.to(at::kDouble).contiguous(), upper = upper_in.to(at::kDouble).contiguous();
  c10::optional<at::Tensor> active;
  if (active_in.has_value()) active = active_in->contiguous();
  NoiseKey key{0, 0, 0};
  const bool with_noise = noise_std > 0;
  if (with_noise) {
    auto gen = at::get_generator_or_default<at::CPUGeneratorImpl>(c10::nullopt, at::detail::getDefaultCPUGenerator());
    std::lock_guard<std::mutex> lock(gen->mutex_);
    const uint64_t r = gen->random64();
    key = NoiseKey{static_cast<uint32_t>(r), static_cast<uint32_t>(r >> 32) ^ 0x5bd1e995u, gen->random64()};
  }
  const int64_t rows = work.size(0), channels = work.size(1), inner = work.numel() / (rows * channels);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, work.scalar_type(), "langevin_step_", [&] {
    auto run = with_noise ? &langevin_rows<scalar_t, true> : &langevin_rows<scalar_t, false>;
    run(work.data_ptr<scalar_t>(), grad.data_ptr<scalar_t>(), key,
        rows, channels, inner, step_size, noise_std, lower.data_ptr<double>(), upper.data_ptr<double>(),
        lower.size(0), active.has_value() ? active->data_ptr<bool>() : nullptr);
  });
  if (!in_place) x.copy_(work);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastood, CPU, m) { m.impl("langevin_step_", &langevin_step_kernel); }

}  // namespace fastood
