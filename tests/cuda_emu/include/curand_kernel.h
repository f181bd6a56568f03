// Host stand-in for curand_kernel.h under the SIMT emulation: the Philox4x32-10 state of curand, driven by
// ATen's host-callable at::Philox4_32 (the same counter/key layout as curand: key = seed, counter words 2-3 =
// subsequence, words 0-1 = offset / 4), and curand's Box-Muller transform. The uniforms are bit-identical to
// the GPU's; the normals differ from the GPU's in the last bits only, because the device uses the __sincosf
// approximation where this host path (like curand's own host path) uses sinf/cosf.
#pragma once
#include <ATen/core/PhiloxRNGEngine.h>

#include <cmath>
#include <cstdint>

#include "cuda_runtime_api.h"

struct curandStatePhilox4_32_10_t {
  at::Philox4_32 engine;
};

// curand_init: `offset` counts 32-bit outputs (curand's skipahead), Philox4_32's offset counts 128-bit blocks.
inline void curand_init(unsigned long long seed, unsigned long long subsequence, unsigned long long offset,
                        curandStatePhilox4_32_10_t* state) {
  state->engine = at::Philox4_32(seed, subsequence, offset / 4);
  for (unsigned long long i = 0; i < offset % 4; ++i) state->engine();
}

inline unsigned curand(curandStatePhilox4_32_10_t* state) { return state->engine(); }

inline uint4 curand4(curandStatePhilox4_32_10_t* state) {
  const unsigned x = state->engine(), y = state->engine(), z = state->engine(), w = state->engine();
  return make_uint4(x, y, z, w);
}

// curand's _curand_box_muller: u in (0, 1], angle v in (0, 2 pi].
inline float2 fastood_emu_box_muller(unsigned x, unsigned y) {
  constexpr float kInv = 2.3283064e-10f;               // CURAND_2POW32_INV
  constexpr float kInv2Pi = 2.3283064e-10f * 6.2831855f;  // CURAND_2POW32_INV_2PI
  const float u = x * kInv + (kInv / 2);
  const float v = y * kInv2Pi + (kInv2Pi / 2);
  const float s = sqrtf(-2.0f * logf(u));
  return make_float2(sinf(v) * s, cosf(v) * s);
}

inline float4 curand_normal4(curandStatePhilox4_32_10_t* state) {
  const uint4 u = curand4(state);
  const float2 a = fastood_emu_box_muller(u.x, u.y), b = fastood_emu_box_muller(u.z, u.w);
  return make_float4(a.x, a.y, b.x, b.y);
}

inline float4 curand_uniform4(curandStatePhilox4_32_10_t* state) {
  constexpr float kInv = 2.3283064e-10f;
  const uint4 u = curand4(state);
  return make_float4(u.x * kInv + kInv / 2, u.y * kInv + kInv / 2, u.z * kInv + kInv / 2, u.w * kInv + kInv / 2);
}
