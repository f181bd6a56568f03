// Host stand-in for cuda_fp16.h under the SIMT emulation: __half as its 16 bits, converted with c10's
// round-to-nearest-even routines (the rounding of the GPU's cvt.rn.f16.f32 and of torch's .half()).
#pragma once
#include <c10/util/Half.h>

struct __half {
  unsigned short x;
};
inline float __half2float(__half h) { return c10::detail::fp16_ieee_to_fp32_value(h.x); }
inline __half __float2half(float f) { return __half{c10::detail::fp16_ieee_from_fp32_value(f)}; }
inline __half __float2half_rn(float f) { return __float2half(f); }
