// One macro for functions that both the C++ loops and the CUDA kernels call.
#pragma once
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define PYDIFF_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define PYDIFF_HOST_DEVICE inline
#endif

namespace pydiff {

PYDIFF_HOST_DEVICE uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
#endif
}

PYDIFF_HOST_DEVICE float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
#endif
}

// Correctly rounded square root on both sides (nvcc's default -prec-sqrt=true, spelled out).
PYDIFF_HOST_DEVICE float sqrt_rn(float x) {
#if defined(__CUDA_ARCH__)
  return __fsqrt_rn(x);
#else
  return __builtin_sqrtf(x);
#endif
}

}  // namespace pydiff
