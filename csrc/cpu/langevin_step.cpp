// FIG sign-gradient Langevin step on CPU, in place (DESIGN.md, method 1, LDS):
//   x <- clamp(x - step/2 * sign(grad) + noise_std * z, lower, upper),  z ~ N(0, 1),  on rows where active.
//
// Noise: one fused pass generates z with Philox4x32-10 (counter-based) keyed by two 64-bit words drawn once
// per call from torch's default CPU generator, so torch.manual_seed reproduces a run. The normal of element e
// (flat index in x's logical, contiguous order) depends only on the key and e -- not on the thread count,
// the chunking, the active mask or x's strides. Layout: element e lies in chunk c = e / 256; Philox block
// c * 64 + (e % 64) yields four uniforms -> two Box-Muller pairs -> four normals, and element e takes normal
// number (e % 256) / 64 of it (the chunk is generated in a vectorized loop over its 64 blocks).
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

namespace fastood {
namespace {

constexpr int64_t kBlocksPerChunk = 64;                // Philox blocks per chunk
constexpr int64_t kChunk = 4 * kBlocksPerChunk;        // elements per chunk (four normals per block)
constexpr int64_t kGrainChunks = 64;                   // 16k elements per parallel task at least

// a * b + c: one FMA where the target has it (std::fma would call libm's software fma otherwise).
__attribute__((always_inline)) inline float madd(float a, float b, float c) {
#if defined(__FMA__) || defined(__aarch64__)
  return std::fma(a, b, c);
#else
  return a * b + c;
#endif
}

struct PhiloxKey {
  uint32_t k0, k1;    // Philox key
  uint32_t s0, s1;    // upper half of the 128-bit counter (a per-call stream id)
};

// Philox4x32-10 (Salmon et al., SC'11) of the counter (lo, hi, s0, s1) under key (k0, k1). Written with plain
// 32x32->64 products so that gcc vectorizes a loop of independent calls.
__attribute__((always_inline)) inline void philox4x32_10(uint32_t lo, uint32_t hi, PhiloxKey key, uint32_t& o0,
                                                         uint32_t& o1, uint32_t& o2, uint32_t& o3) {
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
__attribute__((always_inline)) inline void sincos_turns(float turns, float& c_out, float& s_out) {
  const float t = turns * 4.0f;
  const int32_t quadrant = static_cast<int32_t>(t);
  const float a = (t - static_cast<float>(quadrant)) * 1.57079632679489662f;
  const float a2 = a * a;
  float s = -2.5052108e-8f;
  s = madd(s, a2, 2.7557319e-6f);
  s = madd(s, a2, -1.9841270e-4f);
  s = madd(s, a2, 8.3333333e-3f);
  s = madd(s, a2, -1.6666667e-1f);
  s = madd(s * a2, a, a);
  float c = 2.0876757e-9f;
  c = madd(c, a2, -2.7557319e-7f);
  c = madd(c, a2, 2.4801587e-5f);
  c = madd(c, a2, -1.3888889e-3f);
  c = madd(c, a2, 4.1666667e-2f);
  c = madd(c, a2, -0.5f);
  c = madd(c, a2, 1.0f);
  // Rotate by quadrant * pi/2: odd quadrants map (c, s) to (-s, c), quadrants 2 and 3 negate both. Done on the
  // bits (blend and sign flip), so the loop vectorizes without AVX-512 masks too.
  const uint32_t swap = 0u - static_cast<uint32_t>(quadrant & 1);   // all ones in odd quadrants
  const uint32_t flip = static_cast<uint32_t>(quadrant & 2) << 30;  // the sign bit in quadrants 2 and 3
  uint32_t cb, sb;
  std::memcpy(&cb, &c, sizeof(cb));
  std::memcpy(&sb, &s, sizeof(sb));
  const uint32_t co = ((cb & ~swap) | ((sb ^ 0x80000000u) & swap)) ^ flip;
  const uint32_t so = ((sb & ~swap) | (cb & swap)) ^ flip;
  std::memcpy(&c_out, &co, sizeof(co));
  std::memcpy(&s_out, &so, sizeof(so));
}

// log(x) for x in (0, 1]: exponent split off, mantissa m in [sqrt(1/2), sqrt(2)), Cephes logf polynomial
// (relative error < 1e-7). Branch-free, so loops of it vectorize on AVX2 as well as AVX-512.
__attribute__((always_inline)) inline float log_unit_interval(float x) {
  int32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  int32_t e = ((bits >> 23) & 0xff) - 126;  // x = m 2^e, m in [0.5, 1)
  bits = (bits & 0x007fffff) | 0x3f000000;
  float m;
  std::memcpy(&m, &bits, sizeof(m));
  const int32_t small = m < 0.707106781186547524f ? 1 : 0;  // then use 2m and e - 1
  e -= small;
  m = madd(m, static_cast<float>(small), m) - 1.0f;
  const float z = m * m;
  float y = 7.0376836292e-2f;
  y = madd(y, m, -1.1514610310e-1f);
  y = madd(y, m, 1.1676998740e-1f);
  y = madd(y, m, -1.2420140846e-1f);
  y = madd(y, m, 1.4249322787e-1f);
  y = madd(y, m, -1.6668057665e-1f);
  y = madd(y, m, 2.0000714765e-1f);
  y = madd(y, m, -2.4999993993e-1f);
  y = madd(y, m, 3.3333331174e-1f);
  y = y * m * z;
  const float fe = static_cast<float>(e);
  y = madd(fe, -2.12194440e-4f, y);
  y = madd(-0.5f, z, y);
  return madd(fe, 0.693359375f, m + y);
}

// (bits >> 8) + plus, scaled by 2^-24: plus = 1 gives (0, 1], plus = 0 gives [0, 1).
__attribute__((always_inline)) inline float uniform24(uint32_t bits, int32_t plus) {
  return static_cast<float>(static_cast<int32_t>(bits >> 8) + plus) * (1.0f / 16777216.0f);
}

// The 256 standard normals of chunk `chunk`: z[lane * 64 + q] comes from Philox block chunk * 64 + q.
void chunk_normals(int64_t chunk, PhiloxKey key, float* z) {
  const uint64_t first = static_cast<uint64_t>(chunk) * kBlocksPerChunk;
#pragma omp simd
  for (int64_t q = 0; q < kBlocksPerChunk; ++q) {
    const uint64_t block = first + static_cast<uint64_t>(q);
    uint32_t u0, u1, u2, u3;
    philox4x32_10(static_cast<uint32_t>(block), static_cast<uint32_t>(block >> 32), key, u0, u1, u2, u3);
    // 24-bit uniforms: (0, 1] for the logs, [0, 1) for the angles (int32 -> float converts in one instruction
    // on every x86 vector ISA; uint32 -> float needs AVX-512).
    const float r0 = std::sqrt(-2.0f * log_unit_interval(uniform24(u0, 1)));
    const float r1 = std::sqrt(-2.0f * log_unit_interval(uniform24(u2, 1)));
    float c0, s0, c1, s1;
    sincos_turns(uniform24(u1, 0), c0, s0);
    sincos_turns(uniform24(u3, 0), c1, s1);
    z[q] = r0 * c0;
    z[kBlocksPerChunk + q] = r0 * s0;
    z[2 * kBlocksPerChunk + q] = r1 * c1;
    z[3 * kBlocksPerChunk + q] = r1 * s1;
  }
}

// One run of n elements sharing a bound: v = x - half_step * sign(g) (+ sigma * z), clamped. As torch.sign,
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
  at::parallel_for(0, chunks, kGrainChunks, [&](int64_t begin, int64_t end) {
    alignas(64) float z[kChunk];
    for (int64_t c = begin; c < end; ++c) {
      const int64_t first = c * kChunk, last = std::min(first + kChunk, s.numel);
      bool generated = false;
      for (int64_t e = first; e < last;) {
        const int64_t stop = std::min(last, (e / run_unit + 1) * run_unit);
        if (!active || active[e / s.per_row]) {
          if (kNoise && !generated) {
            chunk_normals(c, key, z);
            generated = true;
          }
          const int64_t b = s.nbounds > 1 ? (e / s.inner) % s.channels : 0;
          step_run<scalar_t, acc_t, kNoise>(x + e, grad + e, z + (e - first), stop - e, half_step, sigma,
                                            static_cast<acc_t>(lower[b]), static_cast<acc_t>(upper[b]));
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
