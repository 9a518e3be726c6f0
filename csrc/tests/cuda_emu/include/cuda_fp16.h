// Emulation stand-in for <cuda_fp16.h>: IEEE binary16 storage, conversions rounding to nearest even.
#pragma once
#include "../cuda_emu.h"

struct alignas(2) __half {
  _Float16 h;
};
inline float __half2float(__half v) {
  return float(v.h);
}
inline __half __float2half_rn(float f) {
  return __half{_Float16(f)};
}
