// The CPU twin's noise loops: csrc/math/philox.h across many groups at once, on the widest
// instruction set this CPU has, chosen at run time (the build's -march does not decide it), with the
// scalar loop as the fallback and as the oracle of the others.
#include "ops/noise_cpu.h"

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>

#include "math/philox.h"
#include "ops/ops.h"

#if defined(__x86_64__) && defined(__GNUC__)
// GCC 12 warns of the intrinsics headers' own deliberately undefined vectors (_mm*_undefined_*).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#define PYDIFF_NOISE_X86 1
#endif

namespace pydiff {

void normal_groups_scalar(uint64_t seed, uint32_t step, uint64_t g0, int64_t count, float* dst) {
  // Structure-of-arrays loops, so that the compiler may vectorise them for the build's -march.
  constexpr int64_t kG = 64;
  uint32_t w[4][kG];
  float z[4][kG];
  for (int64_t base = 0; base < count; base += kG) {
    const int64_t len = std::min(kG, count - base);
    for (int64_t j = 0; j < len; ++j) {
      const U32x4 r = noise_block(seed, step, g0 + uint64_t(base + j));
      w[0][j] = r.v[0];
      w[1][j] = r.v[1];
      w[2][j] = r.v[2];
      w[3][j] = r.v[3];
    }
    for (int64_t j = 0; j < len; ++j) box_muller(w[0][j], w[1][j], z[0][j], z[1][j]);
    for (int64_t j = 0; j < len; ++j) box_muller(w[2][j], w[3][j], z[2][j], z[3][j]);
    float* d = dst + 4 * base;
    for (int64_t j = 0; j < len; ++j) {
      d[4 * j] = z[0][j];
      d[4 * j + 1] = z[1][j];
      d[4 * j + 2] = z[2][j];
      d[4 * j + 3] = z[3][j];
    }
  }
}

#ifdef PYDIFF_NOISE_X86

// ---- AVX-512F: 16 groups an iteration ----
#pragma GCC push_options
#pragma GCC target("avx512f")
namespace avx512 {
struct V {
  static constexpr int kL = 16;
  using U64 = __m512i;
  using U32 = __m512i;
  using F = __m512;
  using M = __mmask16;
  static U64 set64(uint64_t v) { return _mm512_set1_epi64(int64_t(v)); }
  static U64 iota64(uint64_t g) {
    return _mm512_add_epi64(set64(g), _mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0));
  }
  static U64 srli64(U64 a, int n) { return _mm512_srli_epi64(a, unsigned(n)); }
  static U64 mul_epu32(U64 a, U64 b) { return _mm512_mul_epu32(a, b); }
  static U64 xor3(U64 a, U64 b, U64 c) { return _mm512_ternarylogic_epi64(a, b, c, 0x96); }
  static U32 pack(U64 lo, U64 hi) {
    return _mm512_inserti64x4(_mm512_castsi256_si512(_mm512_cvtepi64_epi32(lo)), _mm512_cvtepi64_epi32(hi),
                              1);
  }
  static U32 set32(uint32_t v) { return _mm512_set1_epi32(int32_t(v)); }
  static U32 add32(U32 a, U32 b) { return _mm512_add_epi32(a, b); }
  static U32 sub32(U32 a, U32 b) { return _mm512_sub_epi32(a, b); }
  static U32 and32(U32 a, U32 b) { return _mm512_and_si512(a, b); }
  static U32 or32(U32 a, U32 b) { return _mm512_or_si512(a, b); }
  static U32 xor32(U32 a, U32 b) { return _mm512_xor_si512(a, b); }
  static U32 srli32(U32 a, int n) { return _mm512_srli_epi32(a, unsigned(n)); }
  static U32 slli32(U32 a, int n) { return _mm512_slli_epi32(a, unsigned(n)); }
  static F as_f(U32 a) { return _mm512_castsi512_ps(a); }
  static U32 as_u32(F a) { return _mm512_castps_si512(a); }
  static F setf(float v) { return _mm512_set1_ps(v); }
  static F add(F a, F b) { return _mm512_add_ps(a, b); }
  static F sub(F a, F b) { return _mm512_sub_ps(a, b); }
  static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static F div(F a, F b) { return _mm512_div_ps(a, b); }
  static F sqrt(F a) { return _mm512_sqrt_ps(a); }
  static F cvt_i32(U32 a) { return _mm512_cvtepi32_ps(a); }
  static U32 cvtt_i32(F a) { return _mm512_cvttps_epi32(a); }
  static M cmpgt(F a, F b) { return _mm512_cmp_ps_mask(a, b, _CMP_GT_OQ); }
  static M test32(U32 a, U32 b) { return _mm512_test_epi32_mask(a, b); }
  static F blendf(M m, F if_clear, F if_set) { return _mm512_mask_blend_ps(m, if_clear, if_set); }
  static U32 blendu(M m, U32 if_clear, U32 if_set) { return _mm512_mask_blend_epi32(m, if_clear, if_set); }
  // dst[4j + w] = z_w[j], j < 16: a 4 x 16 transpose (within 128-bit lanes, then across them).
  static void store_interleaved4(float* dst, F z0, F z1, F z2, F z3) {
    const F a = _mm512_unpacklo_ps(z0, z1), b = _mm512_unpackhi_ps(z0, z1);
    const F c = _mm512_unpacklo_ps(z2, z3), d = _mm512_unpackhi_ps(z2, z3);
    const F e = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(a), _mm512_castps_pd(c)));  // 4l
    const F f = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(a), _mm512_castps_pd(c)));  // 4l+1
    const F g = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(b), _mm512_castps_pd(d)));  // 4l+2
    const F h = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(b), _mm512_castps_pd(d)));  // 4l+3
    const F p = _mm512_shuffle_f32x4(e, f, 0x44), q = _mm512_shuffle_f32x4(g, h, 0x44);
    const F r = _mm512_shuffle_f32x4(e, f, 0xEE), s = _mm512_shuffle_f32x4(g, h, 0xEE);
    _mm512_storeu_ps(dst, _mm512_shuffle_f32x4(p, q, 0x88));
    _mm512_storeu_ps(dst + 16, _mm512_shuffle_f32x4(p, q, 0xDD));
    _mm512_storeu_ps(dst + 32, _mm512_shuffle_f32x4(r, s, 0x88));
    _mm512_storeu_ps(dst + 48, _mm512_shuffle_f32x4(r, s, 0xDD));
  }
};
#include "ops/noise_lanes.inc"
}  // namespace avx512
#pragma GCC pop_options

// ---- AVX2: 8 groups an iteration ----
#pragma GCC push_options
#pragma GCC target("avx2")
namespace avx2 {
struct V {
  static constexpr int kL = 8;
  using U64 = __m256i;
  using U32 = __m256i;
  using F = __m256;
  using M = __m256;  // all-ones lanes where set
  static U64 set64(uint64_t v) { return _mm256_set1_epi64x(int64_t(v)); }
  static U64 iota64(uint64_t g) { return _mm256_add_epi64(set64(g), _mm256_set_epi64x(3, 2, 1, 0)); }
  static U64 srli64(U64 a, int n) { return _mm256_srli_epi64(a, n); }
  static U64 mul_epu32(U64 a, U64 b) { return _mm256_mul_epu32(a, b); }
  static U64 xor3(U64 a, U64 b, U64 c) { return _mm256_xor_si256(_mm256_xor_si256(a, b), c); }
  static U32 pack(U64 lo, U64 hi) {  // the low words of lo's lanes, then hi's
    const __m256 w =
        _mm256_shuffle_ps(_mm256_castsi256_ps(lo), _mm256_castsi256_ps(hi), _MM_SHUFFLE(2, 0, 2, 0));
    return _mm256_permute4x64_epi64(_mm256_castps_si256(w), _MM_SHUFFLE(3, 1, 2, 0));
  }
  static U32 set32(uint32_t v) { return _mm256_set1_epi32(int32_t(v)); }
  static U32 add32(U32 a, U32 b) { return _mm256_add_epi32(a, b); }
  static U32 sub32(U32 a, U32 b) { return _mm256_sub_epi32(a, b); }
  static U32 and32(U32 a, U32 b) { return _mm256_and_si256(a, b); }
  static U32 or32(U32 a, U32 b) { return _mm256_or_si256(a, b); }
  static U32 xor32(U32 a, U32 b) { return _mm256_xor_si256(a, b); }
  static U32 srli32(U32 a, int n) { return _mm256_srli_epi32(a, n); }
  static U32 slli32(U32 a, int n) { return _mm256_slli_epi32(a, n); }
  static F as_f(U32 a) { return _mm256_castsi256_ps(a); }
  static U32 as_u32(F a) { return _mm256_castps_si256(a); }
  static F setf(float v) { return _mm256_set1_ps(v); }
  static F add(F a, F b) { return _mm256_add_ps(a, b); }
  static F sub(F a, F b) { return _mm256_sub_ps(a, b); }
  static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static F div(F a, F b) { return _mm256_div_ps(a, b); }
  static F sqrt(F a) { return _mm256_sqrt_ps(a); }
  static F cvt_i32(U32 a) { return _mm256_cvtepi32_ps(a); }
  static U32 cvtt_i32(F a) { return _mm256_cvttps_epi32(a); }
  static M cmpgt(F a, F b) { return _mm256_cmp_ps(a, b, _CMP_GT_OQ); }
  static M test32(U32 a, U32 b) {
    return _mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_and_si256(a, b), b));  // b: a single bit
  }
  static F blendf(M m, F if_clear, F if_set) { return _mm256_blendv_ps(if_clear, if_set, m); }
  static U32 blendu(M m, U32 if_clear, U32 if_set) {
    return _mm256_castps_si256(
        _mm256_blendv_ps(_mm256_castsi256_ps(if_clear), _mm256_castsi256_ps(if_set), m));
  }
  // dst[4j + w] = z_w[j], j < 8.
  static void store_interleaved4(float* dst, F z0, F z1, F z2, F z3) {
    const F a = _mm256_unpacklo_ps(z0, z1), b = _mm256_unpackhi_ps(z0, z1);
    const F c = _mm256_unpacklo_ps(z2, z3), d = _mm256_unpackhi_ps(z2, z3);
    const F e = _mm256_castpd_ps(_mm256_unpacklo_pd(_mm256_castps_pd(a), _mm256_castps_pd(c)));  // 4l
    const F f = _mm256_castpd_ps(_mm256_unpackhi_pd(_mm256_castps_pd(a), _mm256_castps_pd(c)));  // 4l+1
    const F g = _mm256_castpd_ps(_mm256_unpacklo_pd(_mm256_castps_pd(b), _mm256_castps_pd(d)));  // 4l+2
    const F h = _mm256_castpd_ps(_mm256_unpackhi_pd(_mm256_castps_pd(b), _mm256_castps_pd(d)));  // 4l+3
    _mm256_storeu_ps(dst, _mm256_permute2f128_ps(e, f, 0x20));
    _mm256_storeu_ps(dst + 8, _mm256_permute2f128_ps(g, h, 0x20));
    _mm256_storeu_ps(dst + 16, _mm256_permute2f128_ps(e, f, 0x31));
    _mm256_storeu_ps(dst + 24, _mm256_permute2f128_ps(g, h, 0x31));
  }
};
#include "ops/noise_lanes.inc"
}  // namespace avx2
#pragma GCC pop_options

#endif  // PYDIFF_NOISE_X86

namespace {

SimdIsa cpu_simd_isa() {
#ifdef PYDIFF_NOISE_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) return kSimdAvx512;
  if (__builtin_cpu_supports("avx2")) return kSimdAvx2;
#endif
  return kSimdScalar;
}

SimdIsa env_simd_isa() {
  const SimdIsa best = cpu_simd_isa();
  const char* env = std::getenv("PYDIFF_SIMD_ISA");
  SimdIsa want = best;
  if (env && std::strcmp(env, "scalar") == 0) want = kSimdScalar;
  if (env && std::strcmp(env, "avx2") == 0) want = kSimdAvx2;
  return std::min(want, best);
}

std::atomic<int>& isa_slot() {
  static std::atomic<int> isa{int(env_simd_isa())};
  return isa;
}

}  // namespace

SimdIsa simd_isa() {
  return SimdIsa(isa_slot().load(std::memory_order_relaxed));
}

SimdIsa set_simd_isa(SimdIsa wanted) {
  const SimdIsa isa = std::min(wanted, cpu_simd_isa());
  isa_slot().store(int(isa), std::memory_order_relaxed);
  return isa;
}

void normal_groups(uint64_t seed, uint32_t step, uint64_t g0, int64_t count, float* dst) {
  int64_t done = 0;
#ifdef PYDIFF_NOISE_X86
  switch (simd_isa()) {
    case kSimdAvx512:
      done = count / avx512::V::kL * avx512::V::kL;
      avx512::normal_groups_v(seed, step, g0, done, dst);
      break;
    case kSimdAvx2:
      done = count / avx2::V::kL * avx2::V::kL;
      avx2::normal_groups_v(seed, step, g0, done, dst);
      break;
    default:
      break;
  }
#endif
  if (done < count) normal_groups_scalar(seed, step, g0 + uint64_t(done), count - done, dst + 4 * done);
}

}  // namespace pydiff
