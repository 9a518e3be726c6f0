// Counter-based random numbers: Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy
// as 1, 2, 3", SC'11) and the normal transform built on it. The same bits on any thread count
// and on any device, because every value is a pure function of (seed, step, element index).
#pragma once
#include "pydiff/common.h"

namespace pydiff {

struct U32x4 {
  uint32_t v[4];
};

PYDIFF_HOST_DEVICE void philox_round(uint32_t& c0, uint32_t& c1, uint32_t& c2, uint32_t& c3, uint32_t k0,
                                     uint32_t k1) {
  const uint64_t p0 = uint64_t(0xD2511F53u) * c0;
  const uint64_t p1 = uint64_t(0xCD9E8D57u) * c2;
  const uint32_t hi0 = uint32_t(p0 >> 32), lo0 = uint32_t(p0);
  const uint32_t hi1 = uint32_t(p1 >> 32), lo1 = uint32_t(p1);
  const uint32_t n0 = hi1 ^ c1 ^ k0;
  const uint32_t n2 = hi0 ^ c3 ^ k1;
  c0 = n0;
  c1 = lo1;
  c2 = n2;
  c3 = lo0;
}

// Philox4x32-10 of counter (c0, c1, c2, c3) under key (k0, k1).
PYDIFF_HOST_DEVICE U32x4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0,
                                       uint32_t k1) {
#if defined(__CUDACC__)
#pragma unroll
#elif defined(__GNUC__)
#pragma GCC unroll 10  // straight-line code lets the CPU loops vectorise across blocks
#endif
  for (int r = 0; r < 10; ++r) {
    philox_round(c0, c1, c2, c3, k0, k1);
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return U32x4{{c0, c1, c2, c3}};
}

// 24 random bits to a float in (0, 1]: never 0, so its logarithm is finite.
PYDIFF_HOST_DEVICE float uniform_open0(uint32_t bits) {
  return float((bits >> 8) + 1u) * 5.9604644775390625e-08f;  // 2^-24
}

// 24 random bits to a float in [0, 1).
PYDIFF_HOST_DEVICE float uniform_closed0(uint32_t bits) {
  return float(bits >> 8) * 5.9604644775390625e-08f;
}

// Natural logarithm of u in (0, 1] with plain float arithmetic, no libm: the same bits on the CPU
// (where it vectorises) and on the GPU. log(m * 2^e) = e ln 2 + 2 atanh((m - 1) / (m + 1)).
PYDIFF_HOST_DEVICE float log_unit(float u) {
  const uint32_t b = float_bits(u);
  int32_t e = int32_t((b >> 23) & 0xffu) - 127;
  float m = bits_float((b & 0x007fffffu) | 0x3f800000u);  // [1, 2)
  const bool big = m > 1.41421356f;
  m = big ? m * 0.5f : m;
  e = big ? e + 1 : e;
  const float f = m - 1.0f;
  const float s = f / (2.0f + f);  // |s| < 0.172
  const float s2 = s * s;
  const float p = s2 * (0.333333333f + s2 * (0.2f + s2 * (0.142857143f + s2 * 0.111111111f)));
  const float log_m = 2.0f * s + 2.0f * s * p;
  const float ef = float(e);
  return ef * 0.693145752f + (log_m + ef * 1.42860677e-06f);  // ln 2 split in two for accuracy
}

// cos and sin of 2 pi u for u in [0, 1): the quadrant comes exactly from u, the remainder
// |theta| <= pi / 4 goes through Taylor polynomials accurate to float precision.
PYDIFF_HOST_DEVICE void sincos_2pi(float u, float& c, float& s) {
  const int32_t q = int32_t(u * 4.0f + 0.5f);  // 0..4
  const float r = u - float(q) * 0.25f;        // exact, in [-1/8, 1/8]
  const float t = r * 6.28318531f;
  const float t2 = t * t;
  const float sn =
      t * (1.0f +
           t2 * (-1.66666667e-01f + t2 * (8.33333333e-03f + t2 * (-1.98412698e-04f + t2 * 2.75573192e-06f))));
  const float cs =
      1.0f + t2 * (-0.5f + t2 * (4.16666667e-02f +
                                 t2 * (-1.38888889e-03f + t2 * (2.48015873e-05f + t2 * -2.75573192e-07f))));
  const int32_t k = q & 3;
  c = k == 0 ? cs : (k == 1 ? -sn : (k == 2 ? -cs : sn));
  s = k == 0 ? sn : (k == 1 ? cs : (k == 2 ? -sn : -cs));
}

// Two standard normals from two random words: Box-Muller.
PYDIFF_HOST_DEVICE void box_muller(uint32_t a, uint32_t b, float& z0, float& z1) {
  const float rad = sqrt_rn(-2.0f * log_unit(uniform_open0(a)));
  float c, s;
  sincos_2pi(uniform_closed0(b), c, s);
  z0 = rad * c;
  z1 = rad * s;
}

// The Philox block of element group g (elements 4g .. 4g+3) of noise stream (seed, step).
PYDIFF_HOST_DEVICE U32x4 noise_block(uint64_t seed, uint32_t step, uint64_t g) {
  return philox4x32_10(uint32_t(g), uint32_t(g >> 32), step, 0x70796466u /* "pydf" */, uint32_t(seed),
                       uint32_t(seed >> 32));
}

// Four standard normals for element group g: Box-Muller on the two word pairs of its block.
PYDIFF_HOST_DEVICE void normal4(uint64_t seed, uint32_t step, uint64_t g, float out[4]) {
  const U32x4 r = noise_block(seed, step, g);
  box_muller(r.v[0], r.v[1], out[0], out[1]);
  box_muller(r.v[2], r.v[3], out[2], out[3]);
}

}  // namespace pydiff
