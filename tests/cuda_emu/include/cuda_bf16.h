// Host stand-in for cuda_bf16.h under the SIMT emulation: __nv_bfloat16 as its 16 bits, converted with c10's
// round-to-nearest-even routines (the rounding of the GPU's cvt.rn.bf16.f32 and of torch's .bfloat16()).
#pragma once
#include <c10/util/BFloat16.h>

#include "cuda_fp16.h"

struct __nv_bfloat16 {
  unsigned short x;
};
inline float __bfloat162float(__nv_bfloat16 h) { return c10::detail::f32_from_bits(h.x); }
inline __nv_bfloat16 __float2bfloat16(float f) { return __nv_bfloat16{c10::detail::round_to_nearest_even(f)}; }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __float2bfloat16(f); }
